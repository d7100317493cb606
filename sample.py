"""
Sample images with D-AR: the Llama writes tokens, and every finished group of tokens is decoded
into one more step of pixel diffusion as it arrives (streaming).

    python sample.py --class 207                   # sample.png: 4 golden retrievers, released D-AR-L
    python sample.py --class 207 360 --num-per-class 8 --guidance 1.1,8.0 --seed 1
    python sample.py --class 3 --preview           # preview.png: each sample after each decoder
                                                   # step; preview.gif: the samples forming
    python sample.py --class 1 5 9 --layout ref.png --prefix-tokens 16   # layout.png: layout control
    python sample.py --gpt D-AR-XL --class 207     # the released XL (the paper's guidance 1.1,10.0)
    python sample.py --gpt runs/GPT-small/ckpt.pt --class 0 1 2   # a GPT of ours, with its tokenizer
    torchrun --nproc_per_node=8 sample.py --out samples/ --num-samples 50000     # for FID

--gpt and --tokenizer take a released name (downloaded once from the Hugging Face hub,
showlab/D-AR, into its cache) or a checkpoint, ours or official. A released GPT samples with the
paper's guidance and tokenizer_v1; a GPT of ours with the tokenizer it was trained with;
--guidance and --tokenizer say otherwise.

--out DIR writes DIR/000123.png per sample (class = index mod the number of classes) and DIR.npz
in the ADM evaluator's layout (arr_0 uint8 NHWC images, arr_1 labels). Batches have seeds of their
own and are spread over the processes; a batch whose PNGs exist is not redone, so an interrupted
run picks up where it stopped. eval_fid.py --gpt draws the same images (dar.draw).
"""

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


def parse_args(argv=None):
    p = dar.parser(__doc__)
    p.add_argument("--gpt", default="D-AR-L", help="a released name (D-AR-L, D-AR-XL) or a checkpoint")
    p.add_argument("--tokenizer", help="a released name (tokenizer_v1) or a checkpoint; None: the "
                   "GPT's own")
    p.add_argument("--class", dest="classes", type=int, nargs="+", default=[0], help="class ids "
                   "(Fashion-MNIST: 0 t-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, "
                   "6 shirt, 7 sneaker, 8 bag, 9 boot)")
    p.add_argument("--num-per-class", type=dar.positive_int, default=4, help="samples per class")
    dar.add_sampling_arguments(p)  # --seed --guidance --temperature --top-k --top-p --solver ...
    p.add_argument("--preview", action="store_true", help="one row per sample: the image after "
                   "each decoder step; and an animated GIF of the samples forming")
    p.add_argument("--layout", help="a reference image whose first --prefix-tokens tokens every "
                   "sample keeps")
    p.add_argument("--prefix-tokens", type=dar.positive_int, help="how many tokens of --layout to keep")
    p.add_argument("--grid", help="the output image; None: sample.png, preview.png or layout.png")
    p.add_argument("--out", help="bulk sampling: one PNG per sample in this directory, and DIR.npz")
    p.add_argument("--num-samples", type=dar.positive_int, default=50000, help="--out: how many")
    p.add_argument("--batch-size", type=dar.positive_int, default=32, help="--out: per forward")
    p.add_argument("--list-classes", action="store_true", help="print the GPT's class names, then exit")
    p.add_argument("--device", default=dar.DEVICE, choices=["cuda", "mps", "cpu"])
    p.add_argument("--threads", type=dar.threads, help="compute threads; None: the cores")
    args = p.parse_args(argv)
    # a flag the mode cannot honour is refused, never dropped
    unused = [f for f in (GRID_FLAGS if args.out else BULK_FLAGS) if f in dar.typed(argv)]
    if unused:
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
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    return args


