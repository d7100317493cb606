"""
Sample images with D-AR: the Llama writes tokens, and every finished group of tokens is decoded
into one more step of pixel diffusion as it arrives (streaming).

    python sample.py --class 207                         # -> sample.png: 4 golden retrievers (see below)
    python sample.py --class 207 360 --num-per-class 4 --cfg 1.1,8.0 --seed 1
    python sample.py --class 3 --preview                 # -> preview.png: one row per sample, the image after
                                                         #    each group; preview.gif: the samples forming
    python sample.py --class 1 5 9 --layout ref.png --prefix-tokens 16   # -> layout.png: zero-shot layout control
    python sample.py --gpt D-AR-XL --class 207           # the released XL (guidance 1.1,10.0, the paper's)
    python sample.py --tokenizer D-AR-tokenizer_v1.pt --gpt D-AR-L-360K.pt --class 207   # files downloaded by hand
    torchrun --nproc_per_node=8 sample.py --tokenizer ... --gpt ... --out samples/ --num-samples 50000

The weights: --tokenizer and --gpt take a checkpoint (ours or official) or a released name
(tokenizer_v1; D-AR-L, D-AR-XL), which is downloaded once from the Hugging Face hub (showlab/D-AR)
into its cache (HF_HOME; HF_ENDPOINT for a mirror, HF_HUB_OFFLINE=1 to use the cache only). A
released GPT brings its tokenizer. Given neither, the newest runs under runs/ are used, and on a
fresh clone with no runs the released tokenizer_v1 + D-AR-L. A released GPT samples with the
paper's guidance unless --cfg says otherwise; any other with none (1.0). The first line printed
says which weights and guidance are used.

--out DIR writes one PNG per sample (DIR/000123.png, class = index mod number of classes, so the
labels are balanced) and DIR.npz in the ADM evaluator layout (arr_0: uint8 NHWC images, arr_1:
labels). Work is cut into batches with seeds of their own, spread over the processes; a batch whose
PNGs all exist is not redone, so an interrupted run picks up where it stopped.
eval_fid.py --gpt draws the same images through the same dar.Sampler.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import dar


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dar.HelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer checkpoint or released name (tokenizer_v1); default: the GPT's "
                   "if it is released, else the newest runs/tokenizer*/ckpt.pt")
    p.add_argument("--gpt", help="GPT checkpoint or released name (D-AR-L, D-AR-XL); default: the newest "
                   "runs/GPT*/ckpt.pt, and D-AR-L when runs/ holds no run")
    p.add_argument("--class", dest="classes", type=int, nargs="+", default=[0],
                   help="class ids (default 0; a run's class names: --list-classes; Fashion-MNIST: 0 t-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, "
                   "5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 boot)")
    p.add_argument("--num-per-class", type=dar.positive_int, default=4, help="samples per class")
    dar.sampling_arguments(p)  # --seed, --cfg, --temperature, --top-k, --top-p, --sampler, --steps, --bf16, --compile
    p.add_argument("--list-classes", action="store_true", help="print the GPT's class ids and names, then exit")
    p.add_argument("--preview", action="store_true", help="save the trajectory: the image after each step "
                   "(a PNG strip per sample, and an animated GIF of the samples forming next to it)")
    p.add_argument("--layout", help="reference image whose first tokens are kept (layout control; default: none)")
    p.add_argument("--prefix-tokens", type=dar.positive_int, help="how many tokens of --layout to keep (needed with --layout; no default)")
    p.add_argument("--grid", help="output PNG (default: sample.png, preview.png with --preview, layout.png "
                   "with --layout)")
    p.add_argument("--out", help="directory for bulk sampling (one PNG per sample, plus DIR.npz; default: none, a grid)")
    p.add_argument("--num-samples", type=dar.positive_int, default=50000, help="--out: how many samples")
    p.add_argument("--batch-size", type=dar.positive_int, default=32, help="samples per forward")
    p.add_argument("--threads", type=dar.positive_int, help="compute threads (default: the cores this process may "
                   "use; on a busy machine try 1)")
    p.add_argument("--benchmark", action="store_true", help="time AR generation, pixel decoding and "
                   "end-to-end sampling of --batch-size images with random weights, then exit")
    p.add_argument("--tokenizer-preset", default="tokenizer_v1", choices=sorted(dar.TOKENIZER_PRESETS),
                   help="--benchmark: tokenizer size")
    p.add_argument("--gpt-preset", default="GPT-L", choices=sorted(dar.GPT_PRESETS), help="--benchmark: GPT size")
    p.add_argument("--repeats", type=dar.positive_int, default=5, help="--benchmark: timed runs (median) after one warm-up")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.benchmark and args.cfg is None:  # random weights: no paper's guidance to take
        args.cfg = 1.0
    # bf16 and compile pay off on GPUs (tensor cores, CUDA graphs); on a CPU they are opt-in
    args.settings = dar.sampling_settings(args, torch.cuda.is_available())
    # each mode its own file, so the README's commands do not overwrite each other's output
    args.grid = args.grid or ("preview.png" if args.preview else "layout.png" if args.layout else "sample.png")
    # checked now, not after the sampling: PIL picks the format from the extension
    from PIL import Image
    Image.init()
    if os.path.splitext(args.grid)[1].lower() not in Image.EXTENSION:
        p.error(f"--grid {args.grid}: no image extension PIL can write (e.g. .png, .jpg, .webp)")
    if bool(args.layout) != bool(args.prefix_tokens):
        p.error("--layout and --prefix-tokens go together: the reference image, and how many of its tokens to keep")
    return args


def check_settings(args, tok_path, gpt_path):
    """--out DIR continues an earlier run only if it drew with the same settings (they decide every
    image); DIR/settings.json records them. Returns None, or the line saying what differs."""
    import json
    path = os.path.join(args.out, "settings.json")
    now = dict(tokenizer=os.path.abspath(tok_path), gpt=os.path.abspath(gpt_path), seed=args.seed,
               batch_size=args.batch_size, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, sampler=args.sampler, steps=args.steps, bf16=args.bf16,
               preview_step=args.preview_step)
    now = json.loads(json.dumps(now))  # tuples -> lists, as stored
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        differ = [f"{k} {before.get(k)} (now {v})" for k, v in now.items() if before.get(k) != v]
        if differ:
            return (f"{args.out} holds samples drawn with other settings: {', '.join(differ)}; use another --out, "
                    f"or delete {args.out} to start afresh")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(now, f, indent=1)
    return None


def png(out, i):
    return os.path.join(out, f"{i:06d}.png")


def bulk(args, sampler, num_classes):
    """--out DIR --num-samples N: class-balanced PNGs (resumable, sharded over processes) + DIR.npz."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    os.makedirs(args.out, exist_ok=True)
    B, n = args.batch_size, args.num_samples
    # batch j holds samples jB..(j+1)B-1 and process r takes batches r, r + world, ...; a batch's
    # draws come from its own seed (dar.batch_seed), so which process makes it, and whether it is
    # made now or after a restart, does not change its images
    batches = [list(range(s, min(s + B, n))) for s in range(0, n, B)]
    todo = [b for b in batches[rank::world] if not all(os.path.exists(png(args.out, i)) for i in b)]
    labels = dar.class_balanced_labels(n, num_classes)
    if rank == 0:
        print(f"{n} samples in {len(batches)} batches; this process: {len(todo)} to do")
        stale = [f for f in os.listdir(args.out) if f.endswith(".png") and f[:-4].isdigit() and int(f[:-4]) >= n]
        if stale:
            print(f"note: {args.out} also holds {len(stale)} PNGs past sample {n - 1} from an earlier run; "
                  f"{args.out.rstrip('/')}.npz takes samples 0..{n - 1} only")
    for b in tqdm(todo, disable=rank != 0, desc="sampling", dynamic_ncols=True):
        for i, img in zip(b, sampler.batch(b[0], labels[b[0]:b[-1] + 1], args.seed)):
            Image.fromarray(img).save(png(args.out, i))
    if world > 1:
        dist.barrier()  # every process's PNGs are written before rank 0 reads them all
    if rank == 0:  # the .npz is built from the PNGs, so it also holds those of earlier runs
        images = np.stack([np.asarray(Image.open(png(args.out, i)).convert("RGB"))
                           for i in tqdm(range(n), desc="building .npz", dynamic_ncols=True)])
        path = args.out.rstrip("/") + ".npz"
        dar.write_npz(path, images, labels.numpy())
        print(f"wrote {path}: arr_0 {images.shape} {images.dtype}, arr_1 labels")


