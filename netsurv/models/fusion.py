"""Tabular branches, multimodal fusion and the survival network that ties them together.

Missing modalities: every fusion receives, per modality, an embedding ``[B, d]`` and a
``present`` mask ``[B]``. Early and bilinear fusion replace an absent modality's embedding by a
learned placeholder; late fusion drops the absent modality's term from the sum; gated-attention
fusion leaves it out of the softmax. ``SurvivalNet`` can also drop present modalities at random
in training (modality dropout) so the model learns to predict from any subset.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from netsurv.modalities import WSI, WSI_MASK
from netsurv.models.mil import masked_softmax

__all__ = ["TabularMLP", "EarlyFusion", "LateFusion", "BilinearFusion", "GatedAttentionFusion",
           "SurvivalNet"]


class TabularMLP(nn.Module):
    """Clinical / radiomics vector -> embedding. ``hidden=[]`` gives one linear layer."""

    def __init__(self, in_dim: int, dim: int = 32, hidden=(), dropout: float = 0.1):
        super().__init__()
        layers, d = [], in_dim
        for h in list(hidden):
            layers += [nn.Dropout(dropout), nn.Linear(d, h), nn.GELU()]
            d = h
        layers += [nn.Dropout(dropout), nn.Linear(d, dim), nn.GELU()]
        self.net = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """Embed ``x [B, in_dim]`` to ``[B, dim]``."""
        return self.net(x)


class _Fusion(nn.Module):
    def __init__(self, dims: dict[str, int], out_dim: int):
        super().__init__()
        self.names = list(dims)
        self.dims = dict(dims)
        self.out_dim = out_dim
        self.placeholder = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(d)) for m, d in dims.items()})

    def _filled(self, embs, present) -> list[Tensor]:
        return [torch.where(present[m][:, None], embs[m], self.placeholder[m].expand_as(embs[m]))
                for m in self.names]


class EarlyFusion(_Fusion):
    """Concatenate modality embeddings -> MLP -> head."""

    def __init__(self, dims, out_dim: int = 1, hidden: int = 64, dropout: float = 0.25):
        super().__init__(dims, out_dim)
        self.mlp = nn.Sequential(nn.Linear(sum(dims.values()), hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, out_dim))

    def forward(self, embs, present) -> Tensor:
        """Fuse per-modality embeddings into ``[B, out_dim]``.

        Parameters
        ----------
        embs : dict of str to Tensor
            ``{modality: [B, d]}`` for every modality the fusion was built for.
        present : dict of str to Tensor
            ``{modality: bool [B]}``; absent modalities are replaced by their learned placeholder.
        """
        return self.mlp(torch.cat(self._filled(embs, present), 1))


class LateFusion(_Fusion):
    """One linear head per modality; the output is the sum over the PRESENT modalities
    (a sum of per-modality log-hazards for Cox; of per-modality hazard logits for NLL)."""

    def __init__(self, dims, out_dim: int = 1, dropout: float = 0.0):
        super().__init__(dims, out_dim)
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.Dropout(dropout), nn.Linear(d, out_dim))
                                    for m, d in dims.items()})

    def forward(self, embs, present) -> Tensor:
        """Sum of the per-modality heads over the present modalities, ``[B, out_dim]``.

        ``embs`` is ``{modality: [B, d]}``, ``present`` ``{modality: bool [B]}``; a patient with no
        modality present gets 0.
        """
        out = 0.0
        for m in self.names:
            out = out + self.heads[m](embs[m]) * present[m][:, None].to(embs[m].dtype)
        return out


class BilinearFusion(_Fusion):
    """Gated Kronecker fusion (Pathomic Fusion, Chen et al. 2020): each modality is gated by the
    others, projected to ``rank`` dims with a 1 appended (so unimodal terms survive), and the outer
    product of all modalities feeds an MLP -> head. Size grows as (rank+1)^M: keep rank small."""

    def __init__(self, dims, out_dim: int = 1, rank: int = 8, hidden: int = 64,
                 dropout: float = 0.25):
        super().__init__(dims, out_dim)
        total = sum(dims.values())
        self.proj = nn.ModuleDict({m: nn.Linear(d, rank) for m, d in dims.items()})
        self.gate = nn.ModuleDict({m: nn.Linear(total, rank) for m in dims})
        size = (rank + 1) ** len(dims)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(size, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, out_dim))

    def forward(self, embs, present) -> Tensor:
        """Gated outer-product fusion of the modalities into ``[B, out_dim]``.

        ``embs`` is ``{modality: [B, d]}``, ``present`` ``{modality: bool [B]}``; absent modalities
        are replaced by their learned placeholder first.
        """
        filled = self._filled(embs, present)
        ctx = torch.cat(filled, 1)
        kron = None
        for m, e in zip(self.names, filled):
            v = torch.sigmoid(self.gate[m](ctx)) * torch.tanh(self.proj[m](e))
            v = torch.cat([v, v.new_ones(v.shape[0], 1)], 1)
            kron = v if kron is None else torch.einsum("bi,bj->bij", kron, v).flatten(1)
        return self.mlp(kron)


class GatedAttentionFusion(_Fusion):
    """Project every modality to a common size, weight them by gated attention over the present
    modalities (per patient), sum, head. Absent modalities get zero weight."""

    def __init__(self, dims, out_dim: int = 1, dim: int = 64, dropout: float = 0.25):
        super().__init__(dims, out_dim)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in dims.items()})
        self.v = nn.Linear(dim, dim)
        self.u = nn.Linear(dim, dim)
        self.w = nn.Linear(dim, 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, out_dim))

    def forward(self, embs, present) -> Tensor:
        """Attention-weighted sum of the projected present modalities through the head.

        Returns ``[B, out_dim]``.

        ``embs`` is ``{modality: [B, d]}``, ``present`` ``{modality: bool [B]}``; absent modalities
        get zero attention weight.
        """
        h = torch.stack([torch.tanh(self.proj[m](embs[m])) for m in self.names], 1)  # [B, M, dim]
        mask = torch.stack([present[m] for m in self.names], 1)
        a = masked_softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1),
                           mask)
        return self.head(torch.einsum("bm,bmd->bd", a, h))


class SurvivalNet(nn.Module):
    """Branches (``wsi``: a MIL module; tabular modalities: :class:`TabularMLP`) -> fusion -> head
    outputs ``[B, out_dim]`` (1 = Cox log-hazard; n_bins = discrete-time hazard logits).

    ``linear``: {modality: input size} of tabular modalities that also get a linear term added
    to the output (``out += present_m * W_m x_m``; a residual linear Cox / hazard-logit model
    beside the nonlinear fusion). Small cohorts carry most of their tabular signal linearly, and
    a GELU bottleneck followed by the fusion MLP uses it poorly; the weights start at zero so the
    network starts as the plain fusion model.

    ``offset``: the batch carries ``offset`` [B], a classical model's linear predictor
    (:mod:`netsurv.training.offset`), and the output becomes
    ``bias + (1 + s) * offset + g * out``: the gate ``g`` and the scale correction ``s`` start
    at zero, so the network starts as the classical model and learns a residual (ReZero);
    ``bias`` (one per output, zero) gives discrete-time heads their baseline hazard while ``g``
    is small (a Cox output ignores it).

    ``batch`` keys: ``wsi`` [B, N, D] + ``wsi_mask`` [B, N]; ``<modality>`` [B, d] for tabular
    ones; ``present`` {modality: bool [B]}; ``offset`` [B] with ``offset=True``.
    """

    def __init__(self, branches: dict[str, nn.Module], fusion: nn.Module,
                 modality_dropout: float = 0.0, linear: dict[str, int] | None = None,
                 offset: bool = False):
        super().__init__()
        self.offset = bool(offset)
        if self.offset:
            n_out = int(getattr(fusion, "out_dim", 1))
            self.offset_gate = nn.Parameter(torch.zeros(()))
            self.offset_scale = nn.Parameter(torch.zeros(()))
            self.offset_bias = nn.Parameter(torch.zeros(n_out))
        self.branches = nn.ModuleDict(branches)
        self.fusion = fusion
        self.modality_dropout = modality_dropout
        out_dim = int(getattr(fusion, "out_dim", 1))
        self.linear = nn.ModuleDict()
        for m, d in (linear or {}).items():
            if m == WSI or m not in self.branches:
                raise ValueError(f"linear term: {m!r} is not a tabular branch of this network")
            lin = nn.Linear(int(d), out_dim, bias=False)  # bias: Cox is shift-invariant
            nn.init.zeros_(lin.weight)
            self.linear[m] = lin

    def _drop(self, present: dict[str, Tensor]) -> dict[str, Tensor]:
        """Drop each present modality with probability p, keeping at least one per patient."""
        names = list(present)
        keep = torch.stack([present[m] for m in names], 1)
        drop = torch.rand(keep.shape, device=keep.device) < self.modality_dropout
        new = keep & ~drop
        lost = ~new.any(1) & keep.any(1)
        if lost.any():  # restore one random present modality for patients that lost all
            r = torch.rand(keep.shape, device=keep.device).masked_fill(~keep, -1.0)
            pick = torch.nn.functional.one_hot(r.argmax(1), len(names)).bool()
            new = torch.where(lost[:, None], pick, new)
        return {m: new[:, i] for i, m in enumerate(names)}

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Run the branches, the fusion and the optional linear / offset terms on one batch.

        In training mode with ``modality_dropout > 0`` and more than one branch, present
        modalities are dropped at random (at least one kept per patient that has one).

        Parameters
        ----------
        batch : dict
            See the class docstring for the keys.

        Returns
        -------
        dict
            ``"out"``: ``[B, out_dim]`` predictions; ``"attention"``: the WSI branch's per-tile
            attention ``[B, N]``, or None without a ``wsi`` branch.
        """
        embs, attn = {}, None
        present = dict(batch["present"])
        for m, branch in self.branches.items():
            if m == WSI:
                embs[m], attn = branch(batch[WSI], batch[WSI_MASK])
            else:
                embs[m] = branch(batch[m])
        if self.training and self.modality_dropout > 0 and len(embs) > 1:
            present = self._drop(present)
        out = self.fusion(embs, present)
        for m, lin in self.linear.items():
            out = out + lin(batch[m]) * present[m][:, None].to(out.dtype)
        if self.offset:
            off = batch["offset"].to(out.dtype)[:, None]
            out = self.offset_bias + (1 + self.offset_scale) * off + self.offset_gate * out
        return {"out": out, "attention": attn}
