"""
Train the D-AR sequential diffusion tokenizer (stage 1).

    python train_tokenizer.py --preset tokenizer_small            # Fashion-MNIST on a CPU, ~20 min
    torchrun --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train
    torchrun --nnodes=2 --node_rank=$RANK --master_addr=$HOST --master_port=29500 \\
        --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train
    python train_tokenizer.py --init-from tokenizer_v1 --data my_folder --lr 1e-5   # fine-tune the released one

The loss is the paper's eq. 7 (dar.tokenizer_loss): flow matching + VQ + commitment + 0.5 LPIPS +
0.5 REPA. The settings of the official run are tokenizer_v1's defaults: AdamW 2e-4, betas (0.9,
0.95), no weight decay, 500 warm-up steps then constant, clip 1.0, EMA 0.999, bf16, global batch
512, random crop + flip.

The run directory (--out, default runs/<preset>) receives ckpt.pt (model, EMA, optimizer, step,
config, args, RNG; rewritten atomically every --ckpt-every steps), log.txt, metrics.jsonl and
samples/*.png. Running the same command again resumes from ckpt.pt: same step, same learning
rate, same data order, same random draws.
"""

import argparse
import copy
import math
import os

import torch

import dar

# Run settings per preset: the paper's for tokenizer_v1; for the small one, what 2 CPU cores afford
# in about 20 minutes (2,600 steps of 32 images); the tiny one is for the tests.
RUN_DEFAULTS = {
    "tokenizer_v1": dict(data=None, global_batch=512, epochs=100, lr=2e-4, weight_decay=0.0, warmup=500,
                         ema_decay=0.999, lpips_weight=0.5, repa_weight=0.5, augment=True,
                         log_every=50, ckpt_every=1000, sample_every=1000),
    "tokenizer_small": dict(data="fashion-mnist", global_batch=32, max_steps=2600, lr=3e-3, weight_decay=0.0,
                            warmup=100, ema_decay=0.998, lpips_weight=0.0, repa_weight=0.0, augment=True,
                            log_every=50, ckpt_every=250, sample_every=500),
    "tokenizer_tiny": dict(data=None, global_batch=8, epochs=1, lr=1e-3, weight_decay=0.0, warmup=2,
                           ema_decay=0.9, lpips_weight=0.0, repa_weight=0.0, augment=True,
                           log_every=50, ckpt_every=1000, sample_every=1000),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dar.HelpFormatter,
                                epilog=dar.presets_help(RUN_DEFAULTS))
    p.add_argument("--preset", default="tokenizer_small", choices=sorted(dar.TOKENIZER_PRESETS),
                   help="model size and run settings")
    dar.training_arguments(p)
    p.add_argument("--warmup", type=dar.nonneg_int, help="linear warm-up steps, then a constant learning rate "
                   "(default: the preset's)")
    p.add_argument("--lpips-weight", type=dar.nonneg_float, help="lambda_1 of eq. 7 (0.5 in the paper); 0 turns "
                   "LPIPS off (default: the preset's)")
    p.add_argument("--repa-weight", type=dar.nonneg_float, help="lambda_2 of eq. 7 (0.5 in the paper); 0 turns "
                   "REPA off (default: the preset's)")
    p.add_argument("--time-shift", type=dar.positive_float, help="beta of eqs. 5 and 8: how far the groups crowd "
                   "towards the noisy start (default: the preset's, 2 in the paper)")
    p.add_argument("--loss-backbones", choices=["pretrained", "random"], default="pretrained",
                   help="'random': randomly initialised VGG / ViT-B/14 for offline smoke tests")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    return dar.fill_run_defaults(args, RUN_DEFAULTS[args.preset])


class TokenizerLoss:
    """Eq. 7 with this run's networks and weights, plus codebook statistics for the log: usage (the
    fraction of the codebook seen over the last 100 batches of this process) and the official "dead
    code rate" (the fraction of token positions whose code is the same across the batch: collapse)."""

    def __init__(self, args, device, codebook_size):
        random_init = args.loss_backbones == "random"
        self.lpips = dar.build_lpips(random_init, device) if args.lpips_weight > 0 else None
        self.repa = dar.RepaTarget(random_init).to(device) if args.repa_weight > 0 else None
        self.weights = args.lpips_weight, args.repa_weight
        self.codebook_size, self.recent_codes = codebook_size, []

    def __call__(self, tok, images, labels):
        loss, terms, codes = dar.tokenizer_loss(tok, images, self.lpips, self.repa, *self.weights)
        parts = {k: v.item() for k, v in terms.items()}
        self.recent_codes = (self.recent_codes + [codes.detach().flatten().cpu()])[-100:]
        parts["usage"] = torch.cat(self.recent_codes).unique().numel() / self.codebook_size
        parts["dead"] = (codes.float().std(0) < 1e-5).float().mean().item() if codes.shape[0] > 1 else 0.0
        parts["loss"] = loss.item()
        return loss, parts


@torch.no_grad()
def save_samples(model, images, path_recon, path_preview):
    """Inputs above their decodes; and one row per image of the jump estimate after each group,
    then the input."""
    model.eval()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).to(images.device)
    states = list(model.decode_steps(model.encode(images), noise))
    dar.save_grid(torch.cat([images, states[-1].preview]), path_recon, nrow=len(images))
    k = min(4, len(images))
    strip = torch.stack([s.preview[:k] for s in states], dim=1)                    # (k, steps, 3, H, W)
    dar.save_grid(torch.cat([strip, images[:k, None]], dim=1).flatten(0, 1), path_preview, nrow=len(states) + 1)
    model.train()


