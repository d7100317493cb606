"""
Train the D-AR autoregressive model (stage 2): an unmodified Llama over the tokenizer's codes.

    python train_ar.py --tokenizer runs/tokenizer_small/ckpt.pt        # GPT-small on Fashion-MNIST, a CPU
    torchrun --nproc_per_node=8 train_ar.py --preset GPT-L --tokenizer tokenizer_v1 --data /data/imagenet/train
    python train_ar.py --init-from D-AR-L --data my_folder --lr 1e-4   # fine-tune the released D-AR-L

The loss is eq. 6 (dar.ar_loss), with the paper's settings (LlamaGen's recipe) for GPT-B/L/XL/XXL.
The tokenizer is frozen, so the codes of the ten crops of every image are extracted once into an
int16 array under --codes-dir (--online-encode: at every step, the official way). The run directory
is as train_tokenizer.py's; the checkpoint also records the tokenizer (sample.py uses it) and the
class names.
"""

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dar

# Run settings per preset (the flags' defaults). The paper's: AdamW 4e-4, weight decay 0.05, batch 1024,
# 300 epochs of ImageNet (1,281,167 images: 375,300 steps), decaying to 1e-5 over the last 50 (62,550
# steps), ten crops. GPT-small's samples stop improving by 500 steps (README); GPT-tiny: the tests.
RUN_DEFAULTS = {
    **{p: dict(data=None, global_batch=1024, max_steps=375_300, decay_steps=62_550, lr=4e-4, ema_decay=0.0,
               cfg=(1.1, 8.0), augment=True, log_every=50, ckpt_every=1000, sample_every=1000)
       for p in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL")},
    "GPT-small": dict(data="fashion-mnist", global_batch=64, max_steps=500, decay_steps=234, lr=1e-3,
                      ema_decay=0.99, cfg=1.5, augment=False, log_every=50, ckpt_every=250, sample_every=250),
    "GPT-tiny": dict(data=None, global_batch=8, max_steps=10, decay_steps=1, lr=1e-3, ema_decay=0.9, cfg=1.0,
                     augment=True, log_every=5, ckpt_every=1000, sample_every=1000),
}


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dar.HelpFormatter, add_help=add_help)
    p.add_argument("--preset", default="GPT-small", choices=sorted(dar.GPT_PRESETS),
                   help="model size; its run settings are the defaults below (--preset P --help shows P's)")
    p.add_argument("--tokenizer", help="the frozen tokenizer: tokenizer_v1 or a checkpoint; None: a released "
                   "GPT's (with --init-from), else required")
    p.add_argument("--data", help="an ImageFolder directory (root/<class>/<image>) or fashion-mnist")
    p.add_argument("--out", help="run directory; None: runs/<preset>, or runs/<preset>-from-<name>")
    p.add_argument("--init-from", help="fine-tune these weights (their size): D-AR-L, D-AR-XL or a checkpoint")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if <out>/ckpt.pt exists")
    p.add_argument("--global-batch", type=dar.positive_int, help="sequences per optimizer step, all processes")
    p.add_argument("--micro-batch", type=dar.positive_int, help="per forward and process (accumulation); None: all")
    p.add_argument("--max-steps", type=dar.positive_int, help="optimizer steps")
    p.add_argument("--lr", type=dar.positive_float, help="AdamW learning rate")
    p.add_argument("--decay-steps", type=dar.nonneg_int, help="the last steps, over which lr decays linearly to 1e-5")
    p.add_argument("--weight-decay", type=dar.nonneg_float, default=0.05, help="AdamW, on matrices and embeddings")
    p.add_argument("--beta2", type=dar.decay, default=0.95, help="AdamW beta2")
    p.add_argument("--grad-clip", type=dar.positive_float, default=1.0, help="max gradient norm")
    p.add_argument("--ema-decay", type=dar.decay, help="EMA of the weights (what is sampled); 0: none")
    p.add_argument("--class-dropout", type=dar.fraction, default=0.1, help="p of the null class (for guidance)")
    p.add_argument("--reverse-tokens", action="store_true", help="learn the tokens fine to coarse (the paper's "
                   "ablation of the order); sampling flips them back")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, help="ten crops at 1.1x, else centre crops")
    p.add_argument("--online-encode", action="store_true", help="encode at every step, not once")
    p.add_argument("--codes-dir", help="where extracted codes are kept; None: codes/ beside the run directory")
    p.add_argument("--cfg", type=dar.parse_guidance, help="guidance of the sample grids: 'start,end' or one number")
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
    # a fine-tune of a release is named after it: runs/GPT-small-from-D-AR-L
    from_release = args.init_from in dar.RELEASES
    args.out = args.out or os.path.join("runs", args.preset + (f"-from-{args.init_from}" * from_release))
    args.tokenizer = args.tokenizer or ("tokenizer_v1" if from_release else p.error("--tokenizer is required"))
    args.codes_dir = args.codes_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "codes")
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    return args


