"""
D-AR: Diffusion via Autoregressive Models (Gao & Shou, 2025), in one file.

D-AR turns pixel diffusion into plain next-token prediction:

  image --(1D encoder + VQ)--> N = 256 discrete tokens z_1..z_N, in K = 8 groups of 32
  tokens --(causal token decoder)--> conditioning tokens z'
  group k of z' conditions diffusion step k of a pixel DiT (coarse groups first, fine last)
  an unmodified Llama learns p(z) = prod_i p(z_i | z_<i, class) and generates tokens left to right,
  so every 32 tokens can be decoded into one more denoising step (streaming, previews, layout control).

The file is built from the smallest parts up:
  shared pieces (RoPE, attention, blocks) -> 1. vector quantiser -> 2. encoder -> 3. token decoder
  -> 4. pixel DiT -> 5. condition schedule -> 6. samplers -> 7. the tokenizer -> 8. Llama
  -> 9. generation -> 10. checkpoints (ours and the official format) -> 11. presets.

Equation numbers refer to the paper (arXiv 2505.23660). Where the official code (showlab/D-AR),
which produced the released checkpoints, departs from the paper, this file follows the code and
says so. All tensors are (B, ...) batches; shapes are noted as comments, e.g. (B, N, D).
"""

import argparse
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# Configs

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
    data_std: float = 0.6       # the DiT works on x1 = image * 0.6
    time_shift: float = 2.0     # beta: sampling times t = u / (u + beta (1 - u)) for uniform u (eq. 8)
    sample_steps: int = 8       # default number of decoder steps (one per group)
    repa_layer: int = 8         # REPA: DiT features before this block are aligned with DINOv2
    repa_dim: int = 768         # DINOv2 ViT-B/14 width; 0 builds no projector (inference-only model)
    repa_hidden: int = 2048
    rope_theta: float = 10000.0

    def __post_init__(self):
        assert self.num_tokens % self.num_groups == 0, "N must split into K equal groups"
        assert self.num_tokens <= self.max_tokens
        assert self.image_size % self.patch_size == 0 and self.image_size % self.dit_patch_size == 0

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
    class_dropout: float = 0.1  # p of replacing the label by the null class in training (CFG)
    head_dim: int = 0           # derived: dim // n_head
    ffn_hidden: int = 0         # derived: multiple_of above int(2 * 4 dim / 3) (Llama's SwiGLU sizing)

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_head
        if not self.ffn_hidden:
            hidden = int(2 * 4 * self.dim / 3)
            self.ffn_hidden = -(-hidden // self.multiple_of) * self.multiple_of


# -----------------------------------------------------------------------------
# Shared pieces: layer norm without affine, rotary embeddings, attention, MLP

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
# 1. Vector quantiser (LlamaGen style: l2-normalised codes, straight-through)

class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation on the unit sphere of R^vq_dim.

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
# 2. Encoder: image -> N query tokens (1D, TiTok-like)

class Encoder(nn.Module):
    """Patches and N learnable queries go through one transformer; the queries' outputs become the
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
        #    uses them group by group (section 5)

        cos, sin = rope_2d(h, w, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        rope = (torch.cat([cos, cos.new_ones(N, cos.shape[1])]),      # identity rotation
                torch.cat([sin, sin.new_zeros(N, sin.shape[1])]))      # for the queries
        i = torch.arange(P + N, device=x.device)
        mask = (i[None, :] < P) | (i[None, :] <= i[:, None])           # (P+N, P+N), True = may attend

        x = run_blocks(self.blocks, x, self.grad_checkpointing, rope=rope, mask=mask)
        # 4. the query outputs, normalised and projected to the 8-d code space
        return self.to_code(ln(x[:, P:]))                              # (B, N, vq_dim)


# -----------------------------------------------------------------------------
# 3. Token decoder: codes -> conditioning tokens z' (causal, adds nonlinearity)

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
# 4. Pixel diffusion decoder: a DiT on raw pixels with cross-attention to one group of z'

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
    """Velocity network v(x_t, t, c) of the flow-matching decoder, on raw pixels (no VAE).

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
# 5. Condition schedule (paper eq. 5): which group of tokens conditions which time

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
    With steps = K each group conditions exactly one step."""
    t_u = [i / steps for i in range(steps)]
    times = shift_time(torch.tensor(t_u + [1.0], dtype=torch.float32), beta)
    return times, [group_index(t, K) for t in t_u]


# -----------------------------------------------------------------------------
# 6. Samplers: Euler and Adams-Bashforth 2 over the shifted schedule, one step at a time

@dataclass
class DecodeState:
    """Where a decoding is: x_t after `step` of `steps` ODE steps (data_std units), the last velocity
    (for Adams-Bashforth 2) and the preview: the jump estimate x1_hat = x_t + (1 - t) v of the last
    step, in image units. A state can be stored and decoding resumed from it (streaming)."""
    x: torch.Tensor                       # (B, 3, H, W)
    steps: int
    sampler: str = "adams2"
    step: int = 0
    v_prev: Optional[torch.Tensor] = None
    preview: Optional[torch.Tensor] = None


def ode_update(x, v, v_prev, t, t_next, t_end, sampler):
    """One step from t to t_next of dx/dt = v. Euler uses d = v; Adams-Bashforth 2 uses
    d = 1.5 v_i - 0.5 v_{i-1} (an Euler first step). Returns x_next = x + (t_next - t) d and the
    preview x + (t_end - t) d: the same step aimed straight at t = 1 (the official clip_steps)."""
    if sampler not in ("euler", "adams2"):
        raise ValueError(f"unknown sampler {sampler!r}: use 'euler' or 'adams2'")
    d = v if sampler == "euler" or v_prev is None else 1.5 * v - 0.5 * v_prev
    return x + (t_next - t) * d, x + (t_end - t) * d


# -----------------------------------------------------------------------------
# 7. The sequential diffusion tokenizer

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
            nn.init.zeros_(block.gate1)
            nn.init.zeros_(block.gate2)
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
    def decode_step(self, cond, state):
        """One ODE step (eq. 8): step i evaluates v at (x_{t_i}, t_i) conditioned on group g(i) of
        cond = z' (B, N, dec_dim) and moves to t_{i+1}. Only that group of cond is read, so cond may
        hold anything after it (streaming)."""
        cfg, i = self.cfg, state.step
        # t_0 = 0 < t_1 < ... < t_steps = 1 on the shifted grid; group g(i) of z' drives step i
        times, groups = sampling_schedule(state.steps, cfg.num_groups, cfg.time_shift)
        times = times.to(state.x.device)
        g = groups[i] * cfg.group_size
        t = times[i].expand(state.x.shape[0])
        v, _ = self.dit(state.x, t, cond[:, g:g + cfg.group_size])
        # the preview costs nothing: the same update, aimed at t = 1 (the jump estimate of sec. 5,
        # x1_hat = x_t + (1 - t) v); after the last step
        # it is the image itself. Outputs leave the data_std units: * (1 / 0.6)
        x, jump = ode_update(state.x, v, state.v_prev, times[i], times[i + 1], times[-1], state.sampler)
        return DecodeState(x, state.steps, state.sampler, i + 1, v, jump * (1.0 / cfg.data_std))

    @torch.no_grad()
    def decode_steps(self, codes, noise=None, sampler="adams2", steps=None, state=None):
        """Yield the DecodeState after each step; state.preview after step k is the image as seen
        from the first k groups, and after the last step it is the decoded image. Pass `state` to
        continue a decoding that stopped part way."""
        cond = self.cond_tokens(codes)
        if state is None:
            if noise is None:
                S = self.cfg.image_size
                noise = torch.randn(codes.shape[0], 3, S, S, device=codes.device, dtype=cond.dtype)
            state = self.start_decode(noise, steps, sampler)
        while state.step < state.steps:
            state = self.decode_step(cond, state)
            yield state

    def decode(self, codes, noise=None, sampler="adams2", steps=None):
        """codes (B, N) -> images (B, 3, H, W), roughly in [-1, 1]. `noise` (B, 3, H, W) is the
        sampler's initial N(0, I) draw (fresh when None); `steps` defaults to K."""
        for state in self.decode_steps(codes, noise, sampler, steps):
            pass
        return state.preview

    # --- training ------------------------------------------------------------

    def forward(self, images, t=None, noise=None, repa=False):
        """One training forward on images (B, 3, H, W) in [-1, 1]. t (B,) ~ U[0, 1) picks both the
        group (section 5) and, shifted, the diffusion time; noise (B, 3, H, W) is x0. Both are drawn
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


# -----------------------------------------------------------------------------
# 8. The autoregressive model: Llama (LlamaGen's GPT), with a static KV cache

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


# -----------------------------------------------------------------------------
# 9. Generation: prefill / decode one token, CFG with a linear schedule, streaming decoding

def cfg_schedule(cfg, n):
    """Guidance scale per position (n,): linear from start to end (the paper uses 1.1 -> 8.0 for
    D-AR-L, 1.1 -> 10.0 for XL); a single number is a constant scale."""
    start, end = (cfg, cfg) if isinstance(cfg, (int, float)) else cfg
    return torch.linspace(float(start), float(end), n)


def parse_guidance(text):
    """'1.1,8.0' -> (1.1, 8.0); '4' -> 4.0: the command-line form of cfg_schedule's argument."""
    vals = [float(v) for v in str(text).split(",")]
    if len(vals) not in (1, 2) or min(vals) < 0:
        raise ValueError(f"guidance {text!r}: expected one scale or 'start,end'")
    return vals[0] if len(vals) == 1 else tuple(vals)


def guided_logits(logits, scale):
    """Rows are [conditional ; unconditional]: l = l_u + (l_c - l_u) * s (classifier-free guidance
    on the logits)."""
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
def generate_stream(gpt, labels, num_tokens=None, cfg=1.0, temperature=1.0, top_k=0, top_p=1.0,
                    prefix=None, decode_fn=decode_one_token):
    """Yield the tokens (B,) of positions 0..N-1 one at a time. `prefix` (B, P) fixes the first P
    tokens (zero-shot layout control): they are fed in the prefill and yielded as they are.
    With guidance, conditional and unconditional rows run as one batch of 2B rows."""
    N = num_tokens or gpt.cfg.block_size
    B, device = labels.shape[0], labels.device
    prefix = labels.new_zeros(B, 0) if prefix is None else prefix.to(device)
    gpt.check_inputs(prefix, labels)
    if N > gpt.cfg.block_size or prefix.shape[1] > N:
        raise ValueError(f"cannot generate {N} tokens with a prefix of {prefix.shape[1]} "
                         f"(block_size {gpt.cfg.block_size})")
    # guidance costs a second batch (the null class); with a scale of 1 everywhere it is skipped
    scales = cfg_schedule(cfg, N).tolist()
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


def generate(gpt, labels, num_tokens=None, cfg=1.0, temperature=1.0, top_k=0, top_p=1.0, prefix=None):
    """labels (B,) -> tokens (B, N) int64, sampled left to right with the KV cache."""
    return torch.stack(list(generate_stream(gpt, labels, num_tokens, cfg, temperature, top_k, top_p, prefix)), 1)


@torch.no_grad()
def generate_images(gpt, tok, labels, noise=None, sampler="adams2", steps=None, **gen_kwargs):
    """Streaming D-AR: run one pixel-diffusion step as soon as the tokens it needs exist.
    Yields (tokens (B, N), DecodeState) after each decoder step; tokens not generated yet are 0.
    The last state's preview is the image, the same as tok.decode(tokens, noise) would give: the
    token decoder is causal and each step reads only its own group of z'."""
    cfg, N = tok.cfg, tok.cfg.num_tokens
    B = labels.shape[0]
    if noise is None:
        noise = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=labels.device)
    state = tok.start_decode(noise, steps, sampler)
    _, groups = sampling_schedule(state.steps, cfg.num_groups, cfg.time_shift)
    tokens = labels.new_zeros(B, N)
    cond = None
    for i, token in enumerate(generate_stream(gpt, labels, N, **gen_kwargs)):
        # unknown tokens stay 0: they only ever reach rows of z' that no step reads yet
        tokens[:, i] = token
        if (i + 1) % cfg.group_size:
            continue
        cond = tok.cond_tokens(tokens)  # a group is complete: refresh z' (only ready rows are read)
        while state.step < state.steps and (groups[state.step] + 1) * cfg.group_size <= i + 1:
            state = tok.decode_step(cond, state)
            yield tokens, state