def fixed_images(dataset, size, n=8):
    """n images spread over the classes (the first of class 0, 1, ...; then the second...), shown
    at every sample step."""
    by_class = {}
    for i, label in enumerate(dataset.labels):
        by_class.setdefault(label, []).append(i)
    picks = [ids[r] for r in range(n) for ids in by_class.values() if r < len(ids)][:n]
    return torch.stack([dar.to_tensor(dar.center_crop(dataset.image(i), size)) for i in picks])


def main(argv=None):
    args = parse_args(argv)
    run = dar.Run(args.out)  # rank, world size, device (torchrun or not), the run directory
    args.threads, args.workers = dar.cpu_budget(args.threads, args.workers)  # never more than the cores
    settings = dar.TrainSettings.from_dict(vars(args))  # what dar.train reads of the flags
    try:
        overrides = {k: v for k, v in dict(image_size=args.image_size, time_shift=args.time_shift).items() if v}
        cfg = dar.tokenizer_config(args.preset, **overrides)
    except ValueError as e:
        run.fail(f"--image-size {args.image_size}: {e}")
    if args.repa_weight <= 0:
        cfg.repa_dim = 0  # no REPA projector to train

    if args.benchmark:  # synthetic images, random loss backbones: the same compute, no download
        args.loss_backbones = "random"
        model = dar.new_model(lambda: dar.Tokenizer(cfg), 0, run.device, 0)[0].train()
        model.set_grad_checkpointing(args.grad_checkpointing)
        B, size = args.micro_batch or args.global_batch, cfg.image_size
        batch = (torch.rand(B, 3, size, size, device=run.device) * 2 - 1, torch.zeros(B, dtype=torch.long, device=run.device))
        optimizer = dar.make_optimizer(model, args.lr, args.weight_decay, args.beta2, run.cuda)
        return dar.benchmark_training(run, settings, args.preset, model, TokenizerLoss(args, run.device, cfg.codebook_size), optimizer,
                                      batch, "img", 1)

    # the model: the run's own checkpoint when it resumes, else the --init-from weights, else the
    # preset's size with random weights
    repa_dim = cfg.repa_dim  # 0 when this run trains no REPA
    cfg, start_tok, resumed = run.starting_point(
        "dar.tokenizer", args, cfg, lambda source: dar.tokenizer_to_finetune(source, repa_dim, args.seed, args.image_size,
                                                                             run.log))
    args.image_size = size = cfg.image_size

    # data: random crop of a randomly rescaled image and a random flip (the official augmentation),
    # or centre crops; the crop's randomness comes from (seed, epoch, index)
    if args.data is None:
        run.fail("--data is required for this preset (an ImageFolder directory or a built-in name)")
    run.open()  # the run directory, locked: one run at a time in it
    if args.augment:
        def transform(img, rng):
            return dar.to_tensor(dar.flip(dar.random_crop(img, size, rng), rng))
    else:
        def transform(img, rng):
            return dar.to_tensor(dar.center_crop(img, size))
    try:
        dataset = dar.build_dataset(args.data, transform, seed=args.seed)
        dar.check_images(run, dataset, size, args.skip_bad_images, args.threads)  # every file, once
        micro, accum = settings.split(run.world, len(dataset))  # checked now, not after the model is built
        loss_fn = TokenizerLoss(args, run.device, cfg.codebook_size)
        fixed = fixed_images(dataset, size).to(run.device)  # the images every sample step shows
    except (OSError, ValueError, RuntimeError) as e:
        run.fail(str(e))

    # model, EMA and optimizer; restored from the run's checkpoint when it resumes (then the step,
    # the learning rate, the data order and the random draws go on as if never interrupted)
    model, ema = dar.new_model(lambda: copy.deepcopy(start_tok) if start_tok else dar.Tokenizer(cfg), args.seed,
                               run.device, args.ema_decay)
    start_tok = None  # the model and its EMA are copies of it: free it
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = dar.make_optimizer(model, args.lr, args.weight_decay, args.beta2, run.cuda)
    start = run.resume(resumed, model, ema, optimizer)
    total = dar.total_steps(args.max_steps, args.epochs, len(dataset), args.global_batch)
    what = args.preset if not (args.init_from or resumed) else f"{cfg.image_size} px"
    run.describe(f"tokenizer {what}", model, len(dataset), micro, accum, args.global_batch, total,
                 args.threads, args.workers)

    # the paper's schedule: linear warm-up, then constant (the official run never decays: the EMA
    # weights do the averaging a decay would)
    def lr_at(step):
        return args.lr * min(1.0, (step + 1) / max(args.warmup, 1))

    # the loop: dar.train does the steps, logging and checkpoints, and hands back each step number;
    # what to look at now and then is this script's business
    model.train()
    for step in dar.train(run, settings, model, ema, optimizer, dataset, loss_fn, lr_at, total, start,
                          run_args=vars(args)):
        if run.master and (step % args.sample_every == 0 or step == total):
            # the EMA weights are the ones that get saved for sampling: show what they do
            samples = os.path.join(run.out, "samples")
            save_samples(ema or model, fixed, os.path.join(samples, f"recon_{step:07d}.png"),
                         os.path.join(samples, f"preview_{step:07d}.png"))
            # the average starts at the random weights and forgets them slowly: decay^step of it is
            # still the initial (noise-predicting) network, so early grids look worse than training is
            share = args.ema_decay ** step if ema is not None else 0.0
            if share > 0.05:
                catch_up = math.ceil(math.log(0.05) / math.log(args.ema_decay))
                run.log(f"note: samples/recon_{step:07d}.png shows the EMA weights (decay {args.ema_decay}), "
                        f"{share:.0%} of which are still the random initial ones: its grids sharpen by step "
                        f"{catch_up:,} (5%)")
    run.log(f"done: {run.ckpt_path}")
    run.finish()


if __name__ == "__main__":
    main()