# -----------------------------------------------------------------------------
# Codes: the views of every image, encoded once

def views(img, rng, size, augment, one=False):
    """The crops a step may see, (V, 3, S, S): of a centre crop at 1.1x, the corners, the centre and the
    same mirrored (the paper's ten crops), or just the centre crop; one: one of them, drawn with rng."""
    crops = [dar.center_crop(img, size)]
    if augment:
        big = dar.center_crop(img, int(size * 1.1))
        W, H = big.size
        corners = [(0, 0), (W - size, 0), (0, H - size), (W - size, H - size), ((W - size) // 2, (H - size) // 2)]
        crops = [big.crop((x, y, x + size, y + size)) for x, y in corners]
        crops += [c.transpose(0) for c in crops]                    # 0: FLIP_LEFT_RIGHT
    return dar.to_tensor(rng.choice(crops)) if one else torch.stack([dar.to_tensor(c) for c in crops])


@torch.no_grad()
def extract_codes(args, tok, images, rank, world, device):
    """The codes of all views of all images -> (M, V, N) int16 .npy, memory-mapped, named after the
    tokenizer file, the data and the views (later runs reuse it); process r encodes images r, r + world..."""
    V, N, size = 10 if args.augment else 1, tok.cfg.num_tokens, tok.cfg.image_size
    tok_file = dar.find_weights(args.tokenizer, "tokenizer")
    data = os.path.abspath(args.data) if os.path.exists(args.data) else args.data
    key = json.dumps([os.path.abspath(tok_file), os.path.getmtime(tok_file), data, len(images), size, V])
    path = os.path.join(args.codes_dir, f"codes_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
    if not os.path.exists(path + ".done"):
        if rank == 0:
            os.makedirs(args.codes_dir, exist_ok=True)
            np.lib.format.open_memmap(path, "w+", np.int16, (len(images), V, N)).flush()  # codebooks <= 32768
        if world > 1:
            torch.distributed.barrier()
        out = np.load(path, mmap_mode="r+")
        images.transform = functools.partial(views, size=size, augment=args.augment)
        mine = torch.utils.data.Subset(images, range(rank, len(images), world))
        loader = torch.utils.data.DataLoader(mine, batch_size=max(1, 64 // V), num_workers=args.workers,
                                             worker_init_fn=dar.worker_init)
        for j, (x, _) in enumerate(tqdm(loader, desc="extracting codes", disable=rank != 0, dynamic_ncols=True)):
            codes = tok.encode(x.flatten(0, 1).to(device)).view(len(x), V, N)
            out[rank + world * (j * loader.batch_size + np.arange(len(x)))] = codes.cpu().numpy()
        out.flush()
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            open(path + ".done", "w").close()
    return np.load(path, mmap_mode="r")


class CodeDataset(dar.ImageDataset):
    """(codes (N,), label) of image i: one of its stored views (V, N), drawn from (seed, epoch, i)."""

    def image(self, i):
        return self.arrays[i]


def one_code_view(codes, rng):
    return torch.from_numpy(codes[rng.randrange(len(codes))].astype(np.int64))


def finetune_start(args, tok, num_classes, log):
    """The GPT of --init-from (EMA weights when it has them) for num_classes classes: the classes both
    class tables have keep their rows, new rows are drawn as at init, the null class row stays last."""
    gpt = dar.GPT.from_pretrained(args.init_from, block_size=tok.cfg.num_tokens).train()
    old, dim = gpt.cfg.num_classes, gpt.cfg.dim
    log(f"starting from {args.init_from}: {gpt.cfg.n_layer} layers, dim {dim}, {old} classes")
    if num_classes != old:
        table = torch.empty(num_classes + 1, dim).normal_(0, 0.02)
        keep = min(old, num_classes)
        table[:keep], table[-1] = gpt.class_embed.weight.detach()[:keep], gpt.class_embed.weight.detach()[-1]
        gpt.class_embed, gpt.cfg.num_classes = nn.Embedding.from_pretrained(table, freeze=False), num_classes
        log(f"class table resized from {old} to {num_classes} classes (rows 0..{keep - 1} kept, the null class last)")
    return gpt


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dar.setup(args.device, args.threads, args.workers)  # torchrun: a process a GPU
    master, cuda = rank == 0, device.type == "cuda"
    log = dar.logger(args.out, master)               # print + out/log.txt, on process 0

    tok = dar.Tokenizer.from_pretrained(args.tokenizer).to(device).requires_grad_(False)  # frozen
    tokenizer = args.tokenizer if args.tokenizer in dar.RELEASES else os.path.abspath(args.tokenizer)
    log(f"tokenizer: {tokenizer} (frozen)")
    images = dar.build_dataset(args.data, seed=args.seed)

    # ---- start: the run's own checkpoint (resume), else --init-from weights, else the preset
    torch.manual_seed(args.seed)                     # the same initial weights on every process
    ckpt = dar.resume_checkpoint(args, log, master)
    if ckpt:
        model = dar.GPT(dar.GPTConfig(**ckpt["config"]))
    elif args.init_from:
        model = finetune_start(args, tok, len(images.classes), log)
    else:
        model = dar.GPT(dar.gpt_config(args.preset, vocab_size=tok.cfg.codebook_size, block_size=tok.cfg.num_tokens,
                                       num_classes=len(images.classes)))
    dar.check_pair(tok, model)                       # a resumed or fine-tuned GPT writes this tokenizer's codes
    model.cfg.class_dropout, model.cfg.reverse_tokens = args.class_dropout, args.reverse_tokens  # saved with it
    model.to(device).grad_checkpointing = args.grad_checkpointing
    optimizer = dar.make_optimizer(model, args.lr, args.weight_decay, args.beta2, fused=cuda)
    if ckpt:  # weights, optimizer moments, EMA and step: training goes on as if never stopped
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    ema = copy.deepcopy(model).requires_grad_(False).eval() if args.ema_decay > 0 else None
    if ckpt and ckpt["ema"] and ema is not None:
        ema.load_state_dict(ckpt["ema"])
    step = ckpt["step"] if ckpt else 0

    # ---- data: an endless stream of micro-batches from this step on (the same on resume and on N processes)
    if args.online_encode:
        images.transform = functools.partial(views, size=tok.cfg.image_size, augment=args.augment, one=True)
        dataset = images
    else:
        codes = extract_codes(args, tok, images, rank, world, device)
        dataset = CodeDataset(images.labels, images.classes, arrays=codes, transform=one_code_view, seed=args.seed)
    sampler = dar.GlobalBatchSampler(len(dataset), args.global_batch, args.micro_batch, rank, world, args.seed, step)
    batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                               pin_memory=cuda, worker_init_fn=dar.worker_init))
    micro, accum = sampler.micro, sampler.accum      # global batch = processes x micro x accum

    net = torch.compile(model) if args.compile else model
    if world > 1:
        net = DDP(net, device_ids=[device.index] if cuda else None)
    c = model.cfg
    log(f"GPT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {c.n_layer} layers, dim {c.dim}, "
        f"{c.num_classes} classes | {len(dataset)} images | {world} process(es) x micro-batch {micro} x {accum} "
        f"accumulation = {args.global_batch} | {args.max_steps} steps | {device}, {torch.get_num_threads()} threads")

    # ---- the loop
    stop = dar.catch_stop()                          # Ctrl-C / SIGTERM: save, then stop
    loss_sum, since, t0, stopping = 0.0, 0, time.time(), False  # loss summed on the device since the last log
    decay_start = args.max_steps - args.decay_steps
    pbar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    while step < args.max_steps and not stopping:
        # the paper's schedule: constant, then linear to 1e-5 over the last decay_steps
        p = max(0.0, (step - decay_start) / max(args.decay_steps, 1))
        lr = args.lr * (1 - p) + 1e-5 * p
        for group in optimizer.param_groups:
            group["lr"] = lr
        for m in range(accum):
            x, labels = (t.to(device, non_blocking=True) for t in next(batches))
            # class dropout, dropout and the rest of this micro-batch's draws, as in an uninterrupted run
            torch.manual_seed(dar.step_seed(args.seed, step, rank * accum + m))
            codes = tok.encode(x) if args.online_encode else x
            if world > 1:  # DDP averages the gradients in the backward of the last micro-batch only
                net.require_backward_grad_sync = m == accum - 1
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                loss = dar.ar_loss(net, codes, labels, c.class_dropout, c.num_classes, c.reverse_tokens)
            (loss / accum).backward()
            loss_sum += loss.detach() / accum        # no .item(): the host never waits for the device
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            dar.update_ema(ema, model, args.ema_decay)
        step, since = step + 1, since + 1
        pbar.update()

        # ---- every --log-every steps: the loss of all processes, averaged (the only sync), which also
        # tells whether any process was asked to stop; one process stops right after a signal
        stopping = bool(stop) and world == 1
        if step % args.log_every == 0 or step == args.max_steps or stopping:
            values = torch.stack([loss_sum, torch.tensor(float(bool(stop)), device=device)])
            if world > 1:
                torch.distributed.all_reduce(values)
            mean, stopped = (values / world).tolist()
            stopping, mean = stopped > 0, mean / since
            if not math.isfinite(mean):
                raise ValueError(f"non-finite loss at step {step}; resume from {args.out}/ckpt.pt with a lower --lr")
            rate = args.global_batch * c.block_size * since / (time.time() - t0)
            log(f"step {step}/{args.max_steps} | loss {mean:.4f} | lr {lr:.2e} | grad {grad_norm.item():.3f} | "
                f"{rate:.0f} tok/s")
            if master:
                with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(dict(step=step, lr=lr, loss=mean)) + "\n")
            loss_sum, since, t0 = 0.0, 0, time.time()
        if step % args.ckpt_every == 0 or step == args.max_steps or stopping:
            if master:
                dar.save_checkpoint(f"{args.out}/ckpt.pt", model, ema, optimizer=optimizer.state_dict(), step=step,
                                    args=vars(args), tokenizer=tokenizer, classes=images.classes)
            if world > 1:
                torch.distributed.barrier()
        if master and (step % args.sample_every == 0 or step == args.max_steps):  # 4 samples of each of 10 classes
            labels = torch.arange(min(10, c.num_classes), device=device).repeat_interleave(4)
            grid = dar.sample(tok, (ema or model).eval(), labels, args.seed, args.cfg)[-1]  # the EMA: what is sampled
            dar.save_grid(grid, f"{args.out}/samples/ar_{step:07d}.png", nrow=4)
            model.train()
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