def benchmark(args, device):
    """Median seconds of AR generation, pixel decoding and streamed end-to-end sampling of one
    batch, with random weights of the presets' sizes."""
    torch.manual_seed(0)
    tok = dar.Tokenizer(dar.tokenizer_config(args.tokenizer_preset, repa_dim=0)).to(device).eval()
    gpt = dar.GPT(dar.gpt_config(args.gpt_preset, vocab_size=tok.cfg.codebook_size,
                                 block_size=tok.cfg.num_tokens)).to(device).eval()
    sampler = dar.Sampler(tok, gpt, args.settings, device)
    B, N, cuda = args.batch_size, tok.cfg.num_tokens, device.type == "cuda"
    labels = torch.randint(0, gpt.cfg.num_classes, (B,), device=device)
    codes = torch.randint(0, tok.cfg.codebook_size, (B, N), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # the two halves alone (the Llama writing N tokens; the decoder's K steps on known codes), then
    # the streamed whole, which interleaves them
    t_ar = dar.median_seconds(lambda: list(dar.generate_stream(sampler.gpt, labels, N, guidance=args.cfg,
                                                               decode_fn=sampler.decode_fn)), args.repeats, cuda)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        t_px = dar.median_seconds(lambda: list(tok.decode_steps(codes, dit=sampler.dit)), args.repeats, cuda)
    t_e2e = dar.median_seconds(lambda: sampler(labels), args.repeats, cuda)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"benchmark {args.gpt_preset} + {args.tokenizer_preset} | batch {B} | cfg {args.cfg} | {name} | "
          f"compile {args.compile} | bf16 {args.bf16}\n"
          f"  AR generation   {t_ar:8.3f} s  {B * N / t_ar:10.1f} tokens/s  {t_ar / N * 1e3:.2f} ms per token step\n"
          f"  pixel decoding  {t_px:8.3f} s  {B / t_px:10.2f} images/s\n"
          f"  end to end      {t_e2e:8.3f} s  {B / t_e2e:10.2f} images/s   (median of {args.repeats}; "
          f"peak memory {dar.peak_memory_gib(cuda):.2f} GiB)")


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dar.setup_distributed()
    args.threads = dar.cpu_budget(args.threads, 0)[0]
    note = dar.busy_note(args.threads) if rank == 0 else None  # other programs hold the cores
    if note:
        print(note)
    if args.benchmark:
        return benchmark(args, device)

    # models, and every input checked before any work
    try:
        tok, gpt, used = dar.load_models(args.tokenizer, args.gpt, device, guidance=args.cfg)
        args.cfg = args.settings.guidance = used.guidance  # the paper's for a released GPT without --cfg
        if rank == 0:
            print(used)
        if args.list_classes:
            names = gpt.classes or [None] * gpt.cfg.num_classes
            for i, name in enumerate(names):
                print(i, name or "")
            return
        sampler = dar.Sampler(tok, gpt, args.settings, device)  # checks --preview-step against the steps
        if args.out and rank == 0:
            bad_out = check_settings(args, used.tokenizer.path, used.gpt.path)
            if bad_out:
                raise ValueError(bad_out)
        bad = [c for c in args.classes if not 0 <= c < gpt.cfg.num_classes]
        if bad:
            raise ValueError(f"--class {bad[0]} is outside this model's classes 0..{gpt.cfg.num_classes - 1}")
        if args.layout and args.prefix_tokens > tok.cfg.num_tokens:
            raise ValueError(f"--prefix-tokens {args.prefix_tokens}: this tokenizer has {tok.cfg.num_tokens} tokens")
        ref = dar.to_tensor(dar.center_crop(dar.load_image(args.layout), tok.cfg.image_size)) if args.layout else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.out:
        return bulk(args, sampler, gpt.cfg.num_classes)

    # a few images: one row per class, the preview strip, or the layout pairs
    torch.manual_seed(args.seed)
    labels = torch.tensor(args.classes, device=device).repeat_interleave(args.num_per_class)
    prefix = None
    if ref is not None:  # zero-shot layout control: the reference's first tokens, fixed
        prefix = tok.encode(ref[None].to(device))[:, :args.prefix_tokens].expand(len(labels), -1)
    t0 = time.perf_counter()
    tokens, previews = sampler(labels, prefix=prefix)
    total, n = time.perf_counter() - t0, len(labels)
    ar = total - sampler.dit_seconds  # the sampler times its DiT calls; the rest is the Llama's
    print(f"{n} images in {total:.2f} s ({n / total:.2f} images/s): AR tokens {ar:.2f} s "
          f"({n * tok.cfg.num_tokens / max(ar, 1e-9):.0f} tokens/s), pixel DiT {sampler.dit_seconds:.2f} s")

    images = previews[sampler.output_step - 1]  # the image, or the preview after --preview-step
    if args.preview:      # one row per sample: after group 1, 2, ..., final image last
        grid, nrow = torch.stack(previews, 1).flatten(0, 1), len(previews)
    elif ref is not None:  # one row per sample: the reference, then the result
        grid, nrow = torch.stack([ref.to(device).expand_as(images), images], 1).flatten(0, 1), 2
    else:                  # one row per class
        grid, nrow = images, args.num_per_class
    dar.save_grid(grid, args.grid, nrow=nrow)
    print(f"saved {args.grid}")
    if args.preview:      # the samples forming, one frame per decoder step, laid out as sample.png
        gif = os.path.splitext(args.grid)[0] + ".gif"
        dar.save_animation(previews, gif, nrow=args.num_per_class)
        print(f"saved {gif} (animated: the samples after each of {len(previews)} steps)")


if __name__ == "__main__":
    main()
