"""
D-AR: Diffusion via Autoregressive Models (Gao & Shou, 2025), in one file.

D-AR turns pixel diffusion into plain next-token prediction:

  image --(1D encoder + VQ, eq. 1)--> N = 256 discrete tokens z_1..z_N, in K = 8 groups of 32
  tokens --(causal token decoder)--> conditioning tokens z'
  group k of z' conditions diffusion step k of a pixel DiT (eqs. 2-5): coarse groups first, fine last
  an unmodified Llama learns p(z) = prod_i p(z_i | z_<i, class) (eq. 6) and writes tokens left to
  right, so every 32 tokens can be decoded into one more denoising step (eq. 8): streaming
  previews, and layout control by fixing the first tokens.

The file has two parts. Part I is the paper, built from the smallest pieces up; Part II is what it
takes to run it (checkpoints, data, distributed training, sampling helpers). Read Part I first.

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
  PART II: running D-AR
    section 13  checkpoints: atomic saving, safe loading, the official format, the released
                weights by name (Hugging Face hub)
    section 14  images and datasets
    section 15  training runs: processes, seeds, data order, resume, the loop
    section 16  sampling and evaluation: loading models, batches, timing

Equation numbers ("eq. N") are the paper's (arXiv 2505.23660); "section N" always means a section
of this file. Where the official code (showlab/D-AR), which produced the released checkpoints,
departs from the paper, this file follows the code and says so. Tensors are (B, ...) batches;
shapes are noted in comments, e.g. (B, N, D).
"""

