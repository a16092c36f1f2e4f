"""Multiple-instance (bag of tile embeddings) encoders for survival.

Every module maps a padded batch of bags ``x [B, N, D]`` with a validity mask ``mask [B, N]``
(True = real tile) to a bag embedding ``[B, dim]`` and per-tile attention ``[B, N]`` (zeros on
padding; rows sum to 1 over real tiles), so that Cox losses can see several patients per batch
and heatmaps can be drawn for every model. A bag with no tiles gives a zero embedding and zero
attention (the fusion layer treats that patient's WSI as missing).

Written here rather than imported: the published implementations (CLAM, TransMIL, PORPOISE)
are GPL / non-commercial or assume batch size 1 without padding masks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ABMIL", "TransMIL", "MeanPoolMIL", "MaxPoolMIL", "masked_softmax"]


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over dim 1 restricted to ``mask``; all-masked rows give zeros (not NaN)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    return torch.softmax(scores, dim=1).masked_fill(~mask, 0.0)


def _projector(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout))


class ABMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018): a_i = softmax_i w^T (tanh(V h_i) * sigmoid(U h_i))."""

    def __init__(self, in_dim: int, dim: int = 128, attn_dim: int = 64, dropout: float = 0.25,
                 gated: bool = True):
        super().__init__()
        self.dim = dim
        self.proj = _projector(in_dim, dim, dropout)
        self.v = nn.Linear(dim, attn_dim)
        self.u = nn.Linear(dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.proj(x)                                        # [B, N, dim]
        a = torch.tanh(self.v(h))
        if self.u is not None:
            a = a * torch.sigmoid(self.u(h))
        attn = masked_softmax(self.w(a).squeeze(-1), mask)      # [B, N]
        return torch.einsum("bn,bnd->bd", attn, h), attn


class MeanPoolMIL(nn.Module):
    """Baseline: projection then the mean over real tiles (attention = uniform weights)."""

    def __init__(self, in_dim: int, dim: int = 128, dropout: float = 0.25):
        super().__init__()
        self.dim = dim
        self.proj = _projector(in_dim, dim, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.proj(x)
        w = mask.to(h.dtype)
        attn = w / w.sum(1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bn,bnd->bd", attn, h), attn


class MaxPoolMIL(nn.Module):
    """Baseline: projection then the feature-wise max over real tiles. ``attn`` = share of the
    embedding's features for which a tile is the arg-max (what the heatmap can show)."""

    def __init__(self, in_dim: int, dim: int = 128, dropout: float = 0.25):
        super().__init__()
        self.dim = dim
        self.proj = _projector(in_dim, dim, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.proj(x).masked_fill(~mask[..., None], float("-inf"))
        z, arg = h.max(1)                                       # [B, dim]
        empty = ~mask.any(1)
        z = z.masked_fill(empty[:, None], 0.0)
        attn = F.one_hot(arg, h.shape[1]).to(z.dtype).mean(1)   # [B, N]
        return z, attn.masked_fill(empty[:, None], 0.0)


class _AttnLayer(nn.Module):
    """Pre-norm transformer layer that also returns the attention map (head-averaged)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
        h = self.norm1(x)
        a, w = self.attn(h, h, h, key_padding_mask=pad, need_weights=True,
                         average_attn_weights=True)
        x = x + a
        return x + self.ff(self.norm2(x)), w


class _PPEG(nn.Module):
    """TransMIL's pyramid position encoding: depth-wise 7/5/3 convolutions over the tokens laid
    out row-major on a square grid (per bag, so padding never leaks into real tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
                                   for k in (7, 5, 3))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        out = tokens.clone()
        for b in range(tokens.shape[0]):
            n = int(mask[b].sum())
            if n == 0:
                continue
            side = math.ceil(math.sqrt(n))
            t = tokens[b, :n]
            grid = torch.cat([t, t.new_zeros(side * side - n, t.shape[1])]).T.reshape(1, -1, side, side)
            grid = grid + sum(c(grid) for c in self.convs)
            out[b, :n] = grid.reshape(t.shape[1], -1).T[:n]
        return out


class TransMIL(nn.Module):
    """TransMIL (Shao et al. 2021) with exact multi-head attention instead of Nyström attention
    (bags here are hundreds to a few thousand tiles; subsample larger ones in training):
    projection -> [CLS] + tokens -> layer -> PPEG -> layer -> CLS output. ``attn`` is the CLS
    token's attention over the tiles in the last layer."""

    def __init__(self, in_dim: int, dim: int = 128, heads: int = 4, dropout: float = 0.25):
        super().__init__()
        self.dim = dim
        self.proj = _projector(in_dim, dim, dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls, std=0.02)
        self.layer1 = _AttnLayer(dim, heads, dropout)
        self.ppeg = _PPEG(dim)
        self.layer2 = _AttnLayer(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.proj(x)
        B = h.shape[0]
        tokens = torch.cat([self.cls.expand(B, -1, -1), h], 1)
        pad = torch.cat([mask.new_zeros(B, 1), ~mask], 1)     # True = ignore; CLS always valid
        tokens, _ = self.layer1(tokens, pad)
        tokens = torch.cat([tokens[:, :1], self.ppeg(tokens[:, 1:], mask)], 1)
        tokens, w = self.layer2(tokens, pad)
        z = self.norm(tokens[:, 0])
        empty = ~mask.any(1)
        attn = w[:, 0, 1:].masked_fill(~mask, 0.0)
        attn = attn / attn.sum(1, keepdim=True).clamp_min(1e-12)
        return z.masked_fill(empty[:, None], 0.0), attn.masked_fill(empty[:, None], 0.0)
