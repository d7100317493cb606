"""
D-AR: Diffusion via Autoregressive Models (Gao & Shou, 2025), in one file.

  image --(1D encoder + VQ, eq. 1)--> N = 256 discrete tokens z_1..z_N, in K = 8 groups of 32
  tokens --(causal token decoder)--> conditioning tokens z'
  group k of z' conditions diffusion step k of a pixel DiT (eqs. 2-5): coarse groups first
  an unmodified Llama learns p(z) = prod_i p(z_i | z_<i, class) (eq. 6) and writes tokens left
  to right: every 32 tokens decode into one more denoising step (eq. 8), hence streaming
  previews, and layout control by fixed first tokens.

Part I is the paper, from the smallest pieces up; Part II the little the scripts share, each
script (train_tokenizer.py, train_ar.py, sample.py, eval_fid.py) showing its whole stage.

  PART I: D-AR
    section 1   configs
    section 2   shared pieces: RoPE, attention, blocks
    section 3   vector quantiser (eq. 1)
    section 4   encoder: image -> N query tokens (eq. 1)
    section 5   token decoder: codes -> conditioning tokens z'
    section 6   pixel DiT: the velocity network (eqs. 2-4)
    section 7   condition schedule (eqs. 5, 8)
    section 8   the tokenizer: its sampler loop and its loss (eqs. 7, 8)
    section 9   the autoregressive model: Llama with a KV cache (eq. 6)
    section 10  generation: guidance, streaming into the decoder
    section 11  presets
  PART II: what the scripts share
    section 12  checkpoints: safe loading, the official format, the released weights
    section 13  images and data sets
    section 14  training: the run directory, data order and seeds, the end of a step
    section 15  command lines and sampling

"eq. N" is the paper's (arXiv 2505.23660), "section N" this file's. Where the official code
(showlab/D-AR, which made the released weights) departs from the paper, this file follows the
code and says so. Shapes are noted as (B, N, D).
"""

import argparse
import contextlib
import copy
import ctypes
import fcntl
import gzip
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# ===== PART I: D-AR =====

# -- section 1. Configs: a dataclass a model, saved in every checkpoint (it alone rebuilds one)

@dataclass
class TokenizerConfig:
    """The sequential diffusion tokenizer. Defaults: tokenizer_v1 (307.4M parameters)."""
    image_size: int = 256
    patch_size: int = 16      # encoder patches: (256/16)^2 = 256
    enc_dim: int = 768
    enc_layers: int = 8
    dec_dim: int = 768        # token decoder width = width of the conditioning tokens z'
    dec_layers: int = 8
    num_tokens: int = 256     # N, the length of the 1D code
    num_groups: int = 8       # K: N/K tokens condition each diffusion step
    codebook_size: int = 16384
    vq_dim: int = 8           # codes live in a tiny 8-d space
    query_rank: int = 8       # the N queries are low rank: Embedding(., 8) -> Linear(8, enc_dim)
    max_tokens: int = 1024    # rows of the query and position tables (N used)
    dit_dim: int = 768
    dit_depth: int = 12
    dit_patch_size: int = 8   # pixel patches: 8x8x3 = 192 values a token, 1024 at 256 px
    head_dim: int = 64        # every attention's (2D RoPE: 32 dims per axis)
    mlp_ratio: int = 4
    data_std: float = 0.6     # the DiT sees image * 0.6: a lower signal-to-noise ratio at
                              # every t, more of the path at high noise (as pixels need)
    time_shift: float = 2.0   # beta: times t = u / (u + beta (1 - u)) for uniform u (eq. 8)
    sample_steps: int = 8     # decoder steps by default (8 = K: one per group)
    repa_layer: int = 8       # REPA aligns the DiT's features before this block with DINOv2
    repa_dim: int = 768       # DINOv2 ViT-B/14's width; 0: no projector
    repa_hidden: int = 2048
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.num_tokens % self.num_groups or self.num_tokens > self.max_tokens:
            raise ValueError(f"{self.num_tokens} tokens do not split into {self.num_groups}")
        if self.image_size % self.patch_size or self.image_size % self.dit_patch_size:
            raise ValueError(f"image size {self.image_size}: not a multiple of the patches")

    @property
    def group_size(self):  # N / K tokens a diffusion step (32 for tokenizer_v1)
        return self.num_tokens // self.num_groups


@dataclass
class GPTConfig:
    """The autoregressive model: LlamaGen's GPT, an unmodified Llama. Defaults: GPT-L."""
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    vocab_size: int = 16384   # = the tokenizer's codebook size
    block_size: int = 256     # = the tokenizer's num_tokens N
    num_classes: int = 1000   # the class table has one more row, the null class
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256    # of the SwiGLU hidden size
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1  # p of the null class in training, for guidance (ar_loss)
    head_dim: int = 0         # derived: dim // n_head
    ffn_hidden: int = 0       # derived: multiple_of above int(2 * 4 dim / 3) (Llama's sizing)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_head
        if not self.ffn_hidden:
            hidden = int(2 * 4 * self.dim / 3)
            self.ffn_hidden = -(-hidden // self.multiple_of) * self.multiple_of


# -- section 2. Shared pieces: layer norm without affine, rotary embeddings, attention, MLP

def ln(x):  # LayerNorm without affine (eps 1e-6): all of the tokenizer's bare norms
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def rope_2d(h, w, head_dim, theta, device=None):
    """2D RoPE of an h x w grid, row-major: e^(i angle) (h*w, head_dim/2). Pair j turns by pos *
    theta^(-2j/d_axis): the first head_dim/4 pairs by the row (y), the rest by the column (x),
    32 dims per axis for 64-d heads (Flux). float64, then float32, as the official code."""
    d_axis = head_dim // 2
    arange = lambda n: torch.arange(n, dtype=torch.float64, device=device)
    inv_freq = 1.0 / theta ** (arange(d_axis)[::2] / d_axis)
    ys, xs = torch.meshgrid(arange(h), arange(w), indexing="ij")
    angles = torch.cat([ys.reshape(-1, 1) * inv_freq, xs.reshape(-1, 1) * inv_freq], dim=1)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def rope_1d(pos, head_dim, base):  # positions (T,) -> e^(i angle) (T, head_dim/2), as LlamaGen
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    angles = pos.float()[:, None] * inv_freq[None]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x, rope):
    """Turn the pairs (0,1), (2,3), ... of x (..., hd), as complex numbers, by rope (..., hd/2),
    in float32 whatever x's dtype (one complex product: a rotation)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with QK-norm (a LayerNorm a head), the tokenizer's; across to z',
    which has no place on the image grid, RoPE turns the queries only."""

    def __init__(self, dim, head_dim=64, cross=False):
        super().__init__()
        self.n_head, self.head_dim, self.cross = dim // head_dim, head_dim, cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)  # one GEMM for q, k, v (official: three)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, rope=None, mask=None, causal=False):
        # x (B, L, D) -> (B, L, D); mask (L, L) bool, True = may attend; causal: lower triangle
        B, L, D = x.shape
        heads = lambda t, n: t.view(B, -1, n, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.cross:
            q, (k, v) = heads(self.q(x), 1)[0], heads(self.kv(context), 2)   # (B, H, L, hd)
        else:
            q, k, v = heads(self.qkv(x), 3)
        # QK-norm bounds the attention logits: stable training without an attention warm-up
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope)
            k = k if self.cross else apply_rope(k, rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):  # fc2(SiLU(fc1 x)), 4x wide (timm's Mlp with SiLU, as official)
    def __init__(self, dim, ratio=4):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class GatedBlock(nn.Module):
    """The encoder's and token decoder's pre-LN block, with per-channel residual gates:
        x = x + g1 * Attn(LN(x));   x = x + g2 * MLP(LN(x))
    g1, g2 start at zero: at initialisation every block is the identity."""

    def __init__(self, dim, head_dim=64, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)
        self.gate1 = nn.Parameter(torch.zeros(dim))
        self.gate2 = nn.Parameter(torch.zeros(dim))

    def forward(self, x, rope=None, mask=None, causal=False):
        x = torch.addcmul(x, self.gate1, self.attn(self.norm1(x), rope=rope, mask=mask,
                                                   causal=causal))   # x + g1 * Attn(LN(x))
        return torch.addcmul(x, self.gate2, self.mlp(self.norm2(x)))


def run_blocks(blocks, x, use_checkpoint, *args, **kwargs):
    """The blocks in turn; use_checkpoint (training): activations recomputed in backward, not
    stored (less memory, ~30% more compute)."""
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, *args, use_reentrant=False, **kwargs)
        else:
            x = block(x, *args, **kwargs)
    return x

# -- section 3. Vector quantiser (eq. 1, LlamaGen style: l2-normalised codes, straight-through)

