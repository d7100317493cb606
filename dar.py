"""
D-AR: Diffusion via Autoregressive Models (Gao & Shou, 2025), in one file.

D-AR turns pixel diffusion into plain next-token prediction:

  image --(1D encoder + VQ, eq. 1)--> N = 256 discrete tokens z_1..z_N, in K = 8 groups of 32
  tokens --(causal token decoder)--> conditioning tokens z'
  group k of z' conditions diffusion step k of a pixel DiT (eqs. 2-5): coarse groups first, fine last
  an unmodified Llama learns p(z) = prod_i p(z_i | z_<i, class) (eq. 6) and writes tokens left to
  right, so every 32 tokens can be decoded into one more denoising step (eq. 8): streaming
  previews, and layout control by fixing the first tokens.

The file has two parts. Part I is the paper, built from the smallest pieces up; Part II is the
little the scripts share (checkpoints, data, processes, sampling). Read Part I first; each script
(train_tokenizer.py, train_ar.py, sample.py, eval_fid.py) then shows its whole stage.

  PART I: D-AR
    section 1   configs
    section 2   shared pieces: RoPE, attention, blocks
    section 3   vector quantiser                            (eq. 1)
    section 4   encoder: image -> N query tokens              (eq. 1)
    section 5   token decoder: codes -> conditioning tokens z'
    section 6   pixel DiT: the velocity network               (eqs. 2-4)
    section 7   condition schedule                            (eqs. 5, 8)
    section 8   the sampler: Euler and Adams-Bashforth 2, one loop (eq. 8)
    section 9   the sequential diffusion tokenizer and its loss (eq. 7)
    section 10  the autoregressive model: Llama with a KV cache (eq. 6)
    section 11  generation: guidance, streaming into the decoder
    section 12  presets
  PART II: what the scripts share
    section 13  checkpoints: safe loading, the official format, the released weights by name
    section 14  images and data sets
    section 15  training: processes, threads, data order and seeds for an exact resume, EMA
    section 16  sampling: one function for sample.py and eval_fid.py

Equation numbers ("eq. N") are the paper's (arXiv 2505.23660); "section N" always means a section
of this file. Where the official code (showlab/D-AR), which produced the released checkpoints,
departs from the paper, this file follows the code and says so. Tensors are (B, ...) batches;
shapes are noted in comments, e.g. (B, N, D).
"""

import argparse
import copy
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
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# =============================================================================
#                                 PART I: D-AR
# =============================================================================

# -----------------------------------------------------------------------------
# section 1. Configs: one dataclass per model, saved in every checkpoint (asdict), so a checkpoint
# alone rebuilds its model

@dataclass
class TokenizerConfig:
    """The sequential diffusion tokenizer. Defaults are tokenizer_v1 (307.4M parameters)."""
    image_size: int = 256       # H = W of training images and of decoded samples
    patch_size: int = 16        # encoder patches: (256/16)^2 = 256 patch tokens
    enc_dim: int = 768
    enc_layers: int = 8
    dec_dim: int = 768          # token decoder width = width of the conditioning tokens z'
    dec_layers: int = 8
    num_tokens: int = 256       # N, length of the 1D code sequence
    num_groups: int = 8         # K, the code comes in K groups of N/K tokens, one per diffusion step
    codebook_size: int = 16384
    vq_dim: int = 8             # codes live in a tiny 8-d space (l2-normalised, LlamaGen style)
    query_rank: int = 8         # the N learnable queries are low rank: Embedding(., 8) -> Linear(8, enc_dim)
    max_tokens: int = 1024      # rows of the query / position tables; the official code sizes them for
                                # up to 1024 tokens and uses the first N (kept so checkpoints load as-is)
    dit_dim: int = 768
    dit_depth: int = 12
    dit_patch_size: int = 8     # pixel patches: 8x8x3 = 192 values per token, 1024 tokens at 256x256
    head_dim: int = 64          # every attention layer uses 64-d heads (2D RoPE: 32 dims per axis)
    mlp_ratio: int = 4
    data_std: float = 0.6       # the DiT works on x1 = image * 0.6: a smaller signal lowers the
                                # signal-to-noise ratio at every t, so more of the trajectory is
                                # spent at high noise (as pixel diffusion at high resolution needs)
    time_shift: float = 2.0     # beta: sampling times t = u / (u + beta (1 - u)) for uniform u (eq. 8)
    sample_steps: int = 8       # default number of decoder steps (8 = K: one per group)
    repa_layer: int = 8         # REPA: DiT features before this block are aligned with DINOv2
    repa_dim: int = 768         # DINOv2 ViT-B/14 width; 0 builds no projector (inference-only model)
    repa_hidden: int = 2048
    rope_theta: float = 10000.0
    gate_init: float = 0.0      # initial residual gates of the encoder and token decoder blocks (0, as
                                # the official code: each block starts as the identity)

    def __post_init__(self):
        small = [k for k, v in asdict(self).items() if v <= 0 and k not in ("repa_dim", "repa_layer",
                                                                           "gate_init")]
        if small:
            raise ValueError(f"{small[0]} must be > 0")
        if self.num_tokens % self.num_groups or self.num_tokens > self.max_tokens:
            raise ValueError(f"{self.num_tokens} tokens must split into {self.num_groups} equal groups and "
                             f"fit the {self.max_tokens} query rows")
        if self.image_size % self.patch_size or self.image_size % self.dit_patch_size:
            raise ValueError(f"image size {self.image_size} must be a multiple of the encoder's patch "
                             f"({self.patch_size}) and the DiT's ({self.dit_patch_size})")

    @property
    def group_size(self):  # N / K tokens per diffusion step (32 for tokenizer_v1)
        return self.num_tokens // self.num_groups