import argparse
import math
import os
import random
import re
import sys
import tempfile
import time
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
    gate_init: float = 0.0      # initial residual gates of the encoder and token decoder blocks: 0 as
                                # the official code (each block starts as the identity); small runs
                                # open them so that the image reaches the codes within minutes

    def __post_init__(self):
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
    """2D RoPE tables for an h x w grid, row-major: cos, sin of shape (h*w, head_dim/2).

    Pair j of a head rotates by pos * theta^(-2j'/d_axis): the first head_dim/4 pairs use the row
    (y), the next head_dim/4 the column (x), 32 dims per axis for 64-d heads (Flux layout).
    Computed in float64 and rounded to float32, as the official code does."""
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
    """quant(.) of eq. 1: nearest-neighbour quantisation on the unit sphere of R^vq_dim.

    Both the encoder outputs z and the codebook entries e are l2-normalised; the code of a token is
    argmin_j ||z - e_j||^2. The decoder receives z + sg[e - z] (straight-through estimator), so
    gradients flow to the encoder as if quantisation were the identity."""

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
    """E(I, [q_1..q_N]) of eq. 1. Patches and N learnable queries go through one transformer; the queries' outputs become the
    N code vectors. Attention mask: patches see all patches (and no query); query i sees all patches
    and queries <= i, so each token only summarises what earlier tokens left out (causal queries).
    2D RoPE rotates the patches; the queries get the identity rotation."""

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
    u, picks the group from it and shifts it into the diffusion time, which is the same schedule.
    With beta = 2 the groups crowd towards t = 0, so the early (coarse) steps, where the image is
    mostly noise, get more of the token budget."""
    return t / (t + beta * (1 - t))


def group_index(t_u, K):
    """Group used at uniform time t_u: g = clamp(floor(t_u K + 1/2), 0, K-1), so group i is centred
    on t_u = i/K. (The official code rounds; the paper writes ceil(t' K).) Works on floats and
    tensors."""
    if torch.is_tensor(t_u):
        return (t_u * K + 0.5).floor().long().clamp(0, K - 1)
    return min(max(math.floor(t_u * K + 0.5), 0), K - 1)


def sampling_schedule(steps, K, beta):
    """Sampling times and groups for `steps` decoder steps (eq. 8): t_i = shift(i / steps) for
    i = 0..steps-1, then t = 1, as a float32 tensor (steps + 1,); step i uses group g(i / steps).
    With steps = K (the default) each group conditions exactly one step, the one its training
    times were centred on."""
    t_u = [i / steps for i in range(steps)]
    times = shift_time(torch.tensor(t_u + [1.0], dtype=torch.float32), beta)
    return times, [group_index(t, K) for t in t_u]

# -----------------------------------------------------------------------------
# section 8. The sampler (eq. 8): Euler or Adams-Bashforth 2 over the shifted time grid, in one
# loop; previews come with every step, and streaming only feeds the loop its groups late

@dataclass
class DecodeState:
    """Where a decoding is after `step` of `steps` ODE steps: x_t (data_std units), the last velocity
    (Adams-Bashforth 2 needs it) and the preview of the last step in image units (the decoded image
    once step == steps). A state can be kept and the loop resumed from it."""
    x: torch.Tensor                       # (B, 3, H, W)
    steps: int
    sampler: str = "adams2"
    step: int = 0
    v_prev: Optional[torch.Tensor] = None
    preview: Optional[torch.Tensor] = None


def ode_steps(velocity, state, times, data_std):
    """Integrate dx/dt = v from state.step to the end of the time grid `times` (steps + 1,), yielding
    the DecodeState after every step; velocity(x, t_i, i) -> v (B, 3, H, W).
        Euler:                    x_{i+1} = x_i + (t_{i+1} - t_i) v_i
        Adams-Bashforth 2 (AB2):  x_{i+1} = x_i + (t_{i+1} - t_i) (3/2 v_i - 1/2 v_{i-1})
    AB2 extrapolates the velocity linearly from the last two evaluations: second order for one
    network call per step (paper Table 2: rFID 1.52 against Euler's 1.58 at 8 steps); its first step
    is Euler. The preview takes the same direction d straight to t = 1 (the official clip_steps):
    x1_hat = x_i + (1 - t_i) d, the image as seen from the groups used so far; after the last step
    it is the image itself. Previews and outputs leave the data_std units."""
    if state.sampler not in ("euler", "adams2"):
        raise ValueError(f"unknown sampler {state.sampler!r}: use 'euler' or 'adams2'")
    x, v_prev = state.x, state.v_prev
    for i in range(state.step, state.steps):
        v = velocity(x, times[i], i)
        d = v if state.sampler == "euler" or v_prev is None else 1.5 * v - 0.5 * v_prev
        preview = (x + (times[-1] - times[i]) * d) * (1.0 / data_std)
        x, v_prev = x + (times[i + 1] - times[i]) * d, v
        yield DecodeState(x, state.steps, state.sampler, i + 1, v, preview)

# -----------------------------------------------------------------------------
# section 9. The sequential diffusion tokenizer, and its training objective (eq. 7)

class Tokenizer(nn.Module):
    """Encoder + quantiser + token decoder + pixel DiT. encode() gives codes, decode() pixels, and
    forward() is one training step's losses."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.vq_dim)
        self.decoder = TokenDecoder(cfg)
        self.dit = PixelDiT(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        # transformer blocks: truncated-normal(0.02) linears with zero bias (affine norms keep 1, 0)
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
        # patch_embed, query_proj, to_code, from_code, cond_proj, x_embed and the REPA projector keep
        # PyTorch's default (Kaiming-uniform) init, as in the official code

    def set_grad_checkpointing(self, on=True):
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = self.dit.grad_checkpointing = on

    # --- inference -----------------------------------------------------------

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

    def start_decode(self, noise, steps=None, sampler="adams2"):
        """A fresh decoding from noise x0 (B, 3, H, W) ~ N(0, I) (unscaled: it is x_t at t = 0)."""
        return DecodeState(noise, steps or self.cfg.sample_steps, sampler)

    @torch.no_grad()
    def sample(self, cond_group, state, dit=None):
        """The decoder's loop (section 8) from `state`, yielding the state after each step. Step i
        is conditioned on group g(i) of z' (eq. 8), which cond_group(g) -> (B, N/K, dec_dim)
        provides only when step i needs it, so the groups may arrive one at a time (streaming).
        dit is the velocity network: self.dit, or a compiled or timed wrapper of it."""
        cfg, dit = self.cfg, self.dit if dit is None else dit
        # t_0 = 0 < t_1 < ... < t_steps = 1 on the shifted grid; group groups[i] drives step i
        times, groups = sampling_schedule(state.steps, cfg.num_groups, cfg.time_shift)
        times = times.to(state.x.device)

        def velocity(x, t, i):
            return dit(x, t.expand(x.shape[0]), cond_group(groups[i]))[0]
        yield from ode_steps(velocity, state, times, cfg.data_std)

    @torch.no_grad()
    def decode_steps(self, codes, noise=None, sampler="adams2", steps=None, state=None, dit=None):
        """Decode codes (B, N), yielding the DecodeState after each step: state.preview after step k
        is the image as seen from the groups used so far (the first k with one step per group),
        after the last step the decoded image. Pass `state` to continue a decoding that stopped part
        way."""
        z = self.cond_tokens(codes)                                         # (B, N, dec_dim)
        if state is None:
            if noise is None:
                S = self.cfg.image_size
                noise = torch.randn(codes.shape[0], 3, S, S, device=codes.device, dtype=z.dtype)
            state = self.start_decode(noise, steps, sampler)
        G = self.cfg.group_size
        yield from self.sample(lambda g: z[:, g * G:(g + 1) * G], state, dit)

    def decode(self, codes, noise=None, sampler="adams2", steps=None):
        """codes (B, N) -> images (B, 3, H, W), roughly in [-1, 1]. `noise` (B, 3, H, W) is the
        sampler's initial N(0, I) draw (fresh when None); `steps` defaults to K."""
        for state in self.decode_steps(codes, noise, sampler, steps):
            pass
        return state.preview

    # --- training ------------------------------------------------------------

    def forward(self, images, t=None, noise=None, repa=False):
        """One training forward on images (B, 3, H, W) in [-1, 1]. t (B,) ~ U[0, 1) picks both the
        group (eq. 5) and, shifted, the diffusion time; noise (B, 3, H, W) is x0. Both are drawn
        when None. Returns a dict of the losses and what the perceptual / REPA losses need."""
        cfg, B = self.cfg, images.shape[0]
        t_u = torch.rand(B, device=images.device) if t is None else t
        x0 = torch.randn_like(images) if noise is None else noise

        # encode and quantise; the VQ losses count tokens up to the last one of the chosen group
        z_q, codes, z = self.quantizer(self.encoder(images))           # (B, N, d), (B, N), (B, N, d)
        group = group_index(t_u, cfg.num_groups)                        # (B,)
        start = group * cfg.group_size
        idx = torch.arange(cfg.num_tokens, device=images.device)
        vq_loss, commit_loss = self.quantizer.losses(z_q, z, idx <= (start + cfg.group_size - 1)[:, None])
        z_q = z + (z_q - z).detach()                                    # straight-through

        # z' of the chosen group conditions the DiT
        cond = self.decoder(z_q)                                        # (B, N, D)
        cond = cond[torch.arange(B, device=images.device)[:, None], start[:, None] + idx[:cfg.group_size]]

        # flow matching (eqs. 2-4): x_t = t x1 + (1 - t) x0, target v = x1 - x0, in data_std units
        t = shift_time(t_u, cfg.time_shift)
        te = t[:, None, None, None]
        x1 = images * cfg.data_std
        x_t = te * x1 + (1 - te) * x0
        v_pred, repa_feats = self.dit(x_t, t, cond, repa=repa)
        # dividing by data_std^2 puts the loss on the scale of image pixels: the jump estimate below
        # errs by (1 - t)(v_pred - v) / data_std in image units
        fm_loss = F.mse_loss(v_pred, x1 - x0) / cfg.data_std ** 2
        # jump estimate x1_hat = x_t + (1 - t) v, back in image units: LPIPS (eq. 7) compares it
        # with the input
        x1_hat = (x_t + (1 - te) * v_pred) / cfg.data_std
        return dict(fm_loss=fm_loss, vq_loss=vq_loss, commit_loss=commit_loss, x1_hat=x1_hat,
                    codes=codes, group=group, t=t, cond=cond, repa_feats=repa_feats)

    @classmethod
    def from_checkpoint(cls, path, use_ema=True, map_location="cpu"):
        """Load a tokenizer from our checkpoints or the official ones (EMA weights when present)."""
        return load_tokenizer(path, use_ema, map_location)

    @classmethod
    def from_pretrained(cls, name="tokenizer_v1", map_location="cpu"):
        """The released tokenizer by name (tokenizer_v1), downloaded once from the Hugging Face hub
        (section 13) and loaded like any official checkpoint (EMA weights)."""
        return load_tokenizer(pretrained_path(name, "tokenizer"), map_location=map_location)



def tokenizer_loss(tok, images, lpips=None, repa_target=None, lpips_weight=0.5, repa_weight=0.5):
    """The tokenizer's training objective, eq. 7, for images (B, 3, H, W) in [-1, 1]:
        loss = l_fm + l_VQ + lambda_1 LPIPS(I, x1_hat) + lambda_2 l_repa        (lambda = 0.5)
    l_fm is the flow-matching loss of the condition group picked for each image (eqs. 2-5); l_VQ is
    the codebook + commitment pair of section 3; LPIPS compares the input with the one-jump
    estimate x1_hat = x_t + (1 - t) v, so every training time also learns to jump straight to a
    sharp image (what lets 8 steps suffice); l_repa = 1 - cos(REPA projection of the DiT's features,
    a frozen encoder's patch tokens of the input) aligns the DiT with a strong image representation
    (faster convergence). The two networks are passed in: lpips(a, b) -> (B, 1, 1, 1) distances
    (VGG16 LPIPS in the paper) and repa_target(images) -> (B, M, C) patch tokens (DINOv2
    ViT-B/14: 16 x 16 tokens of width 768); None leaves a term out. tok may be wrapped (DDP,
    compile). Returns the loss, its terms (tensors) and the codes (B, N) of this batch."""
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
            # the DiT pools its features to at most 16 x 16 (PixelDiT.repa_features); below 256 px
            # its grid is smaller, so the target's square grid is pooled down to it
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

    @classmethod
    def from_checkpoint(cls, path, use_ema=True, map_location="cpu", block_size=None):
        """Load our checkpoints or the official ones (their size is read off the weights; their
        sequence length, which they do not store, is block_size or 256)."""
        return load_gpt(path, use_ema, map_location, block_size)

    @classmethod
    def from_pretrained(cls, name="D-AR-L", map_location="cpu", block_size=None):
        """A released GPT by name (D-AR-L, D-AR-XL), downloaded once from the Hugging Face hub
        (section 13); its tokenizer is Tokenizer.from_pretrained("tokenizer_v1")."""
        return load_gpt(pretrained_path(name, "gpt"), map_location=map_location, block_size=block_size)

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


def prefill(gpt, labels, prefix):
    """Class token (and fixed prefix tokens) through the cache at positions 0..P -> last logits."""
    h = gpt.embed(labels, prefix)
    return gpt.forward_cached(h, torch.arange(h.shape[1], device=h.device))[:, -1]


def decode_one_token(gpt, token, pos):
    """token (B,) at position pos (1,) -> next-token logits (B, V)."""
    return gpt.forward_cached(gpt.tok_embed(token)[:, None], pos)[:, -1]


@torch.no_grad()
def generate_stream(gpt, labels, num_tokens=None, guidance=1.0, temperature=1.0, top_k=0, top_p=1.0,
                    prefix=None, decode_fn=decode_one_token):
    """Sample eq. 6 left to right: yield the tokens (B,) of positions 0..N-1 one at a time. `prefix`
    (B, P) fixes the first P tokens (zero-shot layout control): they are fed in the prefill and
    yielded as they are. With guidance, conditional and unconditional rows run as one batch of 2B
    rows. decode_fn is the one-token step (decode_one_token, or a compiled version of it)."""
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
    rows = torch.cat([labels, torch.full_like(labels, gpt.cfg.num_classes)]) if guided else labels
    # positions 0..N-1 are ever fed (class token, then tokens 1..N-1): N + 1 slots suffice
    gpt.setup_cache(len(rows), N + 1)
    P = prefix.shape[1]
    positions = torch.arange(N, device=device)  # slices of it feed decode_fn: no tensor per step
    logits = prefill(gpt, rows, torch.cat([prefix, prefix]) if guided else prefix)
    for i in range(P):
        yield prefix[:, i]
    for i in range(P, N):
        next_logits = guided_logits(logits, scales[i]) if guided else logits
        token = sample_logits(next_logits, temperature, top_k, top_p)
        yield token
        if i + 1 < N:
            logits = decode_fn(gpt, torch.cat([token, token]) if guided else token, positions[i + 1:i + 2])


def generate(gpt, labels, num_tokens=None, guidance=1.0, temperature=1.0, top_k=0, top_p=1.0, prefix=None,
             decode_fn=decode_one_token):
    """labels (B,) -> tokens (B, N) int64 in the tokenizer's order, sampled left to right with the
    KV cache (a model trained on the reversed order writes z_N first; they are flipped back)."""
    tokens = torch.stack(list(generate_stream(gpt, labels, num_tokens, guidance, temperature, top_k, top_p,
                                              prefix, decode_fn)), 1)
    return tokens.flip(1) if gpt.cfg.reverse_tokens else tokens


@torch.no_grad()
def generate_images(gpt, tok, labels, noise=None, sampler="adams2", steps=None, dit=None, **gen_kwargs):
    """Streaming D-AR: the decoder's loop (section 8) asks for group g of z' when its step comes,
    and the Llama writes tokens until group g is complete, so each diffusion step runs as soon as
    the 32 tokens it reads exist. Yields (tokens (B, N), DecodeState) after each decoder step; tokens
    not generated yet are 0. The last state's preview is the image, the same as
    tok.decode(tokens, noise) gives: z' is causal and each step reads only its own group.
    gen_kwargs go to generate_stream (guidance, temperature, top_k, top_p, prefix, decode_fn)."""
    cfg, B = tok.cfg, labels.shape[0]
    if noise is None:
        noise = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=labels.device)
    if gpt.cfg.reverse_tokens:  # fine groups come first: no step can run before the whole sequence
        if gen_kwargs.get("prefix") is not None:
            raise ValueError("a prefix fixes the first (coarse) tokens: not with a model of the reversed order")
        tokens = generate(gpt, labels, cfg.num_tokens, **gen_kwargs)
        for state in tok.decode_steps(tokens, noise, sampler, steps, dit=dit):
            yield tokens, state
        return
    stream = generate_stream(gpt, labels, cfg.num_tokens, **gen_kwargs)
    tokens = labels.new_zeros(B, cfg.num_tokens)   # unknown tokens stay 0: no step reads their rows
    n, z, G = 0, None, cfg.group_size              # n tokens written so far; z = z' of them

    def cond_group(g):
        nonlocal n, z
        if z is None or n < (g + 1) * G:           # write up to the end of group g, refresh z'
            while n < (g + 1) * G:
                tokens[:, n] = next(stream)
                n += 1
            z = tok.cond_tokens(tokens)            # (B, N, dec_dim); rows >= n are never read
        return z[:, g * G:(g + 1) * G]

    for state in tok.sample(cond_group, tok.start_decode(noise, steps, sampler), dit):
        if state.step == state.steps:              # fewer steps than groups skip the last groups:
            for token in stream:                   # finish the sequence all the same
                tokens[:, n] = token
                n += 1
        yield tokens, state


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
    # beta = 4: at this size the tokens only take hold when training dwells on the noisy times
    # (README, small scale: beta 1 / 2 / 4 / 8 after 800 steps); 8 decoder steps, twice K (step i
    # uses group round(i K / 8): the groups 1, 2, 2, 3, 3, 4, 4, 4): this briefly trained DiT still
    # gains from finer steps (README: steps and solver)
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
#                            PART II: running D-AR
# =============================================================================

# -----------------------------------------------------------------------------
# section 13. Checkpoints: atomic saving, safe loading, conversion from the official format, the
# released weights by name

class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind (one-line message)."""


class _OfficialConfig(dict):
    """Stand-in for the official config_util.Config (a mapping over its `_data` dict), so that the
    official tokenizer checkpoints unpickle without the official code and without running any."""

    def __setstate__(self, state):
        self.update(state.get("_data", {}))


# The only classes a checkpoint may name besides tensors and containers. A pickle can name any
# callable and have it run on load (os.system, say); weights_only=True refuses every name that is
# not on this list, so loading a file never runs code from it.
_SAFE_GLOBALS = [(_OfficialConfig, "config_util.Config"), argparse.Namespace]


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same directory, then rename: a crash at any moment
    leaves either the old file or the new one, never half of one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give the usual permissions
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def model_checkpoint(model, ema=None, **extra):
    """Our checkpoint dict: kind, config (a plain dict) and weights, plus whatever the trainer adds
    (optimizer, step, RNG states...). Models are saved unwrapped (no DDP / compile prefixes)."""
    kind = {Tokenizer: "dar.tokenizer", GPT: "dar.gpt"}[type(model)]
    ckpt = dict(kind=kind, config=asdict(model.cfg), model=model.state_dict(), **extra)
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    return ckpt


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True (no code from the file runs) and an allow-list that maps
    the official config class to a plain dict. Raises CheckpointError with a one-line reason."""
    path = os.fspath(path)
    # every failure below becomes one CheckpointError line: the scripts print it and exit
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            reason = "it holds objects outside the allow-list of safe types (refusing to unpickle them)"
        raise CheckpointError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch "
                              f"checkpoint ({reason})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict (found {type(ckpt).__name__})")
    return ckpt


def _strip_prefixes(sd):
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _checkpoint_kind(ckpt):
    """'dar.tokenizer' / 'dar.gpt' (ours), 'official.tokenizer' / 'official.gpt', or None."""
    if ckpt.get("kind") in ("dar.tokenizer", "dar.gpt"):  # ours say what they are
        return ckpt["kind"]
    # the official files do not: recognise them by a key only that model has. The released GPTs
    # are {"model": state dict}, sometimes a bare state dict; the tokenizer also holds its config
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict):
        return None
    keys = {k.split("_orig_mod.")[-1].split("module.")[-1] for k in sd}
    if "tok_embeddings.weight" in keys:
        return "official.gpt"
    if "quantize.embedding.weight" in keys and isinstance(ckpt.get("config"), dict):
        return "official.tokenizer"
    return None


def _wrong_kind(path, kind, wanted):
    what = {"dar.tokenizer": "a D-AR tokenizer", "official.tokenizer": "a D-AR tokenizer",
            "dar.gpt": "a D-AR GPT", "official.gpt": "a D-AR GPT"}.get(kind, "not a D-AR")
    return CheckpointError(f"{path} is {what} checkpoint, expected a {wanted} checkpoint")


def tokenizer_config_from_official(c):
    """The official tokenizer config (YAML `model:` section) -> TokenizerConfig."""
    c = c.get("model", c)
    dd = c["diff_decoder"]
    # options the official code has but no released checkpoint uses: refuse rather than build a
    # different model that happens to accept the weights
    unsupported = {"vq_enable": False, "query_low_rank": False, "mlp_head": True, "share_time_encoding": True}
    for k, bad in unsupported.items():
        if c.get(k, dd.get(k)) == bad:
            raise CheckpointError(f"official tokenizer option {k}={bad} is not supported")
    if c.get("queries_per_step", c["num_all_queries"] // c["num_query_groups"]) * c["num_query_groups"] != c["num_all_queries"]:
        raise CheckpointError("official tokenizer with queries_per_step != N / K is not supported")
    if dd.get("cond_dim", c["decoder_dim"]) != c["decoder_dim"]:
        raise CheckpointError("official tokenizer with cond_dim != decoder_dim is not supported")
    # official name -> ours, field by field; defaults are the official code's
    return TokenizerConfig(
        image_size=c.get("sampling_resolution", 256), patch_size=c["encoder_patch_size"],
        enc_dim=c["encoder_dim"], enc_layers=c["num_encoder_layers"],
        dec_dim=c["decoder_dim"], dec_layers=c["num_decoder_layers"],
        num_tokens=c["num_all_queries"], num_groups=c["num_query_groups"],
        codebook_size=c["vq_codebook_size"], vq_dim=c["vq_dim"],
        dit_dim=dd["dim"], dit_depth=dd["depth"], dit_patch_size=dd["patch_size"],
        data_std=dd.get("data_std", 1.0), time_shift=float(dd.get("time_shift", 1.0)),
        sample_steps=c["num_denoising_steps"], repa_layer=dd.get("repa_layer", 8),
        rope_theta=float(c.get("rope_base_len", 10000)))


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
    (r"\.time_embed\.mlp\.", ".t_embed."), (r"\.cond_embed\.", ".c_embed."),
]


# The official modules keep q, k, v as three Linears and 1x1 convolutions where a Linear does the
# same; the conversion below is the whole difference between the two state dicts.
def convert_official_tokenizer(sd):
    """Official tokenizer state dict -> ours: rename, fuse q/k/v (cross-attention: k/v) into one
    Linear, turn 1x1 conv weights (out, in, 1, 1) into Linear weights, drop the codebook-usage
    statistics buffer."""
    out = {}
    for k, v in _strip_prefixes(sd).items():
        if k.endswith("quantize.codebook_used"):  # usage statistics of the official trainer
            continue
        for pattern, repl in _TOKENIZER_RENAMES:
            k = re.sub(pattern, repl, k)
        if k.split(".")[-2] in ("to_code", "from_code", "x_embed", "out") and v.ndim == 4:
            v = v.flatten(1)  # 1x1 conv (out, in, 1, 1) -> Linear (out, in): the same product
        out[k] = v
    # self-attention: q, k, v stacked in that order (rows) into one qkv Linear; cross-attention:
    # k, v into kv (its q reads another input)
    for k in [k for k in out if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
        base, p = k.rsplit(".q.", 1)
        out[f"{base}.qkv.{p}"] = torch.cat([out.pop(k), out.pop(f"{base}.k.{p}"), out.pop(f"{base}.v.{p}")])
    for k in [k for k in out if re.search(r"\.cross_attn\.k\.(weight|bias)$", k)]:
        base, p = k.rsplit(".k.", 1)
        out[f"{base}.kv.{p}"] = torch.cat([out.pop(k), out.pop(f"{base}.v.{p}")])
    return out


def convert_official_gpt(sd):
    """Official GPT state dict -> ours: renames, and w1 / w3 stacked into w13."""
    renames = {"cls_embedding.embedding_table.": "class_embed.", "tok_embeddings.": "tok_embed.",
               ".attention.": ".attn.", ".attention_norm.": ".attn_norm.", ".feed_forward.": ".ffn."}
    out = {}
    for k, v in _strip_prefixes(sd).items():
        if k == "freqs_cis" or ".kv_cache." in k:  # buffers the official model rebuilds anyway
            continue
        for a, b in renames.items():
            k = k.replace(a, b)
        out[k] = v
    # w1 over w3 in one matrix: SwiGLU.forward splits its output in this order
    for k in [k for k in out if k.endswith(".ffn.w1.weight")]:
        out[k.replace(".w1.", ".w13.")] = torch.cat([out.pop(k), out.pop(k.replace(".w1.", ".w3."))])
    return out


def gpt_config_from_weights(sd, block_size=256):
    """Read the GPT size off converted weights (head_dim is 64 in every D-AR / LlamaGen preset)."""
    vocab, dim = sd["tok_embed.weight"].shape
    n_layer = sum(1 for k in sd if k.endswith(".attn.wqkv.weight"))
    return GPTConfig(dim=dim, n_layer=n_layer, n_head=dim // 64, vocab_size=vocab, block_size=block_size,
                     num_classes=sd["class_embed.weight"].shape[0] - 1,
                     ffn_hidden=sd["layers.0.ffn.w13.weight"].shape[0] // 2)


def _config_from_dict(cls, d):
    # fields a later version dropped are ignored, fields it added take their defaults
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def checkpoint_config(ckpt):
    """The model config saved in one of our checkpoints."""
    return _config_from_dict({"dar.tokenizer": TokenizerConfig, "dar.gpt": GPTConfig}[ckpt["kind"]], ckpt["config"])


def _load_weights(model, sd, path):
    # strict, but as one CheckpointError line instead of load_state_dict's long report
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model.eval()


def _weights(ckpt, use_ema):
    """The EMA state dict when asked for and present, else the raw one."""
    return ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]


def load_tokenizer(path, use_ema=True, map_location="cpu"):
    ckpt = load_checkpoint(path, map_location)
    kind = _checkpoint_kind(ckpt)
    if kind == "dar.tokenizer":
        cfg = _config_from_dict(TokenizerConfig, ckpt["config"])
        sd = _strip_prefixes(_weights(ckpt, use_ema))
    elif kind == "official.tokenizer":
        cfg = tokenizer_config_from_official(ckpt["config"])
        sd = convert_official_tokenizer(_weights(ckpt, use_ema))
    else:
        raise _wrong_kind(path, kind, "tokenizer")
    # the REPA projector is training-only: build it only when the file has it (the released
    # tokenizer does; the tiny golden ones and inference exports do not)
    if not any(k.startswith("dit.repa.") for k in sd):
        cfg.repa_dim = 0
    else:
        cfg.repa_dim = sd["dit.repa.4.weight"].shape[0]
    return _load_weights(Tokenizer(cfg), sd, path).to(map_location)


def load_gpt(path, use_ema=True, map_location="cpu", block_size=None):
    ckpt = load_checkpoint(path, map_location)
    kind = _checkpoint_kind(ckpt)
    if kind == "dar.gpt":
        cfg = _config_from_dict(GPTConfig, ckpt["config"])
        sd = _strip_prefixes(_weights(ckpt, use_ema))
    elif kind == "official.gpt":
        # the official sampler uses 'model'; the sequence length is not stored: block_size (the
        # tokenizer's N) or 256
        sd = convert_official_gpt(ckpt.get("model", ckpt))
        cfg = gpt_config_from_weights(sd, block_size or 256)
    else:
        raise _wrong_kind(path, kind, "GPT")
    gpt = _load_weights(GPT(cfg), sd, path).to(map_location)
    # what our trainer records beside the weights (None in the official files): the fingerprint of
    # the tokenizer whose codes it learned, and the class names
    gpt.tokenizer, gpt.classes = ckpt.get("tokenizer"), ckpt.get("classes")
    return gpt


def check_pair(tok, gpt, tok_name, gpt_name):
    """A GPT belongs to a tokenizer when it predicts its codes, as many as the tokenizer uses (a
    GPT of ours also records the fingerprint of the codebook it learned: another one is named)."""
    if getattr(gpt, "tokenizer", None) not in (None, tokenizer_fingerprint(tok)):
        print(f"warning: {gpt_name} was trained on the codes of another tokenizer than {tok_name} "
              f"(codebook fingerprints differ): its samples will not mean much")
    if gpt.cfg.vocab_size != tok.cfg.codebook_size:
        raise CheckpointError(f"{gpt_name} predicts {gpt.cfg.vocab_size} codes but {tok_name} has a "
                              f"codebook of {tok.cfg.codebook_size}: they do not belong together")
    if gpt.cfg.block_size != tok.cfg.num_tokens:
        raise CheckpointError(f"{gpt_name} writes {gpt.cfg.block_size} tokens but {tok_name} uses "
                              f"{tok.cfg.num_tokens}: they do not belong together")


# --- The released weights, by name ---------------------------------------------------------------
# The official checkpoints live in one Hugging Face hub repository. A name fetches its file once
# with huggingface_hub into the standard cache (HF_HOME): later runs, and HF_HUB_OFFLINE=1 runs,
# read the cache; HF_ENDPOINT points it at a mirror. The file then goes through the same safe
# loader as any other checkpoint.

HUB_REPO = "showlab/D-AR"
HUB_URL = f"https://huggingface.co/{HUB_REPO}"


@dataclass(frozen=True)
class Release:
    """One released file; a GPT also names its tokenizer and the paper's guidance for it."""
    file: str
    kind: str                        # "tokenizer" or "gpt"
    tokenizer: Optional[str] = None  # a GPT's tokenizer, by its released name
    guidance: object = None          # a GPT's guidance in the paper: (start, end) of the linear schedule


RELEASES = {
    "tokenizer_v1": Release("D-AR-tokenizer_v1.pt", "tokenizer"),
    "D-AR-L": Release("D-AR-L-360K.pt", "gpt", "tokenizer_v1", (1.1, 8.0)),
    "D-AR-XL": Release("D-AR-XL-360K.pt", "gpt", "tokenizer_v1", (1.1, 10.0)),
}


def released_names(kind):
    return [name for name, r in RELEASES.items() if r.kind == kind]


def pretrained_path(name, kind):
    """The local path of the released `kind` ("tokenizer" or "gpt") called name, fetched if need be."""
    if name not in released_names(kind):
        raise CheckpointError(f"no released {kind} is called {name!r}: choose from {', '.join(released_names(kind))}")
    return fetch_release(name)


def fetch_release(name):
    """The local path of a released file, downloaded on first use (resuming a partial download)."""
    file = RELEASES[name].file
    # imported here: only names need it, and huggingface_hub reads HF_HOME / HF_ENDPOINT /
    # HF_HUB_OFFLINE when it is first imported
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{name} is downloaded with huggingface_hub (pip install huggingface_hub); or "
                              f"download {file} from {HUB_URL} and pass its path") from None
    try:
        return hf_hub_download(HUB_REPO, file)
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
        raise CheckpointError(f"{file} ({name}) is not in the Hugging Face cache and the hub cannot be reached: "
                              f"download it from {HUB_URL} elsewhere and pass its path instead of the name, "
                              f"or set HF_ENDPOINT to a mirror of the hub") from None
    except OSError as e:  # HTTP errors (a mirror without the file...), a full disk
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot download {file} ({name}) from "
                              f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}/{HUB_REPO}: {reason}") from None