def bulk(args, draw, out_step, num_classes, rank, world, made_by):
    """--out DIR: class-balanced PNGs, resumable and shared out over the processes, then DIR.npz.
    Both record what drew them, the settings and the weights' digests (made_by): a directory goes
    on only with the same, and DIR.npz is replaced only when it records the same."""
    out = args.out.rstrip("/")
    npz, record, png = f"{out}.npz", os.path.join(out, "settings.json"), f"{out}/{{:06d}}.png"
    keys = ("gpt", "tokenizer", "seed", "batch_size", "guidance", "temperature", "top_k", "top_p",
            "solver", "steps", "bf16", "preview_step")
    settings = json.loads(json.dumps({**{k: getattr(args, k) for k in keys}, **made_by}))
    before = None
    if os.path.exists(record):
        with open(record) as f:
            before = json.load(f)
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--out {out}: holds files that sample.py did not write: use another --out")
    name = lambda k: k if k.endswith("digest") else "--" + k.replace("_", "-")  # a flag or weights
    differ = [f"{name(k)} {before.get(k)} (now {v})" for k, v in settings.items()
              if before is not None and before.get(k) != v]
    if differ:
        raise ValueError(f"--out {out}: holds samples drawn with other settings: {', '.join(differ)}")
    if os.path.exists(npz):
        with dar.load_npz(npz) as z:
            if "settings" not in z.files or json.loads(str(z["settings"])) != settings:
                raise ValueError(f"--out {out}: {npz} was not drawn with these settings and "
                                 f"weights: use another --out")
    if world > 1:
        torch.distributed.barrier()  # every process has checked before process 0 writes
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(record, "w") as f:
            json.dump(settings, f, indent=1)
    # batch j is samples jB..(j+1)B-1, drawn from its own seed (dar.batch_seed): which process
    # makes it, and whether now or after a restart, does not change its images; process r takes
    # j = r, r + world...; a PNG is written to a .tmp file, then renamed: never half of one
    n, B = args.num_samples, args.batch_size
    labels = torch.arange(n) % num_classes
    todo = [s for s in range(rank * B, n, world * B)
            if not all(os.path.exists(png.format(i)) for i in range(s, min(s + B, n)))]
    for s in tqdm(todo, disable=rank != 0, desc="sampling", dynamic_ncols=True):
        images = dar.to_uint8(draw(labels[s:s + B], dar.batch_seed(args.seed, s))[out_step - 1])
        for i, img in enumerate(images, s):
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
    tok, gpt, args.tokenizer = dar.load_pair(args.gpt, args.tokenizer, device)
    if args.guidance is None:
        args.guidance = dar.PAPER_GUIDANCE.get(args.gpt, 1.0)
    if rank == 0:
        print(f"weights: tokenizer {args.tokenizer} | GPT {args.gpt} | guidance {args.guidance}")
    if args.list_classes:
        for i in range(gpt.cfg.num_classes):
            print(i, gpt.classes[i] if gpt.classes else "")
        return
    bad = [c for c in args.classes if not 0 <= c < gpt.cfg.num_classes]
    if bad:
        raise ValueError(f"--class {bad[0]} is not one of this GPT's classes "
                         f"0..{gpt.cfg.num_classes - 1}")
    out_step = dar.output_step(args.preview_step, args.steps or tok.cfg.sample_steps)
    made_by = dict(gpt_digest=dar.digest(gpt), tokenizer_digest=dar.digest(tok)) if args.out else {}
    dar.prepare_sampling(tok, gpt, args.bf16, args.compile)

    def draw(labels, seed, prefix=None):  # -> the images after each decoder step
        return dar.draw(tok, gpt, labels.to(device), seed, args.guidance, args.temperature,
                        args.top_k, args.top_p, args.solver, args.steps, prefix, args.bf16)

    if args.out:
        return bulk(args, draw, out_step, gpt.cfg.num_classes, rank, world, made_by)

    # a few images: one row per class, the preview strips, or the layout pairs
    labels = torch.tensor(args.classes).repeat_interleave(args.num_per_class)
    ref = prefix = None
    if args.layout:  # zero-shot layout control: the reference's first tokens, fixed
        if args.prefix_tokens > tok.cfg.num_tokens:
            raise ValueError(f"--prefix-tokens {args.prefix_tokens}: the tokenizer has "
                             f"{tok.cfg.num_tokens} tokens")
        ref = dar.to_tensor(dar.center_crop(dar.load_image(args.layout), tok.cfg.image_size))
        ref = ref.to(device)
        prefix = tok.encode(ref[None])[:, :args.prefix_tokens].expand(len(labels), -1)
    t0 = time.perf_counter()
    previews = draw(labels, args.seed, prefix)
    images, seconds = previews[out_step - 1], time.perf_counter() - t0
    print(f"{len(labels)} images in {seconds:.2f} s ({len(labels) / seconds:.2f} images/s)")
    if args.preview:     # one row per sample: after step 1, 2, ..., the final image last
        dar.save_grid(torch.stack(previews, 1).flatten(0, 1), args.grid, nrow=len(previews))
        gif = os.path.splitext(args.grid)[0] + ".gif"  # the samples forming, laid out as sample.png
        frames = [dar.grid_image(p, args.num_per_class) for p in previews]
        frames[0].save(gif, save_all=True, append_images=frames[1:], loop=0,
                       duration=[600] * (len(frames) - 1) + [2000])  # ms a frame; the result 2 s
        print(f"saved {gif}")
    elif ref is not None:  # one row per sample: the reference, then the sample
        dar.save_grid(torch.stack([ref.expand_as(images), images], 1).flatten(0, 1), args.grid, nrow=2)
    else:                # one row per class
        dar.save_grid(images, args.grid, nrow=args.num_per_class)
    print(f"saved {args.grid}")


if __name__ == "__main__":
    dar.cli(main)