@dataclass
class GPTConfig:
    """The autoregressive model: LlamaGen's GPT, an unmodified Llama. Defaults are GPT-L."""
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    vocab_size: int = 16384     # = tokenizer codebook size
    block_size: int = 256       # = tokenizer num_tokens N
    num_classes: int = 1000     # the class table has num_classes + 1 rows: the last is the null class
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256      # SwiGLU hidden size is rounded up to a multiple of this
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1  # p of replacing the label by the null class in training (CFG): ar_loss
    reverse_tokens: bool = False  # trained on z_N .. z_1 (fine to coarse, the paper's ablation of the
                                  # order): generate() and generate_images() flip the tokens back
    head_dim: int = 0           # derived: dim // n_head
    ffn_hidden: int = 0         # derived: multiple_of above int(2 * 4 dim / 3) (Llama's SwiGLU sizing)

    def __post_init__(self):
        small = [k for k in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes",
                             "multiple_of") if getattr(self, k) <= 0]
        if small:
            raise ValueError(f"{small[0]} must be > 0")
        self.head_dim = self.head_dim or self.dim // self.n_head
        if not self.ffn_hidden:
            hidden = int(2 * 4 * self.dim / 3)
            self.ffn_hidden = -(-hidden // self.multiple_of) * self.multiple_of


# -----------------------------------------------------------------------------
# section 2. Shared pieces: layer norm without affine, rotary embeddings, attention, MLP

def ln(x):
    """LayerNorm without learnable affine (eps 1e-6): used for all the tokenizer's bare norms."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def rope_2d(h, w, head_dim, theta, device=None):
    """2D RoPE tables for an h x w grid, row-major: cos, sin of shape (h*w, head_dim/2). Pair j of a head
    rotates by pos * theta^(-2j'/d_axis): the first head_dim/4 pairs use the row (y), the next the
    column (x), 32 dims per axis for 64-d heads (Flux layout); float64, then float32, as the official code."""
    d_axis = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, d_axis, 2, dtype=torch.float64, device=device) / d_axis)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                            torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    angles = torch.cat([ys.reshape(-1, 1) * inv_freq, xs.reshape(-1, 1) * inv_freq], dim=1)
    return angles.cos().float(), angles.sin().float()


def rope_1d(pos, head_dim, base):
    """1D RoPE tables for integer positions pos (T,): cos, sin of shape (T, head_dim/2), float32
    as in LlamaGen / gpt-fast."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    angles = pos.float()[:, None] * inv_freq[None]
    return angles.cos(), angles.sin()


def apply_rope(x, rope):
    """Rotate consecutive pairs (0,1), (2,3), ... of x (..., hd) by the angles of rope = (cos, sin),
    each broadcastable to (..., hd/2), e.g. (L, hd/2) for x (B, H, L, hd). Done in float32
    whatever the dtype of x."""
    cos, sin = rope
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, L, hd/2) each
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with QK-norm (a LayerNorm over each head, with affine), as in all of the
    tokenizer. Self-attention over x, or cross-attention from x to a context (then RoPE rotates only
    the queries: the context tokens z' have no position on the image grid)."""

    def __init__(self, dim, head_dim=64, cross=False):
        super().__init__()
        self.n_head, self.head_dim, self.cross = dim // head_dim, head_dim, cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)  # one GEMM for q, k, v (official: three Linears)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, rope=None, mask=None, causal=False):
        # x (B, L, D) -> (B, L, D). mask (L, L) bool, True = may attend; causal: lower triangle.
        B, L, D = x.shape
        if self.cross:
            q = self.q(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)        # (B, H, L, hd)
            k, v = self.kv(context).view(B, -1, 2, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        # QK-norm: normalising each head's queries and keys bounds the attention logits, which keeps
        # training stable without a learning-rate warm-up of the attention
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope)
            if not self.cross:
                k = apply_rope(k, rope)
        # fused kernel (flash / memory-efficient on GPU, the CPU flash kernel otherwise): the
        # attention map is never materialised
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    """fc2(SiLU(fc1 x)), 4x wide (timm's Mlp with SiLU, as the official tokenizer)."""

    def __init__(self, dim, ratio=4):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class GatedBlock(nn.Module):
    """Pre-LN block of the encoder and the token decoder, with per-channel residual gates:
        x = x + g1 * Attn(LN(x));   x = x + g2 * MLP(LN(x))
    g1, g2 start at zero, so at initialisation every block is the identity."""

    def __init__(self, dim, head_dim=64, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)
        self.gate1 = nn.Parameter(torch.zeros(dim))
        self.gate2 = nn.Parameter(torch.zeros(dim))

    def forward(self, x, rope=None, mask=None, causal=False):
        x = x + self.gate1 * self.attn(self.norm1(x), rope=rope, mask=mask, causal=causal)
        return x + self.gate2 * self.mlp(self.norm2(x))


def run_blocks(blocks, x, use_checkpoint, **kwargs):
    """Apply blocks in turn; with use_checkpoint (training only) each block's activations are
    recomputed in backward instead of stored: less memory, ~30% more compute."""
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x = block(x, **kwargs)
    return x

# -----------------------------------------------------------------------------
# section 3. Vector quantiser (eq. 1, LlamaGen style: l2-normalised codes, straight-through)

class VectorQuantizer(nn.Module):
    """quant(.) of eq. 1: nearest-neighbour quantisation on the unit sphere of R^vq_dim. Both the encoder
    outputs z and the codebook entries e are l2-normalised; the code of a token is argmin_j ||z -
    e_j||^2. The decoder receives z + sg[e - z] (straight-through estimator), so gradients flow to the
    encoder as if quantisation were the identity."""

    def __init__(self, codebook_size, dim):
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, dim)

    def entries(self):
        return F.normalize(self.codebook.weight, dim=-1)  # (V, d)

    def forward(self, z):
        """z (B, N, d) encoder output -> (z_q, codes, z_n): quantised vectors (B, N, d), codes (B, N),
        and the normalised input z_n (B, N, d) that the losses compare z_q against."""
        # On the unit sphere, nearest in L2 is nearest in angle: a tiny 8-d code space whose
        # entries all stay in use better than in an unnormalised one (LlamaGen, ViT-VQGAN).
        z = F.normalize(z, dim=-1)
        e = self.entries()
        # ||z||^2 + ||e||^2 - 2 z.e, written out as the official code does so that near-ties
        # between codes break the same way
        dist = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()  # (B, N, V)
        codes = dist.argmin(-1)
        return e[codes], codes, z

    def lookup(self, codes):
        return self.entries()[codes]  # (B, N) -> (B, N, d)

    @staticmethod
    def losses(z_q, z, mask):
        """Codebook and commitment losses (VQ-VAE): ||sg[z] - e||^2 + 0.25 ||z - sg[e]||^2, each a
        mean over the vq dims, averaged over the tokens where mask (B, N) is True. The official code
        counts only tokens up to the group that conditions this step (the "loss mask"): later
        tokens got no gradient from the diffusion loss either."""
        mask = mask.float()
        codebook = ((z_q - z.detach()).pow(2).mean(-1) * mask).sum() / mask.sum()
        commit = (0.25 * (z_q.detach() - z).pow(2).mean(-1) * mask).sum() / mask.sum()
        return codebook, commit

# -----------------------------------------------------------------------------
# section 4. Encoder (eq. 1): image -> N query tokens (1D, TiTok-like)

class Encoder(nn.Module):
    """E(I, [q_1..q_N]) of eq. 1. Patches and N learnable queries go through one transformer; the queries'
    outputs become the N code vectors. Attention mask: patches see all patches (and no query); query i
    sees all patches and queries <= i, so each token only summarises what earlier tokens left out
    (causal queries). 2D RoPE rotates the patches; the queries get the identity rotation."""

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
        """images (B, 3, H, W) in [-1, 1] -> z (B, N, vq_dim), before normalisation."""
        N, B = self.cfg.num_tokens, images.shape[0]
        # 1. patches: a 16x16 convolution with stride 16, normalised (no affine)
        x = self.patch_embed(images)                                   # (B, D, h, w)
        h, w = x.shape[-2:]
        P = h * w
        x = ln(x.flatten(2).transpose(1, 2))                           # (B, P, D)
        # 2. N learnable queries, shared by all images; low rank (8-d then projected): the same
        #    queries for every image, so they need few degrees of freedom
        queries = self.query_proj(self.query_embed.weight[:N])         # (N, D)
        x = torch.cat([x, queries.expand(B, -1, -1)], dim=1)           # (B, P + N, D)

        # 3. one transformer over [patches ; queries]: 2D RoPE on patches, none on queries; the
        #    mask lets query i read the whole image and queries < i, never later ones. There is no
        #    order among the codes yet: it appears in training, because the diffusion decoder
        #    uses them group by group (eq. 5)
        cos, sin = rope_2d(h, w, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        rope = (torch.cat([cos, cos.new_ones(N, cos.shape[1])]),      # identity rotation
                torch.cat([sin, sin.new_zeros(N, sin.shape[1])]))      # for the queries
        i = torch.arange(P + N, device=x.device)
        mask = (i[None, :] < P) | (i[None, :] <= i[:, None])           # (P+N, P+N), True = may attend

        x = run_blocks(self.blocks, x, self.grad_checkpointing, rope=rope, mask=mask)
        # 4. the query outputs, normalised and projected to the 8-d code space
        return self.to_code(ln(x[:, P:]))                              # (B, N, vq_dim)

# -----------------------------------------------------------------------------
# section 5. Token decoder: codes -> conditioning tokens z' (causal, adds nonlinearity)

class TokenDecoder(nn.Module):
    """Quantised codes (B, N, vq_dim) -> z' (B, N, dec_dim) through causal self-attention blocks.
    Causality keeps the AR property: z'_i depends on z_1..z_i only, so a group of z' can be computed
    as soon as its tokens exist."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.from_code = nn.Linear(cfg.vq_dim, cfg.dec_dim, bias=False)  # official: 1x1 conv
        self.pos_embed = nn.Embedding(cfg.max_tokens, cfg.dec_dim)
        self.blocks = nn.ModuleList(GatedBlock(cfg.dec_dim, cfg.head_dim, cfg.mlp_ratio)
                                    for _ in range(cfg.dec_layers))
        self.grad_checkpointing = False

    def forward(self, z_q):
        # z_q (B, N, vq_dim) -> z' (B, N, dec_dim). A code means little alone (8 dims, 16384
        # values); causal attention lets z'_i read the codes before it, and the position
        # embedding tells it which step it serves
        x = self.from_code(z_q) + self.pos_embed.weight[:z_q.shape[1]]  # (B, N, D)
        x = run_blocks(self.blocks, x, self.grad_checkpointing, causal=True)
        return ln(x)

# -----------------------------------------------------------------------------
# section 6. Pixel diffusion decoder (eqs. 2-4): a DiT on raw pixels, cross-attending to one group of z'

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f_j), sin(t f_j)], f_j = max_period^(-j/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """A SiT/DiT block whose conditioning is spatial. Each block embeds the time and the condition
    group itself; the patches cross-attend to the group, the result sc (per patch) is added to the
    time embedding, and (shift, scale, gate) x 2 = Linear(SiLU(t_emb + sc)) modulate (AdaLN) the
    self-attention and MLP branches:
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
        # x (B, L, D) patch tokens; t (B,) diffusion time in [0, 1]; cond (B, G, D); rope (L, hd/2) x 2
        # t in [0, 1] is scaled by 1000 (DiT's integer timesteps 0..999): the sinusoid's periods run
        # from 2 pi to 10000 * 2 pi, so on [0, 1] most frequencies would see an almost constant phase
        t_emb = self.t_embed(timestep_embedding(t * 1000, x.shape[-1]))[:, None]  # (B, 1, D)
        c = ln(self.c_embed(cond))                                                # (B, G, D)
        h = ln(x)
        # each patch asks the G condition tokens what to become: a spatial condition, unlike
        # DiT's single class vector; 2D RoPE on the queries tells the tokens where the patch is
        sc = self.cross_attn(h, context=c, rope=rope)                             # (B, L, D)
        # AdaLN-Zero with a per-patch (t + condition) vector: 6 modulations of width D per patch
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(F.silu(t_emb + sc)).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(h, shift_a, scale_a), rope=rope)
        return x + gate_m * self.mlp(modulate(ln(x), shift_m, scale_m))


class PixelDiT(nn.Module):
    """D_FM(x_t, t, c(t)) of eq. 2: the velocity network of the flow-matching decoder, on raw pixels
    (no VAE). Flow matching (eqs. 2-4): x_t = t x1 + (1 - t) x0 moves in a straight line from the
    noise x0 ~ N(0, I) to the image x1, so its velocity is v = x1 - x0, which the net regresses.

    x_t (B, 3, H, W) in data_std units -> patchify p = 8 by pure rearrangement (channel order c, p1, p2)
    -> Linear 192 -> D -> 1024 tokens -> blocks -> LN -> Linear D -> 192 -> un-patchify."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.dit_patch_size, cfg.dit_dim
        self.cond_proj = nn.Linear(cfg.dec_dim, D)
        self.x_embed = nn.Linear(3 * p * p, D)  # official: 1x1 conv on the patchified image
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.dit_depth))
        self.out = nn.Linear(D, 3 * p * p)      # official: 1x1 conv
        # 2D RoPE tables of the configured grid, built once (non-persistent: not in checkpoints).
        # Rebuilding them in every forward costs little eagerly, but a compiled graph fuses the
        # float64 cos / sin into each kernel that applies them and recomputes them per element
        g = cfg.image_size // p
        cos, sin = rope_2d(g, g, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # REPA projector (training only): DiT features -> the width of DINOv2 ViT-B/14 patch tokens
        self.repa = nn.Sequential(nn.Linear(D, cfg.repa_hidden), nn.SiLU(),
                                  nn.Linear(cfg.repa_hidden, cfg.repa_hidden), nn.SiLU(),
                                  nn.Linear(cfg.repa_hidden, cfg.repa_dim)) if cfg.repa_dim else None
        self.grad_checkpointing = False

    def forward(self, x, t, cond, repa=False):
        """x (B, 3, H, W), t (B,), cond (B, G, dec_dim) -> (v (B, 3, H, W), REPA features (B, 256,
        repa_dim) when repa=True, else None)."""
        B, C, H, W = x.shape
        p = self.cfg.dit_patch_size
        h, w = H // p, W // p
        cond = ln(self.cond_proj(cond))                                          # (B, G, D)
        # patchify by rearrangement: (B, C, h p, w p) -> (B, h w, C p p), channel order (c, p1, p2)
        x = x.view(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        x = self.x_embed(x)                                                      # (B, L, D)
        if h == w == self.cfg.image_size // p:
            rope = (self.rope_cos, self.rope_sin)
        else:  # another resolution than the configured one
            rope = rope_2d(h, w, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        feats = None
        for i, block in enumerate(self.blocks):
            if repa and i == self.cfg.repa_layer:
                feats = self.repa_features(x, h, w)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, t, cond, rope, use_reentrant=False)
            else:
                x = block(x, t, cond, rope)
        x = self.out(ln(x))                                                      # (B, L, C p p)
        # un-patchify: the inverse rearrangement
        v = x.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        return v, feats

    def repa_features(self, x, h, w):
        # average-pool the patch features to a 16x16 grid (DINOv2 ViT-B/14 at 224 px has 16x16
        # patches), then project: (B, L, D) -> (B, 256, repa_dim)
        s = max(h // 16, 1)
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return self.repa(F.avg_pool2d(grid, s, s).flatten(2).transpose(1, 2))

# -----------------------------------------------------------------------------
# section 7. Condition schedule (eqs. 5, 8): which group of tokens conditions which time

def shift_time(t, beta):
    """Uniform time u -> diffusion time u / (u + beta (1 - u)) (eq. 8). Eq. 5 writes the inverse
    map, diffusion time -> the uniform axis on which the K groups are evenly spaced; the code draws
    u, picks the group from it and shifts it into the diffusion time: the same schedule. With
    beta = 2 the groups crowd towards t = 0, so the early (coarse) steps, where the image is mostly
    noise, get more of the token budget."""
    return t / (t + beta * (1 - t))


def group_index(t_u, K):
    """Group used at uniform time t_u: g = clamp(floor(t_u K + 1/2), 0, K-1), so group i is
    centred on t_u = i/K (the official code rounds; the paper writes ceil(t' K)). Floats and
    tensors."""
    if torch.is_tensor(t_u):
        return (t_u * K + 0.5).floor().long().clamp(0, K - 1)
    return min(max(math.floor(t_u * K + 0.5), 0), K - 1)


def sampling_schedule(steps, K, beta):
    """Sampling times and groups for `steps` decoder steps (eq. 8): t_i = shift(i / steps) for
    i = 0..steps-1, then t = 1, a float32 tensor (steps + 1,); step i uses group g(i / steps).
    With steps = K (the default) each group conditions one step, the one its training times were
    centred on."""
    t_u = [i / steps for i in range(steps)]
    times = shift_time(torch.tensor(t_u + [1.0], dtype=torch.float32), beta)
    return times, [group_index(t, K) for t in t_u]

# -----------------------------------------------------------------------------
# section 8. The sequential diffusion tokenizer: its decoding loop (eq. 8) and its training
# objective (eq. 7)

class Tokenizer(nn.Module):
    """Encoder + quantiser + token decoder + pixel DiT. encode() gives codes, decode_steps() the
    sampler's loop, and forward() one training step's losses."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.vq_dim)
        self.decoder = TokenDecoder(cfg)
        self.dit = PixelDiT(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        # transformer blocks: truncated-normal(0.02) linears, zero biases (affine norms keep 1, 0)
        for block in [*self.encoder.blocks, *self.decoder.blocks, *self.dit.blocks]:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        # ... whose residual branches start closed: zero gates (GatedBlock) and zero AdaLN (DiT)
        for block in [*self.encoder.blocks, *self.decoder.blocks]:
            nn.init.constant_(block.gate1, self.cfg.gate_init)
            nn.init.constant_(block.gate2, self.cfg.gate_init)
        for block in self.dit.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        # the DiT starts by predicting v = 0
        nn.init.zeros_(self.dit.out.weight)
        nn.init.zeros_(self.dit.out.bias)
        # low-rank queries: std 1 in the 8-d space; decoder positions: std 0.02
        nn.init.trunc_normal_(self.encoder.query_embed.weight, std=1.0)
        nn.init.trunc_normal_(self.decoder.pos_embed.weight, std=0.02)
        # codebook: small uniform, then on the unit sphere
        V = self.cfg.codebook_size
        with torch.no_grad():
            w = self.quantizer.codebook.weight
            w.copy_(F.normalize(w.uniform_(-1.0 / V, 1.0 / V), dim=-1))
        # patch_embed, query_proj, to_code, from_code, cond_proj, x_embed and the REPA projector
        # keep PyTorch's default (Kaiming-uniform) init, as in the official code

    def set_grad_checkpointing(self, on=True):
        for m in (self.encoder, self.decoder, self.dit):
            m.grad_checkpointing = on

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, H, W) in [-1, 1] -> codes (B, N) int64."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return self.quantizer(self.encoder(images))[1]

    def cond_tokens(self, codes):
        """codes (B, N) -> z' (B, N, dec_dim). Causal: rows < i do not depend on codes[:, i:]."""
        if codes.min() < 0 or codes.max() >= self.cfg.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.cfg.codebook_size})")
        return self.decoder(self.quantizer.lookup(codes))

    @torch.no_grad()
    def decode_steps(self, codes, noise=None, solver="adams2", steps=None, stream=None):
        """The sampler (eq. 8): decode codes (B, N) from noise x_0 ~ N(0, I) (B, 3, H, W), yielding
        after each step the image as seen so far, the last being the decoded image. Step i
        integrates dx/dt = v(x, t, group g(i) of z') over [t_i, t_{i+1}] of the shifted grid:
            Euler:                    x_{i+1} = x_i + (t_{i+1} - t_i) v_i
            Adams-Bashforth 2 (AB2):  x_{i+1} = x_i + (t_{i+1} - t_i) (3/2 v_i - 1/2 v_{i-1})
        AB2 extrapolates the velocity from the last two evaluations: second order for one network
        call a step (Table 2: rFID 1.52 against Euler's 1.58 at 8 steps); its first step is Euler.
        What each step yields takes its direction d straight to t = 1 (the official clip_steps):
        x1_hat = x_i + (1 - t_i) d, the image as seen from the groups used so far (a preview);
        after the last step, where 1 - t_i = t_{i+1} - t_i, it is the image itself.
        Streaming: with `stream`, an iterator of (B,) tokens (the Llama's), the codes are written
        into `codes` as the steps need their groups; z' is causal (rows < n depend on the first n
        codes only), so each step runs as soon as its 32 tokens exist."""
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

    def decode(self, codes, noise=None, solver="adams2", steps=None):
        """codes (B, N) -> images (B, 3, H, W), roughly in [-1, 1] (decode_steps' last)."""
        *_, images = self.decode_steps(codes, noise, solver, steps)
        return images

    def forward(self, images, t_u=None, noise=None, repa=False):
        """One training forward on images (B, 3, H, W) in [-1, 1]. t_u (B,) ~ U[0, 1) picks the
        group (eq. 5) and, shifted, the diffusion time; noise (B, 3, H, W) is x0. Both are drawn
        when None. -> a dict of the losses and what the perceptual / REPA losses need."""
        cfg, B = self.cfg, images.shape[0]
        t_u = torch.rand(B, device=images.device) if t_u is None else t_u
        x0 = torch.randn_like(images) if noise is None else noise

        # encode and quantise; the VQ losses count tokens up to the last one of the chosen group
        z_q, codes, z = self.quantizer(self.encoder(images))           # (B, N, d), (B, N), (B, N, d)
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
        # dividing by data_std^2 puts the loss on the scale of image pixels: the jump estimate
        # below errs by (1 - t)(v_pred - v) / data_std in image units
        fm_loss = F.mse_loss(v_pred, x1 - x0) / cfg.data_std ** 2
        # the jump estimate x1_hat = x_t + (1 - t) v, in image units: LPIPS (eq. 7) compares it
        # with the input
        x1_hat = (x_t + (1 - te) * v_pred) / cfg.data_std
        return dict(fm_loss=fm_loss, vq_loss=vq_loss, commit_loss=commit_loss, x1_hat=x1_hat,
                    codes=codes, group=group, t=t, cond=cond, repa_feats=repa_feats)

    @classmethod
    def from_pretrained(cls, source="tokenizer_v1", use_ema=True):
        """A released name (tokenizer_v1) or a checkpoint, ours or official (its EMA); section 12."""
        return load_model(find_weights(source, "tokenizer"), "tokenizer", use_ema)


def tokenizer_loss(tok, images, lpips=None, repa_target=None, lpips_weight=0.5, repa_weight=0.5):
    """The tokenizer's training objective, eq. 7, for images (B, 3, H, W) in [-1, 1]:
        loss = l_fm + l_VQ + lambda_1 LPIPS(I, x1_hat) + lambda_2 l_repa        (lambda = 0.5)
    l_fm: flow matching on the group picked for each image (eqs. 2-5); l_VQ: section 3's pair;
    LPIPS compares the input with the one-jump estimate x1_hat = x_t + (1 - t) v, so every time
    also learns to jump to a sharp image (what lets 8 steps suffice); l_repa = 1 - cos(the DiT's
    projected features, a frozen encoder's patch tokens) aligns the DiT with a strong
    representation. lpips(a, b) -> (B, 1, 1, 1) (VGG16 in the paper) and repa_target(images) ->
    (B, M, C) (DINOv2 ViT-B/14: 16 x 16 x 768) are passed in; None leaves a term out. tok may be
    wrapped (DDP, compile). -> the loss, its terms (tensors), the codes (B, N)."""
    out = tok(images, repa=repa_target is not None)
    terms = dict(fm=out["fm_loss"], vq=out["vq_loss"], commit=out["commit_loss"])
    loss = out["fm_loss"] + out["vq_loss"] + out["commit_loss"]
    if lpips is not None:
        terms["lpips"] = lpips(images.float(), out["x1_hat"].float()).mean()
        loss = loss + lpips_weight * terms["lpips"]
    if repa_target is not None:
        target = repa_target(images)                                        # (B, M, C)
        feats = out["repa_feats"]                                           # (B, n, C)
        if feats.shape[1] != target.shape[1]:
            # the DiT pools its features to at most 16 x 16 (PixelDiT.repa_features); below
            # 256 px its grid is smaller, so the target's square grid is pooled down to it
            side, tside = math.isqrt(feats.shape[1]), math.isqrt(target.shape[1])
            grid = target.transpose(1, 2).unflatten(2, (tside, tside))
            target = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
        terms["repa"] = (1 - F.cosine_similarity(feats.float(), target.float(), dim=-1)).mean()
        loss = loss + repa_weight * terms["repa"]
    return loss, terms, out["codes"]
# -----------------------------------------------------------------------------
# section 10. The autoregressive model (eq. 6): Llama (LlamaGen's GPT), with a static KV cache

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) in float32 (also under bf16), then the learned gain
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class KVCache:
    """Static cache (B, H, L, hd) for keys and values: fixed shapes and addresses, so that a
    decode step can be compiled once and replayed as a CUDA graph."""

    def __init__(self, batch, n_head, length, head_dim, dtype, device):
        self.k = torch.zeros(batch, n_head, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos, k, v):
        # pos (T,), k, v (B, H, T, hd) -> the whole cache (B, H, L, hd)
        self.k[:, :, pos] = k
        self.v[:, :, pos] = v
        return self.k, self.v


class LlamaAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, rope, cache=None, pos=None, mask=None):
        B, T, D = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_head, self.head_dim)
        cos, sin = rope                                            # (T, hd/2): rotate q and k at once
        q, k = apply_rope(qkv[:, :, :2], (cos[:, None, None], sin[:, None, None])).permute(2, 0, 3, 1, 4)
        v = qkv[:, :, 2].transpose(1, 2)                           # q, k, v: (B, H, T, hd)
        if cache is None:            # training / teacher forcing: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:                        # inference: attend to everything cached so far
            k, v = cache.update(pos, k, v)                         # (B, H, L, hd)
            if T == 1:
                # one new token: its scores (B, H, 1, L) are a single row per head, so written out
                # the step is two batched matrix-vector products that a compiler fuses with the
                # mask and softmax (on a CPU, measured faster than the fused kernel's setup)
                att = (q @ k.transpose(-2, -1)).float() * self.head_dim ** -0.5
                y = torch.where(mask, att, float("-inf")).softmax(-1).type_as(v) @ v
            else:                    # prefill: class token and prefix at once
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, D)))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), with w1 and w3 stacked into one Linear w13 (one GEMM; the official
    checkpoints' w1, w3 are concatenated on load)."""

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

    def forward(self, x, rope, cache=None, pos=None, mask=None):
        h = x + self.attn(self.attn_norm(x), rope, cache, pos, mask)
        return h + self.ffn(self.ffn_norm(h))


class GPT(nn.Module):
    """Class-conditional Llama over the tokenizer's codes. The sequence is
    [class token, z_1 .. z_{N-1}] and position i predicts z_{i+1}; 1D RoPE over positions 0..N
    (the class token sits at position 0). The class table has a last row for the null class,
    used for classifier-free guidance."""

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
        self.caches = None  # KV caches of generation, one per layer, and their tables (setup_cache)
        self.initialize_weights()

    def initialize_weights(self):
        # every Linear and Embedding ~ N(0, 0.02); the output head starts at zero, so the first
        # prediction is uniform over the codebook
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def embed(self, labels, tokens):
        """labels (B,), tokens (B, T) -> [class token, tokens] embeddings (B, 1 + T, D)."""
        return torch.cat([self.class_embed(labels)[:, None], self.tok_embed(tokens)], dim=1)

    def check_inputs(self, tokens, labels):
        if labels.min() < 0 or labels.max() > self.cfg.num_classes:
            raise ValueError(f"class labels must lie in [0, {self.cfg.num_classes}] "
                             f"({self.cfg.num_classes} is the null class)")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.cfg.vocab_size})")
        if tokens.shape[1] > self.cfg.block_size:
            raise ValueError(f"{tokens.shape[1]} tokens exceed block_size {self.cfg.block_size}")

    def forward(self, tokens, labels):
        """Teacher forcing: tokens (B, N), labels (B,) -> logits (B, N, V); logits[:, i] predicts
        tokens[:, i] from the class and tokens[:, :i]. Class dropout for CFG is the caller's
        job (replace labels by cfg.num_classes)."""
        if not torch.compiler.is_compiling():  # (a check would break the compiled graph)
            self.check_inputs(tokens, labels)
        # the class token takes the place of a BOS token: the input is shifted right by one, so
        # the last token is never an input and position i sees exactly the class and tokens < i
        h = self.tok_dropout(self.embed(labels, tokens[:, :-1]))               # (B, N, D)
        rope = rope_1d(torch.arange(h.shape[1], device=h.device), self.cfg.head_dim, self.cfg.rope_base)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, use_reentrant=False)
            else:
                h = layer(h, rope)
        return self.output(self.norm(h)).float()

    # --- inference with the KV cache -------------------------------------------

    def setup_cache(self, batch, length, dtype=None, device=None):
        """Static KV caches for `batch` rows and `length` positions, kept for the next call of the
        same shape (stale entries are never read: position p only sees slots 0..p)."""
        p = self.output.weight
        dtype, device = dtype or p.dtype, device or p.device
        k = self.caches[0].k if self.caches else None
        if k is None or k.shape[0] != batch or k.shape[2] != length or k.dtype != dtype or k.device != device:
            self.caches = [KVCache(batch, self.cfg.n_head, length, self.cfg.head_dim, dtype, device)
                           for _ in self.layers]
            # per-position tables, looked up at each step: RoPE angles and the causal mask (L, L)
            idx = torch.arange(length, device=device)
            self.cache_rope = rope_1d(idx, self.cfg.head_dim, self.cfg.rope_base)
            self.cache_mask = idx[None, :] <= idx[:, None]

    def forward_cached(self, h, pos):
        """h (B, T, D) input embeddings at positions pos (T,) -> logits (B, T, V), reading and
        filling the KV caches. Position p attends to cache slots 0..p."""
        mask = self.cache_mask[pos]                                            # (T, L)
        rope = (self.cache_rope[0][pos], self.cache_rope[1][pos])
        for layer, cache in zip(self.layers, self.caches):
            h = layer(h, rope, cache, pos, mask)
        return self.output(self.norm(h)).float()

    def prefill(self, labels, prefix):
        """Class token and fixed prefix tokens (B, P) through the cache at positions 0..P -> the
        logits (B, V) of the next token."""
        h = self.embed(labels, prefix)
        return self.forward_cached(h, torch.arange(h.shape[1], device=h.device))[:, -1]

    def decode_one(self, token, pos):
        """token (B,) at position pos (1,) -> next-token logits (B, V): the step generation
        repeats, which prepare_sampling may replace by its compiled version (gpt-fast)."""
        return self.forward_cached(self.tok_embed(token)[:, None], pos)[:, -1]

    @classmethod
    def from_pretrained(cls, source="D-AR-L", use_ema=True, block_size=None):
        """From a released name (D-AR-L, D-AR-XL) or a checkpoint, ours or official (its EMA); section 13."""
        return load_model(find_weights(source, "gpt"), "gpt", use_ema, block_size)