class VectorQuantizer(nn.Module):
    """quant(.) of eq. 1: nearest neighbour on the unit sphere. Encoder outputs z and codebook
    entries e are l2-normalised; a token's code is argmin_j ||z - e_j||^2. The decoder receives
    z + sg[e - z] (straight-through): gradients reach the encoder as through the identity."""

    def __init__(self, codebook_size, dim):
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, dim)

    def forward(self, z):
        """z (B, N, d) -> (z_q (B, N, d), codes (B, N), normalised z (B, N, d) for the losses)."""
        # on the sphere, nearest in L2 is nearest in angle: a tiny 8-d code space whose entries
        # all stay in use better than unnormalised ones (LlamaGen, ViT-VQGAN)
        z, e = F.normalize(z, dim=-1), F.normalize(self.codebook.weight, dim=-1)  # e (V, d)
        # ||z||^2 + ||e||^2 - 2 z.e written out as the official code, so near-ties break alike
        dist = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()  # (B, N, V)
        codes = dist.argmin(-1)
        return e[codes], codes, z

    def lookup(self, codes):  # (B, N) -> (B, N, d)
        return F.normalize(self.codebook.weight, dim=-1)[codes]

    @staticmethod
    def losses(z_q, z, mask):
        """Codebook and commitment losses (VQ-VAE): ||sg[z] - e||^2 + 0.25 ||z - sg[e]||^2, means
        over the vq dims and the tokens where mask (B, N) holds: the official "loss mask", the
        tokens up to the group of this step (those the diffusion loss reaches)."""
        mask = mask.float()
        codebook = ((z_q - z.detach()).pow(2).mean(-1) * mask).sum() / mask.sum()
        commit = (0.25 * (z_q.detach() - z).pow(2).mean(-1) * mask).sum() / mask.sum()
        return codebook, commit

# -- section 4. Encoder (eq. 1): image -> N query tokens (1D, TiTok-like)

class Encoder(nn.Module):
    """E(I, [q_1..q_N]) of eq. 1: patches and N learnable queries through one transformer; the
    queries' outputs become the N code vectors. 2D RoPE turns the patches, not the queries."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.enc_dim, cfg.patch_size, stride=cfg.patch_size)
        self.query_embed = nn.Embedding(cfg.max_tokens, cfg.query_rank)
        self.query_proj = nn.Linear(cfg.query_rank, cfg.enc_dim)
        self.blocks = nn.ModuleList(GatedBlock(cfg.enc_dim, cfg.head_dim, cfg.mlp_ratio)
                                    for _ in range(cfg.enc_layers))
        self.to_code = nn.Linear(cfg.enc_dim, cfg.vq_dim, bias=False)  # official: 1x1 conv
        self.grad_checkpointing = False

    def forward(self, images):
        """images (B, 3, H, W) in [-1, 1] -> z (B, N, vq_dim), unnormalised."""
        N, B = self.cfg.num_tokens, images.shape[0]
        # 1. patches: a 16x16 convolution with stride 16, normalised (no affine)
        x = self.patch_embed(images)                                   # (B, D, h, w)
        h, w = x.shape[-2:]
        P = h * w
        x = ln(x.flatten(2).transpose(1, 2))                           # (B, P, D)
        # 2. N learnable queries, the same for every image, so low rank (8-d, then projected)
        queries = self.query_proj(self.query_embed.weight[:N])         # (N, D)
        x = torch.cat([x, queries.expand(B, -1, -1)], dim=1)           # (B, P + N, D)
        # 3. one transformer over [patches ; queries]. The mask: patches see all patches and no
        #    query; query i sees the image and queries <= i. So the codes come in an order, and
        #    training gives it its meaning: the first groups alone steer the noisy, coarse steps
        #    (eq. 5), the later ones add what those left out
        rope = rope_2d(h, w, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        rope = torch.cat([rope, rope.new_ones(N, rope.shape[1])])     # queries: no rotation
        i = torch.arange(P + N, device=x.device)
        mask = (i[None, :] < P) | (i[None, :] <= i[:, None])           # (P+N, P+N)
        x = run_blocks(self.blocks, x, self.grad_checkpointing, rope=rope, mask=mask)
        # 4. the query outputs, normalised and projected to the 8-d code space
        return self.to_code(ln(x[:, P:]))                              # (B, N, vq_dim)

# -- section 5. Token decoder: codes -> conditioning tokens z' (causal, adds nonlinearity)

class TokenDecoder(nn.Module):
    """Codes (B, N, vq_dim) -> z' (B, N, dec_dim) by causal self-attention: a code means little
    alone (8 dims), so z'_i reads the codes before it, and only those (the AR property)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.from_code = nn.Linear(cfg.vq_dim, cfg.dec_dim, bias=False)  # official: 1x1 conv
        self.pos_embed = nn.Embedding(cfg.max_tokens, cfg.dec_dim)
        self.blocks = nn.ModuleList(GatedBlock(cfg.dec_dim, cfg.head_dim, cfg.mlp_ratio)
                                    for _ in range(cfg.dec_layers))
        self.grad_checkpointing = False

    def forward(self, z_q):  # in the weights' dtype (see draw)
        pos = self.pos_embed.weight[:z_q.shape[1]]
        x = self.from_code(z_q.to(pos.dtype)) + pos                    # (B, N, D)
        return ln(run_blocks(self.blocks, x, self.grad_checkpointing, causal=True))

# -- section 6. Pixel diffusion decoder (eqs. 2-4): a DiT on raw pixels, conditioned on z'

def timestep_embedding(t, dim):  # (B,) -> (B, dim): [cos t f_j, sin t f_j], f_j = 10^(-4 j/half)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):  # x (1 + scale) + shift
    return torch.addcmul(x + shift, x, scale)


