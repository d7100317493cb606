"""
Train the D-AR sequential diffusion tokenizer (stage 1).

    python train_tokenizer.py                    # tokenizer_small on Fashion-MNIST, a CPU, ~15 min
    torchrun --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train
    torchrun --nnodes=2 --node_rank=$RANK --master_addr=$HOST --master_port=29500 \\
        --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train
    python train_tokenizer.py --init-from tokenizer_v1 --data my_folder --lr 1e-5   # fine-tune

The loss is eq. 7 (dar.tokenizer_loss): flow matching + VQ + commitment + 0.5 LPIPS + 0.5 REPA,
with the official run's settings for tokenizer_v1. The run directory (--out) gets ckpt.pt (every
--ckpt-every steps, at the end and on Ctrl-C / SIGTERM), log.txt, metrics.jsonl and samples/;
the same command again resumes from ckpt.pt exactly (the same data order and random draws).
"""

import functools
import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dar

# Run settings per preset (the flags' defaults): the official run's for tokenizer_v1; for the small
# one, what 2 CPU cores afford in about 15 minutes (docs/small_scale.md); tiny is for the tests.
RUN_DEFAULTS = {
    "tokenizer_v1": dict(data=None, global_batch=512, max_steps=210_000, lr=2e-4, warmup=500,
                         decay_steps=0, ema_decay=0.999, lpips_weight=0.5, repa_weight=0.5,
                         log_every=50, ckpt_every=1000, sample_every=1000),
    "tokenizer_small": dict(data="fashion-mnist", global_batch=32, max_steps=2600, lr=3e-3,
                            warmup=100, decay_steps=1300, ema_decay=0.998, lpips_weight=0.0,
                            repa_weight=0.0, log_every=50, ckpt_every=250, sample_every=500),
    "tokenizer_tiny": dict(data=None, global_batch=8, max_steps=10, lr=1e-3, warmup=2,
                           decay_steps=0, ema_decay=0.9, lpips_weight=0.0, repa_weight=0.0,
                           log_every=5, ckpt_every=1000, sample_every=1000),
}
MODEL_FLAGS = ("image_size", "time_shift")  # they set the model: a resumed run keeps its own


def parse_args(argv=None):
    p = dar.parser(__doc__)
    dar.add_run_arguments(p, dar.TOKENIZER_PRESETS, "tokenizer_small")
    p.add_argument("--image-size", type=dar.positive_int, help="training resolution; None: the "
                   "preset's")
    p.add_argument("--time-shift", type=dar.positive_float, help="beta of eqs. 5 and 8; None: the "
                   "preset's")
    p.add_argument("--lpips-weight", type=dar.nonneg_float, help="lambda_1 of eq. 7; 0: off")
    p.add_argument("--repa-weight", type=dar.nonneg_float, help="lambda_2 of eq. 7; 0: off")
    p.add_argument("--loss-backbones", choices=["pretrained", "random"], default="pretrained",
                   help="random: untrained networks, for offline tests (the losses mean nothing)")
    p.set_defaults(augment=True, weight_decay=0.0)
    args = dar.parse_run_args(p, RUN_DEFAULTS, argv)
    args.out = args.out or f"runs/{args.preset}"
    return args


# -----------------------------------------------------------------------------
# Data: the official augmentation (ADM's random_crop_arr, then a flip), or centre crops; rng is
# seeded per (seed, epoch, image) by the data set, so a resumed run sees the same crops.

def augment(img, rng, size):
    img = dar.fit_shorter_side(img, rng.randint(size, math.ceil(size / 0.8)))  # in [S, S / 0.8]
    x, y = rng.randint(0, img.size[0] - size), rng.randint(0, img.size[1] - size)
    img = img.crop((x, y, x + size, y + size))
    return dar.to_tensor(img.transpose(0) if rng.random() < 0.5 else img)  # 0: FLIP_LEFT_RIGHT