@dataclass
class Weights:
    """Where a model's weights are read from: a local file, which may be a released file (fetched
    from the hub by its name, or a copy of it under its released file name)."""
    path: str
    release: Optional[str] = None  # the released name the file is
    hub: bool = False              # fetched by name (the path is in the hub cache)

    def __str__(self):
        if self.hub:
            return f"{self.release} ({HUB_REPO}/{RELEASES[self.release].file} from the hub)"
        return self.path + (f" (the released {self.release})" if self.release else "")


def release_of(source, kind):
    """The released name a checkpoint argument stands for: a released name of this kind, or a local
    file under a released file name; None for any other file."""
    source = os.fspath(source)
    if os.path.exists(source):
        return {RELEASES[n].file: n for n in released_names(kind)}.get(os.path.basename(source))
    return source if source in released_names(kind) else None


def resolve_weights(source, kind):
    """A checkpoint argument -> Weights. A path that exists is that file (a path always wins over
    a name); a released name of this kind is fetched from the hub; anything else is missing."""
    source, release = os.fspath(source), release_of(source, kind)
    if os.path.exists(source):
        return Weights(source, release)
    if release:
        return Weights(fetch_release(release), release, hub=True)
    raise CheckpointError(f"checkpoint not found: {source} (nor is it a released {kind}: "
                          f"{', '.join(released_names(kind))})")