# -----------------------------------------------------------------------------
# 10. Checkpoints: atomic saving, safe loading, conversion from the official format

class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind (one-line message)."""


class _OfficialConfig(dict):
    """Stand-in for the official config_util.Config (a mapping over its `_data` dict), so that the
    official tokenizer checkpoints unpickle without the official code and without running any."""

    def __setstate__(self, state):
        self.update(state.get("_data", {}))


# the only classes a checkpoint may name besides tensors and containers
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
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    if ckpt.get("kind") in ("dar.tokenizer", "dar.gpt"):
        return ckpt["kind"]
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
    unsupported = {"vq_enable": False, "query_low_rank": False, "mlp_head": True, "share_time_encoding": True}
    for k, bad in unsupported.items():
        if c.get(k, dd.get(k)) == bad:
            raise CheckpointError(f"official tokenizer option {k}={bad} is not supported")
    if c.get("queries_per_step", c["num_all_queries"] // c["num_query_groups"]) * c["num_query_groups"] != c["num_all_queries"]:
        raise CheckpointError("official tokenizer with queries_per_step != N / K is not supported")
    if dd.get("cond_dim", c["decoder_dim"]) != c["decoder_dim"]:
        raise CheckpointError("official tokenizer with cond_dim != decoder_dim is not supported")
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
    import re
    out = {}
    for k, v in _strip_prefixes(sd).items():
        if k.endswith("quantize.codebook_used"):
            continue
        for pattern, repl in _TOKENIZER_RENAMES:
            k = re.sub(pattern, repl, k)
        if k.split(".")[-2] in ("to_code", "from_code", "x_embed", "out") and v.ndim == 4:
            v = v.flatten(1)
        out[k] = v
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
        if k == "freqs_cis" or ".kv_cache." in k:
            continue
        for a, b in renames.items():
            k = k.replace(a, b)
        out[k] = v
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
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _load_weights(model, sd, path):
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
    if not any(k.startswith("dit.repa.") for k in sd):
        cfg.repa_dim = 0  # inference-only weights: no REPA projector
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
    return _load_weights(GPT(cfg), sd, path).to(map_location)


# -----------------------------------------------------------------------------
# 11. Presets

TOKENIZER_PRESETS = {
    # the paper's tokenizer: 307.4M parameters (185.1M pixel DiT, 7.3M REPA projector)
    "tokenizer_v1": dict(),
    # trains on 2 CPU cores in minutes: 32x32 images (Fashion-MNIST padded), 64 tokens in 4 groups
    "tokenizer_small": dict(image_size=32, patch_size=4, enc_dim=128, enc_layers=2, dec_dim=128,
                            dec_layers=2, num_tokens=64, num_groups=4, codebook_size=512,
                            dit_dim=128, dit_depth=4, dit_patch_size=4, sample_steps=4, repa_layer=2,
                            repa_dim=0, max_tokens=64),
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



# -----------------------------------------------------------------------------
# 12. For the scripts: images, datasets, distributed runs, EMA

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def load_image(path):
    """An RGB PIL image (grayscale and palette images become 3-channel); a clear error otherwise."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
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


