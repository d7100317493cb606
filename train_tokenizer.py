"""
Train the D-AR sequential diffusion tokenizer (stage 1).

    python train_tokenizer.py                          # tokenizer_small on Fashion-MNIST, a CPU, ~15 min
    torchrun --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train
    torchrun --nnodes=2 --node_rank=$RANK --master_addr=$HOST --master_port=29500 \\
        --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train
    python train_tokenizer.py --init-from tokenizer_v1 --data my_folder --lr 1e-5   # fine-tune the released one

The loss is eq. 7 (dar.tokenizer_loss): flow matching + VQ + commitment + 0.5 LPIPS + 0.5 REPA, with
the official run's settings for tokenizer_v1. The run directory (--out) gets ckpt.pt (every
--ckpt-every steps, at the end and on Ctrl-C / SIGTERM), log.txt, metrics.jsonl and samples/; the
same command again resumes from ckpt.pt exactly (the same data order and random draws).
"""

import argparse
import copy
import functools
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dar

# Run settings per preset (the flags' defaults): the official run's for tokenizer_v1; for the small
# one, what 2 CPU cores afford in about 15 minutes (README: small scale); the tiny one is for tests.
RUN_DEFAULTS = {
    "tokenizer_v1": dict(data=None, global_batch=512, max_steps=210_000, lr=2e-4, warmup=500, decay_steps=0,
                         ema_decay=0.999, lpips_weight=0.5, repa_weight=0.5, log_every=50, ckpt_every=1000,
                         sample_every=1000),
    "tokenizer_small": dict(data="fashion-mnist", global_batch=32, max_steps=2600, lr=3e-3, warmup=100,
                            decay_steps=1300, ema_decay=0.998, lpips_weight=0.0, repa_weight=0.0, log_every=50,
                            ckpt_every=250, sample_every=500),
    "tokenizer_tiny": dict(data=None, global_batch=8, max_steps=10, lr=1e-3, warmup=2, decay_steps=0, ema_decay=0.9,
                           lpips_weight=0.0, repa_weight=0.0, log_every=5, ckpt_every=1000, sample_every=1000),
}


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dar.HelpFormatter, add_help=add_help)
    p.add_argument("--preset", default="tokenizer_small", choices=sorted(dar.TOKENIZER_PRESETS),
                   help="model size; its run settings are the defaults below (--preset P --help shows P's)")
    p.add_argument("--data", help="an ImageFolder directory (root/<class>/<image>) or fashion-mnist")
    p.add_argument("--out", help="run directory; None: runs/<preset>")
    p.add_argument("--init-from", help="fine-tune these weights (their size): tokenizer_v1 or a checkpoint")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if <out>/ckpt.pt exists")
    p.add_argument("--image-size", type=dar.positive_int, help="training resolution; None: the preset's")
    p.add_argument("--time-shift", type=dar.positive_float, help="beta of eqs. 5 and 8; None: the preset's")
    p.add_argument("--global-batch", type=dar.positive_int, help="images per optimizer step, all processes")
    p.add_argument("--micro-batch", type=dar.positive_int, help="per forward and process (accumulation); None: all")
    p.add_argument("--max-steps", type=dar.positive_int, help="optimizer steps")
    p.add_argument("--lr", type=dar.positive_float, help="AdamW learning rate, after a linear warm-up")
    p.add_argument("--warmup", type=dar.nonneg_int, help="warm-up steps")
    p.add_argument("--decay-steps", type=dar.nonneg_int, help="the last steps, over which lr decays linearly to 1e-5")
    p.add_argument("--weight-decay", type=dar.nonneg_float, default=0.0, help="AdamW, on matrices and embeddings")
    p.add_argument("--beta2", type=dar.decay, default=0.95, help="AdamW beta2")
    p.add_argument("--grad-clip", type=dar.positive_float, default=1.0, help="max gradient norm")
    p.add_argument("--ema-decay", type=dar.decay, help="EMA of the weights (what is sampled); 0: none")
    p.add_argument("--lpips-weight", type=dar.nonneg_float, help="lambda_1 of eq. 7 (0.5 in the paper); 0: off")
    p.add_argument("--repa-weight", type=dar.nonneg_float, help="lambda_2 of eq. 7 (0.5 in the paper); 0: off")
    p.add_argument("--loss-backbones", choices=["pretrained", "random"], default="pretrained", help="random: "
                   "untrained networks, for offline smoke tests (the losses mean nothing)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="random crops, flips")
    p.add_argument("--seed", type=int, default=0, help="of the weights, the data order and every draw")
    p.add_argument("--device", default=dar.DEVICE, choices=["cuda", "mps", "cpu"])
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast; None: on with cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile; None: on with cuda")
    p.add_argument("--grad-checkpointing", action="store_true", help="less memory, ~30%% more compute")
    p.add_argument("--threads", type=dar.positive_int, help="compute threads; None: the cores less the workers")
    p.add_argument("--workers", type=dar.nonneg_int, default=0, help="data-loader processes per process")
    p.add_argument("--log-every", type=dar.positive_int, help="steps between log lines (and metrics.jsonl)")
    p.add_argument("--ckpt-every", type=dar.positive_int, help="steps between checkpoints")
    p.add_argument("--sample-every", type=dar.positive_int, help="steps between sample grids")
    return p


def parse_args(argv=None):
    preset = build_parser(add_help=False).parse_known_args(argv)[0].preset  # its settings are the defaults
    p = build_parser()
    p.set_defaults(**RUN_DEFAULTS[preset])
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", args.preset)
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    return args


# -----------------------------------------------------------------------------
# Data: the official augmentation (ADM's random_crop_arr, then a flip), or centre crops; rng is seeded
# per (seed, epoch, image) by the data set, so a resumed run sees the same crops.

def augment(img, rng, size):
    img = dar.fit_shorter_side(img, rng.randint(size, math.ceil(size / 0.8)))  # shorter side in [S, S / 0.8]
    x, y = rng.randint(0, img.size[0] - size), rng.randint(0, img.size[1] - size)
    img = img.crop((x, y, x + size, y + size))
    return dar.to_tensor(img.transpose(0) if rng.random() < 0.5 else img)     # 0: FLIP_LEFT_RIGHT


def centre(img, rng, size):  # --no-augment
    return dar.to_tensor(dar.center_crop(img, size))


# -----------------------------------------------------------------------------
# The two extra losses of eq. 7 need pretrained networks, loaded here and passed to tokenizer_loss

def build_lpips(random_init, device):
    """LPIPS on VGG16, as the official training (heads in the lpips package, VGG16 from torchvision)."""
    import lpips
    try:
        return lpips.LPIPS(net="vgg", pnet_rand=random_init, verbose=False).eval().requires_grad_(False).to(device)
    except Exception as e:
        raise OSError(f"LPIPS needs the VGG16 ImageNet weights ({dar.one_line(e)}): put them in the torch hub "
                      f"cache, or train without LPIPS: --lpips-weight 0") from None


class RepaTarget(nn.Module):
    """Frozen DINOv2 ViT-B/14 patch tokens (B, 256, 768) of the input images, the REPA target: [-1, 1]
    -> ImageNet normalisation -> bicubic 224 px, as the official code. random_init: a random 14 x 14
    patch embedding of the same output instead (offline smoke tests)."""

    def __init__(self, random_init):
        super().__init__()
        try:
            self.net = nn.Conv2d(3, 768, 14, 14) if random_init else torch.hub.load("facebookresearch/dinov2",
                                                                                     "dinov2_vitb14")
        except Exception as e:
            raise OSError(f"REPA needs DINOv2 ViT-B/14 from torch.hub ({dar.one_line(e)}): put it in the torch hub "
                          f"cache, or train without REPA: --repa-weight 0") from None
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images):
        x = F.interpolate(((images.float() + 1) / 2 - self.mean) / self.std, size=224, mode="bicubic")
        if isinstance(self.net, nn.Conv2d):
            return self.net(x).flatten(2).transpose(1, 2)
        return self.net.forward_features(x)["x_norm_patchtokens"]


