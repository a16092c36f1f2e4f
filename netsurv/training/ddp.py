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

import numpy as np
import torch
from torch.utils.data import Sampler

# the global losses live beside the loss objects that call them (survival.losses; imported
# from here they would make survival -> training -> survival an import cycle)
from netsurv.survival.losses import gather_cat, global_cox_loss, global_nll_loss, rank_world

__all__ = ["rank_world", "gather_cat", "global_cox_loss", "global_nll_loss",
           "GlobalBatchSampler", "eval_shard", "eval_batches"]


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
        """The sampler itself: Lightning calls ``set_epoch`` on a batch sampler's ``sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration draws."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (patient positions), before they are split over the ranks.

        Batches with fewer patients than ranks are left out.
        """
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
