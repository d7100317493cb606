"""
Train the D-AR autoregressive model (stage 2): an unmodified Llama over the tokenizer's codes.

    python train_ar.py --preset GPT-small --tokenizer runs/tokenizer_small/ckpt.pt   # Fashion-MNIST, CPU
    torchrun --nproc_per_node=8 train_ar.py --preset GPT-L --tokenizer tokenizer_v1 \\
        --data /data/imagenet/train
    python train_ar.py --init-from D-AR-L --data my_folder --lr 1e-4   # fine-tune the released D-AR-L

The loss is eq. 6's cross-entropy on the N = 256 tokens given the class, the class dropped to the
null class with p = 0.1 for classifier-free guidance (dar.ar_loss). Paper settings (LlamaGen's
recipe), the defaults of the GPT-B/L/XL/XXL presets: AdamW 4e-4, betas (0.9, 0.95), weight decay
0.05 on matrices and embeddings, batch 1024, 300 epochs with the learning rate decaying linearly
to 1e-5 over the last 50, clip 1.0, bf16. Augmentation: centre crop at 1.1x, then one of ten crops
(four corners, centre, and their mirror images).

The tokenizer (ours or the official D-AR-tokenizer_v1.pt) is frozen. Rather than encoding every
image at every step, the codes of all ten crops of every image are extracted once (in parallel
over the processes) into a compact int16 array under --codes-dir, reused by later epochs and
later runs; each step then reads one of the ten views per image. --online-encode encodes on the
fly instead (the official way: slower, but needs no disk).
"""

import argparse
import copy
import hashlib
import json
import os
import random

import numpy as np
import torch
from tqdm import tqdm

import dar

# Run settings per preset: the paper's for the paper's sizes; GPT-small is what 2 CPU cores afford
# in about 20 minutes (one view per image: the ten-crop extraction of 60K images would take 20 more).
RUN_DEFAULTS = {
    **{p: dict(data=None, global_batch=1024, epochs=300, lr=4e-4, weight_decay=0.05, decay_epochs=50,
               ema_decay=0.0, cfg=(1.1, 8.0), augment=True, log_every=50, ckpt_every=1000, sample_every=1000)
       for p in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL")},
    "GPT-small": dict(data="fashion-mnist", global_batch=64, max_steps=1000, lr=1e-3, weight_decay=0.05,
                      decay_epochs=0.5, ema_decay=0.99, cfg=1.5, augment=False, log_every=50, ckpt_every=200,
                      sample_every=400),
    "GPT-tiny": dict(data=None, global_batch=8, epochs=1, lr=1e-3, weight_decay=0.05, decay_epochs=0.5,
                     ema_decay=0.9, cfg=1.0, augment=True, log_every=50, ckpt_every=1000, sample_every=1000),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dar.HelpFormatter,
                                epilog=dar.presets_help(RUN_DEFAULTS))
    p.add_argument("--preset", default="GPT-small", choices=sorted(dar.GPT_PRESETS),
                   help="model size and run settings")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (ours or official) or released name (tokenizer_v1); "
                   "required (no default), except with --init-from a released GPT, which brings its own")
    dar.training_arguments(p)
    p.add_argument("--class-dropout", type=dar.fraction, help="p of the null class, for guidance (default: the "
                   "model config's, 0.1)")
    p.add_argument("--decay-epochs", type=dar.nonneg_float, help="linear decay to 1e-5 over the last epochs (50 of "
                   "300 in the paper; default: the preset's)")
    p.add_argument("--cfg", type=dar.parse_guidance, help="guidance of the sample grids: 'start,end' or one number (default: the preset's)")
    p.add_argument("--reverse-tokens", action="store_true", help="learn the tokens fine to coarse (the paper's "
                   "ablation of the order); the checkpoint records it and sampling flips them back")
    p.add_argument("--online-encode", action="store_true", help="encode images at every step instead "
                   "of pre-extracting the codes")
    p.add_argument("--codes-dir", help="where extracted codes are cached (default: codes/ beside the run directory)")
    p.add_argument("--extract-batch", type=dar.positive_int, default=64, help="images per forward during extraction")
    p.add_argument("--tokens", type=dar.positive_int, default=256, help="--benchmark only: sequence length")
    p.add_argument("--vocab", type=dar.positive_int, default=16384, help="--benchmark only: codebook size")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args = dar.fill_run_defaults(args, RUN_DEFAULTS[args.preset])
    args.codes_dir = args.codes_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "codes")
    return args


# -----------------------------------------------------------------------------
# Codes: extracted once, one of ten views per sample

def views(img, size, augment):
    """The AR augmentation's candidate crops of one PIL image: centre crop at 1.1x then the ten
    crops, or just the centre crop."""
    if not augment:
        return [dar.center_crop(img, size)]
    big = dar.center_crop(img, int(size * 1.1))
    return [dar.ten_crop(big, size, i) for i in range(10)]


