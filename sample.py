"""
Sample images with D-AR: the Llama writes tokens, and every finished group of tokens is decoded
into one more step of pixel diffusion as it arrives (streaming).

    python sample.py --class 207                 # sample.png: 4 golden retrievers, released D-AR-L
    python sample.py --class 207 360 --num-per-class 8 --guidance 1.1,8.0 --seed 1
    python sample.py --class 3 --preview         # preview.png: each sample after each decoder
                                                 # step; preview.gif: the samples forming
    python sample.py --class 1 5 9 --layout ref.png --prefix-tokens 16   # layout.png
    python sample.py --gpt D-AR-XL --class 207   # the released XL (the paper's guidance 1.1,10.0)
    python sample.py --gpt runs/GPT-small/ckpt.pt --class 0 1 2   # ours, with its tokenizer
    torchrun --nproc_per_node=8 sample.py --out samples/ --num-samples 50000     # for FID

--gpt and --tokenizer take a released name (downloaded once from the Hugging Face hub,
showlab/D-AR) or a checkpoint, ours or official. A released GPT samples with the paper's guidance
and tokenizer_v1; a GPT of ours with the tokenizer it was trained with.

--out DIR writes DIR/000123.png per sample (class = index mod the number of classes) and DIR.npz
in the ADM evaluator's layout (arr_0 uint8 NHWC images, arr_1 labels). Batches have seeds of
their own and are spread over the processes; a batch whose PNGs exist is not redone, so an
interrupted run picks up where it stopped.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dar

GRID_FLAGS = ["--class", "--num-per-class", "--preview", "--layout", "--prefix-tokens", "--grid"]
BULK_FLAGS = ["--num-samples", "--batch-size"]
PAPER_GUIDANCE = {"D-AR-L": (1.1, 8.0), "D-AR-XL": (1.1, 10.0)}  # the paper's linear schedules
DRAWN_BY = ("gpt", "tokenizer", "seed", "batch_size", "guidance", "temperature", "solver", "steps",
            "bf16", "preview_step")  # the settings that decide a bulk run's images


def parse_args(argv=None):
    p = dar.parser(__doc__)
    add = p.add_argument
    add("--gpt", default="D-AR-L", help="a released name (D-AR-L, D-AR-XL) or a checkpoint")
    add("--tokenizer", help="a released name (tokenizer_v1) or a checkpoint; None: the GPT's")
    add("--class", dest="classes", type=int, nargs="+", default=[0], help="class ids (Fashion-MNIST"
        ": 0 t-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag, "
        "9 boot)")
    add("--num-per-class", type=dar.positive_int, default=4, help="samples per class")
    add("--seed", type=dar.seed, default=0, help="seed of every draw")
    add("--guidance", type=dar.parse_guidance, help="'start,end' of a linear schedule over the "
        "tokens, or one scale; None: a released GPT's (L 1.1,8.0, XL 1.1,10.0), else 1 (none)")
    add("--temperature", type=dar.nonneg_float, default=1.0, help="of the token draws; 0: greedy")
    add("--solver", choices=["adams2", "euler"], default="adams2", help="the decoder's ODE solver")
    add("--steps", type=dar.positive_int, help="decoder steps; None: the tokenizer's")
    add("--preview-step", type=dar.positive_int, help="output the image after this step")
    add("--bf16", action=argparse.BooleanOptionalAction, help="None: where the hardware has it")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile; None: with cuda")
    add("--preview", action="store_true", help="a row per sample: the image after each decoder "
        "step; and an animated GIF of the samples forming")
    add("--layout", help="a reference image whose first --prefix-tokens every sample keeps")
    add("--prefix-tokens", type=dar.positive_int, help="how many tokens of --layout to keep")
    add("--grid", help="the output image; None: sample.png, preview.png or layout.png")
    add("--out", help="bulk sampling: one PNG per sample in this directory, and DIR.npz")
    add("--num-samples", type=dar.positive_int, default=50000, help="--out: how many")
    add("--batch-size", type=dar.positive_int, default=32, help="--out: samples a forward")
    add("--list-classes", action="store_true", help="print the GPT's class names, then exit")
    add("--device", default=dar.DEVICE, choices=["cuda", "mps", "cpu"])
    add("--threads", type=dar.threads, help="compute threads; None: the cores")
    args = p.parse_args(argv)
    unused = [f for f in (GRID_FLAGS if args.out else BULK_FLAGS) if f in dar.typed(argv)]
    if unused:  # a flag the mode cannot honour is refused, never dropped
        p.error(f"{unused[0]} does nothing {'with' if args.out else 'without'} --out")
    args.grid = args.grid or ("preview.png" if args.preview else "layout.png" if args.layout else
                              "sample.png")
    Image.init()  # PIL picks the format from the extension: checked now, not after the sampling
    if os.path.splitext(args.grid)[1].lower() not in Image.EXTENSION:
        p.error(f"--grid {args.grid}: no image extension PIL writes (.png, .jpg, .webp...)")
    if bool(args.layout) != bool(args.prefix_tokens):
        p.error("--layout and --prefix-tokens go together")
    if args.layout and not os.path.isfile(args.layout):
        p.error(f"--layout {args.layout}: no such file")
    bf16, why = dar.bf16_default(args.device)  # where the hardware computes in bf16
    args.bf16, args.bf16_why = (bf16, why) if args.bf16 is None else (args.bf16, "--bf16")
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    return args


def load_pair(gpt, tokenizer, device):
    """(tokenizer, GPT, the tokenizer's name): --tokenizer, else a released GPT's (tokenizer_v1),
    else the one our trainer recorded; the two checked as a pair. The GPT file is read once."""
    gpt_path, model = dar.find_weights(gpt, "gpt"), None
    if not tokenizer and gpt not in dar.RELEASES:  # ours records its tokenizer
        model = dar.load_model(gpt_path, "gpt")
        tokenizer = model.tokenizer
        if not tokenizer:
            raise dar.CheckpointError(f"--gpt {gpt} records no tokenizer: pass --tokenizer")
    tokenizer = tokenizer or "tokenizer_v1"
    tok = dar.Tokenizer.from_pretrained(tokenizer).to(device)
    if model is None:  # an official GPT's block size is its tokenizer's number of tokens
        model = dar.load_model(gpt_path, "gpt", block_size=tok.cfg.num_tokens)
    dar.check_pair(tok, model, tokenizer, gpt)
    return tok, model.to(device), tokenizer


def bulk(args, draw, num_classes, rank, world, made_by):
    """--out DIR: class-balanced PNGs, resumable and shared out over the processes, then DIR.npz.
    Both record what drew them, the settings and the weights' digests (made_by): a directory
    goes on only with the same, and DIR.npz is replaced only when it records the same."""
    out = args.out.rstrip("/")
    npz, record, png = f"{out}.npz", os.path.join(out, "settings.json"), f"{out}/{{:06d}}.png"
    settings = json.loads(json.dumps({**{k: getattr(args, k) for k in DRAWN_BY}, **made_by}))
    before = None
    if os.path.exists(record):
        with open(record) as f:
            before = json.load(f)
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--out {out}: holds files sample.py did not write")
    name = lambda k: k if k.endswith("digest") else "--" + k.replace("_", "-")  # a flag or weights
    differ = [f"{name(k)} {before.get(k)} (now {v})" for k, v in settings.items()
              if before is not None and before.get(k) != v]
    if differ:
        raise ValueError(f"--out {out}: holds samples drawn with {', '.join(differ)}")
    if os.path.exists(npz):
        with dar.load_npz(npz) as z:
            if "settings" not in z.files or json.loads(str(z["settings"])) != settings:
                raise ValueError(f"--out {out}: {npz} was drawn otherwise: use another --out")
    if world > 1:
        torch.distributed.barrier()  # every process has checked before process 0 writes
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(record, "w") as f:
            json.dump(settings, f, indent=1)
    # batch j is samples jB..(j+1)B-1, drawn from its own seed: which process makes it, and
    # whether now or after a restart, does not change its images; process r takes j = r, r +
    # world...; a PNG is written to .tmp, then renamed: never half of one
    n, B = args.num_samples, args.batch_size
    labels = torch.arange(n) % num_classes
    todo = [s for s in range(rank * B, n, world * B)
            if not all(os.path.exists(png.format(i)) for i in range(s, min(s + B, n)))]
    for s in tqdm(todo, disable=rank != 0, desc="sampling", dynamic_ncols=True):
        for i, img in enumerate(dar.to_uint8(draw(labels[s:s + B], args.seed * 1_000_003 + s)), s):
            Image.fromarray(img).save(png.format(i) + ".tmp", format="PNG")
            os.replace(png.format(i) + ".tmp", png.format(i))
    if world > 1:
        torch.distributed.barrier()  # every PNG is written before process 0 reads them all
    if rank == 0:
        images = np.stack([np.asarray(dar.load_image(png.format(i)))
                           for i in tqdm(range(n), desc="DIR.npz")])
        np.savez(f"{npz}.tmp.npz", images, labels.numpy(), settings=json.dumps(settings))
        os.replace(f"{npz}.tmp.npz", npz)  # the ADM layout (arr_0, arr_1), and what drew them
        print(f"wrote {npz}: {images.shape[0]} images {images.shape[1:]}, labels")


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dar.setup(args.device, args.threads)
    tok, gpt, args.tokenizer = load_pair(args.gpt, args.tokenizer, device)
    if args.guidance is None:
        args.guidance = PAPER_GUIDANCE.get(args.gpt, 1.0)
    if rank == 0:
        print(f"weights: tokenizer {args.tokenizer} | GPT {args.gpt} | guidance {args.guidance} | "
              f"{'bf16' if args.bf16 else 'fp32'} ({args.bf16_why})")
    if args.list_classes:
        for i in range(gpt.cfg.num_classes):
            print(i, gpt.classes[i] if gpt.classes else "")
        return
    bad = [c for c in args.classes if not 0 <= c < gpt.cfg.num_classes]
    if bad:
        raise ValueError(f"--class {bad[0]}: the GPT's classes are 0..{gpt.cfg.num_classes - 1}")
    out_step = dar.output_step(args.preview_step, args.steps or tok.cfg.sample_steps)
    made_by = dict(gpt_digest=dar.digest(gpt), tokenizer_digest=dar.digest(tok)) if args.out else {}
    dar.prepare_sampling(tok, gpt, args.bf16, args.compile)

    def draw(labels, seed):  # a batch's images after the output step
        return dar.draw(tok, gpt, labels.to(device), seed, args.guidance, args.temperature,
                        args.solver, args.steps)[out_step - 1]

    if args.out:
        return bulk(args, draw, gpt.cfg.num_classes, rank, world, made_by)

    # a few images: a row per class, the preview strips, or the layout pairs
    labels = torch.tensor(args.classes).repeat_interleave(args.num_per_class)
    ref = prefix = None
    if args.layout:  # zero-shot layout control: the reference's first tokens, fixed
        if args.prefix_tokens > tok.cfg.num_tokens:
            raise ValueError(f"--prefix-tokens {args.prefix_tokens}: over the tokenizer's "
                             f"{tok.cfg.num_tokens} tokens")
        ref = dar.to_tensor(dar.center_crop(dar.load_image(args.layout), tok.cfg.image_size))
        ref = ref.to(device)
        prefix = tok.encode(ref[None])[:, :args.prefix_tokens].expand(len(labels), -1)
    t0 = time.perf_counter()
    steps = dar.draw(tok, gpt, labels.to(device), args.seed, args.guidance, args.temperature,
                     args.solver, args.steps, prefix)
    images, seconds = steps[out_step - 1], time.perf_counter() - t0
    print(f"{len(labels)} images in {seconds:.2f} s ({len(labels) / seconds:.2f} images/s)")
    if args.preview:     # a row per sample: after step 1, 2, ..., the final image last
        dar.save_grid(torch.stack(steps, 1).flatten(0, 1), args.grid, nrow=len(steps))
        gif = os.path.splitext(args.grid)[0] + ".gif"  # the samples forming, laid out as sample.png
        frames = [dar.grid_image(s, args.num_per_class) for s in steps]
        frames[0].save(gif, save_all=True, append_images=frames[1:], loop=0,
                       duration=[600] * (len(frames) - 1) + [2000])  # ms a frame; the result 2 s
        print(f"saved {gif}")
    elif ref is not None:  # a row per sample: the reference, then the sample
        pairs = torch.stack([ref.expand_as(images), images], 1).flatten(0, 1)
        dar.save_grid(pairs, args.grid, nrow=2)
    else:                # a row per class
        dar.save_grid(images, args.grid, nrow=args.num_per_class)
    print(f"saved {args.grid}")


if __name__ == "__main__":
    dar.cli(main)
