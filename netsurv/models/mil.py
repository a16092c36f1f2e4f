"""Multiple-instance (bag of tile embeddings) encoders for survival.

Every module maps a padded batch of bags ``x [B, N, D]`` with a validity mask ``mask [B, N]``
(True = real tile) to a bag embedding ``[B, dim]`` and per-tile attention ``[B, N]`` (zeros on
padding; rows sum to 1 over real tiles), so that Cox losses can see several patients per batch
and heatmaps can be drawn for every model. A bag with no tiles gives a zero embedding and zero
attention (the fusion layer treats that patient's WSI as missing).

Written here rather than imported: the published implementations (CLAM, TransMIL, PORPOISE)
are GPL / non-commercial or assume batch size 1 without padding masks (see
:class:`NystromAttention` for the Nyström package).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ABMIL", "TransMIL", "MeanPoolMIL", "MaxPoolMIL", "NystromAttention",
           "iterative_pinv", "masked_softmax"]


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over dim 1 restricted to ``mask``; all-masked rows give zeros (not NaN)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    return torch.softmax(scores, dim=1).masked_fill(~mask, 0.0)


def _projector(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout))


def _project(proj: nn.Sequential, x: Tensor, mask: Tensor) -> Tensor:
    """``proj`` of the real tiles only, zeros at padded positions.  A batch of uneven bags is
    padded to its longest (often 3-5x the real tiles), and the input dropout's random draws
    over [B, N, in_dim] dominated a CPU training epoch (37 of 79 s on the demo): padding now
    costs neither draws nor matmuls.  Every caller masks padded positions afterwards."""
    if bool(mask.all()):
        return proj(x)
    h = x.new_zeros((*mask.shape, proj[1].out_features))
    h[mask] = proj(x[mask]).to(h.dtype)
    return h


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
        """Pool a padded batch of bags by gated attention.

        Parameters
        ----------
        x
            Tile embeddings ``[B, N, in_dim]``.
        mask
            ``[B, N]`` bool, True on real tiles.

        Returns
        -------
        z : Tensor
            Attention-weighted mean of the projected tiles, ``[B, dim]`` (zeros for an empty bag).
        attn : Tensor
            ``[B, N]`` attention, summing to 1 over real tiles, 0 on padding and for empty bags.
        """
        h = _project(self.proj, x, mask)                        # [B, N, dim]
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
        """Mean of the projected real tiles ``[B, dim]`` and the uniform weights ``[B, N]``.

        ``x`` is ``[B, N, in_dim]``, ``mask`` ``[B, N]`` (True = real tile); an empty bag gives a
        zero embedding and zero weights.
        """
        h = _project(self.proj, x, mask)
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
        """Feature-wise max of the projected real tiles and each tile's share of the arg-maxes.

        ``x`` is ``[B, N, in_dim]``, ``mask`` ``[B, N]`` (True = real tile); returns ``[B, dim]``
        and ``[B, N]``.  An empty bag gives a zero embedding and zero weights.
        """
        h = _project(self.proj, x, mask).masked_fill(~mask[..., None], float("-inf"))
        z, arg = h.max(1)                                       # [B, dim]
        empty = ~mask.any(1)
        z = z.masked_fill(empty[:, None], 0.0)
        attn = F.one_hot(arg, h.shape[1]).to(z.dtype).mean(1)   # [B, N]
        return z, attn.masked_fill(empty[:, None], 0.0)


_NEG = -1e30  # masked attention logit (finite, so a row with nothing valid stays NaN-free)


def iterative_pinv(a: Tensor, iters: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of each matrix of ``a [..., m, m]`` by the iteration of
    Razavi et al. (2014) that Nyströmformer uses (matrix products only: fast on GPU, smooth
    gradients).  Each matrix is scaled by its own norms (the reference code uses the maximum
    over the whole batch, which makes one patient's output depend on the others')."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm = (a.abs().sum(-1).amax(-1) * a.abs().sum(-2).amax(-1)).clamp_min(1e-12)
    z = a.transpose(-1, -2) / norm[..., None, None]
    for _ in range(int(iters)):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention over the valid tokens of padded bags, exact or by the Nyström
    approximation (Xiong et al. 2021, as TransMIL uses it) whose cost is linear in the bag size.

    ``forward(x [B, N, dim], valid [B, N]) -> (out [B, N, dim], cls [B, N])``: ``cls`` is the
    first token's attention over the tokens (head mean; TransMIL's CLS token).  Padding never
    changes a bag's output: landmarks are the means of ``m`` consecutive segments of the bag's
    own valid tokens (``min(landmarks, n)`` of them, so a bag of at most ``landmarks`` tokens is
    attended exactly), the landmark kernel's pseudo-inverse is taken per bag and head, and the
    depth-wise convolution of the values (Nyströmformer's residual) sees zeros on padding as it
    would past the bag's end.  Memory is O(N x landmarks) per head instead of O(N^2).

    Written here rather than taken from the ``nystrom-attention`` package: that one cuts
    landmark segments over the padded length (front-padded to a multiple of the landmarks) and
    scales its pseudo-inverse by the batch-wide maximum, so a patient's output changes with the
    padding and with the other bags of the batch (relative 6e-3 on a 300-tile bag padded to
    500), and it returns attention only as the full N x N matrix.
    ``exact=True`` uses the same weights with exact softmax attention (small bags; tests).
    """

    def __init__(self, dim: int, heads: int = 4, landmarks: int = 256, pinv_iterations: int = 6,
                 dropout: float = 0.0, residual_kernel: int = 33, exact: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.dh = heads, dim // heads
        self.landmarks, self.pinv_iterations, self.exact = int(landmarks), int(pinv_iterations), exact
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = (nn.Conv2d(heads, heads, (residual_kernel, 1),
                                   padding=(residual_kernel // 2, 0), groups=heads, bias=False)
                         if residual_kernel else None)

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Attend over the valid tokens of ``x [B, N, dim]`` (``valid [B, N]``, True = real token).

        Returns
        -------
        out : Tensor
            ``[B, N, dim]``, zeros on padding.
        cls : Tensor
            ``[B, N]`` attention of the first token over the tokens (mean over heads), zeros on
            padding.
        """
        B, N, _ = x.shape
        H, dh = self.heads, self.dh
        q, k, v = (t.reshape(B, N, H, dh).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        vm = valid[:, None, :, None].to(x.dtype)                  # [B, 1, N, 1]
        q, k, v = q * vm, k * vm, v * vm
        q = q * dh ** -0.5
        if self.exact:
            out, cls = self._exact(q, k, v, valid)
        else:
            out, cls = self._nystrom(q, k, v, valid)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(B, N, H * dh)
        out = self.out(out) * valid[..., None].to(x.dtype)
        return out, cls.mean(1) * valid.to(x.dtype)

    @staticmethod
    def _exact(q, k, v, valid):
        s = q @ k.transpose(-1, -2)
        s.masked_fill_(~valid[:, None, None, :], _NEG)  # finite: an empty bag gives no NaN
        a = torch.softmax(s, -1)
        return a @ v, a[:, :, 0]

    def _nystrom(self, q, k, v, valid):
        B, H, N, dh = q.shape
        m = self.landmarks
        n = valid.sum(1)                                          # [B]
        mb = torch.minimum(n, torch.full_like(n, m))              # landmarks per bag
        # segment of each valid token: floor(rank * mb / n); padding -> dump bucket m
        rank = valid.cumsum(1) - 1
        seg = torch.div(rank * mb[:, None], n.clamp_min(1)[:, None], rounding_mode="floor")
        seg = torch.where(valid, seg, torch.full_like(seg, m))
        idx = seg[:, None, :, None].expand(B, H, N, dh)
        ql = q.new_zeros(B, H, m + 1, dh).scatter_add_(2, idx, q)[:, :, :m]
        kl = k.new_zeros(B, H, m + 1, dh).scatter_add_(2, idx, k)[:, :, :m]
        cnt = q.new_zeros(B, m + 1).scatter_add_(1, seg, valid.to(q.dtype))[:, :m]
        ql, kl = ql / cnt.clamp_min(1)[:, None, :, None], kl / cnt.clamp_min(1)[:, None, :, None]
        lvalid = torch.arange(m, device=q.device)[None, :] < mb[:, None]      # [B, m]
        # Masked logits get a large finite negative value (no NaN for an empty bag, no extra
        # pass over the N x m matrices): their weights underflow to exactly 0.
        f = q @ kl.transpose(-1, -2)                                          # [B, H, N, m]
        f = torch.softmax(f.masked_fill_(~lvalid[:, None, None, :], _NEG), -1)
        a = ql @ kl.transpose(-1, -2)                                         # [B, H, m, m]
        a = torch.softmax(a.masked_fill_(~lvalid[:, None, None, :], _NEG), -1)
        # rows/columns of absent landmarks: an identity block, so that the pseudo-inverse of
        # the bag's own landmark kernel is what multiplies (block-diagonal structure); the
        # columns of f for absent landmarks are 0, so the rows of b for them never count
        eye = torch.diag_embed((~lvalid).to(q.dtype))[:, None]
        a = a * lvalid[:, None, :, None] + eye
        b = ql @ k.transpose(-1, -2)                                          # [B, H, m, N]
        b = torch.softmax(b.masked_fill_(~valid[:, None, None, :], _NEG), -1)
        a_inv = iterative_pinv(a, self.pinv_iterations)
        fa = f @ a_inv
        return fa @ (b @ v), (fa[:, :, :1] @ b)[:, :, 0]


class _AttnLayer(nn.Module):
    """Pre-norm transformer layer (attention + feed-forward) that also returns the first
    token's attention over the tokens."""

    def __init__(self, dim: int, heads: int, dropout: float, **attn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, dropout=dropout, **attn)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        a, w = self.attn(self.norm1(x), valid)
        x = x + a
        return x + self.ff(self.norm2(x)), w


class _PPEG(nn.Module):
    """TransMIL's pyramid position encoding: depth-wise 7/5/3 convolutions over the tokens laid
    out row-major on a square grid of the bag's own side (ceil(sqrt(n))).  All bags of a batch
    go through one convolution: each sits in the top-left corner of a zero canvas of the
    largest side, which is exactly the zero padding its own grid would get, so padding and the
    other bags never leak into a bag (channels-last: oneDNN's depth-wise backward is ~10x
    faster than per bag in the default layout on CPU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
                                   for k in (7, 5, 3))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        B, N, C = tokens.shape
        n = mask.sum(1)
        side = torch.ceil(torch.sqrt(n.to(torch.float64))).to(torch.int64).clamp_min(1)
        S = int(side.max()) if B else 1
        rank = mask.cumsum(1) - 1
        cell = (rank // side[:, None]) * S + rank % side[:, None]
        cell = torch.where(mask, cell, torch.full_like(cell, S * S))   # padding -> dump cell
        idx = cell[..., None].expand(B, N, C)
        canvas = tokens.new_zeros(B, S * S + 1, C).scatter_add(1, idx, tokens * mask[..., None])
        grid = (canvas[:, :S * S].transpose(1, 2).reshape(B, C, S, S)
                .contiguous(memory_format=torch.channels_last))
        grid = grid + sum(c(grid) for c in self.convs)
        flat = torch.cat([grid.reshape(B, C, S * S).transpose(1, 2),
                          tokens.new_zeros(B, 1, C)], 1)
        return torch.where(mask[..., None], torch.gather(flat, 1, idx), tokens)


class TransMIL(nn.Module):
    """TransMIL (Shao et al. 2021): projection -> [CLS] + tokens -> attention layer -> PPEG ->
    attention layer -> CLS output.  ``attn`` is the CLS token's attention over the tiles in the
    last layer (negative Nyström weights clipped to 0, renormalised over the real tiles).

    ``attention="nystrom"`` (default, as the original): Nyström attention with ``landmarks``
    landmarks, linear in the bag size, so whole bags of 10k+ tiles fit at evaluation (exact for
    bags of at most ``landmarks`` tiles).  ``attention="exact"``: softmax attention over all
    tiles, quadratic in memory (small bags only); both share the same weights."""

    def __init__(self, in_dim: int, dim: int = 128, heads: int = 4, dropout: float = 0.25,
                 attention: str = "nystrom", landmarks: int = 256, pinv_iterations: int = 6,
                 residual_kernel: int = 33):
        super().__init__()
        if attention not in ("nystrom", "exact"):
            raise ValueError(f"TransMIL attention must be 'nystrom' or 'exact', got {attention!r}")
        self.dim = dim
        self.proj = _projector(in_dim, dim, dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls, std=0.02)
        kw = dict(landmarks=landmarks, pinv_iterations=pinv_iterations,
                  residual_kernel=residual_kernel, exact=attention == "exact")
        self.layer1 = _AttnLayer(dim, heads, dropout, **kw)
        self.ppeg = _PPEG(dim)
        self.layer2 = _AttnLayer(dim, heads, dropout, **kw)
        self.norm = nn.LayerNorm(dim)

    @property
    def attention(self) -> str:
        """Attention kind of both layers: ``"nystrom"`` or ``"exact"`` (settable; same weights)."""
        return "exact" if self.layer1.attn.exact else "nystrom"

    @attention.setter
    def attention(self, kind: str) -> None:
        """Switch between Nyström and exact attention (same weights)."""
        if kind not in ("nystrom", "exact"):
            raise ValueError(f"attention must be 'nystrom' or 'exact', got {kind!r}")
        for layer in (self.layer1, self.layer2):
            layer.attn.exact = kind == "exact"

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a padded batch of bags (``x [B, N, in_dim]``, ``mask [B, N]``, True = real tile).

        Returns
        -------
        z : Tensor
            Layer-normalised CLS output ``[B, dim]`` (zeros for an empty bag).
        attn : Tensor
            ``[B, N]`` CLS attention of the last layer over the real tiles (negative weights
            clipped, renormalised to sum 1; zeros on padding and for empty bags).
        """
        h = self.proj(x)
        B = h.shape[0]
        tokens = torch.cat([self.cls.expand(B, -1, -1), h], 1)
        valid = torch.cat([mask.new_ones(B, 1), mask], 1)         # CLS always valid
        tokens, _ = self.layer1(tokens, valid)
        tokens = torch.cat([tokens[:, :1], self.ppeg(tokens[:, 1:], mask)], 1)
        tokens, w = self.layer2(tokens, valid)
        z = self.norm(tokens[:, 0])
        empty = ~mask.any(1)
        attn = w[:, 1:].clamp_min(0.0).masked_fill(~mask, 0.0)
        attn = attn / attn.sum(1, keepdim=True).clamp_min(1e-12)
        return z.masked_fill(empty[:, None], 0.0), attn.masked_fill(empty[:, None], 0.0)