class ViewsOf(torch.utils.data.Dataset):
    """Image i -> all its views as one tensor (V, 3, S, S), for the extraction."""

    def __init__(self, dataset, indices, size, augment):
        self.dataset, self.indices, self.size, self.augment = dataset, indices, size, augment

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        return i, torch.stack([dar.to_tensor(v) for v in views(self.dataset.image(i), self.size, self.augment)])


def codes_cache_path(args, tok_path, n_images, n_views):
    """Codes depend on the tokenizer weights (the file tok_path), the data, the image size and the views."""
    st = os.stat(tok_path)
    key = json.dumps([os.path.abspath(tok_path), st.st_size, st.st_mtime_ns,
                      os.path.abspath(args.data) if os.path.exists(args.data) else args.data,
                      args.image_size, n_images, n_views])
    return os.path.join(args.codes_dir, f"codes_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")


@torch.no_grad()
def extract_codes(run, args, tok, tok_path, dataset):
    """All views of all images through the tokenizer's encoder -> (M, V, N) int16 .npy, memory
    mapped. Each process encodes its share and writes its rows; the file is complete once a
    marker file exists next to it."""
    n_views = 10 if args.augment else 1
    path = codes_cache_path(args, tok_path, len(dataset), n_views)
    done = path + ".done"
    if os.path.exists(done):
        run.log(f"codes: reusing {path}")
        return np.load(path, mmap_mode="r")
    N, V = tok.cfg.num_tokens, tok.cfg.codebook_size
    dtype = np.int16 if V <= 32768 else np.int32  # 2 bytes per token for codebooks up to 32768
    if run.master:
        os.makedirs(args.codes_dir, exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(len(dataset), n_views, N)).flush()
    run.barrier()
    out = np.load(path, mmap_mode="r+")
    mine = list(range(run.rank, len(dataset), run.world))  # process r encodes images r, r + world, ...
    loader = torch.utils.data.DataLoader(ViewsOf(dataset, mine, args.image_size, args.augment),
                                         batch_size=max(1, args.extract_batch // n_views),
                                         num_workers=args.workers, pin_memory=run.cuda)
    batches = iter(loader)
    for _ in tqdm(range(len(loader)), desc="extracting codes", disable=not run.master, dynamic_ncols=True):
        idx, x = dar.next_batch(run, batches)
        codes = tok.encode(x.flatten(0, 1).to(run.device))                  # (B * V, N)
        out[idx.numpy()] = codes.view(len(idx), n_views, N).cpu().numpy().astype(dtype)
    out.flush()
    run.barrier()
    if run.master:
        with open(done, "w") as f:
            f.write(json.dumps(dict(tokenizer=args.tokenizer, data=args.data, shape=out.shape)))
        run.log(f"codes: wrote {path} {out.shape}")
    return np.load(path, mmap_mode="r")


class CodeDataset(torch.utils.data.Dataset):
    """(codes (N,), label): one of the stored views, chosen from (seed, epoch, index)."""

    def __init__(self, codes, labels, seed):
        self.codes, self.labels, self.seed, self.epoch = codes, labels, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        v = random.Random(hash((self.seed, self.epoch, i))).randrange(self.codes.shape[1])
        return torch.from_numpy(self.codes[i, v].astype(np.int64)), self.labels[i]


@torch.no_grad()
def save_samples(gpt, tok, path, guidance, seed, per_class=4):
    """One row per class (up to 10 classes), per_class samples each, from a fixed seed."""
    gpt.eval()
    torch.manual_seed(seed)
    device = next(gpt.parameters()).device
    labels = torch.arange(min(10, gpt.cfg.num_classes), device=device).repeat_interleave(per_class)
    tokens = dar.generate(gpt, labels, tok.cfg.num_tokens, guidance=guidance)
    dar.save_grid(tok.decode(tokens), path, nrow=per_class)
    gpt.train()


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    run = dar.Run(args.out)  # rank, world size, device (torchrun or not), the run directory
    args.threads, args.workers = dar.cpu_budget(args.threads, args.workers)  # never more than the cores
    settings = dar.TrainSettings.from_dict(vars(args))  # what dar.train reads of the flags
    # --class-dropout sets the config's field, which the loss reads and the checkpoint keeps
    gpt_overrides = dict(reverse_tokens=args.reverse_tokens)
    if args.class_dropout is not None:
        gpt_overrides["class_dropout"] = args.class_dropout

    def loss_fn(net, codes, labels):  # eq. 6, with class dropout for guidance
        loss = dar.ar_loss(net, codes, labels, cfg.class_dropout, cfg.num_classes, cfg.reverse_tokens)
        return loss, dict(loss=loss.item())

    if args.benchmark:  # synthetic codes: no tokenizer needed
        cfg = dar.gpt_config(args.preset, vocab_size=args.vocab, block_size=args.tokens, **gpt_overrides)
        model = dar.new_model(lambda: dar.GPT(cfg), 0, run.device, 0)[0].train()
        model.grad_checkpointing = args.grad_checkpointing
        B = args.micro_batch or args.global_batch
        batch = (torch.randint(0, cfg.vocab_size, (B, cfg.block_size), device=run.device),
                 torch.randint(0, cfg.num_classes, (B,), device=run.device))
        optimizer = dar.make_optimizer(model, args.lr, args.weight_decay, args.beta2, run.cuda)
        return dar.benchmark_training(run, settings, args.preset, model, loss_fn, optimizer, batch, "tok",
                                      cfg.block_size)

    # the frozen tokenizer (a released GPT to fine-tune brings its own) and the data
    release = args.init_from and dar.release_of(args.init_from, "gpt")
    args.tokenizer = args.tokenizer or (release and dar.RELEASES[release].tokenizer)
    if not args.tokenizer:
        run.fail("--tokenizer is required")
    if args.data is None:
        run.fail("--data is required for this preset (an ImageFolder directory or a built-in name)")
    run.open()  # the run directory, locked: one run at a time in it
    try:
        tok_weights = dar.resolve_weights(args.tokenizer, "tokenizer")
        tok_path = tok_weights.path
        tok = dar.load_tokenizer(tok_path, map_location=run.device).requires_grad_(False)
        images = dar.build_dataset(args.data, seed=args.seed)
        dar.check_images(run, images, args.image_size or tok.cfg.image_size, args.skip_bad_images, args.threads)  # every file, once
        micro, accum = settings.split(run.world, len(images))
    except (OSError, ValueError, RuntimeError) as e:
        run.fail(str(e))
    run.log(f"tokenizer {tok_weights} (frozen)")
    if args.image_size and args.image_size != tok.cfg.image_size:
        run.log(f"note: the tokenizer was trained at {tok.cfg.image_size} px; using {args.image_size}")
    args.image_size = args.image_size or tok.cfg.image_size

    # the model: the run's own checkpoint when it resumes, else the --init-from weights, else the
    # preset's size with random weights
    cfg, start_gpt, resumed = run.starting_point(
        "dar.gpt", args, dar.gpt_config(args.preset, vocab_size=tok.cfg.codebook_size, block_size=tok.cfg.num_tokens,
                                        num_classes=len(images.classes)),
        lambda source: dar.gpt_to_finetune(source, tok, len(images.classes), args.seed, run.log))
    for k, v in gpt_overrides.items():  # in place: the model's own config is saved with it
        setattr(cfg, k, v)
    if cfg.num_classes != len(images.classes) or cfg.vocab_size != tok.cfg.codebook_size:
        run.fail(f"the model has {cfg.num_classes} classes and {cfg.vocab_size} codes; the data has "
                 f"{len(images.classes)} classes and the tokenizer {tok.cfg.codebook_size} codes")

    # what a step reads: stored codes of one view per image, or images encoded on the fly
    if args.online_encode:
        def transform(img, rng):
            return dar.to_tensor(rng.choice(views(img, args.image_size, args.augment)))
        images.transform = transform
        dataset = images

        def step_loss(net, x, labels):
            return loss_fn(net, tok.encode(x), labels)
    else:
        dataset = CodeDataset(extract_codes(run, args, tok, tok_path, images), images.labels, args.seed)
        step_loss = loss_fn

    # model, EMA and optimizer; restored from the run's checkpoint when it resumes
    model, ema = dar.new_model(lambda: copy.deepcopy(start_gpt) if start_gpt else dar.GPT(cfg), args.seed,
                               run.device, args.ema_decay)
    start_gpt = None  # the model and its EMA are copies of it: free it
    model.grad_checkpointing = args.grad_checkpointing
    optimizer = dar.make_optimizer(model, args.lr, args.weight_decay, args.beta2, run.cuda)
    start = run.resume(resumed, model, ema, optimizer)
    total = dar.total_steps(args.max_steps, args.epochs, len(dataset), args.global_batch)
    size = f"{cfg.n_layer} layers, dim {cfg.dim}" if args.init_from or resumed else args.preset
    run.describe(f"GPT {size} (vocab {cfg.vocab_size}, {cfg.block_size} tokens, {cfg.num_classes} classes)",
                 model, len(dataset), micro, accum, args.global_batch, total, args.threads, args.workers)

    # the paper's schedule: constant, then linear to 1e-5 over the last decay_epochs
    decay_start = max(0, total - round(args.decay_epochs * (len(dataset) // args.global_batch)))

    def lr_at(step):
        if step < decay_start:
            return args.lr
        p = (step - decay_start) / max(total - decay_start, 1)
        return args.lr * (1 - p) + 1e-5 * p

    # the loop: dar.train does the steps, logging and checkpoints; the sample grids are drawn here
    model.train()
    # the checkpoint records which tokenizer's codes it learned (sample.py warns on another one)
    for step in dar.train(run, settings, model, ema, optimizer, dataset, step_loss, lr_at, total, start,
                          unit="tok", per_sample=cfg.block_size, run_args=vars(args),
                          ckpt_extra=dict(tokenizer=dar.tokenizer_fingerprint(tok), classes=images.classes)):
        if run.master and (step % args.sample_every == 0 or step == total):
            save_samples(ema or model, tok, os.path.join(run.out, "samples", f"ar_{step:07d}.png"), args.cfg,
                         args.seed)
    run.log(f"done: {run.ckpt_path}")
    run.finish()


if __name__ == "__main__":
    main()