class DiTBlock(nn.Module):
    """A SiT/DiT block with a spatial condition: it embeds the time and the condition group
    itself; the patches cross-attend to the group, whose answer sc (per patch) joins the time in
    (shift, scale, gate) x 2 = Linear(SiLU(t_emb + sc)) (AdaLN):
        x = x + gate_a * Attn(modulate(LN(x)))     with 2D RoPE
        x = x + gate_m * MLP(modulate(LN(x)))"""

    def __init__(self, dim, head_dim=64, mlp_ratio=4):
        super().__init__()
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.c_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cross_attn = Attention(dim, head_dim, cross=True)
        self.attn = Attention(dim, head_dim)
        self.mlp = MLP(dim, mlp_ratio)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, t, cond, rope):
        # x (B, L, D); t (B,); cond (B, G, D); rope (L, hd/2). t is scaled by 1000 (DiT's
        # timesteps): the sinusoid's periods run from 2 pi to 10000 * 2 pi, so on [0, 1] most
        # frequencies would see an almost constant phase
        t_emb = self.t_embed(timestep_embedding(t * 1000, x.shape[-1]).to(x.dtype))[:, None]
        c = ln(self.c_embed(cond))                                                # (B, G, D)
        h = ln(x)
        # each patch asks the G condition tokens what to become (a spatial condition, unlike
        # DiT's class vector); RoPE on the queries tells them where the patch is
        sc = self.cross_attn(h, context=c, rope=rope)                             # (B, L, D)
        # AdaLN-Zero with a per-patch (t + condition) vector: 6 modulations of width D
        mods = self.ada(F.silu(t_emb + sc)).chunk(6, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x = torch.addcmul(x, gate_a, self.attn(modulate(h, shift_a, scale_a), rope=rope))
        return torch.addcmul(x, gate_m, self.mlp(modulate(ln(x), shift_m, scale_m)))


class PixelDiT(nn.Module):
    """D_FM(x_t, t, c(t)) of eq. 2, the velocity network of flow matching on raw pixels (no VAE):
    x_t = t x1 + (1 - t) x0 runs straight from noise x0 ~ N(0, I) to the image x1, at velocity
    v = x1 - x0, which the net regresses (eqs. 2-4). x_t (B, 3, H, W), in data_std units ->
    8x8 patches -> Linear 192 -> D -> blocks -> LN -> Linear D -> 192 -> pixels."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.dit_patch_size, cfg.dit_dim
        self.cond_proj = nn.Linear(cfg.dec_dim, D)
        self.x_embed = nn.Linear(3 * p * p, D)  # official: 1x1 conv on the patchified image
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.head_dim, cfg.mlp_ratio)
                                    for _ in range(cfg.dit_depth))
        self.out = nn.Linear(D, 3 * p * p)      # official: 1x1 conv
        # the 2D RoPE table, built once (not saved: derived; complex: kept by .to(bfloat16))
        g = cfg.image_size // p
        self.register_buffer("rope", rope_2d(g, g, cfg.head_dim, cfg.rope_theta), persistent=False)
        # REPA projector (training only): DiT features -> the width of DINOv2's patch tokens
        R = cfg.repa_hidden
        self.repa = nn.Sequential(nn.Linear(D, R), nn.SiLU(), nn.Linear(R, R), nn.SiLU(),
                                  nn.Linear(R, cfg.repa_dim)) if cfg.repa_dim else None
        self.grad_checkpointing = False

    def forward(self, x, t, cond, repa=False):
        """x (B, 3, H, W), t (B,), cond (B, G, dec_dim) -> v (B, 3, H, W), REPA features or None."""
        B, C, H, W = x.shape
        p = self.cfg.dit_patch_size
        h, w = H // p, W // p
        x, cond = x.to(self.out.weight.dtype), cond.to(self.out.weight.dtype)  # (see draw)
        cond = ln(self.cond_proj(cond))                                    # (B, G, D)
        # patches by rearrangement: (B, C, h p, w p) -> (B, h w, C p p), channel order (c, p1, p2)
        x = x.view(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        x = self.x_embed(x)                                                # (B, L, D)
        feats = None
        for i, block in enumerate(self.blocks):
            if repa and i == self.cfg.repa_layer:  # REPA: the features average-pooled to 16x16
                # (DINOv2 ViT-B/14's grid at 224 px; smaller, repeated), projected (B, 256, C)
                grid = F.adaptive_avg_pool2d(x.transpose(1, 2).unflatten(2, (h, w)), 16)
                feats = self.repa(grid.flatten(2).transpose(1, 2))
            x = run_blocks([block], x, self.grad_checkpointing, t, cond, self.rope)
        x = self.out(ln(x))                                                # (B, L, C p p)
        return x.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W), feats

# -- section 7. Condition schedule (eqs. 5, 8): which group of tokens conditions which time

def shift_time(t, beta):
    """Uniform time u -> diffusion time u / (u + beta (1 - u)) (eq. 8). Eq. 5 writes the inverse
    (the K groups are evenly spaced in u); the code draws u, picks the group from it, then
    shifts: the same schedule. beta = 2 crowds the groups towards t = 0: the early, noisy
    (coarse) steps get more of the tokens."""
    return t / (t + beta * (1 - t))


def group_index(t_u, K):
    """The group of uniform time t_u: g = clamp(floor(t_u K + 1/2), 0, K-1), group i centred on
    t_u = i/K (the official code rounds; the paper writes ceil(t' K)). Floats or tensors."""
    if torch.is_tensor(t_u):
        return (t_u * K + 0.5).floor().long().clamp(0, K - 1)
    return min(max(math.floor(t_u * K + 0.5), 0), K - 1)


def sampling_schedule(steps, K, beta):
    """Times (steps + 1,) and groups of the decoder's steps (eq. 8): t_i = shift(i / steps), then
    1; step i uses group g(i / steps): with steps = K each group one step, the one its training
    times were centred on."""
    t_u = [i / steps for i in range(steps)]
    times = shift_time(torch.tensor(t_u + [1.0], dtype=torch.float32), beta)
    return times, [group_index(t, K) for t in t_u]

# -- section 8. The sequential diffusion tokenizer: its sampler (eq. 8) and objective (eq. 7)

class Tokenizer(nn.Module):
    """Encoder + quantiser + token decoder + pixel DiT: encode(), decode_steps() (the sampler),
    and forward(), a training step's losses."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.vq_dim)
        self.decoder = TokenDecoder(cfg)
        self.dit = PixelDiT(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        # transformer blocks: truncated-normal(0.02) linears, zero biases
        for block in [*self.encoder.blocks, *self.decoder.blocks, *self.dit.blocks]:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        # ... whose residual branches start closed (GatedBlock: zero gates; DiT: zero AdaLN),
        # and the DiT starts by predicting v = 0
        for m in [*(block.ada for block in self.dit.blocks), self.dit.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        # the queries: std 1 in their 8-d space; the decoder's positions 0.02; the codebook:
        # small uniform, then on the unit sphere
        nn.init.trunc_normal_(self.encoder.query_embed.weight, std=1.0)
        nn.init.trunc_normal_(self.decoder.pos_embed.weight, std=0.02)
        with torch.no_grad():
            w, V = self.quantizer.codebook.weight, self.cfg.codebook_size
            w.copy_(F.normalize(w.uniform_(-1.0 / V, 1.0 / V), dim=-1))
        # the rest: PyTorch's default (Kaiming-uniform), as the official code

    @torch.no_grad()
    def encode(self, images):  # (B, 3, H, W) in [-1, 1] -> codes (B, N) int64
        return self.quantizer(self.encoder(images))[1]

    def cond_tokens(self, codes):  # (B, N) -> z' (B, N, dec_dim); row i reads codes <= i
        return self.decoder(self.quantizer.lookup(codes))

    @torch.no_grad()
    def decode_steps(self, codes, noise=None, solver="adams2", steps=None, stream=None):
        """The sampler (eq. 8): codes (B, N) decoded from x_0 ~ N(0, I) (B, 3, H, W), yielding the
        image as seen after each step. Step i integrates dx/dt = v(x, t, group g(i) of z') over
        [t_i, t_{i+1}] of the shifted grid:
            Euler:                    x_{i+1} = x_i + (t_{i+1} - t_i) v_i
            Adams-Bashforth 2 (AB2):  x_{i+1} = x_i + (t_{i+1} - t_i) (3/2 v_i - 1/2 v_{i-1})
        AB2 extrapolates v from the last two calls: second order at one call a step (Table 2:
        rFID 1.52, Euler 1.58 at 8 steps); its first step is Euler. A step yields its direction
        taken straight to t = 1, x1_hat = x_i + (1 - t_i) d (official clip_steps): a preview
        from the groups so far, the image after the last step. `stream` (the Llama's tokens)
        writes the codes as the steps need them (z' is causal)."""
        if solver not in ("euler", "adams2"):
            raise ValueError(f"unknown solver {solver!r}: use 'euler' or 'adams2'")
        cfg, B, G = self.cfg, codes.shape[0], self.cfg.group_size
        S, N = cfg.image_size, cfg.num_tokens
        times, groups = sampling_schedule(steps or cfg.sample_steps, cfg.num_groups, cfg.time_shift)
        x = torch.randn(B, 3, S, S, device=codes.device) if noise is None else noise
        n, z, v_prev = (0 if stream else N), None, None  # n codes known; z = z' of them
        for i, g in enumerate(groups):
            if z is None or n < (g + 1) * G:             # the Llama writes up to group g's end
                while n < (g + 1) * G:
                    codes[:, n], n = next(stream), n + 1
                z = self.cond_tokens(codes)              # (B, N, dec_dim); rows >= n unread
            t, dt = times[i].item(), (times[i + 1] - times[i]).item()
            v = self.dit(x, torch.full((B,), t, device=x.device), z[:, g * G:(g + 1) * G])[0]
            d = v if solver == "euler" or v_prev is None else 1.5 * v - 0.5 * v_prev
            yield (x + (1 - t) * d) / cfg.data_std       # x1_hat, in image units
            x, v_prev = x + dt * d, v
        while n < N:  # fewer steps than groups skip the last groups: the sequence is finished
            codes[:, n], n = next(stream), n + 1

    def decode(self, codes, noise=None, solver="adams2", steps=None):  # -> images (B, 3, H, W)
        *_, images = self.decode_steps(codes, noise, solver, steps)
        return images

    def forward(self, images, t_u=None, noise=None, repa=False):
        """A training forward of images (B, 3, H, W): t_u (B,) ~ U[0, 1) picks the group (eq. 5)
        and, shifted, the time; noise is x0 (both drawn if None) -> a dict of losses."""
        cfg, B = self.cfg, images.shape[0]
        t_u = torch.rand(B, device=images.device) if t_u is None else t_u
        x0 = torch.randn_like(images) if noise is None else noise

        # encode, quantise; the VQ losses count the tokens up to the chosen group's end
        z_q, codes, z = self.quantizer(self.encoder(images))          # (B, N, d), (B, N), ...
        group = group_index(t_u, cfg.num_groups)                        # (B,)
        start = group * cfg.group_size
        idx = torch.arange(cfg.num_tokens, device=images.device)
        used = idx <= (start + cfg.group_size - 1)[:, None]             # (B, N)
        vq_loss, commit_loss = self.quantizer.losses(z_q, z, used)
        z_q = z + (z_q - z).detach()                                    # straight-through

        # z' of the chosen group conditions the DiT
        rows = start[:, None] + idx[:cfg.group_size]                    # (B, N/K)
        cond = self.decoder(z_q)[torch.arange(B, device=images.device)[:, None], rows]

        # flow matching (eqs. 2-4): x_t = t x1 + (1 - t) x0, target v = x1 - x0, in data_std units
        t = shift_time(t_u, cfg.time_shift)
        te = t[:, None, None, None]
        x1 = images * cfg.data_std
        x_t = te * x1 + (1 - te) * x0
        v_pred, repa_feats = self.dit(x_t, t, cond, repa=repa)
        # / data_std^2: the scale of image pixels (x1_hat errs by (1 - t)(v_pred - v) / data_std)
        fm_loss = F.mse_loss(v_pred, x1 - x0) / cfg.data_std ** 2
        # the jump estimate x1_hat = x_t + (1 - t) v, in image units: LPIPS (eq. 7) compares it
        x1_hat = (x_t + (1 - te) * v_pred) / cfg.data_std
        return dict(fm_loss=fm_loss, vq_loss=vq_loss, commit_loss=commit_loss, x1_hat=x1_hat,
                    codes=codes, group=group, t=t, cond=cond, repa_feats=repa_feats)

    @classmethod
    def from_pretrained(cls, source="tokenizer_v1", use_ema=True):  # a name or a file: sec. 12
        return load_model(find_weights(source, "tokenizer"), "tokenizer", use_ema)


def tokenizer_loss(tok, images, lpips=None, repa_target=None, lpips_weight=0.5, repa_weight=0.5):
    """The tokenizer's objective, eq. 7, for images (B, 3, H, W) in [-1, 1]:
        loss = l_fm + l_VQ + lambda_1 LPIPS(I, x1_hat) + lambda_2 l_repa        (lambda = 0.5)
    l_fm: flow matching on each image's group (eqs. 2-5); l_VQ: section 3's; LPIPS of the jump
    estimate x1_hat teaches every time to jump to a sharp image (so 8 steps do); l_repa =
    1 - cos(the DiT's projected features, DINOv2's patch tokens) aligns the DiT with a strong
    representation. lpips (VGG16) and repa_target (DINOv2 ViT-B/14) are given, None leaves a
    term out; tok may be wrapped (DDP, compile). -> the loss, its terms, the codes (B, N)."""
    out = tok(images, repa=repa_target is not None)
    terms = dict(fm=out["fm_loss"], vq=out["vq_loss"], commit=out["commit_loss"])
    weights = dict(fm=1, vq=1, commit=1, lpips=lpips_weight, repa=repa_weight)
    if lpips is not None:
        terms["lpips"] = lpips(images.float(), out["x1_hat"].float()).mean()
    if repa_target is not None:  # (B, 256, C) both
        cos = F.cosine_similarity(out["repa_feats"].float(), repa_target(images).float(), dim=-1)
        terms["repa"] = (1 - cos).mean()
    return sum(weights[k] * v for k, v in terms.items()), terms, out["codes"]

# -- section 9. The autoregressive model (eq. 6): Llama (LlamaGen's GPT), with a static KV cache

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x / sqrt(mean(x^2) + eps) times the gain, in float32 under bf16 too
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.cache = None  # generation's static KV cache: (k, v) (B, H, L, hd)

    def forward(self, x, rope, pos=None, mask=None):
        B, T, D = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], rope[:, None, None]).permute(2, 0, 3, 1, 4)  # at once
        v = qkv[:, :, 2].transpose(1, 2)                   # q, k, v: (B, H, T, hd)
        if pos is None:  # training, teacher forcing: causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:            # generation: k, v into the cache at pos; attention to what it holds
            cache_k, cache_v = self.cache
            cache_k[:, :, pos], cache_v[:, :, pos] = k, v
            k, v = cache_k[:, :, :mask.shape[-1]], cache_v[:, :, :mask.shape[-1]]  # as masked
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, D)))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), w1 and w3 stacked in one Linear w13 (one GEMM; concatenated on
    loading an official checkpoint)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(a) * b))