# -----------------------------------------------------------------------------
# section 11. Generation: prefill / decode one token, classifier-free guidance with a linear
# schedule, streaming into the decoder; and the AR training loss

def guidance_schedule(guidance, n):
    """Classifier-free guidance scale per position (n,): linear from start to end over the tokens
    (the paper: 1.1 -> 8.0 for D-AR-L, 1.1 -> 10.0 for XL); a single number is a constant scale.
    Early tokens fix the layout, where strong guidance costs diversity; late tokens add the detail
    that guidance sharpens."""
    start, end = (guidance, guidance) if isinstance(guidance, (int, float)) else guidance
    return torch.linspace(float(start), float(end), n)


def guided_logits(logits, scale):
    """Classifier-free guidance on the logits (Ho & Salimans): rows are [conditional ; unconditional]
    and l = l_u + (l_c - l_u) s, which sharpens p(z_i | z_<i, class) by s against p(z_i | z_<i)."""
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * scale


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Draw one token per row from logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:  # keep the k most likely
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set whose probability reaches top_p (the top token always)
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[:, 1:] = drop[:, :-1].clone()
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # argmax p_i / E_i with E_i = -log U_i ~ Exp(1) picks i with probability p_i (the exponential
    # race), and unlike torch.multinomial it needs no device sync (gpt-fast)
    return torch.argmax(probs / -torch.log(torch.rand_like(probs)), dim=-1)


