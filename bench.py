"""
Time D-AR's stages with random weights of any preset, each beside its floor on this machine,
measured in the same run (as nanoGPT's bench.py, with the roofline made explicit):

    python bench.py sample --preset GPT-L          # token step and DiT step, tokenizer_v1's size
    python bench.py tokenizer --preset tokenizer_v1 --batch-size 64   # a training step, img/s
    python bench.py ar --preset GPT-L --batch-size 64                 # a training step, tok/s

The floors: a token step reads the Llama's weights and KV cache once, so it cannot beat their
bytes at the rate of a large copy; a DiT step or a training step does its FLOPs (counted) at
best at the rate of a large matmul in the dtype used. Each figure is the median of --repeats
runs after a warm-up run (which also compiles). --peak-tflops overrides the measured matmul rate.
"""

import argparse
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import dar


def parse_args(argv=None):
    p = dar.parser(__doc__)
    add = p.add_argument
    add("stage", choices=["sample", "tokenizer", "ar"], help="what to time")
    add("--preset", choices=sorted({**dar.TOKENIZER_PRESETS, **dar.GPT_PRESETS}),
        help="the model (stage tokenizer: a tokenizer); None: tokenizer_v1, GPT-L")
    add("--tokenizer-preset", default="tokenizer_v1", choices=sorted(dar.TOKENIZER_PRESETS),
        help="stages sample and ar: the tokenizer whose codes the GPT writes")
    add("--batch-size", type=dar.positive_int, default=4, help="images (sequences)")
    add("--guidance", type=dar.parse_guidance, default=(1.1, 8.0), help="sample: > 1 doubles "
        "the rows of a token step")
    add("--repeats", type=dar.positive_int, default=3, help="timed runs (median)")
    add("--peak-tflops", type=dar.positive_float, help="the device's peak, instead of a matmul's")
    add("--device", default=dar.DEVICE, choices=["cuda", "mps", "cpu"])
    add("--bf16", action=argparse.BooleanOptionalAction, help="None: where the hardware has it")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile; None: with cuda")
    add("--grad-checkpointing", action="store_true", help="training stages")
    add("--threads", type=dar.threads, help="compute threads; None: the cores")
    args = p.parse_args(argv)
    if args.preset and (args.preset in dar.TOKENIZER_PRESETS) != (args.stage == "tokenizer"):
        p.error(f"--preset {args.preset}: not a preset of the {args.stage} stage")
    args.bf16 = dar.bf16_default(args.device)[0] if args.bf16 is None else args.bf16
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    return args