def centre(img, rng, size):  # --no-augment
    return dar.to_tensor(dar.center_crop(img, size))


# -----------------------------------------------------------------------------
# The two extra losses of eq. 7 need pretrained networks, loaded here and passed to tokenizer_loss

def build_lpips(random_init, device):
    """LPIPS on VGG16, as the official training (heads in the lpips package, VGG16 from
    torchvision)."""
    import lpips
    try:
        net = lpips.LPIPS(net="vgg", pnet_rand=random_init, verbose=False)
    except Exception as e:
        raise OSError(f"LPIPS needs the VGG16 ImageNet weights ({dar.one_line(e)}): put them in "
                      f"the torch hub cache, or train without LPIPS: --lpips-weight 0") from None
    return net.eval().requires_grad_(False).to(device)


class RepaTarget(nn.Module):
    """Frozen DINOv2 ViT-B/14 patch tokens (B, 256, 768) of the input images, the REPA target:
    [-1, 1] -> ImageNet normalisation -> bicubic 224 px, as the official code. random_init: a
    random 14 x 14 patch embedding of the same output instead (offline tests)."""

    def __init__(self, random_init):
        super().__init__()
        try:
            self.net = (nn.Conv2d(3, 768, 14, 14) if random_init else
                        torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14"))
        except Exception as e:
            raise OSError(f"REPA needs DINOv2 ViT-B/14 from torch.hub ({dar.one_line(e)}): put it "
                          f"in the torch hub cache, or train without it: --repa-weight 0") from None
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images):
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=224, mode="bicubic")
        if isinstance(self.net, nn.Conv2d):
            return self.net(x).flatten(2).transpose(1, 2)
        return self.net.forward_features(x)["x_norm_patchtokens"]


def finetune_start(args):
    """The tokenizer of --init-from (EMA weights when it has them) for this run: its size, this
    run's image size and time shift if given, and a REPA projector only if the run trains REPA
    (the file's, or a new one). -> (model, a line for the log)."""
    tok = dar.Tokenizer.from_pretrained(args.init_from)
    repa = args.repa_weight > 0
    cfg = replace(tok.cfg, image_size=args.image_size or tok.cfg.image_size,
                  time_shift=args.time_shift or tok.cfg.time_shift,
                  repa_dim=(tok.cfg.repa_dim or 768) if repa else 0)
    model = dar.Tokenizer(cfg)
    # every weight of the file but a REPA projector this run does not train; a new one: its init
    weights = {k: v for k, v in tok.state_dict().items() if repa or not k.startswith("dit.repa.")}
    model.load_state_dict(weights, strict=False)
    projector = "none" if not repa else "the file's" if tok.cfg.repa_dim else "new"
    return model, (f"starting from {args.init_from}: {cfg.image_size} px, {cfg.num_tokens} tokens "
                   f"in {cfg.num_groups} groups, codebook {cfg.codebook_size}, REPA projector "
                   f"{projector}")


