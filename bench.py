"""
Time D-AR's stages with random weights of any preset, on synthetic data (as nanoGPT's bench.py):
the training step of either stage, and sampling (AR generation, pixel decoding, end to end).

    python bench.py tokenizer --preset tokenizer_v1 --batch-size 64       # img/s, TFLOP/s, peak memory
    python bench.py ar --preset GPT-L --batch-size 64                     # tok/s (tokenizer_v1's 256 of 16384)
    python bench.py sample --preset GPT-L --batch-size 64 --guidance 1.1,8.0   # with tokenizer_v1
    python bench.py sample --preset GPT-small --tokenizer-preset tokenizer_small --batch-size 8

Each figure is the median of --repeats runs after a warm-up run (which also compiles). --peak-tflops
gives the model FLOPs utilisation (MFU) of a training step, its FLOPs counted on the eager model.
"""

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import dar

p = dar.parser(__doc__)
p.add_argument("stage", choices=["tokenizer", "ar", "sample"], help="what to time")
p.add_argument("--preset", choices=sorted({**dar.TOKENIZER_PRESETS, **dar.GPT_PRESETS}), help="the model: a tokenizer preset (stage tokenizer) or a GPT preset; "
               "None: tokenizer_v1 / GPT-L")
p.add_argument("--tokenizer-preset", default="tokenizer_v1", choices=sorted(dar.TOKENIZER_PRESETS), help="stages ar and sample: the tokenizer whose "
               "codes the GPT writes (and which decodes them)")
p.add_argument("--batch-size", type=dar.positive_int, default=8, help="images (sequences) per step or sampling")
p.add_argument("--guidance", type=dar.parse_guidance, default=1.0, help="sample: guidance (> 1 doubles the AR batch)")
p.add_argument("--repeats", type=dar.positive_int, default=5, help="timed runs (median)")
p.add_argument("--peak-tflops", type=dar.positive_float, help="the device's peak (989 for an H100 / H200 in bf16 "
               "dense): prints MFU")
p.add_argument("--device", default=dar.DEVICE, choices=["cuda", "mps", "cpu"])
p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (sample: bf16 Llama "
               "weights too); None: on with cuda")
p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile; None: on with cuda")
p.add_argument("--grad-checkpointing", action="store_true", help="training stages: recompute activations")
p.add_argument("--threads", type=dar.threads, help="compute threads; None: the cores")
args = p.parse_args()
if args.preset and (args.preset in dar.TOKENIZER_PRESETS) != (args.stage == "tokenizer"):
    p.error(f"--preset {args.preset}: not a preset of the {args.stage} stage")
bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
use_compile = args.device == "cuda" if args.compile is None else args.compile
device, cuda = torch.device(args.device), args.device == "cuda"
try:
    dar.setup(args.device, args.threads)
except ValueError as e:
    p.error(str(e))
torch.manual_seed(0)


def median_seconds(fn):
    """Median wall time of fn() over --repeats runs, after one warm-up run (compilation, caches)."""
    fn()
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


tok_cfg = dar.tokenizer_config(args.preset if args.stage == "tokenizer" and args.preset else args.tokenizer_preset,
                               repa_dim=0)
B, N = args.batch_size, tok_cfg.num_tokens
name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
if cuda:
    torch.cuda.reset_peak_memory_stats()

if args.stage in ("tokenizer", "ar"):
    # one whole optimizer step (forward, backward, clip, AdamW) of the real model and loss on a batch
    # already on the device: no loader, no disk
    if args.stage == "tokenizer":  # eq. 7 without LPIPS and REPA (their networks are not D-AR's cost)
        model, unit, per_item = dar.Tokenizer(tok_cfg).to(device).train(), "img", 1
        for m in (model.encoder, model.decoder, model.dit):
            m.grad_checkpointing = args.grad_checkpointing
        batch = (torch.rand(B, 3, tok_cfg.image_size, tok_cfg.image_size, device=device) * 2 - 1,)
        loss_fn = lambda net, x: dar.tokenizer_loss(net, x)[0]
    else:                          # eq. 6 on random codes
        model = dar.GPT(dar.gpt_config(args.preset or "GPT-L", vocab_size=tok_cfg.codebook_size, block_size=N))
        model, unit, per_item = model.to(device).train(), "tok", N
        model.grad_checkpointing = args.grad_checkpointing
        batch = (torch.randint(0, tok_cfg.codebook_size, (B, N), device=device),
                 torch.randint(0, model.cfg.num_classes, (B,), device=device))
        loss_fn = lambda net, codes, labels: dar.ar_loss(net, codes, labels, 0.1, model.cfg.num_classes)
    optimizer = dar.make_optimizer(model, 1e-4, 0.0, 0.95, fused=cuda)
    net = torch.compile(model) if use_compile else model

    def step(net=net):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = loss_fn(net, *batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # one eager step's FLOPs (forward and backward)
        step(model)
    seconds, flops = median_seconds(step), counter.get_total_flops()
    mfu = f" | MFU {flops / seconds / 1e12 / args.peak_tflops:.1%}" if args.peak_tflops else ""
    print(f"{args.stage} {args.preset or 'default'} | batch {B} | {name} | compile {use_compile} | bf16 {bf16}\n"
          f"  training step {seconds * 1e3:.1f} ms | {B * per_item / seconds:.1f} {unit}/s | {flops / 1e9:.1f} "
          f"GFLOP per step, {flops / seconds / 1e12:.3f} TFLOP/s{mfu}")
else:
    tok = dar.Tokenizer(tok_cfg).to(device).eval()
    gpt = dar.GPT(dar.gpt_config(args.preset or "GPT-L", vocab_size=tok_cfg.codebook_size, block_size=N))
    gpt = gpt.to(device).eval()
    dar.prepare_sampling(tok, gpt, bf16, use_compile)
    labels = torch.randint(0, gpt.cfg.num_classes, (B,), device=device)
    codes = torch.randint(0, tok_cfg.codebook_size, (B, N), device=device)
    # the two halves alone (the Llama writing N tokens; the decoder's steps on known codes), then the
    # streamed whole (dar.sample, as sample.py draws), which interleaves them
    t_ar = median_seconds(lambda: list(dar.generate_stream(gpt, labels, N, args.guidance)))
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        t_px = median_seconds(lambda: list(tok.decode_steps(codes)))
    t_all = median_seconds(lambda: dar.draw(tok, gpt, labels, 0, args.guidance, bf16=bf16))
    print(f"sample {args.preset or 'GPT-L'} + {args.tokenizer_preset} | batch {B} | guidance {args.guidance} | {name} | "
          f"compile {use_compile} | bf16 {bf16}\n"
          f"  AR generation   {t_ar:8.3f} s  {B * N / t_ar:10.1f} tokens/s  {t_ar / N * 1e3:.2f} ms per token step\n"
          f"  pixel decoding  {t_px:8.3f} s  {B / t_px:10.2f} images/s ({tok_cfg.sample_steps} steps)\n"
          f"  end to end      {t_all:8.3f} s  {B / t_all:10.2f} images/s")
import resource  # noqa: E402  (the process's peak resident memory, in KiB, on a CPU)
peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"  peak {'GPU' if cuda else 'resident'} memory {peak / 2 ** 30:.2f} GiB")
