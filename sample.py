"""
Sample images with D-AR: the Llama writes tokens, and every finished group of tokens is decoded
into one more step of pixel diffusion as it arrives (streaming).

    python sample.py --class 207                         # latest checkpoints under runs/ -> sample.png
    python sample.py --class 207 360 --num-per-class 4 --cfg 1.1,8.0 --seed 1
    python sample.py --class 3 --preview                 # one row per sample: jump estimate after each group
    python sample.py --class 1 5 9 --layout ref.png --prefix-tokens 16   # zero-shot layout control
    python sample.py --tokenizer D-AR-tokenizer_v1.pt --gpt D-AR-L-360K.pt --class 207 --cfg 1.1,8.0
    torchrun --nproc_per_node=8 sample.py --tokenizer ... --gpt ... --out samples/ --num-samples 50000

--out DIR writes one PNG per sample (DIR/000123.png, class = index mod number of classes, so the
labels are balanced) and DIR.npz in the ADM evaluator layout (arr_0: uint8 NHWC images, arr_1:
labels). Work is cut into batches with seeds of their own, spread over the processes; a batch whose
PNGs all exist is not redone, so an interrupted run picks up where it stopped.
"""

import argparse
import glob
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import dar


def latest(pattern):
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: newest runs/tokenizer*/ckpt.pt)")
    p.add_argument("--gpt", help="GPT checkpoint (default: newest runs/GPT*/ckpt.pt)")
    p.add_argument("--class", dest="classes", type=int, nargs="+", default=[0], help="class ids")
    p.add_argument("--num-per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", default="1.0", help="guidance: 'start,end' of a linear schedule over the "
                   "tokens (D-AR-L: 1.1,8.0; XL: 1.1,10.0) or one number")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampler", choices=["adams2", "euler"], default="adams2")
    p.add_argument("--steps", type=int, help="decoder steps (default: one per group)")
    p.add_argument("--preview", action="store_true", help="save the trajectory: jump estimate after each step")
    p.add_argument("--layout", help="reference image whose first tokens are kept (layout control)")
    p.add_argument("--prefix-tokens", type=int, default=0, help="how many tokens of --layout to keep")
    p.add_argument("--grid", default="sample.png", help="output PNG of the grid modes")
    p.add_argument("--out", help="directory for bulk sampling (one PNG per sample, plus DIR.npz)")
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights for the Llama and bf16 autocast for the decoder (default: on with "
                   "CUDA, off on a CPU, where it needs AVX512-BF16 or AMX to pay off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the pixel DiT and the AR decode step (a CUDA graph on GPUs); "
                   "default: on with CUDA; on a CPU it pays off for bulk sampling")
    p.add_argument("--benchmark", action="store_true", help="time AR generation, pixel decoding and "
                   "end-to-end sampling of --batch-size images with random weights, then exit")
    p.add_argument("--tokenizer-preset", default="tokenizer_v1", help="--benchmark: tokenizer size")
    p.add_argument("--gpt-preset", default="GPT-L", help="--benchmark: GPT size")
    p.add_argument("--repeats", type=int, default=5, help="--benchmark: timed runs (median) after one warm-up")
    return p.parse_args(argv)


def load_models(args, device):
    """Tokenizer and GPT, checked to belong together."""
    tok_path = args.tokenizer or latest("runs/tokenizer*/ckpt.pt")
    gpt_path = args.gpt or latest("runs/GPT*/ckpt.pt")
    if not tok_path or not gpt_path:
        raise dar.CheckpointError("no checkpoints given and none found under runs/: pass --tokenizer and --gpt")
    tok = dar.Tokenizer.from_checkpoint(tok_path).to(device)
    gpt = dar.GPT.from_checkpoint(gpt_path, block_size=tok.cfg.num_tokens).to(device)
    if gpt.cfg.vocab_size != tok.cfg.codebook_size:
        raise dar.CheckpointError(f"{gpt_path} predicts {gpt.cfg.vocab_size} codes but {tok_path} has a "
                                  f"codebook of {tok.cfg.codebook_size}: they do not belong together")
    if gpt.cfg.block_size != tok.cfg.num_tokens:
        raise dar.CheckpointError(f"{gpt_path} writes {gpt.cfg.block_size} tokens but {tok_path} uses "
                                  f"{tok.cfg.num_tokens}: they do not belong together")
    return tok, gpt