def seconds(fn, repeats, sync, best=False):
    """Wall time of fn() over `repeats` runs after a warm-up run: the median, or the best."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times) if best else statistics.median(times)


def floors(device, dtype, repeats, sync):
    """This machine's best rates, measured: a large copy (bytes copied a second) and a large
    matmul (FLOP/s), in the dtype used."""
    x = torch.empty(2 ** 29 // dtype.itemsize, dtype=dtype, device=device)  # 512 MiB
    y = torch.empty_like(x)
    copy = x.numel() * x.itemsize / seconds(lambda: y.copy_(x), repeats + 2, sync, best=True)
    a = torch.randn(4096, 4096, device=device).to(dtype)
    matmul = 2 * 4096 ** 3 / seconds(lambda: a @ a, repeats + 2, sync, best=True)
    return copy, matmul


def line(name, t, floor, why):
    return f"{name:<14} {t * 1e3:9.1f} ms | floor {floor * 1e3:8.1f} ms ({why}) | {t / floor:.2f}x"


@torch.no_grad()
def sample(args, device, dtype, copy, matmul, sync):
    """The two steps of sampling: a token step of the Llama (guided: 2B rows) and a DiT step."""
    tok_cfg = dar.tokenizer_config(args.tokenizer_preset, repa_dim=0)
    tok = dar.Tokenizer(tok_cfg).to(device).eval()
    gpt = dar.GPT(dar.gpt_config(args.preset or "GPT-L", vocab_size=tok_cfg.codebook_size,
                                 block_size=tok_cfg.num_tokens)).to(device).eval()
    dar.prepare_sampling(tok, gpt, args.bf16, args.compile)
    B, N = args.batch_size, tok_cfg.num_tokens
    rows = 2 * B if dar.guidance_schedule(args.guidance, 2).ne(1).any() else B
    gpt.setup_cache(rows, N + 1)
    token = torch.zeros(rows, dtype=torch.long, device=device)
    gpt.prefill(token, token[:, None][:, :0])
    pos = torch.tensor([N // 2], device=device)  # the average step, half the cache filled
    t_token = seconds(lambda: gpt.decode_one(token, pos), args.repeats, sync)
    cache = sum(t[:, :, :N // 2 + 1].numel() * t.itemsize for l in gpt.layers for t in l.attn.cache)
    weights = sum(p.numel() * p.itemsize for p in gpt.parameters())
    bytes_ = weights + cache  # a step must read them all, once
    x = torch.randn(B, 3, tok_cfg.image_size, tok_cfg.image_size, device=device)
    t, z = torch.full((B,), 0.5, device=device), torch.randn(B, tok_cfg.group_size, tok_cfg.dec_dim)

    def dit_step():
        tok.dit(x, t, z.to(device))
    with FlopCounterMode(display=False) as counter:
        dit_step()
    t_dit = seconds(dit_step, args.repeats, sync)
    flops = counter.get_total_flops()
    print(line("token step", t_token, bytes_ / copy,
               f"{bytes_ / 1e9:.2f} GB at {copy / 1e9:.0f} GB/s"))
    print(line("DiT step", t_dit, flops / matmul,
               f"{flops / 1e12:.2f} TFLOP at {matmul / 1e12:.2f} TFLOP/s"))
    steps = tok_cfg.sample_steps
    print(f"sampling {B} images: ~{N * t_token + steps * t_dit:.1f} s ({N} token steps, "
          f"{steps} DiT steps)")


def train(args, device, dtype, copy, matmul, sync):
    """One whole optimizer step (forward, backward, clip, AdamW) on a batch already on the
    device; LPIPS and REPA left out (their networks are not D-AR's cost)."""
    tok_cfg = dar.tokenizer_config(args.preset if args.stage == "tokenizer" and args.preset else
                                   args.tokenizer_preset, repa_dim=0)
    B, N = args.batch_size, tok_cfg.num_tokens
    if args.stage == "tokenizer":
        model, unit = dar.Tokenizer(tok_cfg).to(device).train(), ("img", B)
        for m in (model.encoder, model.decoder, model.dit):
            m.grad_checkpointing = args.grad_checkpointing
        batch = (torch.rand(B, 3, tok_cfg.image_size, tok_cfg.image_size, device=device) * 2 - 1,)
        loss_fn = lambda net, x: dar.tokenizer_loss(net, x)[0]
    else:
        model = dar.GPT(dar.gpt_config(args.preset or "GPT-L", vocab_size=tok_cfg.codebook_size,
                                       block_size=N)).to(device).train()
        model.grad_checkpointing, unit = args.grad_checkpointing, ("tok", B * N)
        batch = (torch.randint(0, tok_cfg.codebook_size, (B, N), device=device),
                 torch.randint(0, model.cfg.num_classes, (B,), device=device))
        loss_fn = lambda net, codes, labels: dar.ar_loss(net, codes, labels, 0.1,
                                                         model.cfg.num_classes)
    optimizer = dar.make_optimizer(model, 1e-4, 0.0, 0.95, fused=device.type == "cuda")
    net = torch.compile(model) if args.compile else model

    def step(net=net):
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            loss = loss_fn(net, *batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # an eager step's FLOPs
        step(model)
    t, flops = seconds(step, args.repeats, sync), counter.get_total_flops()
    print(line("training step", t, flops / matmul,
               f"{flops / 1e12:.2f} TFLOP at {matmul / 1e12:.2f} TFLOP/s") +
          f" | {unit[1] / t:.1f} {unit[0]}/s")


def main(argv=None):
    args = parse_args(argv)
    device = dar.setup(args.device, args.threads)[2]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(0)
    copy, matmul = floors(device, dtype, args.repeats, sync)
    matmul = args.peak_tflops * 1e12 if args.peak_tflops else matmul
    what = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.stage} {args.preset or ''} | batch {args.batch_size} | {what} | "
          f"{'bf16' if args.bf16 else 'fp32'} | compile {args.compile}")
    (sample if args.stage == "sample" else train)(args, device, dtype, copy, matmul, sync)
    peak = (torch.cuda.max_memory_allocated() if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"peak {'GPU' if cuda else 'resident'} memory {peak / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    dar.cli(main)