class LlamaBlock(nn.Module):
    """h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, rope, pos=None, mask=None):
        h = x + self.attn(self.attn_norm(x), rope, pos, mask)
        return h + self.ffn(self.ffn_norm(h))


class GPT(nn.Module):
    """Class-conditional Llama over the codes: [class token, z_1 .. z_{N-1}], position i predicts
    z_{i+1}; 1D RoPE (the class token at 0). The class table's last row is the null class."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        # Linears and Embeddings ~ N(0, 0.02); the head starts at zero: uniform first predictions
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def embed(self, labels, tokens):  # (B,), (B, T) -> [class token, tokens] (B, 1 + T, D)
        return torch.cat([self.class_embed(labels)[:, None], self.tok_embed(tokens)], dim=1)

    def forward(self, tokens, labels):
        """Teacher forcing: tokens (B, N), labels (B,) -> logits (B, N, V), logits[:, i] predicting
        tokens[:, i] from the class and tokens[:, :i]. The class token stands where a BOS token
        would: the input is shifted right by one, the last token never an input."""
        h = self.tok_dropout(self.embed(labels, tokens[:, :-1]))             # (B, N, D)
        rope = rope_1d(torch.arange(h.shape[1], device=h.device), self.cfg.head_dim,
                       self.cfg.rope_base)
        h = run_blocks(self.layers, h, self.grad_checkpointing, rope)
        return self.output(self.norm(h)).float()

    # --- generation with a static KV cache (gpt-fast)

    def setup_cache(self, batch, length):
        """Static KV caches of `batch` rows, `length` slots; kept for calls of the same shape (a
        stale slot is never read: position p sees slots 0..p)."""
        w = self.output.weight
        shape = (batch, self.cfg.n_head, length, self.cfg.head_dim)
        old = self.layers[0].attn.cache
        if old is None or (old[0].shape, old[0].dtype, old[0].device) != (shape, w.dtype, w.device):
            for layer in self.layers:
                layer.attn.cache = (w.new_zeros(shape), w.new_zeros(shape))
            # tables looked up a step: the RoPE angles and the causal mask (L, L)
            idx = torch.arange(length, device=w.device)
            self.cache_rope = rope_1d(idx, self.cfg.head_dim, self.cfg.rope_base)
            self.cache_mask = idx[None, :] <= idx[:, None]

    def forward_cached(self, h, pos):
        """h (B, T, D) at positions pos (T,) -> logits (B, T, V), through the KV caches. Eager, a
        step reads the filled slots only; compiled, all of them, masked (static shapes)."""
        n = len(self.cache_mask) if torch.compiler.is_compiling() else int(pos[-1]) + 1
        mask, rope = self.cache_mask[pos, :n], self.cache_rope[pos]
        for layer in self.layers:
            h = layer(h, rope, pos, mask)
        return self.output(self.norm(h)).float()

    def prefill(self, labels, prefix):
        """The class token and a fixed prefix (B, P) at positions 0..P -> next logits (B, V)."""
        h = self.embed(labels, prefix)
        return self.forward_cached(h, torch.arange(h.shape[1], device=h.device))[:, -1]

    def decode_one(self, token, pos):
        """token (B,) at position pos (1,) -> next logits (B, V): the step generation repeats
        (prepare_sampling compiles it in place)."""
        return self.forward_cached(self.tok_embed(token)[:, None], pos)[:, -1]

    @classmethod
    def from_pretrained(cls, source="D-AR-L", use_ema=True, block_size=None):  # see section 12
        return load_model(find_weights(source, "gpt"), "gpt", use_ema, block_size)

# -- section 10. Generation (guidance, streaming into the decoder) and the AR loss

def guidance_schedule(guidance, n):
    """The guidance scale of each position (n,): linear over the tokens (the paper: 1.1 -> 8.0
    for D-AR-L, 10.0 for XL) or constant. Early tokens fix the layout, where strong guidance
    costs diversity; late ones add the detail it sharpens."""
    start, end = (guidance, guidance) if isinstance(guidance, (int, float)) else guidance
    return torch.linspace(float(start), float(end), n)


def guided_logits(logits, scale):
    """Classifier-free guidance: rows [cond ; uncond], l = l_u + (l_c - l_u) s, sharpening
    p(z_i | z_<i, class) by s against p(z_i | z_<i) (Ho & Salimans)."""
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * scale


