"""Deep training on several processes (DDP): global losses, and samplers without padding.

* Cox partial likelihood: the risk set of a patient is every patient of the *global* batch, so
  each rank gathers risk (with gradients), time and event from all ranks and computes the loss
  of the whole batch.  Every rank then holds the same loss L; the backward of the gather sums
  the ranks' gradients (each d L / d risk_local), i.e. world_size x dL/d(own patients), and DDP
  divides by world_size when it averages: the parameter gradient is exactly the single-process
  gradient of the global batch.
* Per-patient losses (discrete-time NLL): each rank's sum is scaled by
  world_size / global count, so DDP's average is the mean over the global batch even when the
  ranks hold different numbers of patients.
* :class:`GlobalBatchSampler`: the same global batches as one process would draw (a seeded
  permutation per epoch cut into ``batch_size`` patients), each rank taking its part.
  ``batch_size`` is therefore the global number of patients per optimiser step.
* :func:`eval_shard`: evaluation patients ``rank::world_size``, never padded (Lightning's default
  DistributedSampler repeats patients to even out the ranks, which would count them twice in a
  C-index); :func:`gather_cat` joins the uneven parts.

In one process (no process group, or world size 1) every function reduces to the plain
single-process computation.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler

from netsurv.survival.losses import cox_ph_loss_with_flag, nll_logistic_hazard

__all__ = ["rank_world", "gather_cat", "global_cox_loss", "global_nll_loss",
           "GlobalBatchSampler", "eval_shard", "eval_batches"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_cat(x: Tensor, *, grad: bool = False) -> Tensor:
    """``x`` of every rank concatenated along dim 0 in rank order; the ranks' lengths may differ
    (collectives need equal shapes: padded to the longest, trimmed after).  ``grad=True``: the
    result is differentiable (``torch.distributed.nn``); its backward sums over ranks."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    if x.shape[0] < longest:
        x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - x.shape[0]))
    if grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            # the functional replacement is private API; this one is public and maintained
            warnings.filterwarnings("ignore", ".*all_gather is deprecated.*", FutureWarning)
            parts = all_gather(x.contiguous())
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def global_cox_loss(risk: Tensor, time: Tensor, event: Tensor, ties: str = "efron"
                    ) -> tuple[Tensor, bool, int]:
    """Negative Cox partial log-likelihood (mean over events) of the global batch:
    (loss, whether the global batch has an event, global batch size)."""
    risk = risk.reshape(-1)
    r = gather_cat(risk, grad=True)
    t = gather_cat(time.reshape(-1).to(risk.dtype))
    e = gather_cat(event.reshape(-1).to(risk.dtype))
    loss, has_event = cox_ph_loss_with_flag(r, t, e, ties=ties)
    return loss, has_event, int(r.shape[0])


def global_nll_loss(logits: Tensor, idx: Tensor, event: Tensor) -> tuple[Tensor, int]:
    """Discrete-time NLL whose DDP average is the mean over the global batch:
    (this rank's share, global batch size).  The returned value differs per rank; the mean of
    the ranks' values (what DDP and ``sync_dist`` average) is the global mean."""
    import torch.distributed as dist

    _, world = rank_world()
    total = nll_logistic_hazard(logits, idx, event, reduction="sum")
    if world == 1:
        return total / max(1, logits.shape[0]), int(logits.shape[0])
    n = torch.tensor([float(logits.shape[0])], device=logits.device)
    dist.all_reduce(n)
    n_global = int(n.item())
    return total * world / max(1, n_global), n_global


class GlobalBatchSampler(Sampler):
    """This rank's part of each global training batch.

    Each epoch: a permutation of the ``n`` patients seeded by (``seed``, epoch), cut into
    batches of ``batch_size`` patients (the last one smaller), each split over the ranks with
    :func:`numpy.array_split` (sizes differ by at most one).  The union over ranks of step k is
    the batch one process draws at step k, so training on K ranks sees the same batches as on
    one.  A trailing batch with fewer patients than ranks is dropped (every rank must take part
    in every step); in one process nothing is dropped.

    Lightning calls ``set_epoch`` through the ``sampler`` attribute of a batch sampler, so a
    resumed run draws the same permutation for an epoch as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if batch_size < world_size:
            raise ValueError(f"optim.batch_size={batch_size} is the global number of patients "
                             f"per step and must be at least the number of processes "
                             f"({world_size})")
        self.n, self.batch_size = int(n), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch = 0

    @property
    def sampler(self):  # where Lightning looks for set_epoch
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[np.ndarray]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        out = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        return [b for b in out if len(b) >= self.world_size]

    def __iter__(self):
        for b in self.global_batches():
            yield np.array_split(b, self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world_size and rest > 0 else 0)


def eval_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """Positions ``rank::world_size`` of ``n`` evaluation patients: every patient on exactly
    one rank, no padding (shards differ in length by at most one)."""
    return np.arange(rank, n, world_size)


def eval_batches(positions, batch_size: int) -> list[list[int]]:
    """Consecutive batches of at most ``batch_size`` of the given dataset positions."""
    positions = [int(p) for p in positions]
    return [positions[i:i + batch_size] for i in range(0, len(positions), int(batch_size))]
