"""
Train the D-AR autoregressive model (stage 2): an unmodified Llama over the tokenizer's codes.

    python train_ar.py --tokenizer runs/tokenizer_small/ckpt.pt    # GPT-small on Fashion-MNIST
    torchrun --nproc_per_node=8 train_ar.py --preset GPT-L --tokenizer tokenizer_v1 \\
        --data /data/imagenet/train
    python train_ar.py --init-from D-AR-L --data my_folder --lr 1e-4   # fine-tune D-AR-L

The loss is eq. 6 (dar.ar_loss), with the paper's settings (LlamaGen's recipe) for GPT-B/L/XL/XXL.
The tokenizer is frozen, so the codes of the ten crops of every image are extracted once, into
an int16 array under --codes-dir. The run directory is as train_tokenizer.py's; the checkpoint
also records the tokenizer (its name, and the digest of its codes: sample.py uses and checks
them) and the class names.
"""

import functools
import hashlib
import json
import os
import random

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import dar

# Run settings per preset (the flags' defaults). The paper's: AdamW 4e-4, weight decay 0.05,
# batch 1024, 300 epochs of ImageNet (375,300 steps), decaying to 1e-5 over the last 50 (62,550
# steps), ten crops. GPT-small's samples stop improving by 500 steps; GPT-tiny: the tests.
PAPER = dict(data=None, global_batch=1024, max_steps=375_300, decay_steps=62_550, lr=4e-4,
             ema_decay=0.0, guidance=(1.1, 8.0), augment=True, log_every=50, ckpt_every=1000,
             sample_every=1000)
RUN_DEFAULTS = {
    **{p: PAPER for p in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL")},
    "GPT-small": dict(data="fashion-mnist", global_batch=64, max_steps=500, decay_steps=234,
                      lr=1e-3, ema_decay=0.99, guidance=1.5, augment=False, log_every=50,
                      ckpt_every=250, sample_every=250),
    "GPT-tiny": dict(data=None, global_batch=8, max_steps=10, decay_steps=1, lr=1e-3,
                     ema_decay=0.9, guidance=1.0, augment=True, log_every=5, ckpt_every=1000,
                     sample_every=1000),
}


def parse_args(argv=None):
    p = dar.parser(__doc__)
    dar.add_run_arguments(p, dar.GPT_PRESETS, "GPT-small")
    p.add_argument("--tokenizer", help="the frozen tokenizer: tokenizer_v1 or a checkpoint; "
                   "None: a released GPT's (with --init-from), else required")
    p.add_argument("--class-dropout", type=dar.fraction, default=0.1, help="p of the null class")
    p.add_argument("--codes-dir", help="where extracted codes are kept; None: codes/ by --out")
    p.add_argument("--guidance", type=dar.parse_guidance, help="of the sample grids")
    p.set_defaults(weight_decay=0.05)
    args = dar.parse_run_args(p, RUN_DEFAULTS, argv)
    release = args.init_from in dar.RELEASES  # a fine-tune of a release is named after it
    args.out = args.out or f"runs/{args.preset}" + f"-from-{args.init_from}" * release
    args.tokenizer = args.tokenizer or ("tokenizer_v1" if release else
                                        p.error("--tokenizer is required"))
    args.codes_dir = args.codes_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                    "codes")
    return args


# -----------------------------------------------------------------------------
# Codes: the views of every image, encoded once