def sample_logits(logits, temperature=1.0):
    """One token a row drawn from logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)
    # argmax p_i / E_i with E_i = -log U_i ~ Exp(1) picks i with probability p_i (the exponential
    # race), and unlike torch.multinomial it needs no device sync (gpt-fast)
    return torch.argmax(probs / -torch.log(torch.rand_like(probs)), dim=-1)


@torch.no_grad()
def generate_stream(gpt, labels, num_tokens=None, guidance=1.0, temperature=1.0, prefix=None):
    """Eq. 6 sampled left to right: the tokens (B,) of positions 0..N-1, one at a time. A prefix
    (B, P) fixes the first P (layout control). Guided, conditional and unconditional rows run as
    one batch."""
    N = num_tokens or gpt.cfg.block_size
    prefix = labels.new_zeros(len(labels), 0) if prefix is None else prefix.to(labels.device)
    # guidance costs a second batch (the null class); a scale of 1 skips it
    scales = guidance_schedule(guidance, N).tolist()
    guided = any(s != 1.0 for s in scales)
    both = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)   # rows [cond ; uncond]
    null = torch.full_like(labels, gpt.cfg.num_classes)
    gpt.setup_cache(len(labels) * (1 + guided), N + 1)
    positions = torch.arange(N, device=labels.device)   # sliced a step: no new tensor
    logits = gpt.prefill(torch.cat([labels, null]) if guided else labels, both(prefix))
    yield from prefix.unbind(1)
    for i in range(prefix.shape[1], N):
        token = sample_logits(guided_logits(logits, scales[i]) if guided else logits, temperature)
        yield token
        if i + 1 < N:
            logits = gpt.decode_one(both(token), positions[i + 1:i + 2])


def generate(gpt, labels, num_tokens=None, guidance=1.0, temperature=1.0, prefix=None):
    """labels (B,) -> tokens (B, N) int64, drawn left to right with the KV cache."""
    stream = generate_stream(gpt, labels, num_tokens, guidance, temperature, prefix)
    return torch.stack(list(stream), 1)


@torch.no_grad()
def generate_images(gpt, tok, labels, noise=None, solver="adams2", steps=None, **gen_kwargs):
    """Streaming D-AR: the Llama's tokens feed the decoder's loop, which takes group g when its
    step comes: a diffusion step runs as soon as its tokens exist. Yields (tokens (B, N), image
    (B, 3, H, W)) after each step; the last image is tok.decode(tokens, noise)'s (z' is causal).
    gen_kwargs: generate_stream's guidance, temperature, prefix."""
    tokens = labels.new_zeros(len(labels), tok.cfg.num_tokens)
    stream = generate_stream(gpt, labels, tok.cfg.num_tokens, **gen_kwargs)
    for image in tok.decode_steps(tokens, noise, solver, steps, stream):
        yield tokens, image


def ar_loss(gpt, codes, labels, class_dropout, null_class):
    """Eq. 6 as a loss: the cross-entropy of the next-token predictions of codes (B, N). With
    probability class_dropout a label is the null class: the same network learns the
    unconditional p(z) that guidance contrasts with. gpt may be wrapped (DDP, compile)."""
    drop = torch.rand(labels.shape, device=labels.device) < class_dropout
    labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    logits = gpt(codes, labels)                                             # (B, N, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())

# -- section 11. Presets: the paper's sizes, and small ones for a CPU and for the tests

TOKENIZER_PRESETS = {
    # the paper's tokenizer: 307.4M parameters (185.1M pixel DiT, 7.3M REPA projector)
    "tokenizer_v1": dict(),
    # minutes on 2 CPU cores: 32x32 images, 64 tokens in 4 groups; beta = 4 (at this size the
    # tokens take hold only if training dwells on noisy times); 8 steps help a young DiT
    "tokenizer_small": dict(image_size=32, patch_size=4, enc_dim=128, enc_layers=2, dec_dim=128,
                            dec_layers=2, num_tokens=64, num_groups=4, codebook_size=512,
                            dit_dim=128, dit_depth=4, dit_patch_size=4, sample_steps=8,
                            repa_layer=2, repa_dim=0, max_tokens=64, time_shift=4.0),
    # a few seconds a step: the tests
    "tokenizer_tiny": dict(image_size=32, patch_size=8, enc_dim=64, enc_layers=1, dec_dim=64,
                           dec_layers=1, num_tokens=16, num_groups=4, codebook_size=64,
                           dit_dim=64, dit_depth=2, dit_patch_size=4, sample_steps=4,
                           repa_layer=1, repa_dim=768, repa_hidden=64, max_tokens=16),
}

GPT_PRESETS = {
    "GPT-B": dict(n_layer=12, dim=768, n_head=12),      # 111M
    "GPT-L": dict(n_layer=24, dim=1024, n_head=16),     # 343M
    "GPT-XL": dict(n_layer=36, dim=1280, n_head=20),    # 775M
    "GPT-XXL": dict(n_layer=48, dim=1536, n_head=24),   # 1.4B
    "GPT-small": dict(n_layer=4, dim=256, n_head=4),    # CPU
    "GPT-tiny": dict(n_layer=2, dim=64, n_head=1),      # tests
}


def tokenizer_config(preset, **overrides):
    return TokenizerConfig(**{**TOKENIZER_PRESETS[preset], **overrides})


def gpt_config(preset, **overrides):
    return GPTConfig(**{**GPT_PRESETS[preset], **overrides})

# ===== PART II: what the scripts share (each holds the rest of its stage) =====

# -- section 12. Checkpoints: safe loading, the official format, the released weights by name

class CheckpointError(ValueError):  # a checkpoint missing, unreadable or of the wrong kind
    pass


class _OfficialConfig(dict):  # the official config_util.Config, read without the official code

    def __setstate__(self, state):
        self.update(state.get("_data", {}))