class Timer:
    """Seconds spent in the pixel decoder (the rest of a streaming run is the AR model)."""

    def __init__(self, tok, device):
        self.seconds, self.cuda = 0.0, device.type == "cuda"
        for name in ("decode_step", "cond_tokens"):
            setattr(tok, name, self.timed(getattr(tok, name)))

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t
            return out
        return wrapper


def sample(tok, gpt, labels, args, noise=None, prefix=None, decode_fn=dar.decode_one_token):
    """Streamed generation -> (tokens (B, N), list of previews (B, 3, H, W) after each step)."""
    autocast = torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
    previews = []
    with autocast:
        for tokens, state in dar.generate_images(gpt, tok, labels, noise, args.sampler, args.steps,
                                                 cfg=dar.parse_guidance(args.cfg), temperature=args.temperature,
                                                 top_k=args.top_k, top_p=args.top_p, prefix=prefix,
                                                 decode_fn=decode_fn):
            previews.append(state.preview.float())
    return tokens, previews


def class_balanced_labels(n, num_classes):
    """Sample i has class i mod C: every class n / C times (50 each for 50K ImageNet samples)."""
    return torch.arange(n) % num_classes


def batch_seed(seed, first):
    """The seed of the batch that starts at sample `first`: its draws never depend on the batches
    before it, so a batch can be redone alone (and eval_fid.py --gpt makes the same images)."""
    return seed * 1_000_003 + first