@torch.no_grad()
def generate_stream(gpt, labels, num_tokens=None, guidance=1.0, temperature=1.0, top_k=0,
                    top_p=1.0, prefix=None):
    """Sample eq. 6 left to right: yield the tokens (B,) of positions 0..N-1 one at a time.
    `prefix` (B, P) fixes the first P tokens (zero-shot layout control): they are fed in the
    prefill and yielded as they are. With guidance, conditional and unconditional rows run as one
    batch of 2B rows."""
    N = num_tokens or gpt.cfg.block_size
    B, device = labels.shape[0], labels.device
    prefix = labels.new_zeros(B, 0) if prefix is None else prefix.to(device)
    gpt.check_inputs(prefix, labels)
    if N > gpt.cfg.block_size or prefix.shape[1] > N:
        raise ValueError(f"cannot generate {N} tokens with a prefix of {prefix.shape[1]} "
                         f"(block_size {gpt.cfg.block_size})")
    # guidance costs a second batch (the null class); with a scale of 1 everywhere it is skipped
    scales = guidance_schedule(guidance, N).tolist()
    guided = any(s != 1.0 for s in scales)
    null = torch.full_like(labels, gpt.cfg.num_classes)
    both = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)   # rows [cond ; uncond]
    # positions 0..N-1 are ever fed (class token, then tokens 1..N-1): N + 1 slots suffice
    gpt.setup_cache(len(labels) * (1 + guided), N + 1)
    positions = torch.arange(N, device=device)  # slices of it feed decode_one: no tensor a step
    logits = gpt.prefill(torch.cat([labels, null]) if guided else labels, both(prefix))
    yield from prefix.unbind(1)
    for i in range(prefix.shape[1], N):
        token = sample_logits(guided_logits(logits, scales[i]) if guided else logits,
                              temperature, top_k, top_p)
        yield token
        if i + 1 < N:
            logits = gpt.decode_one(both(token), positions[i + 1:i + 2])


def generate(gpt, labels, num_tokens=None, guidance=1.0, temperature=1.0, top_k=0, top_p=1.0,
             prefix=None):
    """labels (B,) -> tokens (B, N) int64 in the tokenizer's order, sampled left to right with the
    KV cache (a model trained on the reversed order writes z_N first; they are flipped back)."""
    stream = generate_stream(gpt, labels, num_tokens, guidance, temperature, top_k, top_p, prefix)
    tokens = torch.stack(list(stream), 1)
    return tokens.flip(1) if gpt.cfg.reverse_tokens else tokens


@torch.no_grad()
def generate_images(gpt, tok, labels, noise=None, solver="adams2", steps=None, **gen_kwargs):
    """Streaming D-AR: the Llama's tokens feed the decoder's loop (Tokenizer.decode_steps), which
    takes group g when its step comes, so each diffusion step runs as soon as the 32 tokens it
    reads exist. Yields (tokens (B, N), image (B, 3, H, W)) after each decoder step: the image as
    seen so far, and after the last step the image, the same as tok.decode(tokens, noise) gives
    (z' is causal and each step reads its own group); tokens not written yet are 0. gen_kwargs go
    to generate_stream (guidance, temperature, top_k, top_p, prefix)."""
    N = tok.cfg.num_tokens
    if gpt.cfg.reverse_tokens:  # fine groups come first: no step can run before the whole sequence
        if gen_kwargs.get("prefix") is not None:
            raise ValueError("a prefix fixes the first (coarse) tokens: not with a model of the "
                             "reversed order")
        tokens, stream = generate(gpt, labels, N, **gen_kwargs), None
    else:
        tokens, stream = labels.new_zeros(len(labels), N), generate_stream(gpt, labels, N, **gen_kwargs)
    for image in tok.decode_steps(tokens, noise, solver, steps, stream):
        yield tokens, image


def ar_loss(gpt, codes, labels, class_dropout, null_class, reverse=False):
    """Eq. 6 as a training loss: cross-entropy of the N next-token predictions under teacher forcing
    (codes (B, N), labels (B,)). With probability class_dropout a label becomes the null class, so
    the same network also learns the unconditional p(z) that guidance contrasts with. reverse: learn
    the sequence fine to coarse (z_N first). gpt may be wrapped (DDP, compile)."""
    if reverse:
        codes = codes.flip(1)
    drop = torch.rand(labels.shape, device=labels.device) < class_dropout
    labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    logits = gpt(codes, labels)                                             # (B, N, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())

# -----------------------------------------------------------------------------
# section 12. Presets: the paper's sizes, and small ones for a CPU and for the tests

TOKENIZER_PRESETS = {
    # the paper's tokenizer: 307.4M parameters (185.1M pixel DiT, 7.3M REPA projector)
    "tokenizer_v1": dict(),
    # trains on 2 CPU cores in minutes: 32x32 images (Fashion-MNIST padded), 64 tokens in 4 groups;
    # beta = 4: at this size the tokens take hold only when training dwells on the noisy times; 8
    # decoder steps, twice K (groups 1, 2, 2, 3, 3, 4, 4, 4): a briefly trained DiT gains from them
    "tokenizer_small": dict(image_size=32, patch_size=4, enc_dim=128, enc_layers=2, dec_dim=128,
                            dec_layers=2, num_tokens=64, num_groups=4, codebook_size=512,
                            dit_dim=128, dit_depth=4, dit_patch_size=4, sample_steps=8, repa_layer=2,
                            repa_dim=0, max_tokens=64, time_shift=4.0),
    # a few seconds per step: tests
    "tokenizer_tiny": dict(image_size=32, patch_size=8, enc_dim=64, enc_layers=1, dec_dim=64,
                           dec_layers=1, num_tokens=16, num_groups=4, codebook_size=64,
                           dit_dim=64, dit_depth=2, dit_patch_size=4, sample_steps=4, repa_layer=1,
                           repa_dim=768, repa_hidden=64, max_tokens=16),
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
    if preset not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}: choose from {sorted(TOKENIZER_PRESETS)}")
    return TokenizerConfig(**{**TOKENIZER_PRESETS[preset], **overrides})


def gpt_config(preset, **overrides):
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}: choose from {sorted(GPT_PRESETS)}")
    return GPTConfig(**{**GPT_PRESETS[preset], **overrides})


# =============================================================================
# =============================================================================
#          PART II: what the scripts share (each holds the rest of its stage)
# =============================================================================

# -----------------------------------------------------------------------------
# section 13. Checkpoints: safe loading, the official format, the released weights by name

class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind (one-line message)."""


class _OfficialConfig(dict):
    """The official config_util.Config (a mapping over `_data`), read without the official code."""

    def __setstate__(self, state):
        self.update(state.get("_data", {}))


def save_checkpoint(path, model, ema=None, **extra):
    """Our checkpoint: kind, config (a dict), weights, the EMA's and what the trainer adds. Written
    to path.tmp, then renamed: a crash leaves the old file or the new one, never half of one, and
    a failed write (a full disk) leaves the old file and no path.tmp."""
    kind = "dar.tokenizer" if isinstance(model, Tokenizer) else "dar.gpt"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        torch.save(dict(kind=kind, config=asdict(model.cfg), model=model.state_dict(),
                        ema=None if ema is None else ema.state_dict(), **extra), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    finally:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")


def load_checkpoint(path):
    """torch.load(weights_only=True): a pickle can name any callable to run on load (os.system,
    say); this refuses all but tensors, containers and the allow-list below: no file runs code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    safe = [(_OfficialConfig, "config_util.Config"), argparse.Namespace]
    try:
        with torch.serialization.safe_globals(safe):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = "it names objects outside the allow-list" if "weights_only" in str(e) else one_line(e)
        raise CheckpointError(f"cannot read checkpoint {path}: truncated, corrupt or unsafe "
                              f"({why})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict")
    return ckpt


def make_config(cls, d, path):
    """A config dataclass from a checkpoint's dict; an unknown key or a size of 0 is one line."""
    try:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        return cls(**d)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: not a {cls.__name__} ({e})") from None


def tokenizer_config_from_official(c):
    """The official tokenizer config (YAML `model:` section) -> TokenizerConfig."""
    c = c.get("model", c)
    dd = c["diff_decoder"]
    group = c["num_all_queries"] // c["num_query_groups"]
    if c.get("queries_per_step", group) != group:  # no release has it
        raise CheckpointError("official tokenizer with queries_per_step != N / K: not supported")
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


def strip_prefixes(sd):
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes of state dict keys."""
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
    """Official tokenizer state dict -> ours, the whole difference: renames, q/k/v fused, 1x1 conv
    weights (out, in, 1, 1) as Linear ones, the official trainer's codebook statistics dropped."""
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
        qkv = [out.pop(f"{base}.{n}.{p}") for n in "qkv"]
        out[f"{base}.qkv.{p}"] = torch.cat(qkv)
    for k in [k for k in out if re.search(r"\.cross_attn\.k\.(weight|bias)$", k)]:
        base, p = k.rsplit(".k.", 1)
        out[f"{base}.kv.{p}"] = torch.cat([out.pop(k), out.pop(f"{base}.v.{p}")])
    return out


