"""
Train the D-AR sequential diffusion tokenizer (stage 1).

    python train_tokenizer.py --preset tokenizer_small            # Fashion-MNIST on a CPU, ~10 min
    torchrun --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train
    torchrun --nnodes=2 --node_rank=$RANK --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train

loss = fm + vq + commit + 0.5 LPIPS(image, x1_hat) + 0.5 REPA (paper eq. 7; settings of the official
run: AdamW 2e-4, betas (0.9, 0.95), no weight decay, 500 warm-up steps then constant, clip 1.0,
EMA 0.999, bf16, global batch 512-1024, random crop + flip).

The run directory (--out, default runs/<preset>) receives ckpt.pt (model, EMA, optimizer, step,
config, args, RNG; rewritten atomically every --ckpt-every steps), log.txt, metrics.jsonl and
samples/*.png. Running the same command again resumes from ckpt.pt: same step, same learning
rate, same data order, same random draws (every step reseeds from (seed, step, micro-batch)).

This file also holds the training machinery that train_ar.py shares: the run directory and
checkpoints, the data order, and the loop (gradient accumulation, DDP, EMA, logging).
"""

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dar

# -----------------------------------------------------------------------------
# The run: DDP, directory, log, checkpoints (shared with train_ar.py)


class Run:
    def __init__(self, args):
        self.rank, self.world, self.device = dar.setup_distributed()
        self.master = self.rank == 0
        self.out = args.out
        self.cuda = self.device.type == "cuda"
        if self.master:
            os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        self.barrier()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def mean(self, values):
        """Average a list of floats over all processes (one all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    def log(self, msg):
        if not self.master:
            return
        tqdm.write(msg)
        with open(os.path.join(self.out, "log.txt"), "a") as f:
            f.write(msg + "\n")

    def fail(self, msg):
        self.log(f"error: {msg}")
        if self.world > 1:
            dist.destroy_process_group()
        sys.exit(f"error: {msg}")

    @property
    def ckpt_path(self):
        return os.path.join(self.out, "ckpt.pt")

    def resume_checkpoint(self, args, kind):
        """The checkpoint to resume from: --resume PATH, else the run directory's own, if any."""
        path = args.resume or (self.ckpt_path if os.path.exists(self.ckpt_path) else None)
        if path is None or args.no_resume:
            return None
        ckpt = dar.load_checkpoint(path)
        if ckpt.get("kind") != kind or "optimizer" not in ckpt:
            self.fail(f"{path} is not a {kind} training checkpoint to resume from")
        self.log(f"resuming from {path} at step {ckpt['step']}")
        return ckpt


def rng_state():
    return dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_seed(seed, step, micro):
    """The seed of one micro-batch of one step. Everything random in a step (t, noise, dropout,
    class dropout) is drawn after reseeding with it, so a resumed run repeats the draws of the
    uninterrupted one, and a run gives the same draws on 1 or N processes."""
    return (seed * 1_000_003 + step * 10_007 + micro) % (2 ** 63)


# -----------------------------------------------------------------------------
# Data order (shared with train_ar.py)

class GlobalBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of dataset indices for one process, step after step.

    Each epoch is a seeded permutation cut into global batches; process r takes the r-th
    contiguous slice of each global batch and cuts it into micro-batches. Unlike
    DistributedSampler's interleaving, sample j of a global batch lands in the same micro-batch
    slot whatever the number of processes (1 process x 2 micro-batches = 2 processes x 1), and
    set_epoch(epoch, skip) starts mid-epoch for an exact resume."""

    def __init__(self, n, global_batch, micro_batch, rank, world, seed):
        self.n, self.global_batch, self.micro, self.rank, self.world, self.seed = n, global_batch, micro_batch, rank, world, seed
        self.per_rank = global_batch // world
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch ({global_batch})")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return (self.steps_per_epoch - self.skip) * (self.per_rank // self.micro)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for s in range(self.skip, self.steps_per_epoch):
            mine = perm[s * self.global_batch + self.rank * self.per_rank:][:self.per_rank]
            for m in range(0, self.per_rank, self.micro):
                yield mine[m:m + self.micro]


class Augment:
    """Per-sample augmentation whose randomness is a function of (seed, epoch, index): the same
    crops in a resumed run and with any number of data-loader workers."""

    def __init__(self, fn, seed):
        self.fn, self.seed, self.epoch = fn, seed, 0

    def __call__(self, img, index):
        return dar.to_tensor(self.fn(img, random.Random(hash((self.seed, self.epoch, index)))))


# -----------------------------------------------------------------------------
# The training loop (shared with train_ar.py)

def batch_sizes(args, run):
    micro = args.micro_batch or args.global_batch // run.world
    if args.global_batch % (run.world * micro):
        run.fail(f"--global-batch {args.global_batch} must be a multiple of processes ({run.world}) "
                 f"x --micro-batch ({micro})")
    return micro, args.global_batch // (run.world * micro)


def train(run, args, model, ema, optimizer, dataset, augment, loss_fn, lr_at, total_steps, start_step,
          units=("img", 1), on_log=None, on_sample=None):
    """Optimise `model` for steps start_step..total_steps-1.

    loss_fn(model, x, y) -> (loss, dict of floats to log); lr_at(step) -> learning rate;
    augment.epoch is set at each epoch (per-sample randomness is a function of seed, epoch, index).
    A step: for each of the `accum` micro-batches, reseed, forward under bf16 autocast (CUDA),
    backward of loss / accum (DDP syncs gradients on the last micro-batch only); then clip,
    AdamW, EMA. Every --ckpt-every steps and at the end, rank 0 writes the checkpoint."""
    micro, accum = batch_sizes(args, run)
    net = model
    if args.compile:
        net = torch.compile(net)
    if run.world > 1:
        net = DDP(net, device_ids=[run.device.index] if run.cuda else None)
    sampler = GlobalBatchSampler(len(dataset), args.global_batch, micro, run.rank, run.world, args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.cuda and args.bf16 else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    unit, per_sample = units

    pbar = tqdm(total=total_steps, initial=start_step, disable=not run.master, dynamic_ncols=True, unit="step")
    step, t0, seen, sums, count = start_step, time.time(), 0, {}, 0
    while step < total_steps:
        epoch, skip = divmod(step, sampler.steps_per_epoch)
        sampler.set_epoch(epoch, skip)
        augment.epoch = epoch
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                             pin_memory=run.cuda, persistent_workers=False)
        batches = iter(loader)
        for _ in range(skip, sampler.steps_per_epoch):
            if step >= total_steps:
                break
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logs = {}
            for m in range(accum):
                x, y = next_batch(run, batches)
                x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
                torch.manual_seed(step_seed(args.seed, step, run.rank * accum + m))
                sync = m == accum - 1 or run.world == 1
                with (nullcontext() if sync else net.no_sync()), autocast:
                    loss, parts = loss_fn(net, x, y)
                (loss / accum).backward()
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + v / accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0 else torch.zeros(())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                dar.update_ema(ema, model, args.ema_decay)
            step += 1
            seen += args.global_batch

            # losses of all processes, every step: a NaN stops every process at once
            names = sorted(logs)
            values = run.mean([logs[k] for k in names] + [float(grad_norm)])
            logs, gnorm = dict(zip(names, values[:-1])), values[-1]
            if not all(math.isfinite(v) for v in values):
                run.fail(f"non-finite loss at step {step} ({', '.join(f'{k}={v:.4g}' for k, v in logs.items())}); "
                         f"the last good checkpoint is {run.ckpt_path}: resume with a lower --lr")
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            rate = seen * per_sample / (time.time() - t0)
            pbar.update(1)
            pbar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}", **{f"{unit}/s": f"{rate:.1f}"})
            if run.master:  # one line per step for the exact-resume check and plots
                with open(os.path.join(run.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(dict(step=step, lr=lr, grad_norm=gnorm, **logs)) + "\n")

            if step % args.log_every == 0 or step == total_steps:
                extra = on_log() if on_log else ""
                avg = " ".join(f"{k} {v / count:.4f}" for k, v in sums.items())
                run.log(f"step {step}/{total_steps} epoch {epoch} | {avg} | lr {lr:.2e} | grad {gnorm:.3f} | "
                        f"{rate:.1f} {unit}/s{extra}")
                sums, count = {}, 0
            if step % args.ckpt_every == 0 or step == total_steps:
                if run.master:
                    dar.save_checkpoint(dar.model_checkpoint(
                        model, ema, optimizer=optimizer.state_dict(), step=step, epoch=epoch,
                        args=vars(args), rng=rng_state()), run.ckpt_path)
                run.barrier()
            if on_sample and (step % args.sample_every == 0 or step == total_steps) and run.master:
                on_sample(step)
        del batches, loader
    pbar.close()
    return step


def next_batch(run, batches):
    """The next batch; a bad image (corrupt file...) stops the run with the loader's message."""
    try:
        return next(batches)
    except (ValueError, OSError) as e:  # from a worker, the original error is the last line
        run.fail(str(e).strip().splitlines()[-1])