# -----------------------------------------------------------------------------
# section 14. Images and datasets

# Images are PIL images until they enter a model: (3, H, W) float tensors in [-1, 1] from then on,
# and (B, H, W, 3) uint8 arrays when they leave (PNG files, the ADM .npz layout).

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "boot"]


def load_image(path):
    """An RGB PIL image (grayscale and palette images become 3-channel); a clear error otherwise.
    16-bit grey images are scaled to 8 bits (PIL's convert would clip them at 255)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # "I;16..." (16-bit) or "I" (32-bit int, how some 16-bit PNGs open)
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
                im = Image.fromarray((a * (255.0 / top)).round().clip(0, 255).astype(np.uint8))
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for a bad file: one line that names it
        raise ValueError(f"cannot read image {path}: {e}") from None


def fit_shorter_side(img, size):
    """Scale so that the shorter side is `size` (ADM: BOX halving, then bicubic). Images smaller
    than that are padded with black instead of blown up (Fashion-MNIST 28 px -> 32 px)."""
    from PIL import Image
    if min(img.size) < size:
        w, h = max(img.size[0], size), max(img.size[1], size)
        canvas = Image.new("RGB", (w, h))
        canvas.paste(img, ((w - img.size[0]) // 2, (h - img.size[1]) // 2))
        return canvas
    # halving with a box filter first keeps the bicubic step from aliasing on large reductions
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)


def crop(img, x, y, size):
    return img.crop((x, y, x + size, y + size))


def center_crop(img, size):
    """ADM's centre crop: shorter side to size, then the central size x size square."""
    img = fit_shorter_side(img, size)
    return crop(img, (img.size[0] - size) // 2, (img.size[1] - size) // 2, size)


def random_crop(img, size, rng, min_frac=0.8):
    """The tokenizer's augmentation (ADM random_crop_arr): shorter side to a random length in
    [size, size / 0.8], then a random size x size crop."""
    img = fit_shorter_side(img, rng.randint(size, math.ceil(size / min_frac)))
    return crop(img, rng.randint(0, img.size[0] - size), rng.randint(0, img.size[1] - size), size)


def flip(img, rng):
    """Mirror left-right with probability 1/2."""
    from PIL import Image
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def ten_crop(img, size, i):
    """Crop i of the ten (four corners and centre, then the same mirrored) of an image that is a
    little larger than size (the AR model's augmentation: centre crop at 1.1x, one of ten crops)."""
    from PIL import Image
    W, H = img.size
    x, y = [(0, 0), (W - size, 0), (0, H - size), (W - size, H - size), ((W - size) // 2, (H - size) // 2)][i % 5]
    out = crop(img, x, y, size)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if i >= 5 else out


def to_tensor(img):
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    import numpy as np
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy, rounded as torchvision's save_image."""
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    return (x + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images, nrow=8):
    """(B, 3, H, W) images in [-1, 1] -> one PIL grid, nrow images per row, 2 px gaps. Images under
    64 px are enlarged (nearest neighbour) to be seen."""
    from PIL import Image
    x = to_uint8(images)
    scale = max(1, 64 // x.shape[2])
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    B, H, W, _ = x.shape
    nrow = min(nrow, B)
    rows = -(-B // nrow)
    grid = Image.new("RGB", (nrow * (W + 2) + 2, rows * (H + 2) + 2))
    for i in range(B):
        grid.paste(Image.fromarray(x[i]), (2 + (i % nrow) * (W + 2), 2 + (i // nrow) * (H + 2)))
    return grid


def save_grid(images, path, nrow=8):
    """grid_image saved as a PNG (or whatever the extension of path says)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid_image(images, nrow).save(path)


def save_animation(frames, path, nrow=8, seconds=0.6, hold=2.0):
    """An animated GIF (WebP by the extension) of grid_image grids: frames is a list of (B, 3, H, W)
    batches, one grid each, shown `seconds` apiece; the last one, the result, is held `hold` seconds."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grids = [grid_image(f, nrow) for f in frames]
    durations = [round(seconds * 1000)] * (len(grids) - 1) + [round(hold * 1000)]
    grids[0].save(path, save_all=True, append_images=grids[1:], duration=durations, loop=0)


def list_images(folder):
    """Every image file in folder and below, sorted (the order of an ImageFolder)."""
    return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder, followlinks=True)
                  for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))


class ImageDataset(torch.utils.data.Dataset):
    """(image, label) pairs from an ImageFolder tree (root/<class>/<image>, classes sorted by
    name, as ImageNet is usually laid out) or from in-memory arrays (Fashion-MNIST).

    transform(PIL image, rng) -> tensor, where rng is a random.Random seeded from (seed, epoch,
    index): the same augmentation for a sample in a resumed run and with any number of loader
    workers. set_epoch(e) picks the epoch (the training loop calls it)."""

    def __init__(self, files=None, labels=None, arrays=None, classes=None, transform=None, seed=0):
        self.files, self.labels, self.arrays = files, labels, arrays
        self.classes, self.transform, self.seed, self.epoch = classes, transform, seed, 0

    @classmethod
    def folder(cls, root, transform=None, seed=0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root}: no such directory (expected root/<class>/<image> "
                                    f"or a built-in name: {', '.join(BUILTIN_DATASETS)})")
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not classes:
            raise ValueError(f"--data {root}: no class sub-folders (expected root/<class>/<image>)")
        files, labels = [], []
        for label, c in enumerate(classes):
            found = list_images(os.path.join(root, c))
            if not found:
                raise ValueError(f"--data {root}: class folder '{c}' holds no images")
            files += found
            labels += [label] * len(found)
        return cls(files=files, labels=labels, classes=classes, transform=transform, seed=seed)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def drop(self, paths):
        """Leave these files out (unreadable images the run was told to skip)."""
        keep = [i for i, f in enumerate(self.files) if f not in set(paths)]
        self.files, self.labels = [self.files[i] for i in keep], [self.labels[i] for i in keep]

    def __len__(self):
        return len(self.labels)

    def image(self, i):
        """The i-th image as an RGB PIL image, before any transform."""
        from PIL import Image
        return Image.fromarray(self.arrays[i]).convert("RGB") if self.files is None else load_image(self.files[i])

    def __getitem__(self, i):
        img = self.image(i)
        if self.transform is None:
            return img, self.labels[i]
        return self.transform(img, random.Random(hash((self.seed, self.epoch, i)))), self.labels[i]


def read_idx(path):
    """An IDX file (MNIST format), gzipped or not -> uint8 numpy array. The header is 2 zero bytes,
    a type byte (0x08: uint8) and the number of dimensions, then each size as a big-endian int32."""
    import gzip
    import numpy as np
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(train=True, transform=None, seed=0):
    """Fashion-MNIST (10 classes, 28x28 grey): from Debian's dataset-fashion-mnist files when
    present, else torchvision's download into ~/.cache/dar."""
    prefix = "train" if train else "t10k"
    images = os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")
    if os.path.exists(images):
        x, y = read_idx(images), read_idx(os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
    else:
        try:
            import torchvision
            ds = torchvision.datasets.FashionMNIST(os.path.expanduser("~/.cache/dar"), train=train, download=True)
            x, y = ds.data.numpy(), ds.targets.numpy()
        except Exception as e:
            raise FileNotFoundError(f"Fashion-MNIST is neither in {FASHION_MNIST_DIR} (Debian package "
                                    f"dataset-fashion-mnist) nor downloadable ({e})") from None
    return ImageDataset(arrays=x, labels=[int(v) for v in y], classes=FASHION_MNIST_CLASSES,
                        transform=transform, seed=seed)


BUILTIN_DATASETS = {"fashion-mnist": fashion_mnist}


def build_dataset(data, transform=None, train=True, seed=0):
    """--data: a built-in name or an ImageFolder directory (whose split is the folder itself)."""
    if data in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[data](train=train, transform=transform, seed=seed)
    return ImageDataset.folder(data, transform, seed)


def scan_images(dataset, size, threads=4):
    """Check every image of a dataset once, before training: (unreadable files as (path, reason),
    how many images are smaller than size, how many have a shorter side larger than size). Headers
    and checksums only (PIL's verify), in threads:
    a few seconds for tens of thousands of files. A bad file found here costs nothing; met at
    step 31, it would stop every resumed run at the same step, the data order being fixed."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    if dataset.files is None:  # in-memory arrays (N, H, W): readable, one size
        side = min(dataset.arrays.shape[1:3])
        return [], len(dataset) if side < size else 0, len(dataset) if side > size else 0

    def check(path):
        try:
            with Image.open(path) as im:
                w, h = im.size
                im.verify()
            return None, (min(w, h) > size) - (min(w, h) < size)   # -1 smaller, 1 larger, 0 fits
        except Exception as e:
            return (path, str(e).splitlines()[0] if str(e) else type(e).__name__), 0
    from tqdm import tqdm
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(tqdm(pool.map(check, dataset.files), total=len(dataset.files), desc="checking images",
                            disable=len(dataset.files) < 5000, dynamic_ncols=True))
    return ([bad for bad, _ in results if bad], sum(fit < 0 for _, fit in results),
            sum(fit > 0 for _, fit in results))


def write_npz(path, images, labels):
    """The ADM evaluator's layout: arr_0 uint8 images (N, H, W, 3), arr_1 int labels (N,)."""
    import numpy as np
    np.savez(path, images, labels)


def npz_keys(path):
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz (expected an .npz or a folder of images)")
    with zipfile.ZipFile(path) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def npz_batches(path, batch_size, limit=None):
    """(batches, n): arr_0 read batch by batch straight from the zip, as ADM does (50K images at
    256 px are 10 GB). Each batch is a 1-tuple (uint8 (B, H, W, 3),) (see eval_fid.extract)."""
    import numpy as np
    keys = npz_keys(path)
    if "arr_0" not in keys:
        raise ValueError(f"{path}: no arr_0 in the .npz (keys: {', '.join(keys) or 'none'}); expected uint8 "
                         "images (N, H, W, 3) as arr_0")
    z = zipfile.ZipFile(path)
    f = z.open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)                                       # f is now at the data
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        z.close()
        raise ValueError(f"{path}: arr_0 is {dtype} {shape}{' (Fortran order)' * fortran}; expected uint8 "
                         "images (N, H, W, 3) as np.savez(path, arr_0=images) writes them")
    n = shape[0] if limit is None else min(limit, shape[0])

    def batches():
        with z, f:
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                yield (np.frombuffer(f.read(b * int(np.prod(shape[1:]))), np.uint8).reshape(b, *shape[1:]),)
    return batches(), n


def folder_batches(folder, batch_size, workers, limit=None):
    """(batches, n) of the images under folder, decoded in threads (PIL releases the GIL); the
    images must share one size."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such file or directory")
    files = list_images(folder)[:limit]
    if not files:
        raise ValueError(f"{folder}: no images ({' '.join(IMAGE_EXTENSIONS)}) in it or below")

    def batches():
        size = None
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i in range(0, len(files), batch_size):
                chunk = files[i:i + batch_size]
                images = list(pool.map(lambda p: np.asarray(load_image(p)), chunk))
                size = size or images[0].shape                              # (H, W, 3) of the first
                for p, im in zip(chunk, images):
                    if im.shape != size:
                        raise ValueError(f"{p} is {im.shape[1]}x{im.shape[0]}, not {size[1]}x{size[0]} as "
                                         f"{files[0]}: crop the images to one size first")
                yield (np.stack(images),)
    return batches(), len(files)


def image_batches(path, batch_size, workers=1, limit=None):
    """An .npz of images or a folder -> (batches of uint8 (B, H, W, 3) 1-tuples, count)."""
    if os.path.isfile(path):
        return npz_batches(path, batch_size, limit)
    return folder_batches(path, batch_size, workers, limit)

# -----------------------------------------------------------------------------
# section 15. Training runs: processes, run directory, seeds, data order, EMA, the loop

# What a training run needs around the model: processes (torchrun), a run directory, seeds that make
# a resumed or multi-process run repeat the single uninterrupted one, the data order, EMA, the
# optimizer, and the loop itself, shared by train_tokenizer.py and train_ar.py.

def setup_distributed():
    """(rank, world_size, device). A process group only when torchrun set RANK: NCCL on GPUs,
    gloo on CPU. One GPU per process (LOCAL_RANK); the same script runs with plain python."""
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


class Run:
    """One training run as one process sees it: rank, world size, device, and the run directory
    out/ (ckpt.pt, log.txt, metrics.jsonl, samples/). Rank 0 writes the files; every process takes
    part in the collectives (barrier, mean).

    open() takes the directory: creates it, locks it (one run per directory at a time; the lock
    goes with the process, so a crash leaves none) and removes the temporary file of a save that
    a kill interrupted. A run that fails before its first step removes the directory it created,
    so a mistyped flag leaves nothing behind."""

    def __init__(self, out):
        self.rank, self.world, self.device = setup_distributed()
        self.master, self.out, self.cuda = self.rank == 0, out, self.device.type == "cuda"
        self.ckpt_path = os.path.join(out, "ckpt.pt")
        self.opened = self.created = self.stepped = False
        self.stop, self.handlers = None, {}
        self.lock, self.pending = None, []  # log lines from before open(), written to log.txt then

    def open(self):
        if self.master:
            self.created = not os.path.exists(self.out)
            os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
            self.lock = open(os.path.join(self.out, ".lock"), "a+")
            try:
                import fcntl
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # no fcntl (Windows): no lock
                pass
            except OSError:
                self.lock.seek(0)
                owner = self.lock.read().strip() or "?"
                self.lock.close()
                self.lock = None
                self.fail(f"{self.out} is in use by another run (process {owner}); wait for it to end, or "
                          f"train into another --out")
            self.lock.seek(0)
            self.lock.truncate()
            self.lock.write(str(os.getpid()))
            self.lock.flush()
            for f in os.listdir(self.out):  # what a save killed half way left (save_checkpoint)
                if f.startswith(".tmp_") and f.endswith(".pt"):
                    os.remove(os.path.join(self.out, f))
            self.opened = True
            self.catch_stop()
            for msg in self.pending:
                self.write_log(msg)
        self.barrier()

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values):
        """Average a list of floats over all processes (one all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t.tolist()

    def write_log(self, msg):
        with open(os.path.join(self.out, "log.txt"), "a") as f:
            f.write(msg + "\n")

    def log(self, msg):
        """Print (above the progress bar) and append to log.txt, on rank 0."""
        if not self.master:
            return
        from tqdm import tqdm
        tqdm.write(msg)
        if self.opened:
            self.write_log(msg)
        else:
            self.pending.append(msg)

    def fail(self, msg):
        """Stop every process with one line: the reason (printed once, by rank 0; in log.txt too)."""
        if self.master and self.opened:
            if self.created and not self.stepped:  # nothing worth keeping: leave no stub directory
                import shutil
                self.close()
                shutil.rmtree(self.out, ignore_errors=True)
            else:
                self.write_log(f"error: {msg}")
        self.finish()
        sys.exit(f"error: {msg}" if self.master else 1)

    def catch_stop(self):
        """Ctrl-C (SIGINT) or kill (SIGTERM) asks the run to stop after the step in progress, with a
        checkpoint (train() looks at self.stop); a second one stops at once."""
        import signal
        self.stop = None
        if not threading_main():
            return

        def request_stop(signum, frame):
            if self.stop is not None:
                raise KeyboardInterrupt
            self.stop = signal.Signals(signum).name
        self.handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def close(self):
        import signal
        for sig, handler in getattr(self, "handlers", {}).items():  # give the signals back
            signal.signal(sig, handler)
        self.handlers = {}
        if self.lock is not None:
            self.lock.close()  # releases the lock
            self.lock = None
        self.opened = False

    def finish(self):
        self.close()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def describe(self, what, model, n, micro, accum, global_batch, total, threads, workers):
        """The run's first log line: model, data, batch split, length, device and CPU use (with a
        note when other programs keep the cores busy)."""
        self.log(f"{what}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {n} images | "
                 f"{self.world} process(es) x micro-batch {micro} x {accum} accumulation = {global_batch} | "
                 f"{total} steps | device {self.device}, {threads} threads, {workers} loader workers")
        note = busy_note(threads) if self.master else None
        if note:
            self.log(note)

    def autocast(self, bf16):
        """bf16 autocast on this run's device when bf16 is on, else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def resume_checkpoint(self, kind, path=None, fresh=False, run_args=None):
        """The training checkpoint to go on from: path, or the run's own ckpt.pt when it exists;
        None for a new run (or with fresh=True). Its stored settings must be this run's (run_args),
        but for those RESUME_MAY_CHANGE; its config, not the flags, rebuilds the model."""
        path = path or (self.ckpt_path if os.path.exists(self.ckpt_path) else None)
        metrics = os.path.join(self.out, "metrics.jsonl")
        if path is None or fresh:
            if fresh and self.master and os.path.exists(self.ckpt_path):
                self.log(f"starting afresh in {self.out} (--no-resume): its ckpt.pt and metrics.jsonl are replaced")
                if os.path.exists(metrics):
                    os.remove(metrics)
            return None
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            self.fail(str(e))
        if ckpt.get("kind") != kind or "optimizer" not in ckpt:
            self.fail(f"{path} is not a {kind} training checkpoint to resume from")
        stored = ckpt.get("args", {})
        differ = [(k, stored[k], v) for k, v in (run_args or {}).items() if v is not None and k in stored
                  and stored[k] != v]
        changed = [f"--{k.replace('_', '-')} {old} (now {v})" for k, old, v in differ if k not in RESUME_MAY_CHANGE]
        if changed:
            self.fail(f"{path} was trained with other settings: {', '.join(changed)}; run with the same "
                      f"settings to resume it, or start afresh with --no-resume or another --out")
        # of the settings a resumed run may change, those that change how long or in what steps it trains
        told = [f"--{k.replace('_', '-')} {old} -> {v}" for k, old, v in differ
                if k in ("max_steps", "epochs", "micro_batch")]
        self.log(f"resuming from {path} at step {ckpt['step']}" + (f" ({', '.join(told)})" if told else ""))
        return ckpt

    def starting_point(self, kind, args, preset_cfg, finetune):
        """Where the model of this run starts, as (config, model to copy or None, checkpoint to
        resume or None): the run's own checkpoint when it resumes (--resume, or its ckpt.pt; its
        config, whatever the flags say), else the --init-from weights (finetune(source) -> the
        model), else preset_cfg with random weights."""
        resumed = self.resume_checkpoint(kind, args.resume, args.no_resume, vars(args))
        if resumed:
            if args.init_from:
                self.log(f"--init-from {args.init_from} is not used: the run goes on from its checkpoint")
            return checkpoint_config(resumed), None, resumed
        if args.init_from:
            try:
                start = finetune(args.init_from)
            except (OSError, ValueError, RuntimeError) as e:
                self.fail(str(e))
            return start.cfg, start, None
        return preset_cfg, None, None

    def resume(self, ckpt, model, ema, optimizer):
        """Restore model, EMA, optimizer and RNG states from a resume_checkpoint and return the
        step to go on from; 0 without one (a new run). metrics.jsonl loses the lines of steps after
        the checkpoint, which the resumed run writes again."""
        if ckpt is None:
            return 0
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt.get("ema") or ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        metrics = os.path.join(self.out, "metrics.jsonl")
        if self.master and os.path.exists(metrics):
            import json
            with open(metrics) as f:
                lines = [line for line in f if json.loads(line)["step"] <= ckpt["step"]]
            with open(metrics + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(metrics + ".tmp", metrics)
        return ckpt["step"]


# what may differ between a run and its resumption: where things go and how fast they run, how
# long it trains (a longer --max-steps or --epochs goes on training), not what is learned
RESUME_MAY_CHANGE = {"out", "resume", "no_resume", "workers", "threads", "log_every", "ckpt_every", "sample_every",
                     "compile", "grad_checkpointing", "benchmark", "max_steps", "epochs", "micro_batch", "codes_dir",
                     "extract_batch", "skip_bad_images", "init_from"}


def rng_state():
    return dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_seed(seed, step, micro):
    """The seed of one micro-batch of one step. Everything random in a step (t, noise, dropout,
    class dropout) is drawn after reseeding with it, so a resumed run repeats the draws of the
    uninterrupted one, and a run gives the same draws on 1 or N processes."""
    return (seed * 1_000_003 + step * 10_007 + micro) % (2 ** 63)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of dataset indices for one process, step after step.

    Each epoch is a seeded permutation cut into global batches; process r takes the r-th
    contiguous slice of each global batch and cuts it into micro-batches. Unlike
    DistributedSampler's interleaving, sample j of a global batch lands in the same micro-batch
    slot whatever the number of processes (1 process x 2 micro-batches = 2 processes x 1), and
    set_epoch(epoch, skip) starts mid-epoch for an exact resume."""

    def __init__(self, n, global_batch, micro_batch, rank, world, seed):
        self.n, self.global_batch, self.micro, self.rank, self.world, self.seed = n, global_batch, micro_batch, rank, world, seed
        self.per_rank = global_batch // world
        self.steps_per_epoch = n // global_batch  # the last partial batch of an epoch is dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch ({global_batch})")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return (self.steps_per_epoch - self.skip) * (self.per_rank // self.micro)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for s in range(self.skip, self.steps_per_epoch):
            mine = perm[s * self.global_batch + self.rank * self.per_rank:][:self.per_rank]
            for m in range(0, self.per_rank, self.micro):
                yield mine[m:m + self.micro]


def new_model(make_model, seed, device, ema_decay):
    """The model, built under a fixed seed (every process starts from the same weights), and its
    EMA copy (None when ema_decay is 0)."""
    torch.manual_seed(seed)
    model = make_model().to(device)
    ema = None
    if ema_decay > 0:
        ema = make_model().to(device).requires_grad_(False).eval()
        ema.load_state_dict(model.state_dict())
    return model, ema


# Fine-tuning (--init-from) starts from trained weights, ours or official: the model takes the size
# of the weights, and only what the new run needs changes (the GPT's class table; the tokenizer's
# image size and its training-only REPA projector).

def gpt_to_finetune(source, tok, num_classes, seed, log=print):
    """The GPT of `source` (a checkpoint or a released name; EMA weights when it has them), ready for
    a run on num_classes classes over the codes of tok. Another number of classes resizes the class
    table: the classes both tables have keep their rows, new rows are drawn as initialize_weights
    draws them (N(0, 0.02), from seed), and the null class row stays the last one."""
    weights = resolve_weights(source, "gpt")
    gpt = load_gpt(weights.path, block_size=tok.cfg.num_tokens)
    check_pair(tok, gpt, "the tokenizer", weights)
    old, dim = gpt.cfg.num_classes, gpt.cfg.dim
    log(f"starting from {weights}: {gpt.cfg.n_layer} layers, dim {dim}, {old} classes")
    if num_classes != old:
        released = gpt.class_embed.weight.detach()
        table = torch.empty(num_classes + 1, dim).normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
        keep = min(old, num_classes)
        table[:keep], table[-1] = released[:keep], released[-1]
        gpt.class_embed = nn.Embedding.from_pretrained(table, freeze=False)
        gpt.cfg.num_classes = num_classes
        change = f"{num_classes - old} new rows ~ N(0, 0.02)" if num_classes > old else f"classes {keep}..{old - 1} dropped"
        log(f"class table resized from {old} to {num_classes} classes: classes 0..{keep - 1} keep their rows, "
            f"{change}, the null class row moves from {old} to {num_classes}")
    return gpt.train()


def tokenizer_to_finetune(source, repa_dim, seed, image_size=None, log=print):
    """The tokenizer of `source` (a checkpoint or a released name; EMA weights when it has them),
    rebuilt at image_size (default: its own) with a REPA projector only when the run trains REPA
    (repa_dim > 0): the file's when it has one, else a new one (drawn from seed)."""
    weights = resolve_weights(source, "tokenizer")
    tok = load_tokenizer(weights.path)
    had = tok.cfg.repa_dim > 0
    cfg = replace(tok.cfg, repa_dim=repa_dim, image_size=image_size or tok.cfg.image_size)
    torch.manual_seed(seed)
    model = Tokenizer(cfg)
    sd = {k: v for k, v in tok.state_dict().items() if repa_dim or not k.startswith("dit.repa.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("dit.repa.") for k in missing):
        raise CheckpointError(f"{weights}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    repa = "none" if not repa_dim else "the file's" if had else "new"
    log(f"starting from {weights}: {cfg.image_size} px, {cfg.num_tokens} tokens in {cfg.num_groups} groups, "
        f"codebook {cfg.codebook_size}, REPA projector {repa}")
    return model.train()


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def make_optimizer(model, lr, weight_decay, beta2, fused=False):
    """AdamW (betas 0.9, beta2); weight decay on matrices and embeddings (dim >= 2), none on norms,
    biases and gates, whose scale should not be pulled towards zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=fused)


@dataclass
class TrainSettings:
    """What the training loop reads of a run's settings (the scripts fill it from their flags)."""
    global_batch: int             # images (or sequences) per optimizer step, over all processes
    micro_batch: Optional[int]    # per forward and process; None: global_batch / processes
    grad_clip: float = 1.0        # max gradient norm; 0 disables clipping
    ema_decay: float = 0.0        # 0: no EMA
    seed: int = 0
    workers: int = 0              # data-loader processes per training process
    log_every: int = 50
    ckpt_every: int = 1000
    compile: bool = False
    bf16: bool = False            # bf16 autocast

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def split(self, world, n=None):
        """(micro-batch, accumulation steps) per process, or ValueError; n: the data set's size,
        which must hold one global batch."""
        micro = self.micro_batch or self.global_batch // world
        if micro < 1 or self.global_batch % (world * micro):
            raise ValueError(f"--global-batch {self.global_batch} must be a multiple of processes ({world}) "
                             f"x --micro-batch ({micro})")
        if n is not None and n < self.global_batch:
            raise ValueError(f"--global-batch {self.global_batch} is larger than the data set ({n} images)")
        return micro, self.global_batch // (world * micro)


def train(run, settings, model, ema, optimizer, dataset, loss_fn, lr_at, total_steps, start_step,
          unit="img", per_sample=1, run_args=None, ckpt_extra=None):
    """Optimise `model` for steps start_step..total_steps-1, yielding each step number once the
    step is done (the caller draws its samples then).

    loss_fn(net, x, y) -> (loss, dict of floats to log), net being model wrapped for compile and
    DDP; lr_at(step) -> learning rate. A step: for each of the `accum` micro-batches, reseed
    (step_seed), forward under the autocast, backward of loss / accum (DDP syncs gradients on the
    last micro-batch only, nanoGPT's no_sync trick); then clip, AdamW, EMA. The losses of all
    processes are averaged every step (a NaN anywhere stops every process), written to
    metrics.jsonl, and logged every log_every steps. Every ckpt_every steps and at the end, rank 0
    writes the checkpoint: model, EMA, optimizer, step, epoch, run_args, RNG states and ckpt_extra.
    Ctrl-C (or SIGTERM) ends the run with one line that says where it can resume from."""
    import json
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm
    s = settings
    micro, accum = s.split(run.world)
    net = torch.compile(model) if s.compile else model
    if run.world > 1:
        net = DDP(net, device_ids=[run.device.index] if run.cuda else None)
    sampler = GlobalBatchSampler(len(dataset), s.global_batch, micro, run.rank, run.world, s.seed)
    params = [p for p in model.parameters() if p.requires_grad]

    pbar = tqdm(total=total_steps, initial=start_step, disable=not run.master, dynamic_ncols=True, unit="step")
    step, t0, seen, sums, count = start_step, time.time(), 0, {}, 0
    batches = loader = None
    try:
        while step < total_steps:
            # where this step falls in the data: the epoch, and how many of its batches are done
            epoch, skip = divmod(step, sampler.steps_per_epoch)
            sampler.set_epoch(epoch, skip)
            dataset.set_epoch(epoch)  # per-sample augmentation draws depend on (seed, epoch, index)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=s.workers,
                                                 pin_memory=run.cuda, worker_init_fn=quiet_worker)
            batches = iter(loader)
            for _ in range(skip, sampler.steps_per_epoch):
                if step >= total_steps:
                    break
                lr = lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logs = {}
                for m in range(accum):
                    x, y = next_batch(run, batches)
                    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
                    torch.manual_seed(step_seed(s.seed, step, run.rank * accum + m))
                    sync = m == accum - 1 or run.world == 1
                    with (nullcontext() if sync else net.no_sync()), run.autocast(s.bf16):
                        loss, parts = loss_fn(net, x, y)
                    (loss / accum).backward()
                    for k, v in parts.items():
                        logs[k] = logs.get(k, 0.0) + v / accum
                grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip) if s.grad_clip > 0 else torch.zeros(())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    update_ema(ema, model, s.ema_decay)
                step += 1
                seen += s.global_batch
                run.stepped = True

                # the losses of all processes, every step: a NaN on any of them stops all at once
                names = sorted(logs)
                values = run.mean([logs[k] for k in names] + [float(grad_norm), float(run.stop is not None)])
                stop, values = values[-1] > 0, values[:-1]  # any process asked to stop: all stop
                logs, gnorm = dict(zip(names, values[:-1])), values[-1]
                if not all(math.isfinite(v) for v in values):
                    run.fail(f"non-finite loss at step {step} ({', '.join(f'{k}={v:.4g}' for k, v in logs.items())}); "
                             f"the last good checkpoint is {run.ckpt_path}: resume with a lower --lr")
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                rate = seen * per_sample / (time.time() - t0)
                pbar.update(1)
                pbar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}", **{f"{unit}/s": f"{rate:.1f}"})
                if run.master:  # one line per step: for plots, and the tests' exact-resume check
                    with open(os.path.join(run.out, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(dict(step=step, lr=lr, grad_norm=gnorm, **logs)) + "\n")
                if step % s.log_every == 0 or step == total_steps:
                    avg = " ".join(f"{k} {v / count:.4f}" for k, v in sums.items())
                    run.log(f"step {step}/{total_steps} epoch {epoch} | {avg} | lr {lr:.2e} | grad {gnorm:.3f} | "
                            f"{rate:.1f} {unit}/s")
                    sums, count = {}, 0
                if step % s.ckpt_every == 0 or step == total_steps or stop:
                    if run.master:
                        save_checkpoint(model_checkpoint(model, ema, optimizer=optimizer.state_dict(), step=step,
                                                         epoch=epoch, args=run_args or {}, rng=rng_state(),
                                                         **(ckpt_extra or {})), run.ckpt_path)
                    run.barrier()
                if stop:
                    pbar.close()
                    run.fail(f"stopped by {run.stop or 'another process'} at step {step}, saved in {run.ckpt_path}: "
                             f"rerun the same command to resume")
                yield step
            del batches, loader
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        # stop the loader's workers before exiting: one still sending a batch would print a traceback
        batches = loader = None
        import gc
        gc.collect()
        pbar.close()
        run.stepped = True  # keep what the run wrote
        where = f"rerun the same command to resume from {run.ckpt_path}" if os.path.exists(run.ckpt_path) else \
            "no checkpoint was written yet"
        run.fail(f"interrupted at step {step}; {where}")
    pbar.close()


def quiet_worker(_):
    """Data-loader workers leave Ctrl-C to the main process (which ends the run with one line)
    instead of each printing its own traceback."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_images(run, dataset, size, skip_bad, threads):
    """Scan the data set once (scan_images): stop on unreadable images, or leave them out with
    skip_bad and list them in the log; say how many images are padded up to size, and how many
    scaled down to it."""
    bad, small, large = scan_images(dataset, size, threads)
    if bad and not skip_bad:
        run.fail(f"{len(bad)} unreadable image(s), the first {bad[0][0]} ({bad[0][1]}): fix or remove them, "
                 f"or pass --skip-bad-images to leave them out")
    if bad:
        dataset.drop([path for path, _ in bad])
        run.log(f"leaving out {len(bad)} unreadable image(s) (--skip-bad-images):")
        for path, reason in bad:
            run.log(f"  {path} ({reason})")
    if small:
        run.log(f"note: {small} of {len(dataset)} images are smaller than {size} px: they are padded with black "
                f"to {size}, not enlarged")
    if large:
        run.log(f"note: {large} of {len(dataset)} images are larger than {size} px: they are scaled down (shorter "
                f"side to {size}, as ADM) and cropped to {size}x{size}")


def tokenizer_fingerprint(tok):
    """A short hash of the codebook: the codes a GPT was trained on mean something only to the
    tokenizer with this codebook."""
    import hashlib
    return hashlib.sha1(tok.quantizer.codebook.weight.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def next_batch(run, batches):
    """The next batch; a bad image (corrupt file...) stops the run with the loader's message."""
    try:
        return next(batches)
    except (ValueError, OSError) as e:  # from a worker, the original error is the last line
        run.fail(str(e).strip().splitlines()[-1] + " (--skip-bad-images leaves unreadable images out)")


def median_seconds(fn, repeats, cuda=False, warmup=1):
    """Median wall time of fn() over `repeats` runs after `warmup` runs (compilation, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_memory_gib(cuda):
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def benchmark_training(run, settings, name, model, loss_fn, optimizer, batch, unit, per_sample, steps=10):
    """Time whole optimizer steps (forward, backward, clip, AdamW) of the real model and loss on a
    synthetic batch already on the device (no loader, no disk), after warm-up (and compilation).
    Prints the median, throughput, FLOPs (counted on the eager model) and peak memory."""
    from torch.utils.flop_counter import FlopCounterMode
    net = torch.compile(model) if settings.compile else model
    x, y = batch

    def step():
        with run.autocast(settings.bf16):
            loss, _ = loss_fn(net, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # one forward and backward of the eager model
        with run.autocast(settings.bf16):
            loss, _ = loss_fn(model, x, y)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    med = median_seconds(step, steps, run.cuda, warmup=3)
    flops = counter.get_total_flops()
    device = torch.cuda.get_device_name() if run.cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"benchmark {name} | batch {len(x)} | {device} | compile {settings.compile} | "
          f"median step {med * 1e3:.1f} ms over {steps} | {len(x) * per_sample / med:.1f} {unit}/s | "
          f"{flops / med / 1e12:.3f} TFLOP/s ({flops / 1e9:.1f} GFLOP per step) | "
          f"peak memory {peak_memory_gib(run.cuda):.2f} GiB")
    return med


def threading_main():
    import threading
    return threading.current_thread() is threading.main_thread()


# Command-line values: argparse types that refuse what makes no sense with one line that names the
# flag, the value and the allowed range, before any work starts.

def _number(cast, lo=None, hi=None, lo_open=False, hi_open=False, what=""):
    def parse(text):
        try:
            v = cast(text)
        except ValueError:
            v = None
        ok = v is not None and math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v
    parse.__name__ = what
    return parse


positive_int = _number(int, 1, what="an integer >= 1")
nonneg_int = _number(int, 0, what="an integer >= 0")
positive_float = _number(float, 0, lo_open=True, what="a finite number > 0")
nonneg_float = _number(float, 0, what="a finite number >= 0")
fraction = _number(float, 0, 1, what="a number in [0, 1]")
decay = _number(float, 0, 1, hi_open=True, what="a number in [0, 1)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default: '(default: X)' is added where the help does not say it,
    '(default: off)' for switches."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is argparse.SUPPRESS or not action.option_strings:
            return h
        if action.default is False:
            return h + " (default: off)"
        return h if action.default is None else h + " (default: %(default)s)"


def usable_cores():
    """The cores this process may run on (its CPU affinity: a job scheduler's allotment)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cores():
    """How many cores other programs keep busy right now: the kernel's count of runnable threads
    (/proc/loadavg) less this one, the smallest of five looks 10 ms apart so that a passing process
    does not count. 0 where there is no /proc."""
    try:
        seen = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                seen.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.01)
        return max(0, min(seen))
    except (OSError, ValueError, IndexError):
        return 0


def cpu_budget(threads=None, workers=None):
    """Compute threads and data-loader workers for this process that do not oversubscribe the
    cores: threads + workers <= the cores it may use (its share when torchrun starts several on one
    machine) less those other programs keep busy. OpenMP threads that wait for a core another
    program holds are slow: on this project's 2-core machine with one other busy process, 2 threads
    trained at 17 img/s and sampled at 2.1 img/s, 1 thread at 39 img/s and 10.7 img/s. Sets torch's
    thread count; returns (threads, workers)."""
    cores = usable_cores()
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if workers is None:  # loading in the main process costs less than a worker's core on small machines
        workers = 0 if share <= 2 else min(4, share // 2)
    if threads is None:
        threads = max(1, min(share, cores - busy_cores()) - workers)
    torch.set_num_threads(threads)
    return threads, workers


def busy_note(threads):
    """A line when other programs keep more cores busy than this process leaves free, else None."""
    cores = usable_cores()
    busy = busy_cores()
    if threads > 1 and threads + busy > cores:
        return (f"note: other programs keep {busy} of {cores} cores busy, and {threads} compute threads may wait "
                f"on each other; --threads {max(1, cores - busy)} can be much faster")
    return None


def training_arguments(parser):
    """The flags both trainers share. Those left unset (None) take the preset's value
    (fill_run_defaults); --help lists each preset's values."""
    p = parser
    p.add_argument("--data", help="ImageFolder directory (root/<class>/<image>) or a built-in name: "
                   + ", ".join(BUILTIN_DATASETS) + " (default: the preset's)")
    p.add_argument("--image-size", type=positive_int, help="crop (or pad) images to this size (default: the preset's)")
    p.add_argument("--out", help="run directory (default: runs/<preset>)")
    p.add_argument("--global-batch", type=positive_int, help="images per optimizer step, over all processes "
                   "(default: the preset's)")
    p.add_argument("--micro-batch", type=positive_int, help="images per forward per process; smaller than global "
                   "batch / processes accumulates gradients (default: no accumulation)")
    p.add_argument("--epochs", type=positive_float, help="passes over the data; an explicit value wins over the "
                   "preset's step budget (default: the preset's)")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps; wins over --epochs (default: the preset's)")
    p.add_argument("--lr", type=positive_float, help="AdamW learning rate (default: the preset's)")
    p.add_argument("--beta2", type=decay, default=0.95, help="AdamW beta2")
    p.add_argument("--weight-decay", type=nonneg_float, help="AdamW weight decay on matrices and embeddings "
                   "(default: the preset's)")
    p.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="max gradient norm, 0 = off")
    p.add_argument("--ema-decay", type=decay, help="EMA of the weights; 0 disables it (default: the preset's)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the official augmentations; --no-augment: centre crops only (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and draws")
    p.add_argument("--threads", type=positive_int, help="compute threads per process (default: the cores of "
                   "this process less its loader workers; on a busy machine try 1)")
    p.add_argument("--workers", type=nonneg_int, help="data-loader processes per training process (default: 0 "
                   "with 2 cores or fewer per process, else half of them, at most 4)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images (listed in the "
                   "log) instead of stopping")
    p.add_argument("--log-every", type=positive_int, help="steps between log lines (default: the preset's)")
    p.add_argument("--ckpt-every", type=positive_int, help="steps between checkpoints (default: the preset's)")
    p.add_argument("--sample-every", type=positive_int, help="steps between sample images (default: the preset's)")
    p.add_argument("--resume", help="checkpoint to resume from (default: <out>/ckpt.pt when it exists)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if <out>/ckpt.pt exists")
    p.add_argument("--init-from", help="start a new run from these weights (fine-tuning): a checkpoint, ours "
                   "or official, or a released name (" + ", ".join(RELEASES) + "); the model's size comes "
                   "from them, the preset gives the run settings, and a run that resumes ignores it "
                   "(default: random weights)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, off on a CPU)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~30%% slower")
    p.add_argument("--benchmark", action="store_true", help="time training steps on synthetic data "
                   "(batch: --micro-batch, default --global-batch) and exit")


def fill_run_defaults(args, defaults):
    """Give the flags left unset (None) the preset's values, in place. An explicit --epochs drops
    the preset's step budget (max_steps), so the flag always does what it says."""
    if args.epochs is not None and args.max_steps is None:
        defaults = {k: v for k, v in defaults.items() if k != "max_steps"}
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    cuda = torch.cuda.is_available()
    args.compile = cuda if args.compile is None else args.compile
    args.bf16 = cuda if args.bf16 is None else args.bf16
    # a fine-tune is named after what it starts from: runs/GPT-small-from-D-AR-L
    init = args.init_from and (release_of(args.init_from, "gpt") or release_of(args.init_from, "tokenizer"))
    name = f"{args.preset}-from-{init}" if init else f"{args.preset}-finetune" if args.init_from else args.preset
    args.out = args.out or os.path.join("runs", name)
    return args


def presets_help(run_defaults):
    """The epilog of a trainer's --help: each preset's values of the flags it sets."""
    lines = ["preset defaults (a flag given on the command line wins):"]
    for name, d in run_defaults.items():
        lines.append(f"  {name}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items()))
    return "\n".join(lines)


def total_steps(max_steps, epochs, n, global_batch):
    """The run's length in optimizer steps: max_steps, or epochs over n samples."""
    return max_steps if max_steps else max(1, round(epochs * (n // global_batch)))


# The tokenizer's two auxiliary losses (eq. 7) need pretrained networks, loaded here and passed to
# tokenizer_loss as modules.

def build_lpips(random_init, device):
    """LPIPS with the VGG16 backbone, as the official training. The lpips package ships its linear
    heads; the VGG16 weights come from torchvision's download. random_init: a random VGG16 (runs
    offline; the loss then measures nothing useful)."""
    import lpips
    try:
        net = lpips.LPIPS(net="vgg", pnet_rand=random_init, verbose=False)
    except Exception as e:
        raise RuntimeError(f"LPIPS needs the VGG16 ImageNet weights, which could not be loaded ({e}); "
                           f"put them in the torch hub cache or train without LPIPS: --lpips-weight 0") from None
    return net.eval().requires_grad_(False).to(device)


class RepaTarget(nn.Module):
    """Frozen DINOv2 ViT-B/14 patch tokens (B, 256, 768) of the input images: the REPA target.
    Input: images in [-1, 1] -> [0, 1] -> ImageNet normalisation -> bicubic resize to 224, as the
    official code. random_init builds a randomly initialised ViT-B/14 of the same shape instead
    (torchvision's VisionTransformer), for offline smoke tests: the loss runs but means nothing."""

    def __init__(self, random_init):
        super().__init__()
        self.random_init = random_init
        if random_init:
            from torchvision.models import VisionTransformer
            self.net = VisionTransformer(image_size=224, patch_size=14, num_layers=12, num_heads=12,
                                         hidden_dim=768, mlp_dim=3072)
        else:
            try:
                self.net = torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")
            except Exception as e:
                raise RuntimeError(f"REPA needs DINOv2 ViT-B/14 from torch.hub, which could not be loaded "
                                   f"({e}); put it in the torch hub cache or train without REPA: "
                                   f"--repa-weight 0") from None
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images):
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=224, mode="bicubic")
        if not self.random_init:
            return self.net.forward_features(x)["x_norm_patchtokens"]
        n = self.net  # torchvision ViT: the encoder's normalised tokens without the class token
        tokens = n._process_input(x)
        tokens = torch.cat([n.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return n.encoder(tokens)[:, 1:]

# -----------------------------------------------------------------------------
# section 16. Sampling and evaluation: loading models, one sampler for sample.py and eval_fid.py

# sample.py and eval_fid.py sample through the same object, so the images of
# `sample.py --out` and of `eval_fid.py --gpt` are the same images.

def parse_guidance(text):
    """'1.1,8.0' -> (1.1, 8.0); '4' -> 4.0: the command-line form of the guidance (--cfg).
    Used as an argparse type, so a bad value stops before any work."""
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or not all(math.isfinite(v) and v >= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"guidance {text!r}: expected one finite scale >= 0 or 'start,end'")
    return vals[0] if len(vals) == 1 else tuple(vals)


def latest(pattern):
    """The newest file matching a glob pattern, or None."""
    import glob
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else None


def format_guidance(guidance):
    """(1.1, 8.0) -> '1.1,8.0', the form --cfg takes."""
    return ",".join(map(str, guidance)) if isinstance(guidance, (tuple, list)) else str(guidance)


@dataclass
class SamplingWeights:
    """What sample.py and eval_fid.py sample with: where each model comes from, and the guidance."""
    tokenizer: Weights
    gpt: Weights
    guidance: object
    papers: bool  # the guidance is the paper's for this released GPT (none was asked for)

    def __str__(self):  # the line the scripts print
        why = f" (the paper's for {self.gpt.release})" if self.papers else ""
        return (f"weights: tokenizer {self.tokenizer} | GPT {self.gpt} | guidance "
                f"{format_guidance(self.guidance)}{why}")


DEFAULT_GPT = "D-AR-L"  # what a fresh clone samples with: the released D-AR-L and its tokenizer


def trained_with(gpt):
    """The tokenizer our trainer learned the GPT checkpoint's codes from (its --tokenizer), where that
    file is still there; else None. The official files record none."""
    args = load_checkpoint(gpt).get("args")
    path = args.get("tokenizer") if isinstance(args, dict) else None
    if isinstance(path, str) and os.path.isfile(path):
        print(f"tokenizer: {path}, the one {gpt} was trained with (--tokenizer picks another)")
        return path
    return None


def load_models(tokenizer=None, gpt=None, device="cpu", runs="runs", guidance=None):
    """(tokenizer, GPT, SamplingWeights). tokenizer and gpt are checkpoints (ours or official) or
    released names. A GPT that is a released file brings its tokenizer, and one of ours the
    tokenizer it was trained with (where that file is still there); a model not given is the
    newest run under runs/; given none and finding no run, the released D-AR-L. Checked to belong
    together: the GPT writes the tokenizer's codes. guidance: the one asked for; None takes the
    paper's for a released GPT, and 1 (none) for any other."""
    tok_run = latest(os.path.join(runs, "tokenizer*", "ckpt.pt"))
    gpt_run = latest(os.path.join(runs, "GPT*", "ckpt.pt"))
    if tokenizer is None and gpt is None and not tok_run and not gpt_run:
        gpt = DEFAULT_GPT
    gpt = gpt or gpt_run
    release = gpt and release_of(gpt, "gpt")
    if not tokenizer and gpt and not release and os.path.isfile(gpt):
        tokenizer = trained_with(gpt)
    tokenizer = tokenizer or (RELEASES[release].tokenizer if release else tok_run)
    # both named before anything is downloaded
    for what, source in (("gpt", gpt), ("tokenizer", tokenizer)):
        if not source:
            raise CheckpointError(f"no {what} given and none found under {runs}/: pass --{what} (a checkpoint, "
                                  f"or a released name: {', '.join(released_names(what))})")
    tok_w, gpt_w = resolve_weights(tokenizer, "tokenizer"), resolve_weights(gpt, "gpt")
    tok = load_tokenizer(tok_w.path).to(device)
    gpt_model = load_gpt(gpt_w.path, block_size=tok.cfg.num_tokens).to(device)
    check_pair(tok, gpt_model, tok_w, gpt_w)
    papers = guidance is None and gpt_w.release is not None
    guidance = RELEASES[gpt_w.release].guidance if papers else 1.0 if guidance is None else guidance
    return tok, gpt_model, SamplingWeights(tok_w, gpt_w, guidance, papers)


def sampling_arguments(parser):
    """The flags that decide what sample.py draws; eval_fid.py --gpt takes the same, so that the
    same flags score the same images. sampling_settings(args) turns them into SamplingSettings."""
    p = parser
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (batch b of --out draws from "
                   "seed and b: any batch can be redone alone)")
    p.add_argument("--cfg", type=parse_guidance, help="classifier-free guidance: 'start,end' of a linear schedule "
                   "over the tokens, or one number (default: the paper's for a released GPT, D-AR-L 1.1,8.0 and "
                   "XL 1.1,10.0; 1.0, none, for any other)")
    p.add_argument("--temperature", type=nonneg_float, default=1.0, help="of the token draws; 0 is greedy")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="draw among the k likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling; 1 = off")
    p.add_argument("--sampler", choices=["adams2", "euler"], default="adams2", help="decoder ODE solver")
    p.add_argument("--steps", type=positive_int, help="decoder steps (default: the tokenizer's: one per group for the paper's, 8 "
                   "for tokenizer_small's 4 groups)")
    p.add_argument("--preview-step", type=positive_int, help="keep the preview after this decoder step instead of "
                   "the image; with one step per group (--steps K), the image from the first k groups of tokens "
                   "(the paper's partial-token FIDs; default: off, the image)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 Llama weights and bf16 autocast for the decoder (default: on with CUDA, off on "
                   "a CPU, where it needs AVX512-BF16 or AMX to pay off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the pixel DiT and the AR decode step (a CUDA graph on GPUs); "
                   "default: on with CUDA; on a CPU it pays off for bulk sampling")


def sampling_settings(args, cuda):
    """SamplingSettings from sampling_arguments' flags; bf16 and compile default to on with CUDA."""
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.compile = cuda if args.compile is None else args.compile
    return SamplingSettings(guidance=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            sampler=args.sampler, steps=args.steps, bf16=args.bf16, compile=args.compile,
                            preview_step=args.preview_step)


def class_balanced_labels(n, num_classes):
    """Sample i has class i mod C: every class n / C times (50 each for 50K ImageNet samples)."""
    return torch.arange(n) % num_classes


def batch_seed(seed, first):
    """The seed of the batch that starts at sample `first`: its draws never depend on the batches
    before it, so a batch can be redone alone, on any process."""
    return seed * 1_000_003 + first


def output_step(preview_step, steps):
    """The decoder step whose preview is the output: the last of `steps`, or --preview-step k, which
    must name one of them (the image from the first k steps' groups)."""
    if preview_step is None:
        return steps
    if not 1 <= preview_step <= steps:
        raise ValueError(f"--preview-step {preview_step}: the decoder takes {steps} steps, so 1..{steps}")
    return preview_step


@dataclass
class SamplingSettings:
    """How to sample: the AR model's draws, the decoder's ODE, and the arithmetic."""
    guidance: object = 1.0        # a scale, or (start, end) of a linear schedule over the tokens
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    sampler: str = "adams2"       # the decoder's ODE solver: adams2 or euler
    steps: Optional[int] = None   # decoder steps; None: the tokenizer's sample_steps
    bf16: bool = False            # bf16 Llama weights and bf16 autocast for the decoder
    compile: bool = False         # torch.compile the DiT and the one-token step
    preview_step: Optional[int] = None  # batch() returns the preview after this step, not the image


class Sampler:
    """A tokenizer and a GPT made ready to sample with SamplingSettings.

    bf16 halves the weights the Llama reads at every token step. compile wraps (never replaces)
    the pixel DiT and the one-token decode step in torch.compile: on a GPU the step becomes a
    CUDA graph (gpt-fast: static KV cache, mode="reduce-overhead"); on a CPU, fused C++ kernels
    around the matrix products. dit_seconds adds up the time spent in the DiT."""

    def __init__(self, tok, gpt, settings, device):
        self.tok, self.settings, self.device = tok, settings, torch.device(device)
        self.output_step = output_step(settings.preview_step, settings.steps or tok.cfg.sample_steps)
        self.gpt = gpt.to(torch.bfloat16) if settings.bf16 else gpt
        self.dit, self.decode_fn = tok.dit, decode_one_token
        if settings.compile:
            self.dit = torch.compile(tok.dit)
            self.decode_fn = torch.compile(decode_one_token, fullgraph=True,
                                           mode="reduce-overhead" if self.device.type == "cuda" else "default")
        self.dit_seconds = 0.0

    def timed_dit(self, *args):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = self.dit(*args)
        if cuda:
            torch.cuda.synchronize()
        self.dit_seconds += time.perf_counter() - t
        return out

    def __call__(self, labels, noise=None, prefix=None):
        """generate_images with these settings -> tokens (B, N) and the previews (B, 3, H, W),
        float32, after each decoder step (the last one is the image)."""
        s, previews = self.settings, []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=s.bf16):
            for tokens, state in generate_images(self.gpt, self.tok, labels.to(self.device), noise, s.sampler,
                                                 s.steps, self.timed_dit, guidance=s.guidance,
                                                 temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                                 prefix=prefix, decode_fn=self.decode_fn):
                previews.append(state.preview.float())
        return tokens, previews

    def batch(self, first, labels, seed):
        """The images (uint8 (B, H, W, 3)) of the batch of samples first.. with these labels, drawn
        from batch_seed(seed, first): what sample.py --out writes and eval_fid.py --gpt scores. With
        preview_step k, the jump estimates after k decoder steps (with one step per group, the image
        from the first k groups: the paper's partial-token evaluation)."""
        torch.manual_seed(batch_seed(seed, first))
        return to_uint8(self(labels)[1][self.output_step - 1])