def convert_official_gpt(sd):
    """Official GPT state dict -> ours: renames, and w1 over w3 in one w13 (as SwiGLU splits it)."""
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
        out[k.replace(".w1.", ".w13.")] = torch.cat([out.pop(k), out.pop(k.replace(".w1.", ".w3."))])
    return out


def gpt_config_from_weights(sd, block_size=256):
    """The GPT's size read off converted weights (head_dim is 64 in every D-AR / LlamaGen preset)."""
    vocab, dim = sd["tok_embed.weight"].shape
    return GPTConfig(dim=dim, n_layer=sum(k.endswith(".attn.wqkv.weight") for k in sd),
                     n_head=dim // 64, vocab_size=vocab, block_size=block_size,
                     num_classes=sd["class_embed.weight"].shape[0] - 1,
                     ffn_hidden=sd["layers.0.ffn.w13.weight"].shape[0] // 2)


def load_model(path, kind, use_ema=True, block_size=None):
    """A Tokenizer or GPT (kind) from our checkpoint or an official one (known by a key only that
    model has), EMA weights when asked and present; an official GPT's length is block_size or 256."""
    ckpt = load_checkpoint(path)
    sd = ckpt.get("model", ckpt)  # the released GPTs are {"model": state dict}
    keys = " ".join(sd) if isinstance(sd, dict) else ""
    official = ("gpt" if "tok_embeddings.weight" in keys else "tokenizer"
                if "quantize.embedding.weight" in keys and isinstance(ckpt.get("config"), dict)
                else None)
    found = ckpt["kind"][4:] if ckpt.get("kind") in ("dar.tokenizer", "dar.gpt") else official
    if found != kind:
        what = f"a D-AR {found}" if found else "not a D-AR"
        raise CheckpointError(f"{path} is {what} checkpoint, expected a {kind}")
    sd = ckpt["ema"] if use_ema and ckpt.get("ema") else sd
    if kind == "tokenizer" and official:
        cfg, sd = tokenizer_config_from_official(ckpt["config"]), convert_official_tokenizer(sd)
    elif kind == "tokenizer":
        cfg, sd = make_config(TokenizerConfig, ckpt["config"], path), strip_prefixes(sd)
    elif official:
        sd = convert_official_gpt(sd)
        cfg = gpt_config_from_weights(sd, block_size or 256)
    else:
        cfg, sd = make_config(GPTConfig, ckpt["config"], path), strip_prefixes(sd)
    if kind == "tokenizer":  # the REPA projector is training-only: built when the file has it
        cfg.repa_dim = sd["dit.repa.4.weight"].shape[0] if "dit.repa.4.weight" in sd else 0
    model = Tokenizer(cfg) if kind == "tokenizer" else GPT(cfg)
    # ours record what the GPT was trained with: its tokenizer (name or path) and the digest of
    # that tokenizer's codes (check_pair), and the class names
    model.tokenizer, model.classes = ckpt.get("tokenizer"), ckpt.get("classes")
    model.tokenizer_digest = ckpt.get("tokenizer_digest")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # keys or shapes that do not fit, in one line
        why = " ".join(str(e).split())[:400]
        raise CheckpointError(f"{path}: weights do not fit the model: {why}") from None
    return model.eval()


# The released checkpoints: a known name is downloaded once into the Hugging Face cache (HF_HOME;
# HF_ENDPOINT: a mirror; HF_HUB_OFFLINE=1: the cache only); anything else is a path (DiT's
# find_model)
HUB_REPO = "showlab/D-AR"
RELEASES = {"tokenizer_v1": ("D-AR-tokenizer_v1.pt", "tokenizer"),  # name: (file, kind)
            "D-AR-L": ("D-AR-L-360K.pt", "gpt"), "D-AR-XL": ("D-AR-XL-360K.pt", "gpt")}
PAPER_GUIDANCE = {"D-AR-L": (1.1, 8.0), "D-AR-XL": (1.1, 10.0)}  # the paper's linear schedules


def find_weights(source, kind):
    """A released name of this kind -> its downloaded file; anything else must be a file."""
    names = ", ".join(n for n, (_, k) in RELEASES.items() if k == kind)
    if source not in RELEASES:
        if not os.path.isfile(source):
            raise CheckpointError(f"checkpoint not found: {source} (released {kind}s: {names})")
        return os.fspath(source)
    file, released = RELEASES[source]
    if released != kind:
        raise CheckpointError(f"{source} is a released {released}, not a {kind} ({names})")
    from huggingface_hub import hf_hub_download  # imported here: only names need it
    try:
        return hf_hub_download(HUB_REPO, file)
    except Exception as e:  # offline with an empty cache, a mirror without the file, a full disk
        raise CheckpointError(f"cannot get {file} ({source}) from the hub or its cache "
                              f"({type(e).__name__}): download it from "
                              f"https://huggingface.co/{HUB_REPO} and pass its path, or set "
                              f"HF_ENDPOINT to a mirror") from None


def digest(*modules):
    """A short key of the modules' weights, by content (sha256 of their bytes): what an output was
    made from, which a path alone does not tell (a run retrained at the same path)."""
    h = hashlib.sha256()
    for m in modules:
        for t in m.state_dict().values():
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def check_pair(tok, gpt, tok_name, gpt_name):
    """A GPT writes the codes of one tokenizer: the same shapes, and where its checkpoint records
    it (ours do; the released ones record nothing) the digest of that tokenizer's encoder and
    codebook, which decide what each code means."""
    if (gpt.cfg.vocab_size, gpt.cfg.block_size) != (tok.cfg.codebook_size, tok.cfg.num_tokens):
        raise CheckpointError(f"{gpt_name} writes {gpt.cfg.block_size} tokens of "
                              f"{gpt.cfg.vocab_size} codes, {tok_name} has {tok.cfg.num_tokens} of "
                              f"{tok.cfg.codebook_size}: they do not belong together")
    recorded = getattr(gpt, "tokenizer_digest", None)
    if recorded and recorded != digest(tok.encoder, tok.quantizer):
        raise CheckpointError(f"{gpt_name} was trained on the codes of another tokenizer than "
                              f"{tok_name} (its encoder and codebook differ): pass the one the "
                              f"GPT was trained with")


def load_pair(gpt, tokenizer=None, device="cpu"):
    """(tokenizer, GPT, the tokenizer's name) to sample with: `tokenizer`, else the one a released
    GPT was trained with (tokenizer_v1), else the one our trainer recorded; checked as a pair."""
    gpt_path = find_weights(gpt, "gpt")
    if not tokenizer:
        tokenizer = "tokenizer_v1" if gpt in RELEASES else load_checkpoint(gpt_path).get("tokenizer")
        if not tokenizer:
            raise CheckpointError(f"--gpt {gpt} does not say which tokenizer it was trained with: "
                                  f"pass --tokenizer")
    tok = load_model(find_weights(tokenizer, "tokenizer"), "tokenizer").to(device)
    model = load_model(gpt_path, "gpt", block_size=tok.cfg.num_tokens).to(device)
    check_pair(tok, model, tokenizer, gpt)
    return tok, model, tokenizer

# -----------------------------------------------------------------------------
# section 14. Images: PIL until they enter a model, (3, H, W) floats in [-1, 1] inside, and
# (B, H, W, 3) uint8 out

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "boot"]


def load_image(path):
    """An RGB PIL image, or ValueError naming the file; 16-bit grey scaled (PIL would clip it)."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # "I;16..." 16-bit, or "I" (how some 16-bit PNGs open)
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
                im = Image.fromarray((a * (255.0 / top)).round().clip(0, 255).astype(np.uint8))
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for a bad file
        raise ValueError(f"cannot read image {path}: {e}") from None


def fit_shorter_side(img, size):
    """Shorter side to `size` (ADM: halving with a box filter, which keeps the bicubic step from
    aliasing, then bicubic); a smaller image is padded with black, not blown up (Fashion-MNIST)."""
    if min(img.size) < size:
        canvas = Image.new("RGB", (max(img.size[0], size), max(img.size[1], size)))
        canvas.paste(img, ((canvas.size[0] - img.size[0]) // 2, (canvas.size[1] - img.size[1]) // 2))
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


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded as torchvision's save_image."""
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images, nrow=8):
    """(B, 3, H, W) in [-1, 1] -> one PIL grid, nrow images a row, 2 px apart; images under 64 px
    are enlarged (nearest neighbour) to be seen."""
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid_image(images, nrow).save(path)


def list_images(folder):
    """The image files in folder and below, sorted. Links to folders are not followed: a link
    loop would list its images again and again, and a link to another class's folder would give
    its images a second class."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder)
                  for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))


def load_npz(path):
    """An .npz, opened (its arrays are read when asked for), never unpickling. Anything else (an
    .npy, a pickle) is one line naming the file: numpy's message would advise an unsafe load."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception:
        z = None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz of arrays")
    return z