def views(img, rng, size, augment):
    """The crops a step may see, (V, 3, S, S): of a centre crop at 1.1x, the corners, the centre
    and the same mirrored (the paper's ten crops), or just the centre crop."""
    crops = [dar.center_crop(img, size)]
    if augment:
        big = dar.center_crop(img, int(size * 1.1))
        m = big.size[0] - size
        crops = [big.crop((x, y, x + size, y + size))
                 for x, y in ((0, 0), (m, 0), (0, m), (m, m), (m // 2, m // 2))]
        crops += [c.transpose(0) for c in crops]                    # 0: FLIP_LEFT_RIGHT
    return torch.stack([dar.to_tensor(c) for c in crops])


@torch.no_grad()
def extract_codes(args, tok, images, rank, world, device):
    """The codes of all views of all images -> (M, V, N) int16, memory-mapped from --codes-dir,
    named after what decides them (the tokenizer's encoder and codebook, the images, the views):
    later runs reuse it. Rows not yet written are -1, so an extraction that stopped (Ctrl-C, a
    kill) goes on where it did; process r encodes every world-th row left."""
    V, N, size = 10 if args.augment else 1, tok.cfg.num_tokens, tok.cfg.image_size
    key = json.dumps([dar.digest(tok.encoder, tok.quantizer), images.key(), size, V])
    path = os.path.join(args.codes_dir, f"codes_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
    if rank == 0 and not os.path.exists(path):
        os.makedirs(args.codes_dir, exist_ok=True)
        np.lib.format.open_memmap(f"{path}.tmp", "w+", np.int16, (len(images), V, N)).fill(-1)
        os.replace(f"{path}.tmp", path)  # codebooks of at most 32768 codes fit int16
    if world > 1:
        torch.distributed.barrier()
    codes = np.load(path, mmap_mode="r+")
    left = np.flatnonzero(codes.min(axis=(1, 2)) < 0)[rank::world]
    images.transform = functools.partial(views, size=size, augment=args.augment)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, left),
                                         batch_size=max(1, 64 // V), num_workers=args.workers,
                                         worker_init_fn=dar.worker_init)
    done = 0
    for x, _ in tqdm(loader, desc="extracting codes", disable=rank > 0 or not len(left)):
        batch = tok.encode(x.flatten(0, 1).to(device)).view(len(x), V, N)
        codes[left[done:done + len(x)]] = batch.cpu().numpy()
        done += len(x)
    codes.flush()
    if world > 1:
        torch.distributed.barrier()
    return np.load(path, mmap_mode="r")


class CodeDataset(dar.ImageDataset):
    """(codes (N,), label) of image i: one of its stored views (V, N), drawn from (seed, epoch,
    i) as the ten crops are."""

    def __getitem__(self, k):
        epoch, i = divmod(k, len(self))
        view = random.Random(hash((self.seed, epoch, i))).randrange(self.arrays.shape[1])
        return torch.from_numpy(self.arrays[i, view].astype(np.int64)), self.labels[i]


def finetune_start(args, tok, num_classes):
    """The GPT of --init-from (EMA weights when it has them) for num_classes classes: the classes
    both class tables have keep their rows, new rows are drawn as at init, the null class row
    stays last. -> (model, a line for the log)."""
    gpt = dar.GPT.from_pretrained(args.init_from, block_size=tok.cfg.num_tokens).train()
    old, dim = gpt.cfg.num_classes, gpt.cfg.dim
    note = f"starting from {args.init_from}: {gpt.cfg.n_layer} layers, dim {dim}, {old} classes"
    if num_classes != old:
        table, released = torch.empty(num_classes + 1, dim).normal_(0, 0.02), gpt.class_embed.weight
        keep = min(old, num_classes)
        table[:keep], table[-1] = released.detach()[:keep], released.detach()[-1]
        gpt.class_embed = nn.Embedding.from_pretrained(table, freeze=False)
        gpt.cfg.num_classes = num_classes
        note += f", resized to {num_classes} (rows 0..{keep - 1} kept, the null class last)"
    return gpt, note


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dar.setup(args.device, args.threads, args.workers)  # a process a GPU
    ckpt = dar.find_run(args, "gpt", ["class_dropout"])  # the run to resume, or None
    tok = dar.Tokenizer.from_pretrained(args.tokenizer).to(device).requires_grad_(False)  # frozen
    images = dar.build_dataset(args.data, seed=args.seed)

    # ---- the model: the run's own checkpoint, else --init-from weights, else the preset
    torch.manual_seed(args.seed)                   # the same initial weights on every process
    note = None
    if ckpt:
        model = dar.GPT(dar.make_config(dar.GPTConfig, ckpt["config"], args.out))
        model.tokenizer_digest = ckpt.get("tokenizer_digest")
    elif args.init_from:
        model, note = finetune_start(args, tok, len(images.classes))
    else:
        model = dar.GPT(dar.gpt_config(args.preset, vocab_size=tok.cfg.codebook_size,
                                       block_size=tok.cfg.num_tokens,
                                       num_classes=len(images.classes)))
    # a resumed or fine-tuned GPT must write this tokenizer's codes (shapes, digest)
    dar.check_pair(tok, model, args.tokenizer, args.init_from or f"{args.out}/ckpt.pt")
    log = dar.open_run(args, ckpt, rank)           # the run directory is this trainer's now
    release = args.tokenizer in dar.RELEASES
    tokenizer = args.tokenizer if release else os.path.abspath(args.tokenizer)
    recorded = dict(tokenizer=tokenizer, classes=images.classes,  # in every checkpoint
                    tokenizer_digest=dar.digest(tok.encoder, tok.quantizer))
    for line in (f"tokenizer: {tokenizer} (frozen)", note):
        if line:
            log(line)
    c = model.cfg
    c.class_dropout, model.grad_checkpointing = args.class_dropout, args.grad_checkpointing
    optimizer = dar.make_optimizer(model.to(device), args.lr, args.weight_decay, args.beta2,
                                   fused=device.type == "cuda")
    step, ema = dar.restore(ckpt, model, optimizer, args.ema_decay)

    # ---- the data: the codes of the ten crops, extracted once
    codes = extract_codes(args, tok, images, rank, world, device)
    dataset = CodeDataset(images.labels, images.classes, arrays=codes, seed=args.seed)
    batches, accum = dar.batches(dataset, args, rank, world, step, device)
    net = dar.wrap(model, args, device, world)     # torch.compile, DDP
    log(f"GPT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {c.n_layer} "
        f"layers, dim {c.dim}, {c.num_classes} classes | {len(dataset)} images | "
        f"{args.global_batch} a step: {world} process(es) x {accum} micro-batches | "
        f"{args.max_steps} steps | {device}, {torch.get_num_threads()} threads")

    # ---- the loop
    progress, stopping = dar.Progress(args, step, ckpt, rank), False  # a bar, the losses, Ctrl-C
    while step < args.max_steps and not stopping:
        for m in range(accum):
            codes, labels = next(batches)
            with dar.micro_batch(net, args, step, m, accum):  # its seed, DDP sync, autocast
                loss = dar.ar_loss(net, codes, labels, c.class_dropout, c.num_classes)
            (loss / accum).backward()
            progress.add(1 / accum, loss=loss)
        progress.add(grad=dar.optimizer_step(model, optimizer, ema, step, args))  # lr, clip, EMA
        step += 1
        stopping = dar.end_step(args, step, progress, log, model, ema, optimizer,
                                ("tok", args.global_batch * c.block_size), **recorded)
        if rank == 0 and (step % args.sample_every == 0 or step == args.max_steps):
            labels = torch.arange(min(10, c.num_classes), device=device).repeat_interleave(4)
            grid = dar.draw(tok, (ema or model).eval(), labels, args.seed, args.guidance)[-1]
            dar.save_grid(grid, f"{args.out}/samples/ar_{step:07d}.png", nrow=4)  # 4 a class
            model.train()
    dar.finish(progress, step, args, log)


if __name__ == "__main__":
    dar.cli(main)