def save_checkpoint(path, model, ema=None, **extra):
    """-> path.tmp, renamed: a crash or a full disk leaves the old file, never half of one."""
    kind = "dar.tokenizer" if isinstance(model, Tokenizer) else "dar.gpt"
    ema = None if ema is None else ema.state_dict()
    try:
        torch.save(dict(kind=kind, config=asdict(model.cfg), model=model.state_dict(), ema=ema,
                        **extra), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    finally:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")


def load_checkpoint(path):
    """weights_only=True: a pickle may call anything (os.system, say); this loads tensors,
    containers and the allow-list only: no file runs code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([(_OfficialConfig, "config_util.Config"),
                                               argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):
            raise TypeError("not a dict")
    except Exception as e:
        raise CheckpointError(f"{path}: not a checkpoint, or unsafe ({one_line(e)[:80]})") from None
    return ckpt


def make_config(cls, d, path):  # a checkpoint's config; an unknown key or a 0 size: one line
    try:
        unknown = set(d) - {f.name for f in fields(cls)}
        zero = [k for k, v in d.items() if not v and k.split("_")[-1] not in
                ("dim", "layer", "init", "hidden", "dropout")]
        if unknown or zero:
            raise ValueError(f"unknown keys {sorted(unknown)}, zeros {zero}")
        return cls(**d)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: not a {cls.__name__} ({e})") from None


def tokenizer_config_from_official(c):  # its YAML's `model:` -> TokenizerConfig
    c = c.get("model", c)
    dd = c["diff_decoder"]
    return TokenizerConfig(  # official name -> ours; defaults are the official code's
        image_size=c.get("sampling_resolution", 256), patch_size=c["encoder_patch_size"],
        enc_dim=c["encoder_dim"], enc_layers=c["num_encoder_layers"],
        dec_dim=c["decoder_dim"], dec_layers=c["num_decoder_layers"],
        num_tokens=c["num_all_queries"], num_groups=c["num_query_groups"],
        codebook_size=c["vq_codebook_size"], vq_dim=c["vq_dim"],
        dit_dim=dd["dim"], dit_depth=dd["depth"], dit_patch_size=dd["patch_size"],
        data_std=dd.get("data_std", 1.0), time_shift=float(dd.get("time_shift", 1.0)),
        sample_steps=c["num_denoising_steps"], repa_layer=dd.get("repa_layer", 8),
        rope_theta=float(c.get("rope_base_len", 10000)))


def strip_prefixes(sd):  # drop torch.compile's `_orig_mod.` and DDP's `module.`
    return {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in sd.items()}


# official tokenizer key -> ours (regex, in order); q/k/v triples are fused afterwards
_TOKENIZER_RENAMES = [
    (r"^encoder_layers\.", "encoder.blocks."), (r"^decoder_layers\.", "decoder.blocks."),
    (r"^patchify\.", "encoder.patch_embed."), (r"^query_embedding\.", "encoder.query_embed."),
    (r"^query_linear\.", "encoder.query_proj."), (r"^quant_in_conv\.", "encoder.to_code."),
    (r"^quant_out_conv\.", "decoder.from_code."), (r"^decoder_embedding\.", "decoder.pos_embed."),
    (r"^quantize\.embedding\.", "quantizer.codebook."), (r"^diff_decoder\.net\.", "dit."),
    (r"^dit\.cond_mlp\.", "dit.cond_proj."), (r"^dit\.conv_in\.", "dit.x_embed."),
    (r"^dit\.conv_out\.", "dit.out."), (r"^dit\.repa_out\.", "dit.repa."),
    (r"\.attention\.", ".attn."), (r"\.adaLN_modulation\.1\.", ".ada."),
    (r"\.time_embed\.mlp\.", ".t_embed."), (r"\.cond_embed\.", ".c_embed.")]


def convert_official_tokenizer(sd):
    """Official tokenizer weights -> ours: renamed, q/k/v fused, 1x1 convs as Linears."""
    out = {}
    for k, v in strip_prefixes(sd).items():
        if k.endswith("quantize.codebook_used"):
            continue
        for pattern, repl in _TOKENIZER_RENAMES:
            k = re.sub(pattern, repl, k)
        if k.split(".")[-2] in ("to_code", "from_code", "x_embed", "out") and v.ndim == 4:
            v = v.flatten(1)  # a 1x1 conv and a Linear compute the same product
        out[k] = v
    # q, k, v stacked in that order (rows) into qkv; cross-attention's k, v into kv (q reads x)
    for k in [k for k in out if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        base, p = k.rsplit(".q.", 1)
        out[f"{base}.qkv.{p}"] = torch.cat([out.pop(f"{base}.{n}.{p}") for n in "qkv"])
    for k in [k for k in out if re.search(r"\.cross_attn\.k\.(weight|bias)$", k)]:
        base, p = k.rsplit(".k.", 1)
        out[f"{base}.kv.{p}"] = torch.cat([out.pop(f"{base}.{n}.{p}") for n in "kv"])
    return out


def convert_official_gpt(sd):
    """Official GPT weights -> ours: renames, and w1 over w3 in one w13 (as SwiGLU splits it)."""
    renames = {"cls_embedding.embedding_table.": "class_embed.", "tok_embeddings.": "tok_embed.",
               ".attention.": ".attn.", ".attention_norm.": ".attn_norm.",
               ".feed_forward.": ".ffn."}
    out = {}
    for k, v in strip_prefixes(sd).items():
        if k != "freqs_cis" and ".kv_cache." not in k:  # buffers the official model rebuilds
            for a, b in renames.items():
                k = k.replace(a, b)
            out[k] = v
    for k in [k for k in out if k.endswith(".ffn.w1.weight")]:
        out[k.replace("w1", "w13")] = torch.cat([out.pop(k), out.pop(k.replace("w1", "w3"))])
    return out


def gpt_config_from_weights(sd, block_size=256):  # (64-d heads in every D-AR preset)
    vocab, dim = sd["tok_embed.weight"].shape
    return GPTConfig(dim=dim, n_layer=sum(k.endswith(".attn.wqkv.weight") for k in sd),
                     n_head=dim // 64, vocab_size=vocab, block_size=block_size,
                     num_classes=sd["class_embed.weight"].shape[0] - 1,
                     ffn_hidden=sd["layers.0.ffn.w13.weight"].shape[0] // 2)


def load_model(path, kind, use_ema=True, block_size=None):
    """A Tokenizer or GPT (kind) from our checkpoint or an official one (known by a key only that
    model has); EMA weights if asked and there; an official GPT block_size (256) long."""
    ckpt = load_checkpoint(path)
    sd = ckpt.get("model", ckpt)  # the released GPTs are {"model": state dict}
    keys = " ".join(sd) if isinstance(sd, dict) else ""
    official = ("gpt" if "tok_embeddings.weight" in keys else "tokenizer"
                if "quantize.embedding.weight" in keys and isinstance(ckpt.get("config"), dict)
                else None)
    found = ckpt["kind"][4:] if ckpt.get("kind") in ("dar.tokenizer", "dar.gpt") else official
    if found != kind:
        raise CheckpointError(f"{path} is a {found or 'foreign'} checkpoint, not a {kind}")
    sd = ckpt["ema"] if use_ema and ckpt.get("ema") else sd
    if official == "tokenizer":
        cfg, sd = tokenizer_config_from_official(ckpt["config"]), convert_official_tokenizer(sd)
    elif official:
        sd = convert_official_gpt(sd)
        cfg = gpt_config_from_weights(sd, block_size or 256)
    else:
        cls = TokenizerConfig if kind == "tokenizer" else GPTConfig
        cfg, sd = make_config(cls, ckpt["config"], path), strip_prefixes(sd)
    if kind == "tokenizer":  # the REPA projector is training-only: built when the file has it
        cfg.repa_dim = sd["dit.repa.4.weight"].shape[0] if "dit.repa.4.weight" in sd else 0
    model = Tokenizer(cfg) if kind == "tokenizer" else GPT(cfg)
    # a GPT of ours records its tokenizer, the digest of its codes (check_pair), its classes
    model.tokenizer, model.classes = ckpt.get("tokenizer"), ckpt.get("classes")
    model.tokenizer_digest = ckpt.get("tokenizer_digest")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # keys or shapes that do not fit, in one line
        why = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: weights that do not fit: {why}") from None
    return model.eval()


# a released name is downloaded once into the Hugging Face cache (HF_ENDPOINT: a mirror;
# HF_HUB_OFFLINE=1: the cache only), anything else is a path (DiT's find_model)
HUB_REPO = "showlab/D-AR"
RELEASES = {"tokenizer_v1": ("D-AR-tokenizer_v1.pt", "tokenizer"),  # name: (file, kind)
            "D-AR-L": ("D-AR-L-360K.pt", "gpt"), "D-AR-XL": ("D-AR-XL-360K.pt", "gpt")}


def find_weights(source, kind):  # a released name -> its downloaded file; else a path
    names = [n for n, (_, k) in RELEASES.items() if k == kind]
    if source not in RELEASES:
        if not os.path.isfile(source):
            raise CheckpointError(f"checkpoint not found: {source} (released: {names})")
        return os.fspath(source)
    file, released = RELEASES[source]
    if released != kind:
        raise CheckpointError(f"{source} is a released {released}, not a {kind} ({names})")
    from huggingface_hub import hf_hub_download  # imported here: only names need it
    try:
        return hf_hub_download(HUB_REPO, file)
    except Exception as e:  # offline with an empty cache, a mirror without the file, a full disk
        raise CheckpointError(f"cannot get {file} ({type(e).__name__}): pass a downloaded "
                              f"copy's path, or set HF_ENDPOINT")


def digest(*modules):  # the weights by content: a path cannot tell a run retrained in place
    h = hashlib.sha256()
    for t in (t for m in modules for t in m.state_dict().values()):
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def check_pair(tok, gpt, tok_name, gpt_name):  # the shapes; the encoder's digest where recorded
    recorded = getattr(gpt, "tokenizer_digest", None)
    if (gpt.cfg.vocab_size, gpt.cfg.block_size) != (tok.cfg.codebook_size, tok.cfg.num_tokens) \
            or recorded and recorded != digest(tok.encoder, tok.quantizer):
        raise CheckpointError(f"{gpt_name} writes the codes of another tokenizer than {tok_name}")



# -- section 13. Images (PIL, then (3, H, W) in [-1, 1], out (B, H, W, 3) uint8), data sets

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "boot"]


def load_image(path):
    """An RGB PIL image, or ValueError naming the file."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # 16-bit grey, which PIL would clip, not scale
                a = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((a / (257 if a.max() > 255 else 1)).round().astype(np.uint8))
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for a bad file
        raise ValueError(f"cannot read image {path}: {e}") from None


def fit_shorter_side(img, size):
    """Shorter side to `size` (ADM: box halvings, then bicubic); smaller: padded, not blown up."""
    if min(img.size) < size:
        canvas = Image.new("RGB", tuple(max(s, size) for s in img.size))
        canvas.paste(img, tuple((c - s) // 2 for c, s in zip(canvas.size, img.size)))
        return canvas
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)


def center_crop(img, size):  # ADM's: shorter side to size, then the central square
    img = fit_shorter_side(img, size)
    x, y = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((x, y, x + size, y + size))


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1) / 127.5 - 1


def to_uint8(images):  # (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as save_image rounds
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images, nrow=8):
    """(B, 3, H, W) in [-1, 1] -> one PIL grid, nrow a row, 2 px apart; under 64 px enlarged."""
    x = to_uint8(images)
    scale = max(1, 64 // x.shape[2])
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    B, H, W, _ = x.shape
    nrow = min(nrow, B)
    grid = Image.new("RGB", (nrow * (W + 2) + 2, -(-B // nrow) * (H + 2) + 2))
    for i in range(B):
        grid.paste(Image.fromarray(x[i]), (2 + (i % nrow) * (W + 2), 2 + (i // nrow) * (H + 2)))
    return grid


def save_grid(images, path, nrow=8):
    grid_image(images, nrow).save(path)


def list_images(folder):
    """The images in folder and below; links to folders not followed (a loop would not end)."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder)
                  for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))


def file_stamp(path):  # a file, cheaply, for caches' keys: its path, size and modification time
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def load_npz(path):  # an .npz, never unpickled; anything else is one line, not numpy's advice
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz of arrays")
    return np.load(path, allow_pickle=False)


class ImageDataset(torch.utils.data.Dataset):
    """(image, label) of files or arrays; transform(image, rng) gets an rng seeded by (seed,
    epoch, index): the same crops on a resume, with any workers. Item e * n + i: epoch e's i."""

    def __init__(self, labels, classes, files=None, arrays=None, transform=None, seed=0):
        self.labels, self.classes, self.files, self.arrays = labels, classes, files, arrays
        self.transform, self.seed = transform, seed

    def __len__(self):
        return len(self.labels)

    def image(self, i):
        if self.files is None:
            return Image.fromarray(self.arrays[i]).convert("RGB")
        return load_image(self.files[i])

    def __getitem__(self, k):
        epoch, i = divmod(k, len(self))
        img, rng = self.image(i), random.Random(hash((self.seed, epoch, i)))
        return (img if self.transform is None else self.transform(img, rng)), self.labels[i]

    def key(self):
        """What the images are, cheaply (paths, sizes, mtimes; or arrays), for caches' keys."""
        h = hashlib.sha256(json.dumps(self.labels).encode())
        for f in self.files or []:
            h.update(file_stamp(f).encode())
        if self.files is None:
            h.update(np.ascontiguousarray(self.arrays))
        return h.hexdigest()[:16]


def build_dataset(data, transform=None, train=True, seed=0):
    """--data: an ImageFolder tree (root/<class>/<image>) or fashion-mnist (Debian's, or a
    download)."""
    if data == "fashion-mnist":
        prefix = os.path.join(FASHION_MNIST_DIR, "train" if train else "t10k")
        if os.path.exists(f"{prefix}-images-idx3-ubyte.gz"):  # IDX: a 16 (8) byte header, uint8
            read = lambda f, skip: np.frombuffer(gzip.open(f"{prefix}-{f}-ubyte.gz").read(),
                                                 np.uint8, offset=skip)
            x, y = read("images-idx3", 16).reshape(-1, 28, 28), read("labels-idx1", 8)
        else:
            import torchvision
            ds = torchvision.datasets.FashionMNIST(os.path.expanduser("~/.cache/dar"),
                                                   train=train, download=True)
            x, y = ds.data.numpy(), ds.targets.numpy()
        return ImageDataset([int(v) for v in y], FASHION_MNIST_CLASSES, arrays=x,
                            transform=transform, seed=seed)
    classes = sorted(d.name for d in os.scandir(data) if d.is_dir()) if os.path.isdir(data) else []
    files = {c: list_images(os.path.join(data, c)) for c in classes}
    if not classes or not all(files.values()):
        raise ValueError(f"--data {data}: not a folder of class folders of images")
    return ImageDataset([i for i, c in enumerate(classes) for _ in files[c]], classes,
                        [f for c in classes for f in files[c]], transform=transform, seed=seed)

# -- section 14. Training: processes, the run directory, an exact resume, the end of a step

# the best device here, as nanoGPT picks it (mps untested)
DEVICE = ("cuda" if torch.cuda.is_available() else
          "mps" if torch.backends.mps.is_available() else "cpu")


def setup(device, threads=None, workers=0):
    """-> (rank, world size, device). Under torchrun (RANK set): a process group (NCCL, a GPU a
    process, or gloo). Threads: --threads, else this process's share of the cores less workers."""
    if device != DEVICE and device != "cpu":
        raise ValueError(f"--device {device}: this machine has none")
    # glibc returns freed blocks over 32 MB to the OS and page-faults the next ones in (big ops
    # 3x slower on a CPU): it keeps them now, as a GPU's caching allocator does
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 30), libc.mallopt(-1, 1 << 30)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
                                         - workers))
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    local = f"cuda:{os.environ['LOCAL_RANK']}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device(local)


def worker_init(_):  # a loader worker: one thread; Ctrl-C is the main process's
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def find_run(args, kind, model_flags):
    """--out's checkpoint to go on from, or None. A run directory holds one kind of model, which
    no other replaces (--no-resume neither); the flags that set the model or its data must be
    the run's. Read only: a refusal changes no file."""
    path = os.path.join(args.out, "ckpt.pt")
    ckpt = load_checkpoint(path) if os.path.exists(path) else None
    if ckpt is not None and ckpt.get("kind") != f"dar.{kind}":
        raise CheckpointError(f"--out {args.out}: holds another kind of run: use another --out")
    if ckpt is None or args.no_resume:
        return None
    same = lambda d: os.path.realpath(d) if isinstance(d, str) and os.path.exists(d) else d
    for k in ("preset", "data", "init_from", *model_flags):
        flag, old = "--" + k.replace("_", "-"), ckpt["args"].get(k)
        if getattr(args, k) is not None and same(old) != same(getattr(args, k)):
            raise ValueError(f"{flag} {getattr(args, k)}: {path} has {flag} {old} (another "
                             f"--out, or --no-resume)")
    return ckpt


_LOCKS = {}  # run directory -> its lock file, held while the process lives


def open_run(args, ckpt, rank):
    """Take --out -> log(line) (process 0 prints it, into log.txt). One trainer at a time: an OS
    lock, which dies with the process. metrics.jsonl keeps the steps before the start."""
    def log(line):
        if rank == 0:
            tqdm.write(line)
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write(line + "\n")
    if rank > 0:
        return log
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    if os.path.realpath(args.out) not in _LOCKS:
        lock = open(os.path.join(args.out, "lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {args.out}: another trainer is running in it") from None
        _LOCKS[os.path.realpath(args.out)] = lock
    if ckpt:
        log(f"resuming from {args.out}/ckpt.pt at step {ckpt['step']}")
    metrics = os.path.join(args.out, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            lines = [line for line in f if step_of(line) <= (ckpt["step"] if ckpt else 0)]
        with open(metrics, "w") as f:
            f.writelines(lines)
    return log


def step_of(line):  # of a metrics.jsonl line; a damaged one is dropped, not worth a run
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def global_batches(n, batch, micro, rank, world, seed, start):
    """One process's micro-batches from step `start` on: epoch e, a permutation seeded with
    seed + e, cut into global batches, whose r-th slices process r cuts into micro-batches (the
    same slots on any number of processes)."""
    for step in itertools.count(start):
        epoch, s = divmod(step, n // batch)
        if step == start or s == 0:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        mine = perm[s * batch + rank * batch // world:][:batch // world].tolist()
        for m in range(0, batch // world, micro):
            yield [epoch * n + i for i in mine[m:m + micro]]


def batches(dataset, args, rank, world, step, device):
    """-> (endless micro-batches (inputs, labels) on the device, micro-batches a step)."""
    n, batch = len(dataset), args.global_batch
    micro = args.micro_batch or batch // world
    if batch % (world * micro) or n < batch:
        raise ValueError(f"--global-batch {batch}: over {n} images, or not a multiple of "
                         f"{world} processes x --micro-batch {micro}")
    order = global_batches(n, batch, micro, rank, world, args.seed, step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, worker_init_fn=worker_init,
                                         num_workers=args.workers, pin_memory=args.device == "cuda")
    return ((x.to(device), y.to(device)) for x, y in loader), batch // world // micro


def wrap(model, args, device, world):  # torch.compile and DDP around the model, as asked
    net = torch.compile(model) if args.compile else model
    cuda = [device.index] if device.type == "cuda" else None
    return DDP(net, device_ids=cuda) if world > 1 else net


def get_lr(step, args):
    """Linear warm-up over --warmup steps, constant, linear to 1e-5 over the last --decay-steps
    (the paper's GPT; the official tokenizer run has no decay: its EMA averages)."""
    decay = max(0.0, (step - args.max_steps + args.decay_steps) / max(args.decay_steps, 1))
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1)) * (1 - decay) + 1e-5 * decay


def make_optimizer(model, lr, weight_decay, beta2, fused=False):
    """AdamW, decaying matrices and embeddings only (norms, biases, gates: their scale matters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=fused)


def restore(ckpt, model, optimizer, decay):
    """The checkpoint's weights and AdamW moments; the EMA (sampled; None if decay is 0): the
    checkpoint's or a copy -> (the step, the EMA)."""
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    ema = copy.deepcopy(model).requires_grad_(False).eval() if decay > 0 else None
    if ema is not None and ckpt and ckpt["ema"]:
        ema.load_state_dict(ckpt["ema"])
    return (ckpt["step"] if ckpt else 0), ema


@contextlib.contextmanager
def micro_batch(net, args, step, m, accum):
    """Micro-batch m's forward: its draws (t, noise, dropout) after reseeding with (seed, step,
    m), as an uninterrupted run on any number of processes; DDP syncs in the last one's
    backward only; bf16 autocast if asked."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.manual_seed((args.seed * 1_000_003 + step * 10_007 + rank * accum + m) % 2 ** 63)
    if isinstance(net, DDP):
        net.require_backward_grad_sync = m == accum - 1
    with torch.autocast(args.device, torch.bfloat16, enabled=args.bf16):
        yield


def optimizer_step(model, optimizer, ema, step, args):
    """AdamW at the step's lr after clipping the gradient norm (-> it); ema <- lerp to model."""
    for group in optimizer.param_groups:
        group["lr"] = get_lr(step, args)
    norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - args.ema_decay)
    return norm


class Progress:
    """The loop's bookkeeping: a bar; the loss terms since a read, summed on the device (no
    sync a step); Ctrl-C and SIGTERM, caught (to save, then stop); the step ckpt.pt holds."""

    def __init__(self, args, step, ckpt, rank):
        self.sums, self.steps, self.t0, self.caught = {}, 0, time.time(), []
        self.saved = step if ckpt else None
        self.bar = tqdm(total=args.max_steps, initial=step, disable=rank > 0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda n, _: self.caught.append(signal.Signals(n).name))

    def add(self, scale=1.0, **terms):  # a micro-batch's (or step's) loss terms, times scale
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float() * scale


def end_step(args, step, progress, log, model, ema, optimizer, unit, **extra):
    """A step's end, both trainers' -> stop? At --log-every steps, a checkpoint and a stop, the
    losses are read and logged; a non-finite loss or weight stops the run before a save (ckpt.pt
    keeps its last good step). ckpt.pt: every --ckpt-every steps, at the end, at a stop."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    p, first = progress, world == 1 or torch.distributed.get_rank() == 0
    p.steps += 1
    p.bar.update()
    save = step % args.ckpt_every == 0 or step == args.max_steps
    if not (save or p.caught and world == 1 or step % args.log_every == 0):
        return False
    # the means over the steps and processes, and any process's stop flag: one all-reduce
    flag = torch.tensor(float(bool(p.caught)), device=p.sums["loss"].device)
    values = torch.stack([*p.sums.values(), flag])
    if world > 1:
        torch.distributed.all_reduce(values)
    *sums, stopping = (values / world).tolist()
    means = {k: v / p.steps for k, v in zip(p.sums, sums)}
    rate, lr = unit[1] * p.steps / (time.time() - p.t0), optimizer.param_groups[0]["lr"]
    p.sums, p.steps, p.t0 = {}, 0, time.time()
    terms = " ".join(f"{k} {v:.4f}" for k, v in means.items())
    log(f"step {step}/{args.max_steps} | {terms} | lr {lr:.2e} | {rate:.1f} {unit[0]}/s")
    if first:
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(dict(step=step, lr=lr, **means)) + "\n")
    weights = [w for m in (model, ema) if m is not None for w in m.parameters()]
    if not (all(map(math.isfinite, means.values())) and
            torch.stack([w.isfinite().all() for w in weights]).all()):
        held = f"{args.out}/ckpt.pt keeps step {p.saved}" if p.saved else "none saved"
        raise ValueError(f"non-finite loss or weights at step {step}: {held}; try a lower --lr")
    if save or stopping:
        if first:
            save_checkpoint(os.path.join(args.out, "ckpt.pt"), model, ema, step=step,
                            optimizer=optimizer.state_dict(), args=vars(args), **extra)
        if world > 1:
            torch.distributed.barrier()
        p.saved = step
    return stopping > 0


def finish(progress, step, args, log):  # a run a signal stopped: one line, exit status 1
    progress.bar.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if step < args.max_steps:
        by = progress.caught[0] if progress.caught else "another process"
        first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        sys.exit(f"stopped by {by} at step {step}: {args.out}/ckpt.pt, which the same command "
                 f"resumes" if first else 1)
    log(f"done: {args.out}/ckpt.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

# -- section 15. Command lines (nonsense stops at parse time; an error is one line), sampling

def _number(cast, ok, what):  # an argparse type: nonsense stops at parse time, the flag named
    def parse(text):
        try:
            v = cast(text)
            good = math.isfinite(v) and ok(v)
        except (ValueError, OverflowError):
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
decay = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
seed = _number(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)")
threads = _number(int, lambda v: 1 <= v <= 1024, "an integer in [1, 1024]")


def parse_guidance(text):  # '1.1,8.0' -> (1.1, 8.0), the ends of a linear schedule; '4' -> 4.0
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or not all(math.isfinite(v) and v >= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: one scale >= 0, or 'start,end'")
    return vals[0] if len(vals) == 1 else tuple(vals)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass  # every flag's default, and the docstring as written


def parser(doc):  # no abbreviations: a flag is written out, so `typed` finds it
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter,
                                   allow_abbrev=False)


def typed(argv):  # the flags on the command line (argv, else sys.argv's)
    return {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}


def add_run_arguments(p, presets, default):  # both trainers'; a preset sets their defaults
    add, on_off = p.add_argument, argparse.BooleanOptionalAction
    add("--preset", default=default, choices=sorted(presets), help="model size (and defaults)")
    add("--data", help="an ImageFolder tree (root/<class>/<image>) or fashion-mnist")
    add("--out", help="run directory; None: runs/<preset>")
    add("--init-from", help="fine-tune these weights: a released name or a file")
    add("--no-resume", action="store_true", help="start afresh over the run in --out")
    add("--global-batch", type=positive_int, help="images a step, all processes")
    add("--micro-batch", type=positive_int, help="a forward's (accumulation)")
    add("--max-steps", type=positive_int, help="optimizer steps")
    add("--lr", type=positive_float, help="learning rate (dar.get_lr)")
    add("--warmup", type=nonneg_int, default=0, help="steps")
    add("--decay-steps", type=nonneg_int, help="the last steps, linear to 1e-5")
    add("--weight-decay", type=nonneg_float, help="AdamW's")
    add("--beta2", type=decay, default=0.95, help="AdamW's")
    add("--grad-clip", type=positive_float, default=1.0, help="max gradient norm")
    add("--ema-decay", type=decay, help="of the sampled weights; 0: no EMA")
    add("--augment", action=on_off, help="random crops and flips")
    add("--seed", type=seed, default=0, help="of the weights, data order and draws")
    add("--device", default=DEVICE, choices=["cuda", "mps", "cpu"])
    add("--bf16", action=on_off, help="autocast; None: with cuda")
    add("--compile", action=on_off, help="torch.compile; None: with cuda")
    add("--grad-checkpointing", action="store_true", help="less memory, ~30%% more compute")
    add("--threads", type=threads, help="None: the cores less the workers")
    add("--workers", type=nonneg_int, default=0, help="data-loader processes a process")
    add("--log-every", type=positive_int, help="steps")
    add("--ckpt-every", type=positive_int, help="steps")
    add("--sample-every", type=positive_int, help="steps")


def parse_run_args(p, run_defaults, argv=None):
    """Two passes: the first finds --preset, whose settings are the second's defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = p.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0].preset
    p.set_defaults(**run_defaults[preset])
    args = p.parse_args(argv)
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    return args


def one_line(e):  # an exception's type and the first line of its message
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def cli(main, argv=None):
    """main as a script: bad input, a missing file, a refusal, Ctrl-C: one line, exit status 1
    (a loader worker's traceback ends in its error)."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[-1]}")
    except KeyboardInterrupt:
        sys.exit("stopped by Ctrl-C")


def bf16_default(device):
    """bf16 where the hardware computes in it (a GPU; a CPU with AMX or AVX-512 BF16, others
    emulate it, slower than fp32) -> (on?, why)."""
    if device != "cpu":
        return device == "cuda", device
    amx, avx = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
    return amx or avx, f"the CPU has {'AMX' if amx else 'AVX-512 BF16' if avx else 'no bf16 unit'}"


def prepare_sampling(tok, gpt, bf16, compile):
    """In place: bf16 weights (half the bytes a token step reads); torch.compile for the DiT
    and the token step (on a GPU a CUDA graph)."""
    if bf16:  # (not .to(): it would cast the complex RoPE tables too)
        for p in [*gpt.parameters(), *tok.decoder.parameters(), *tok.dit.parameters()]:
            p.data = p.data.to(torch.bfloat16)
    if compile:
        tok.dit.compile()
        mode = "reduce-overhead" if gpt.output.weight.is_cuda else "default"
        gpt.decode_one = torch.compile(gpt.decode_one, fullgraph=True, mode=mode)


@torch.no_grad()
def draw(tok, gpt, labels, seed, guidance=1.0, temperature=1.0, solver="adams2", steps=None,
         prefix=None):
    """Streaming D-AR from `seed` -> the images (B, 3, H, W) after each step. The models compute
    in their weights' dtype (prepare_sampling), the sampler's state in float32."""
    torch.manual_seed(seed)
    return [image.float() for _, image in generate_images(
        gpt, tok, labels, None, solver, steps, guidance=guidance, temperature=temperature,
        prefix=prefix)]


def output_step(preview_step, steps):  # the step whose image is the output: --preview-step, last
    if preview_step is not None and not 1 <= preview_step <= steps:
        raise ValueError(f"--preview-step {preview_step}: the decoder takes {steps} steps")
    return preview_step or steps