class ImageDataset(torch.utils.data.Dataset):
    """(image, label) pairs of files or in-memory arrays. transform(PIL image, rng) -> tensor gets a
    random.Random seeded from (seed, epoch, index): the same augmentation in a resumed run and with
    any number of loader workers. Item e * len + i is image i in epoch e (GlobalBatchSampler)."""

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
        """What the images are, cheaply: each file's path, size and modification time (arrays:
        their bytes), and the labels; a cache of their codes or features is keyed by it."""
        h = hashlib.sha256(json.dumps(self.labels).encode())
        if self.files is None:
            h.update(np.ascontiguousarray(self.arrays))
        for f in self.files or []:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def build_dataset(data, transform=None, train=True, seed=0):
    """--data: an ImageFolder tree (root/<class>/<image>, classes sorted by name, as ImageNet is laid
    out; its split is the folder) or fashion-mnist (Debian's dataset-fashion-mnist, else
    torchvision's download): 10 classes of 28x28 grey images."""
    if data == "fashion-mnist":
        prefix = os.path.join(FASHION_MNIST_DIR, "train" if train else "t10k")
        if os.path.exists(f"{prefix}-images-idx3-ubyte.gz"):  # IDX: a 16 (8) byte header, uint8
            read = lambda f, skip: np.frombuffer(gzip.open(f"{prefix}-{f}-ubyte.gz").read(),
                                                 np.uint8, offset=skip)
            x, y = read("images-idx3", 16).reshape(-1, 28, 28), read("labels-idx1", 8)
        else:
            import torchvision
            ds = torchvision.datasets.FashionMNIST(os.path.expanduser("~/.cache/dar"), train=train,
                                                   download=True)
            x, y = ds.data.numpy(), ds.targets.numpy()
        return ImageDataset([int(v) for v in y], FASHION_MNIST_CLASSES, arrays=x,
                            transform=transform, seed=seed)
    if not os.path.isdir(data or ""):
        raise FileNotFoundError(f"--data {data}: no such directory (expected root/<class>/<image> "
                                f"or fashion-mnist)")
    classes = sorted(d.name for d in os.scandir(data) if d.is_dir())
    files = {c: list_images(os.path.join(data, c)) for c in classes}
    if not classes or not all(files.values()):
        raise ValueError(f"--data {data}: expected class folders of images (root/<class>/<image>)")
    return ImageDataset([i for i, c in enumerate(classes) for _ in files[c]], classes,
                        files=[f for c in classes for f in files[c]], transform=transform, seed=seed)

# -----------------------------------------------------------------------------
# section 15. Training: the flags, processes and run directory both trainers share, the data
# order and seeds of an exact resume, and the end of a step (losses read, checkpoints saved)

# the best device here, as nanoGPT picks it (mps: Apple silicon, untested here)
DEVICE = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def setup(device, threads=None, workers=0):
    """(rank, world size, torch.device). Under torchrun (RANK set) a process group: NCCL on GPUs,
    one a process (LOCAL_RANK), gloo on CPUs. Compute threads: --threads, else this process's
    share of the cores it may use, less its data-loader workers (one thread each, worker_init)."""
    there = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if not there[device]:
        raise ValueError(f"--device {device}: this machine has no {device} device (use cpu)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - workers)
    torch.set_num_threads(threads or share)
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    local = f"cuda:{os.environ['LOCAL_RANK']}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device(local)


def worker_init(_):  # a data-loader worker: one thread; Ctrl-C is the main process's
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """One process's micro-batches (`accum` a step), from step `start` on. Epoch e is a permutation
    seeded with seed + e, cut into global batches; process r takes the r-th slice of each and cuts
    it into micro-batches, so sample j of a global batch lands in the same slot on any number of
    processes (1 x 2 micro-batches = 2 x 1) and a resumed run goes on where it stopped. Item
    e * n + i: image i in epoch e."""

    def __init__(self, n, global_batch, micro_batch, rank, world, seed, start=0):
        self.micro = micro_batch or global_batch // world
        if global_batch % (world * self.micro) or n < global_batch:
            raise ValueError(f"--global-batch {global_batch} must be processes ({world}) x "
                             f"--micro-batch ({self.micro}) x a whole number, and at most the {n} "
                             f"images of --data")
        self.n, self.global_batch, self.seed, self.start = n, global_batch, seed, start
        self.per_rank, self.accum = global_batch // world, global_batch // (world * self.micro)
        self.offset = rank * self.per_rank

    def __iter__(self):
        g = torch.Generator()
        for step in itertools.count(self.start):
            epoch, s = divmod(step, self.n // self.global_batch)
            if step == self.start or s == 0:
                perm = torch.randperm(self.n, generator=g.manual_seed(self.seed + epoch)).tolist()
            mine = perm[s * self.global_batch + self.offset:][:self.per_rank]
            for m in range(0, self.per_rank, self.micro):
                yield [epoch * self.n + i for i in mine[m:m + self.micro]]


def step_seed(seed, step, micro):
    """The seed of one micro-batch of one step: everything random in a step (t, noise, dropout,
    class dropout) is drawn after reseeding with it, so a resumed run draws what the uninterrupted
    one did, on 1 or N processes."""
    return (seed * 1_000_003 + step * 10_007 + micro) % (2 ** 63)


def get_lr(step, args):
    """The learning rate of a step: a linear warm-up over --warmup steps, then constant, then a
    linear decay to 1e-5 over the last --decay-steps (the paper's GPT recipe; the official
    tokenizer run has no decay: its EMA does the averaging a decay would)."""
    decay = max(0.0, (step - args.max_steps + args.decay_steps) / max(args.decay_steps, 1))
    warm = min(1.0, (step + 1) / max(args.warmup, 1))
    return args.lr * warm * (1 - decay) + 1e-5 * decay


def make_optimizer(model, lr, weight_decay, beta2, fused=False):
    """AdamW, decaying matrices and embeddings only (not norms, biases, gates: their scale matters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2],
                               "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, beta2), fused=fused)


def optimizer_step(model, optimizer, ema, args):
    """Clip the gradient norm, step AdamW, clear the gradients, and move the EMA of the weights:
    ema <- decay * ema + (1 - decay) * model. -> the gradient norm before clipping."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - args.ema_decay)
    return norm


def find_run(args, kind, model_flags):
    """The checkpoint --out holds to go on from, or None: a new run. A run directory holds one
    kind of model: another kind's ckpt.pt is refused, and --no-resume starts afresh over a run of
    the same kind only. A flag that sets the model or its data (--preset, --data, --init-from,
    model_flags) must be the run's own. Read only: a refusal changes no file."""
    path = os.path.join(args.out, "ckpt.pt")
    ckpt = load_checkpoint(path) if os.path.exists(path) else None
    if ckpt is not None and ckpt.get("kind") != f"dar.{kind}":
        raise CheckpointError(f"--out {args.out}: its ckpt.pt is not a {kind} run of ours, which "
                              f"neither a resume nor --no-resume may replace: use another --out")
    if ckpt is None or args.no_resume:
        return None
    old, flag = ckpt["args"], lambda k: "--" + k.replace("_", "-")
    same = lambda d: os.path.realpath(d) if isinstance(d, str) and os.path.exists(d) else d
    for k in ("preset", "data", "init_from", *model_flags):
        if getattr(args, k) is not None and same(old.get(k)) != same(getattr(args, k)):
            raise ValueError(f"{flag(k)} {getattr(args, k)}: {path} is a run with {flag(k)} "
                             f"{old.get(k)}; train into another --out, or start afresh with "
                             f"--no-resume")
    return ckpt


_LOCKS = {}  # run directory -> its open lock file, held by this process until it ends


def open_run(args, ckpt, rank):
    """Take --out for this trainer -> log(line). One trainer at a time: an OS lock, which the OS
    releases when the process ends (process 0 holds it). A resumed run says what changed (those
    flags apply); metrics.jsonl keeps the lines of the steps before the start (a line it cannot
    read goes too)."""
    log, metrics = logger(args.out, rank == 0), os.path.join(args.out, "metrics.jsonl")
    if rank > 0:
        return log
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    real = os.path.realpath(args.out)
    if real not in _LOCKS:
        lock = open(os.path.join(args.out, "lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {args.out}: another trainer is running in it") from None
        _LOCKS[real] = lock
    if ckpt:
        old = ckpt["args"]
        changed = [f"--{k.replace('_', '-')} {old[k]} -> {v}" for k, v in vars(args).items()
                   if k in old and old[k] != v and v is not None]
        log(f"resuming from {args.out}/ckpt.pt at step {ckpt['step']}"
            + f" ({', '.join(changed)})" * bool(changed))
    if os.path.exists(metrics):
        with open(metrics) as f:
            lines = [line for line in f if metrics_step(line) <= (ckpt["step"] if ckpt else 0)]
        with open(metrics, "w") as f:
            f.writelines(lines)
    return log


def metrics_step(line):  # the step of a metrics.jsonl line; a damaged line is not worth a run
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def logger(out, master):  # log(line): above the progress bar and into out/log.txt, by process 0
    def log(line):
        if master:
            tqdm.write(line)
            with open(os.path.join(out, "log.txt"), "a") as f:
                f.write(line + "\n")
    return log


def restore(ckpt, model, optimizer):
    """The run's checkpoint into the model and the optimizer (its moments): training goes on as if
    never stopped. -> the step to start from (0 for a new run)."""
    if not ckpt:
        return 0
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def make_ema(model, ckpt, decay):
    """The EMA of the weights (what is sampled; None when decay is 0): the checkpoint's, else a
    copy of the model."""
    if decay == 0:
        return None
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if ckpt and ckpt["ema"]:
        ema.load_state_dict(ckpt["ema"])
    return ema


class Meter:
    """The loss terms of the steps since the last read, summed on the device: the host never waits
    for the device but at a read (nanoGPT reads its loss only at log time too). Also the step the
    run's ckpt.pt holds (`saved`)."""

    def __init__(self, saved):
        self.sums, self.steps, self.t0, self.saved = {}, 0, time.time(), saved

    def add(self, scale=1.0, **terms):  # tensors of one micro-batch (or step), times scale
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float() * scale

    def read(self, stop, world):
        """-> (the means over the steps and processes, seconds per step, whether any process was
        asked to stop): one all-reduce, of the stop flags too; then the sums start again."""
        flag = torch.tensor(float(bool(stop)), device=next(iter(self.sums.values())).device)
        values = torch.stack([*self.sums.values(), flag])
        if world > 1:
            torch.distributed.all_reduce(values)
        *sums, stopped = (values / world).tolist()
        means = {k: v / self.steps for k, v in zip(self.sums, sums)}
        seconds = (time.time() - self.t0) / self.steps
        self.sums, self.steps, self.t0 = {}, 0, time.time()
        return means, seconds, stopped > 0


def end_step(args, step, meter, stop, log, model, ema, optimizer, unit, **extra):
    """The end of optimizer step `step`, the same in both trainers -> whether to stop. Every
    --log-every steps, at a checkpoint and at a stop the loss terms are read (the only sync) and
    logged (log.txt, metrics.jsonl). A non-finite loss or weight stops the run there, before it can
    reach a checkpoint: ckpt.pt keeps the last good step, which the message names. Otherwise ckpt.pt
    is written every --ckpt-every steps, at the last step and at a stop. unit = (name, items a step)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    meter.steps += 1
    stopping = bool(stop) and world == 1                      # one process stops at once
    save = step % args.ckpt_every == 0 or step == args.max_steps
    if not (save or stopping or step % args.log_every == 0):
        return False
    means, seconds, stopping = meter.read(stop, world)
    lr = optimizer.param_groups[0]["lr"]
    terms = " ".join(f"{k} {v:.4f}" for k, v in means.items())
    log(f"step {step}/{args.max_steps} | {terms} | lr {lr:.2e} | "
        f"{unit[1] / seconds:.1f} {unit[0]}/s")
    if rank == 0:
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(dict(step=step, lr=lr, **means)) + "\n")
    weights = [p for m in (model, ema) if m is not None for p in m.parameters()]
    finite = torch.stack([p.isfinite().all() for p in weights]).all()
    if not (all(map(math.isfinite, means.values())) and finite):
        held = (f"{args.out}/ckpt.pt keeps step {meter.saved}, the same command with a lower --lr "
                f"resumes it" if meter.saved else "no checkpoint was saved: start again with a "
                f"lower --lr")
        raise ValueError(f"non-finite loss or weights at step {step}, not saved; {held}")
    if save or stopping:
        if rank == 0:
            save_checkpoint(os.path.join(args.out, "ckpt.pt"), model, ema, step=step,
                            optimizer=optimizer.state_dict(), args=vars(args), **extra)
        if world > 1:
            torch.distributed.barrier()
        meter.saved = step
    return stopping


def catch_stop(on=True):
    """Ctrl-C / SIGTERM put their name into the returned list, which the training loop reads (it
    saves and stops); on=False gives the signals back."""
    caught = []
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        handler = (lambda signum, frame: caught.append(signal.Signals(signum).name)) if on else default
        signal.signal(sig, handler)
    return caught


def finish(stopping, stop, step, args, log):
    """After the loop: the signals given back; a run stopped by one ends in one line and a
    non-zero exit status (process 0 says it)."""
    catch_stop(False)
    if stopping:
        first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        sys.exit(f"stopped by {stop[0] if stop else 'another process'} at step {step}, saved in "
                 f"{args.out}/ckpt.pt: the same command resumes" if first else 1)
    log(f"done: {args.out}/ckpt.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _number(cast, ok, what):
    """An argparse type: a value that makes no sense stops at parse time, in one line naming the
    flag."""
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


def parse_guidance(text):
    """--guidance: '1.1,8.0' -> (1.1, 8.0), the ends of a linear schedule over the tokens; '4' -> 4.0."""
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or not all(math.isfinite(v) and v >= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"guidance {text!r}: expected one finite scale >= 0 or "
                                         f"'start,end'")
    return vals[0] if len(vals) == 1 else tuple(vals)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's own two: every flag's default, and the docstring as written."""


def parser(doc):
    # abbreviations off: a flag is the flag written out, so that one a mode cannot use is found
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)


def typed(argv):
    """The flags written on the command line (argv, else sys.argv), as `--name`."""
    return {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}


def add_run_arguments(p, presets, default):
    """The flags both trainers take. A preset's run settings are the defaults (parse_run_args)."""
    p.add_argument("--preset", default=default, choices=sorted(presets),
                   help="model size; its run settings are the defaults below (--preset P --help)")
    p.add_argument("--data", help="an ImageFolder directory (root/<class>/<image>) or fashion-mnist")
    p.add_argument("--out", help="run directory; None: runs/<preset>")
    p.add_argument("--init-from", help="fine-tune these weights (their size): a released name or a "
                   "checkpoint")
    p.add_argument("--no-resume", action="store_true", help="start afresh over the run in --out")
    p.add_argument("--global-batch", type=positive_int, help="images per optimizer step, in all")
    p.add_argument("--micro-batch", type=positive_int, help="per forward and process "
                   "(accumulation); None: all")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps")
    p.add_argument("--lr", type=positive_float, help="AdamW learning rate (dar.get_lr)")
    p.add_argument("--warmup", type=nonneg_int, default=0, help="linear warm-up steps")
    p.add_argument("--decay-steps", type=nonneg_int, help="the last steps, over which lr decays "
                   "linearly to 1e-5")
    p.add_argument("--weight-decay", type=nonneg_float, help="AdamW, on matrices and embeddings")
    p.add_argument("--beta2", type=decay, default=0.95, help="AdamW beta2")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="max gradient norm")
    p.add_argument("--ema-decay", type=decay, help="EMA of the weights (what is sampled); 0: none")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random crops, flips")
    p.add_argument("--seed", type=seed, default=0, help="of the weights, the data order, the draws")
    p.add_argument("--device", default=DEVICE, choices=["cuda", "mps", "cpu"])
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast; None: on "
                   "with cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile; None: "
                   "on with cuda")
    p.add_argument("--grad-checkpointing", action="store_true", help="less memory, ~30%% more compute")
    p.add_argument("--threads", type=threads, help="compute threads; None: the cores less the workers")
    p.add_argument("--workers", type=nonneg_int, default=0, help="data-loader processes per process")
    p.add_argument("--log-every", type=positive_int, help="steps between log lines (metrics.jsonl)")
    p.add_argument("--ckpt-every", type=positive_int, help="steps between checkpoints")
    p.add_argument("--sample-every", type=positive_int, help="steps between sample grids")