def save_grid(images, path, nrow=8):
    """Save (B, 3, H, W) images in [-1, 1] as one PNG grid, nrow images per row, 2 px gaps.
    Images under 64 px are enlarged (nearest neighbour) to be seen."""
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


class ImageDataset(torch.utils.data.Dataset):
    """(image, label) pairs from an ImageFolder tree (root/<class>/<image>, classes sorted by
    name, as ImageNet is usually laid out) or from in-memory arrays (Fashion-MNIST).
    transform(PIL image, index) -> tensor; it gets the index so augmentations can be chosen
    deterministically per sample."""

    def __init__(self, files=None, labels=None, arrays=None, classes=None, transform=None):
        self.files, self.labels, self.arrays = files, labels, arrays
        self.classes, self.transform = classes, transform

    @classmethod
    def folder(cls, root, transform=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root}: no such directory (expected root/<class>/<image> "
                                    f"or a built-in name: {', '.join(BUILTIN_DATASETS)})")
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not classes:
            raise ValueError(f"--data {root}: no class sub-folders (expected root/<class>/<image>)")
        files, labels = [], []
        for label, c in enumerate(classes):
            found = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, c), followlinks=True)
                           for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ValueError(f"--data {root}: class folder '{c}' holds no images")
            files += found
            labels += [label] * len(found)
        return cls(files=files, labels=labels, classes=classes, transform=transform)

    def __len__(self):
        return len(self.labels)

    def image(self, i):
        """The i-th image as an RGB PIL image, before any transform."""
        from PIL import Image
        return Image.fromarray(self.arrays[i]).convert("RGB") if self.files is None else load_image(self.files[i])

    def __getitem__(self, i):
        img = self.image(i)
        return (self.transform(img, i) if self.transform else img), self.labels[i]


def read_idx(path):
    """An IDX file (MNIST format), gzipped or not -> uint8 numpy array."""
    import gzip
    import numpy as np
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(train=True, transform=None):
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
    classes = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    return ImageDataset(arrays=x, labels=[int(v) for v in y], classes=classes, transform=transform)


BUILTIN_DATASETS = {"fashion-mnist": fashion_mnist}


def build_dataset(data, transform=None, train=True):
    """--data: a built-in name or an ImageFolder directory."""
    if data in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[data](train=train, transform=transform)
    return ImageDataset.folder(data, transform)


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


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