def benchmark(run, args, model, loss_fn, optimizer, make_batch, unit, per_sample, steps=10, warmup=3):
    """--benchmark: time whole optimizer steps (forward, backward, clip, AdamW) of the real model and
    loss on synthetic data already on the device (no loader, no disk), after warm-up (and
    compilation). Prints the median, throughput, FLOPs and peak memory."""
    from torch.utils.flop_counter import FlopCounterMode
    net = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.cuda and args.bf16 else nullcontext()
    x, y = make_batch()

    def step():
        with autocast:
            loss, _ = loss_fn(net, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.cuda:
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:  # counted on the eager model
        with autocast:
            loss, _ = loss_fn(model, x, y)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    flops = counter.get_total_flops()
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if run.cuda else peak_rss_gib()
    device = torch.cuda.get_device_name() if run.cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"benchmark {args.preset} | batch {len(x)} | {device} | compile {args.compile} | "
          f"median step {med * 1e3:.1f} ms over {steps} | {len(x) * per_sample / med:.1f} {unit}/s | "
          f"{flops / med / 1e12:.3f} TFLOP/s ({flops / 1e9:.1f} GFLOP per step) | peak memory {mem:.2f} GiB")
    return med


def peak_rss_gib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def add_common_args(p):
    p.add_argument("--data", help="ImageFolder directory (root/<class>/<image>) or a built-in name: "
                   + ", ".join(dar.BUILTIN_DATASETS))
    p.add_argument("--image-size", type=int, help="images are cropped (or padded) to this size")
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--global-batch", type=int, help="images per optimizer step, over all processes")
    p.add_argument("--micro-batch", type=int, help="images per forward per process (gradient accumulation "
                   "when global batch > processes x micro batch; default: no accumulation)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--lr", type=float)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, help="0 disables the EMA")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the official augmentations (default: on, except for the GPT-small preset whose "
                   "CPU budget affords one view per image); --no-augment: centre crops only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) // 2)
    p.add_argument("--log-every", type=int, help="steps between log lines (default 50)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default 1000)")
    p.add_argument("--sample-every", type=int, help="steps between sample images (default 1000)")
    p.add_argument("--resume", help="checkpoint to resume from (default: <out>/ckpt.pt when it exists)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if <out>/ckpt.pt exists")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (CPU runs are fp32)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~30%% slower")
    p.add_argument("--benchmark", action="store_true", help="time training steps on synthetic data "
                   "(batch: --micro-batch, default --global-batch) and exit")


COMMON_DEFAULTS = dict(log_every=50, ckpt_every=1000, sample_every=1000, augment=True)


def finish_args(args, run_defaults):
    """Fill the flags left unset from the preset's run defaults."""
    for k, v in {**COMMON_DEFAULTS, **run_defaults}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.compile is None:
        args.compile = torch.cuda.is_available()
    args.out = args.out or os.path.join("runs", args.preset)
    return args


def make_optimizer(model, args, cuda):
    """AdamW; weight decay on matrices and embeddings (dim >= 2), none on norms, biases, gates."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=cuda)


def prepare(run, args, make_model, kind, n_images, name):
    """The model (seeded), its EMA copy, AdamW, the step to resume from (0 for a new run) and the
    number of steps of the run; logs what is about to be trained."""
    torch.manual_seed(args.seed)
    model = make_model().to(run.device)
    ema = None
    if args.ema_decay > 0:
        ema = make_model().to(run.device).requires_grad_(False).eval()
        ema.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model, args, run.cuda)
    ckpt = run.resume_checkpoint(args, kind)
    start = restore(ckpt, model, ema, optimizer) if ckpt else 0
    micro, accum = batch_sizes(args, run)
    total = args.max_steps or args.epochs * (n_images // args.global_batch)
    run.log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {n_images} images | "
            f"{run.world} process(es) x micro-batch {micro} x {accum} accumulation = {args.global_batch} | "
            f"{total} steps | device {run.device}")
    return model, ema, optimizer, start, total


def restore(ckpt, model, ema, optimizer):
    model.load_state_dict(ckpt["model"])
    if ema is not None:
        ema.load_state_dict(ckpt.get("ema") or ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"]


# -----------------------------------------------------------------------------
# Tokenizer losses: LPIPS (VGG) and REPA (DINOv2 ViT-B/14)

def build_lpips(random_init, device):
    """LPIPS with the VGG16 backbone, as the official training. The lpips package ships its linear
    heads; the VGG16 weights come from torchvision's download."""
    import lpips
    try:
        net = lpips.LPIPS(net="vgg", pnet_rand=random_init, verbose=False)
    except Exception as e:
        raise RuntimeError(f"LPIPS needs the VGG16 ImageNet weights, which could not be loaded ({e}); "
                           f"put them in the torch hub cache or train without LPIPS: --lpips-weight 0") from None
    return net.eval().requires_grad_(False).to(device)


class RepaTarget(torch.nn.Module):
    """Frozen DINOv2 ViT-B/14 patch tokens (B, 256, 768) of the input images: the REPA target.
    Input: images in [-1, 1] -> [0, 1] -> ImageNet normalisation -> bicubic resize to 224, as the
    official code. random_init builds a randomly initialised ViT-B/14 of the same shape instead
    (torchvision's VisionTransformer), for offline smoke tests: the loss runs but means nothing."""

    def __init__(self, random_init):
        super().__init__()
        self.random_init = random_init
        if random_init:
            from torchvision.models import VisionTransformer
            self.net = VisionTransformer(image_size=224, patch_size=14, num_layers=12, num_heads=12,
                                         hidden_dim=768, mlp_dim=3072)
        else:
            try:
                self.net = torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")
            except Exception as e:
                raise RuntimeError(f"REPA needs DINOv2 ViT-B/14 from torch.hub, which could not be loaded "
                                   f"({e}); put it in the torch hub cache or train without REPA: "
                                   f"--repa-weight 0") from None
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images):
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=224, mode="bicubic")
        if not self.random_init:
            return self.net.forward_features(x)["x_norm_patchtokens"]
        n = self.net  # torchvision ViT: the encoder's normalised tokens without the class token
        tokens = n._process_input(x)
        tokens = torch.cat([n.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return n.encoder(tokens)[:, 1:]


class TokenizerLoss:
    """loss = fm + vq + commit + w_lpips LPIPS(image, x1_hat) + w_repa (1 - cos(DINOv2, REPA proj.))."""

    def __init__(self, args, device):
        self.args = args
        random_init = args.loss_backbones == "random"
        self.lpips = build_lpips(random_init, device) if args.lpips_weight > 0 else None
        self.repa = RepaTarget(random_init).to(device) if args.repa_weight > 0 else None
        self.recent_codes = []

    def __call__(self, model, images, labels):
        out = model(images, repa=self.repa is not None)
        loss = out["fm_loss"] + out["vq_loss"] + out["commit_loss"]
        parts = dict(fm=out["fm_loss"].item(), vq=out["vq_loss"].item(), commit=out["commit_loss"].item())
        if self.lpips is not None:
            lp = self.lpips(images.float(), out["x1_hat"].float()).mean()
            loss = loss + self.args.lpips_weight * lp
            parts["lpips"] = lp.item()
        if self.repa is not None:
            target = self.repa(images)                                      # (B, 256, 768)
            n = out["repa_feats"].shape[1]
            if n != target.shape[1]:  # images below 256 px: pool DINOv2's 16x16 grid to the DiT's
                side = int(math.isqrt(n))
                grid = target.transpose(1, 2).unflatten(2, (16, 16))
                target = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
            rp = (1 - F.cosine_similarity(out["repa_feats"].float(), target.float(), dim=-1)).mean()
            loss = loss + self.args.repa_weight * rp
            parts["repa"] = rp.item()
        # codebook statistics (this process's batches): usage over the last 100 steps, and the
        # official "dead code rate": the fraction of token positions whose code is the same for
        # the whole batch (a sign of collapse)
        codes = out["codes"].detach()
        self.recent_codes = (self.recent_codes + [codes.flatten().cpu()])[-100:]
        parts["dead"] = (codes.float().std(0) < 1e-5).float().mean().item() if codes.shape[0] > 1 else 0.0
        parts["loss"] = loss.item()
        return loss, parts

    def usage(self, codebook_size):
        return torch.cat(self.recent_codes).unique().numel() / codebook_size if self.recent_codes else 0.0


# -----------------------------------------------------------------------------
# Images to look at: reconstructions and previews

@torch.no_grad()
def save_samples(model, images, path_recon, path_preview):
    """Inputs above their decodes; and one row per image of the jump estimate after each group."""
    model.eval()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).to(images.device)
    codes = model.encode(images)
    states = list(model.decode_steps(codes, noise))
    dar.save_grid(torch.cat([images, states[-1].preview]), path_recon, nrow=len(images))
    k = min(4, len(images))
    strip = torch.stack([s.preview[:k] for s in states], dim=1)                    # (k, steps, 3, H, W)
    dar.save_grid(torch.cat([strip, images[:k, None]], dim=1).flatten(0, 1), path_preview, nrow=len(states) + 1)


# -----------------------------------------------------------------------------

# run defaults per preset: the paper's for tokenizer_v1, a 2-core CPU budget for the small ones
RUN_DEFAULTS = {
    "tokenizer_v1": dict(data=None, global_batch=512, epochs=100, lr=2e-4, weight_decay=0.0, warmup=500,
                         ema_decay=0.999, lpips_weight=0.5, repa_weight=0.5),
    "tokenizer_small": dict(data="fashion-mnist", global_batch=32, epochs=1, max_steps=1800, lr=1e-3,
                            weight_decay=0.0, warmup=100, ema_decay=0.99, lpips_weight=0.0, repa_weight=0.0,
                            log_every=50, ckpt_every=250, sample_every=500),
    "tokenizer_tiny": dict(data=None, global_batch=8, epochs=1, lr=1e-3, weight_decay=0.0, warmup=2,
                           ema_decay=0.9, lpips_weight=0.0, repa_weight=0.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tokenizer_small", choices=sorted(dar.TOKENIZER_PRESETS))
    add_common_args(p)
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then a constant learning rate")
    p.add_argument("--lpips-weight", type=float, help="0.5 in the paper; 0 turns LPIPS off")
    p.add_argument("--repa-weight", type=float, help="0.5 in the paper; 0 turns REPA off")
    p.add_argument("--loss-backbones", choices=["pretrained", "random"], default="pretrained",
                   help="'random': randomly initialised VGG / ViT-B/14 for offline smoke tests")
    args = p.parse_args(argv)
    return finish_args(args, RUN_DEFAULTS[args.preset])


def main(argv=None):
    args = parse_args(argv)
    run = Run(args)
    if args.benchmark:
        return run_benchmark(run, args)
    if args.data is None:
        run.fail("--data is required for this preset (an ImageFolder directory or a built-in name)")
    cfg = dar.tokenizer_config(args.preset, **({"image_size": args.image_size} if args.image_size else {}))
    args.image_size = cfg.image_size
    if args.repa_weight <= 0:
        cfg.repa_dim = 0  # no projector to train

    size = cfg.image_size
    crop = (lambda img, rng: dar.center_crop(img, size)) if not args.augment else \
        (lambda img, rng: flip(dar.random_crop(img, size, rng), rng))
    try:
        dataset = dar.build_dataset(args.data, Augment(crop, args.seed))
        loss_fn = TokenizerLoss(args, run.device)
    except (OSError, ValueError, RuntimeError) as e:
        run.fail(str(e))

    model, ema, optimizer, start, total = prepare(run, args, lambda: dar.Tokenizer(cfg), "dar.tokenizer",
                                                  len(dataset), f"tokenizer {args.preset}")
    model.set_grad_checkpointing(args.grad_checkpointing)

    try:  # a fixed set of images to reconstruct now and then
        fixed = torch.stack([dar.to_tensor(dar.center_crop(dataset.image(i), size))
                             for i in range(min(8, len(dataset)))]).to(run.device)
    except ValueError as e:
        run.fail(str(e))

    def on_sample(step):
        save_samples(ema or model, fixed, os.path.join(run.out, "samples", f"recon_{step:07d}.png"),
                     os.path.join(run.out, "samples", f"preview_{step:07d}.png"))
        model.train()

    model.train()
    train(run, args, model, ema, optimizer, dataset, dataset.transform, loss_fn,
          lr_at=lambda s: args.lr * min(1.0, (s + 1) / max(args.warmup, 1)),
          total_steps=total, start_step=start,
          on_log=lambda: f" | codebook usage {loss_fn.usage(cfg.codebook_size):.3f}", on_sample=on_sample)
    run.log(f"done: {run.ckpt_path}")
    if run.world > 1:
        dist.destroy_process_group()


def run_benchmark(run, args):
    cfg = dar.tokenizer_config(args.preset, **({"image_size": args.image_size} if args.image_size else {}))
    if args.repa_weight <= 0:
        cfg.repa_dim = 0
    args.loss_backbones = "random"  # same compute as the pretrained VGG / DINOv2, no download
    torch.manual_seed(0)
    model = dar.Tokenizer(cfg).to(run.device).train()
    model.set_grad_checkpointing(args.grad_checkpointing)
    B, S = args.micro_batch or args.global_batch, cfg.image_size
    benchmark(run, args, model, TokenizerLoss(args, run.device), make_optimizer(model, args, run.cuda),
              lambda: (torch.rand(B, 3, S, S, device=run.device) * 2 - 1, torch.zeros(B, dtype=torch.long, device=run.device)),
              "img", 1)


def flip(img, rng):
    from PIL import Image
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


if __name__ == "__main__":
    main()