def parse_run_args(p, run_defaults, argv=None):
    """A trainer's flags, in two passes: the first finds --preset, whose run settings become the
    defaults of the second."""
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = p.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0].preset
    p.set_defaults(**run_defaults[preset])
    args = p.parse_args(argv)
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    return args


def one_line(e):
    """An exception as one line: its type and the first line of its message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def cli(main, argv=None):
    """Run a script's main as `python script.py` does: bad input, a missing file or a refusal
    (ValueError, OSError) is one `error:` line and exit status 1, never a traceback. (A loader
    worker's error carries its traceback in the message: its last line is the error.)"""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        sys.exit(f"error: {lines[-1]}")
    except KeyboardInterrupt:
        sys.exit("stopped by Ctrl-C")

# -----------------------------------------------------------------------------
# section 16. Sampling: one function for sample.py and eval_fid.py, so that `sample.py --out` and
# `eval_fid.py --gpt` draw the same images

def add_sampling_arguments(p):  # the flags that decide what is drawn
    p.add_argument("--seed", type=seed, default=0, help="seed of every draw")
    p.add_argument("--guidance", type=parse_guidance, help="'start,end' of a linear schedule "
                   "over the tokens, or one number; None: the paper's for a released GPT "
                   "(L 1.1,8.0, XL 1.1,10.0), else 1 (none)")
    p.add_argument("--temperature", type=nonneg_float, default=1.0, help="of the token draws; "
                   "0 is greedy")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="draw among the k likeliest; 0: all")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling; 1: off")
    p.add_argument("--solver", choices=["adams2", "euler"], default="adams2",
                   help="the decoder's ODE solver")
    p.add_argument("--steps", type=positive_int, help="decoder steps; None: the tokenizer's")
    p.add_argument("--preview-step", type=positive_int, help="output the preview after this "
                   "step, not the image")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 weights; None: on "
                   "with cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile; None: "
                   "on with cuda")
def prepare_sampling(tok, gpt, bf16, compile):
    """Ready the models for sampling, in place. bf16: Llama weights in bf16 halve what each token
    step reads. compile: the DiT and the one-token step through torch.compile; on a GPU the step
    becomes a CUDA graph (gpt-fast: static KV cache, reduce-overhead), on a CPU fused kernels."""
    if bf16:
        gpt.to(torch.bfloat16)
    if compile:
        tok.dit.compile()
        mode = "reduce-overhead" if gpt.output.weight.is_cuda else "default"
        gpt.decode_one = torch.compile(gpt.decode_one, fullgraph=True, mode=mode)


@torch.no_grad()
def draw(tok, gpt, labels, seed, guidance=1.0, temperature=1.0, top_k=0, top_p=1.0,
         solver="adams2", steps=None, prefix=None, bf16=False):
    """Streaming D-AR (generate_images) from `seed` -> the images as seen after each decoder step
    (B, 3, H, W), float32; the last is the image."""
    torch.manual_seed(seed)
    with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
        return [image.float() for _, image in generate_images(
            gpt, tok, labels, None, solver, steps, guidance=guidance, temperature=temperature,
            top_k=top_k, top_p=top_p, prefix=prefix)]


def batch_seed(seed, first):  # of the batch of samples first..: any batch can be redone anywhere
    return seed * 1_000_003 + first


def output_step(preview_step, steps):  # the step whose image is the output: --preview-step or last
    if preview_step is not None and not 1 <= preview_step <= steps:
        raise ValueError(f"--preview-step {preview_step}: the decoder takes {steps} steps, so "
                         f"1..{steps}")
    return preview_step or steps