def bulk(args, tok, gpt, device, decode_fn):
    """--out DIR --num-samples N: class-balanced PNGs (resumable, sharded over processes) + DIR.npz."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    C, B = gpt.cfg.num_classes, args.batch_size
    os.makedirs(args.out, exist_ok=True)
    batches = [list(range(s, min(s + B, args.num_samples))) for s in range(0, args.num_samples, B)]
    todo = [b for b in batches[rank::world] if not all(os.path.exists(png(args.out, i)) for i in b)]
    labels = class_balanced_labels(args.num_samples, C)
    if rank == 0:
        print(f"{args.num_samples} samples in {len(batches)} batches; this process: {len(todo)} to do")
    for b in tqdm(todo, disable=rank != 0, desc="sampling", dynamic_ncols=True):
        torch.manual_seed(batch_seed(args.seed, b[0]))
        _, previews = sample(tok, gpt, labels[b[0]:b[-1] + 1].to(device), args, decode_fn=decode_fn)
        for i, img in zip(b, dar.to_uint8(previews[-1])):
            Image.fromarray(img).save(png(args.out, i))
    if world > 1:
        dist.barrier()
    if rank == 0:
        images = np.stack([np.asarray(Image.open(png(args.out, i)).convert("RGB"))
                           for i in tqdm(range(args.num_samples), desc="building .npz", dynamic_ncols=True)])
        path = args.out.rstrip("/") + ".npz"
        np.savez(path, images, labels.numpy())  # arr_0, arr_1 as the ADM evaluator expects
        print(f"wrote {path}: arr_0 {images.shape} {images.dtype}, arr_1 labels")


def compile_models(args, device, tok):
    """--compile (default with CUDA): the pixel DiT and the AR decode step through torch.compile.
    Returns the decode step. On a GPU the step becomes a CUDA graph (gpt-fast: static KV cache,
    mode="reduce-overhead"); on a CPU, fused C++ kernels around the matrix products."""
    if not (args.compile or (args.compile is None and device.type == "cuda")):
        return dar.decode_one_token
    tok.dit = torch.compile(tok.dit)
    return torch.compile(dar.decode_one_token, mode="reduce-overhead" if device.type == "cuda" else "default",
                         fullgraph=True)


def benchmark(args, device):
    """Median seconds of AR generation, pixel decoding and streamed end-to-end sampling of one batch."""
    torch.manual_seed(0)
    tok = dar.Tokenizer(dar.tokenizer_config(args.tokenizer_preset, repa_dim=0)).to(device).eval()
    decode_fn = compile_models(args, device, tok)
    gpt = dar.GPT(dar.gpt_config(args.gpt_preset, vocab_size=tok.cfg.codebook_size,
                                 block_size=tok.cfg.num_tokens)).to(device).eval()
    if args.bf16:
        gpt = gpt.to(torch.bfloat16)
    B, N = args.batch_size, tok.cfg.num_tokens
    labels = torch.randint(0, gpt.cfg.num_classes, (B,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
    cfg = dar.parse_guidance(args.cfg)

    def timed(fn):
        fn()  # warm-up (and compilation)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    codes = torch.randint(0, tok.cfg.codebook_size, (B, N), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ar = timed(lambda: list(dar.generate_stream(gpt, labels, N, cfg=cfg, decode_fn=decode_fn)))
    with autocast:
        t_px = timed(lambda: tok.decode(codes))
    t_e2e = timed(lambda: sample(tok, gpt, labels, args, decode_fn=decode_fn))
    mem = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else "n/a"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"benchmark {args.gpt_preset} + {args.tokenizer_preset} | batch {B} | cfg {args.cfg} | {name} | "
          f"compile {decode_fn is not dar.decode_one_token}\n"
          f"  AR generation   {t_ar:8.3f} s  {B * N / t_ar:10.1f} tokens/s  {t_ar / N * 1e3:.2f} ms per token step\n"
          f"  pixel decoding  {t_px:8.3f} s  {B / t_px:10.2f} images/s\n"
          f"  end to end      {t_e2e:8.3f} s  {B / t_e2e:10.2f} images/s   (median of {args.repeats}; peak memory {mem})")


def png(out, i):
    return os.path.join(out, f"{i:06d}.png")


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = dar.setup_distributed()
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    if args.benchmark:
        return benchmark(args, device)
    try:
        tok, gpt = load_models(args, device)
        dar.parse_guidance(args.cfg)
        bad = [c for c in args.classes if not 0 <= c < gpt.cfg.num_classes]
        if bad:
            raise ValueError(f"--class {bad[0]} is outside this model's classes 0..{gpt.cfg.num_classes - 1}")
        if args.layout and not 0 < args.prefix_tokens <= tok.cfg.num_tokens:
            raise ValueError(f"--prefix-tokens must be in 1..{tok.cfg.num_tokens} with --layout")
        ref = dar.to_tensor(dar.center_crop(dar.load_image(args.layout), tok.cfg.image_size)) if args.layout else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.bf16:
        gpt = gpt.to(torch.bfloat16)  # halves the weights read at every token step
    decode_fn = compile_models(args, device, tok)

    if args.out:
        return bulk(args, tok, gpt, device, decode_fn)

    torch.manual_seed(args.seed)
    labels = torch.tensor(args.classes, device=device).repeat_interleave(args.num_per_class)
    prefix = None
    if ref is not None:
        prefix = tok.encode(ref[None].to(device))[:, :args.prefix_tokens].expand(len(labels), -1)
    timer = Timer(tok, device)
    t0 = time.perf_counter()
    tokens, previews = sample(tok, gpt, labels, args, prefix=prefix, decode_fn=decode_fn)
    total = time.perf_counter() - t0
    images = previews[-1]
    n = len(labels)
    print(f"{n} images in {total:.2f} s ({n / total:.2f} images/s): AR tokens {total - timer.seconds:.2f} s "
          f"({n * tok.cfg.num_tokens / max(total - timer.seconds, 1e-9):.0f} tokens/s), "
          f"pixel decoding {timer.seconds:.2f} s")

    if args.preview:      # one row per sample: after group 1, 2, ..., final image last
        grid, nrow = torch.stack(previews, 1).flatten(0, 1), len(previews)
    elif ref is not None:  # one row per sample: the reference, then the result
        grid, nrow = torch.stack([ref.to(device).expand_as(images), images], 1).flatten(0, 1), 2
    else:                  # one row per class
        grid, nrow = images, args.num_per_class
    dar.save_grid(grid, args.grid, nrow=nrow)
    print(f"saved {args.grid}")


if __name__ == "__main__":
    main()