def finetune_start(args, log):
    """The tokenizer of --init-from (EMA weights when it has them) for this run: its size, this run's
    image size, and a REPA projector only if the run trains REPA (the file's, or a new one)."""
    tok = dar.Tokenizer.from_pretrained(args.init_from)
    repa = args.repa_weight > 0
    model = dar.Tokenizer(replace(tok.cfg, image_size=args.image_size or tok.cfg.image_size,
                                  repa_dim=(tok.cfg.repa_dim or 768) if repa else 0))
    # every weight of the file (the size is its own), but a REPA projector this run does not train; a
    # new projector keeps its init
    model.load_state_dict({k: v for k, v in tok.state_dict().items() if repa or not k.startswith("dit.repa.")},
                          strict=False)
    c = model.cfg
    log(f"starting from {args.init_from}: {c.image_size} px, {c.num_tokens} tokens in {c.num_groups} groups, "
        f"codebook {c.codebook_size}, REPA projector {'none' if not repa else 'the file' if tok.cfg.repa_dim else 'new'}")
    return model


@torch.no_grad()
def save_samples(model, images, step, out):
    """recon_<step>.png: inputs over their decodes; preview_<step>.png: the jump estimate after each step"""
    model.eval()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).to(images.device)
    states = list(model.decode_steps(model.encode(images), noise))
    dar.save_grid(torch.cat([images, states[-1].preview]), f"{out}/samples/recon_{step:07d}.png", nrow=len(images))
    strip = torch.stack([s.preview[:4] for s in states] + [images[:4]], dim=1)       # (4, steps + 1, 3, H, W)
    dar.save_grid(strip.flatten(0, 1), f"{out}/samples/preview_{step:07d}.png", nrow=len(states) + 1)
    model.train()


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dar.setup(args.device, args.threads, args.workers)  # torchrun: a process a GPU
    master, cuda = rank == 0, device.type == "cuda"
    log = dar.logger(args.out, master)               # print + out/log.txt, on process 0

    # ---- start: the run's own checkpoint (resume), else --init-from weights, else the preset
    torch.manual_seed(args.seed)                     # the same initial weights on every process
    ckpt = dar.resume_checkpoint(args, log, master)
    if ckpt:
        model = dar.Tokenizer(dar.TokenizerConfig(**ckpt["config"]))
    elif args.init_from:
        model = finetune_start(args, log)
    else:
        changes = {k: v for k, v in dict(image_size=args.image_size, time_shift=args.time_shift).items() if v}
        try:
            model = dar.Tokenizer(dar.tokenizer_config(args.preset, **changes, repa_dim=768 * (args.repa_weight > 0)))
        except ValueError as e:  # an image size the patch sizes do not divide
            raise ValueError(f"--image-size {args.image_size}: {e}") from None
    model.to(device).set_grad_checkpointing(args.grad_checkpointing)
    optimizer = dar.make_optimizer(model, args.lr, args.weight_decay, args.beta2, fused=cuda)
    if ckpt:  # weights, optimizer moments, EMA and step: training goes on as if never stopped
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    ema = copy.deepcopy(model).requires_grad_(False).eval() if args.ema_decay > 0 else None
    if ckpt and ckpt["ema"] and ema is not None:
        ema.load_state_dict(ckpt["ema"])
    step = ckpt["step"] if ckpt else 0

    # ---- data: an endless stream of micro-batches from this step on (the same on resume and on N processes)
    size = model.cfg.image_size
    dataset = dar.build_dataset(args.data, functools.partial(augment if args.augment else centre, size=size), seed=args.seed)
    sampler = dar.GlobalBatchSampler(len(dataset), args.global_batch, args.micro_batch, rank, world, args.seed, step)
    batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                               pin_memory=cuda, worker_init_fn=dar.worker_init))
    micro, accum = sampler.micro, sampler.accum      # global batch = processes x micro x accum
    first = {label: i for i, label in reversed(list(enumerate(dataset.labels)))}  # of each class: shown
    picks = (sorted(first.values()) + list(range(0, len(dataset), max(1, len(dataset) // 8))))[:8]  # at sample steps
    fixed = torch.stack([dar.to_tensor(dar.center_crop(dataset.image(i), size)) for i in picks]).to(device)
    backbones = args.loss_backbones == "random"
    lpips = build_lpips(backbones, device) if args.lpips_weight > 0 else None
    repa = RepaTarget(backbones).to(device) if args.repa_weight > 0 else None

    net = torch.compile(model) if args.compile else model
    if world > 1:
        net = DDP(net, device_ids=[device.index] if cuda else None)
    log(f"tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {size} px | "
        f"{len(dataset)} images | {world} process(es) x micro-batch {micro} x {accum} accumulation = "
        f"{args.global_batch} | {args.max_steps} steps | {device}, {torch.get_num_threads()} threads")

    # ---- the loop
    stop = dar.catch_stop()                          # Ctrl-C / SIGTERM: save, then stop
    sums, since, t0, stopping = {}, 0, time.time(), False  # loss terms summed on the device since the last log
    pbar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    while step < args.max_steps and not stopping:
        # the official schedule: linear warm-up, then constant (the EMA does the averaging a decay would);
        # --decay-steps ends short runs on a linear decay to 1e-5 (tokenizer_small: README, small scale)
        p = max(0.0, (step - args.max_steps + args.decay_steps) / max(args.decay_steps, 1))
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1)) * (1 - p) + 1e-5 * p
        for group in optimizer.param_groups:
            group["lr"] = lr
        for m in range(accum):
            images = next(batches)[0].to(device, non_blocking=True)
            # t, the noise and the rest of this micro-batch's draws, as in an uninterrupted run
            torch.manual_seed(dar.step_seed(args.seed, step, rank * accum + m))
            if world > 1:  # DDP averages the gradients in the backward of the last micro-batch only
                net.require_backward_grad_sync = m == accum - 1
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                loss, terms, codes = dar.tokenizer_loss(net, images, lpips, repa, args.lpips_weight, args.repa_weight)
            (loss / accum).backward()
            for k, v in dict(loss=loss, **terms).items():  # no .item(): the host never waits for the device
                sums[k] = sums.get(k, 0.0) + v.detach() / accum
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            dar.update_ema(ema, model, args.ema_decay)
        step, since = step + 1, since + 1
        pbar.update()

        # ---- every --log-every steps: the losses of all processes, averaged (the only sync), which
        # also tell whether any process was asked to stop; one process stops right after a signal
        stopping = bool(stop) and world == 1
        if step % args.log_every == 0 or step == args.max_steps or stopping:
            values = torch.stack([*sums.values(), torch.tensor(float(bool(stop)), device=device)])
            if world > 1:
                torch.distributed.all_reduce(values)
            *means, stopped = (values / world).tolist()
            stopping = stopped > 0
            logs = {k: v / since for k, v in zip(sums, means)}
            if not all(map(math.isfinite, logs.values())):
                raise ValueError(f"non-finite loss at step {step}; resume from {args.out}/ckpt.pt with a lower --lr")
            logs["codes_used"] = codes.unique().numel() / model.cfg.codebook_size  # of the last micro-batch
            rate = args.global_batch * since / (time.time() - t0)
            log(f"step {step}/{args.max_steps} | " + " ".join(f"{k} {v:.4f}" for k, v in logs.items()) +
                f" | lr {lr:.2e} | grad {grad_norm.item():.3f} | {rate:.1f} img/s")
            if master:
                with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(dict(step=step, lr=lr, **logs)) + "\n")
            sums, since, t0 = {}, 0, time.time()
        if step % args.ckpt_every == 0 or step == args.max_steps or stopping:
            if master:
                dar.save_checkpoint(f"{args.out}/ckpt.pt", model, ema, optimizer=optimizer.state_dict(), step=step,
                                    args=vars(args))
            if world > 1:
                torch.distributed.barrier()
        if master and (step % args.sample_every == 0 or step == args.max_steps):
            save_samples(ema or model, fixed, step, args.out)  # the EMA weights are what sample.py uses
    dar.catch_stop(False)
    if stopping:  # one line, and a non-zero exit status: the run did not finish
        sys.exit(f"stopped by {stop[0] if stop else 'another process'} at step {step}, saved in {args.out}/ckpt.pt: "
                 f"the same command resumes" if master else 1)
    log(f"done: {args.out}/ckpt.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input, missing files or weights: one line
        sys.exit(f"error: {str(e).strip().splitlines()[-1]}")