@torch.no_grad()
def save_samples(model, images, step, out):
    """recon_<step>.png: inputs over their decodes; preview_<step>.png: each decoder step's
    preview of the first 4, then the input."""
    model.eval()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).to(images.device)
    steps = list(model.decode_steps(model.encode(images), noise))  # the image after each step
    dar.save_grid(torch.cat([images, steps[-1]]), f"{out}/samples/recon_{step:07d}.png",
                  nrow=len(images))
    strip = torch.stack([s[:4] for s in steps] + [images[:4]], dim=1)  # (4, steps + 1, 3, H, W)
    dar.save_grid(strip.flatten(0, 1), f"{out}/samples/preview_{step:07d}.png", nrow=len(steps) + 1)
    model.train()


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dar.setup(args.device, args.threads, args.workers)  # a process a GPU
    ckpt = dar.find_run(args, "tokenizer", MODEL_FLAGS)  # the run to resume, or None

    # ---- the model: the run's own checkpoint, else --init-from weights, else the preset
    torch.manual_seed(args.seed)                   # the same initial weights on every process
    note, repa = None, args.repa_weight > 0
    if ckpt:
        model = dar.Tokenizer(dar.make_config(dar.TokenizerConfig, ckpt["config"], args.out))
        if repa != (model.cfg.repa_dim > 0):
            raise ValueError(f"--repa-weight {args.repa_weight}: the run in {args.out} has "
                             f"{'a' if model.cfg.repa_dim else 'no'} REPA projector")
    elif args.init_from:
        model, note = finetune_start(args)
    else:
        sizes = dict(image_size=args.image_size, time_shift=args.time_shift, repa_dim=768 * repa)
        try:
            model = dar.Tokenizer(dar.tokenizer_config(args.preset, **{
                k: v for k, v in sizes.items() if v is not None}))
        except ValueError as e:  # an image size the patch sizes do not divide
            raise ValueError(f"--image-size {args.image_size}: {e}") from None
    log = dar.open_run(args, ckpt, rank)           # the run directory is this trainer's now
    if note:
        log(note)
    for m in (model.encoder, model.decoder, model.dit):
        m.grad_checkpointing = args.grad_checkpointing
    optimizer = dar.make_optimizer(model.to(device), args.lr, args.weight_decay, args.beta2,
                                   fused=device.type == "cuda")
    step, ema = dar.restore(ckpt, model, optimizer, args.ema_decay)

    # ---- the data
    size = model.cfg.image_size
    crop = functools.partial(augment if args.augment else centre, size=size)
    dataset = dar.build_dataset(args.data, crop, seed=args.seed)
    batches, accum = dar.batches(dataset, args, rank, world, step, device)
    first = {label: i for i, label in reversed(list(enumerate(dataset.labels)))}  # of each class
    picks = (sorted(first.values()) + list(range(0, len(dataset), len(dataset) // 8 + 1)))[:8]
    shown = torch.stack([centre(dataset.image(i), None, size) for i in picks]).to(device)
    net = dar.wrap(model, args, device, world)     # torch.compile, DDP
    log(f"tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {size} "
        f"px | {len(dataset)} images | {args.global_batch} a step: {world} process(es) x "
        f"{accum} micro-batches | {args.max_steps} steps | {device}, {torch.get_num_threads()} "
        f"threads")

    # ---- the loop, with the extra losses of eq. 7 (their networks, frozen)
    random_nets = args.loss_backbones == "random"
    lpips = build_lpips(random_nets, device) if args.lpips_weight > 0 else None
    repa = RepaTarget(random_nets).to(device) if repa else None
    progress, stopping = dar.Progress(args, step, ckpt, rank), False  # a bar, the losses, Ctrl-C
    while step < args.max_steps and not stopping:
        for m in range(accum):
            images, _ = next(batches)
            with dar.micro_batch(net, args, step, m, accum):  # its seed, DDP sync, autocast
                loss, terms, codes = dar.tokenizer_loss(net, images, lpips, repa,
                                                        args.lpips_weight, args.repa_weight)
            (loss / accum).backward()
            # the share of the codebook in use, without a host-device sync (no unique())
            used = torch.zeros(model.cfg.codebook_size, device=device)
            used.index_fill_(0, codes.flatten(), 1)
            progress.add(1 / accum, loss=loss, **terms, codes_used=used.mean())
        progress.add(grad=dar.optimizer_step(model, optimizer, ema, step, args))  # lr, clip, EMA
        step += 1
        stopping = dar.end_step(args, step, progress, log, model, ema, optimizer,
                                ("img", args.global_batch))  # logs; saves when due and finite
        if rank == 0 and (step % args.sample_every == 0 or step == args.max_steps):
            save_samples(ema or model, shown, step, args.out)  # the EMA is what sample.py uses
    dar.finish(progress, step, args, log)


if __name__ == "__main__":
    dar.cli(main)
