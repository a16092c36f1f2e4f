"""Patient-level data for deep survival models: bags of tile embeddings + tabular vectors.

One item = one patient: all tiles of all their slides (slide index kept for heatmaps), the
clinical / radiomics / other feature-table vectors after the fitted feature steps, time, event,
and a ``present`` flag per modality (missing modalities are zero-filled and flagged, the fusion
layer decides what to do with them). Batches hold several patients (bags padded to the longest,
with a mask) so that the Cox partial likelihood compares patients within a batch.  Bags come
from a :class:`~netsurv.training.bags.BagStore` (read from disk per item, so memory does not
grow with the cohort); evaluation batches are bounded by a tile budget
(:class:`TileBudgetBatchSampler`).
"""
from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, get_worker_info

from netsurv.modalities import WSI, WSI_MASK
from netsurv.training.bags import Bag, BagStore

__all__ = ["Bag", "BagStore", "load_bags", "TabularSteps", "PatientDataset", "collate_patients",
           "TileBudgetBatchSampler", "size_order", "SurvivalDataModule", "inner_split"]


def load_bags(slides: pd.DataFrame, emb_dir, patients) -> tuple[dict[str, Bag], list[str]]:
    """Every bag in memory: read the embedding HDF5 of every slide (``<emb_dir>/<slide_id>.h5``)
    and group them by patient.  Memory grows with the cohort: training runs use
    :class:`~netsurv.training.bags.BagStore` (tiles read on demand); this stays as the simple
    reference for small cohorts and tests.  Slides without an embedding file are left out with
    a warning naming them; a patient with none of their slides left has no WSI modality."""
    from pathlib import Path

    import h5py

    emb_dir = Path(emb_dir)
    bags, missing = {}, []
    wanted = set(patients)
    for pid, grp in slides.groupby("patient_id", sort=False):
        if pid not in wanted:
            continue
        feats, coords, sl, ids, ps = [], [], [], [], []
        mpp = float("nan")
        for sid in grp["slide_id"].astype(str):
            h5 = emb_dir / f"{sid}.h5"
            if not h5.is_file():
                missing.append(sid)
                continue
            with h5py.File(h5, "r") as f:
                x = f["features"][:].astype(np.float32)
                if len(x) == 0:
                    missing.append(sid)
                    continue
                feats.append(x)
                coords.append(f["coords"][:].astype(np.int64))
                sl.append(np.full(len(x), len(ids), dtype=np.int64))
                ids.append(sid)
                ps.append(int(f.attrs.get("patch_size_level0", 0)))
                mpp = float(f.attrs.get("target_mpp", mpp))
        if feats:
            bags[pid] = Bag(np.concatenate(feats), np.concatenate(coords), np.concatenate(sl),
                            ids, ps, mpp)
    if missing:
        warnings.warn(f"{len(missing)} slide(s) have no embeddings in {emb_dir} and are left "
                      f"out: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
                      "(see failures.csv there)", UserWarning)
    return bags, missing


def inner_split(event, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (by event) fit / validation positions within a training split."""
    from sklearn.model_selection import StratifiedShuffleSplit

    event = np.asarray(event).astype(int)
    n_val = int(round(fraction * len(event)))
    if n_val < 2 or min(event.sum(), len(event) - event.sum()) < 2:
        raise ValueError(f"inner validation split: {len(event)} training patients with "
                         f"{int(event.sum())} events are too few for a {fraction:.0%} "
                         "validation split (need >= 2 patients, 2 events and 2 censored)")
    sss = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=int(seed))
    fit, val = next(sss.split(np.zeros(len(event)), event))
    return np.sort(fit), np.sort(val)


class TabularSteps:
    """Fitted feature steps for the tabular modalities, fitted on the FIT rows only.

    ``encoders``: {modality: unfitted step with fit(X, y) / transform(X) on DataFrames}
    (a ClinicalEncoder, or an ImagingBlock + top-k univariate Cox selection). Rows of a modality
    that is missing for a patient are zero-filled and flagged absent."""

    def __init__(self, make_steps):
        self.make_steps = make_steps  # callable(modality) -> object with fit/transform

    def fit(self, frames: dict[str, pd.DataFrame], patients, fit_idx, time, event):
        """Fit one step per modality on the fit patients that have that modality.

        Parameters
        ----------
        frames : dict of str to pandas.DataFrame
            Feature table per tabular modality, indexed by patient ID.
        patients : list of str
            Patient IDs, by position.
        fit_idx : array-like of int
            Positions in ``patients`` of the fit patients.
        time, event : numpy.ndarray
            Survival times and event indicators of all ``patients``, by position.

        Returns
        -------
        TabularSteps
            ``self``, with ``steps_``, ``columns_`` and ``dims_`` (output columns / size per
            modality) set.
        """
        self.steps_, self.dims_, self.columns_ = {}, {}, {}
        fit_ids = [patients[i] for i in fit_idx]
        for m, frame in frames.items():
            rows = [p for p in fit_ids if p in frame.index]
            pos = [patients.index(p) for p in rows]
            step = self.make_steps(m)
            Z = step.fit_transform(frame.loc[rows], (time[pos], event[pos]))
            self.steps_[m] = step
            self.columns_[m] = list(Z.columns)
            self.dims_[m] = Z.shape[1]
        return self

    def transform(self, frames, patients) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Transform every modality for ``patients`` with the fitted steps.

        Returns
        -------
        X : dict of str to numpy.ndarray
            float32 [len(patients), dims_[m]] per modality; zeros for patients without the
            modality, non-finite values replaced (:func:`numpy.nan_to_num`).
        present : dict of str to numpy.ndarray
            bool [len(patients)] per modality: whether the patient has it.
        """
        X, present = {}, {}
        for m, frame in frames.items():
            have = np.array([p in frame.index for p in patients])
            out = np.zeros((len(patients), self.dims_[m]), np.float32)
            if have.any():
                rows = [p for p, h in zip(patients, have) if h]
                Z = self.steps_[m].transform(frame.loc[rows]).to_numpy(np.float32)
                out[have] = np.nan_to_num(Z)
            X[m], present[m] = out, have
        return X, present


class PatientDataset(Dataset):
    """Patients at positions ``idx`` of ``patients``.

    ``bags``: a :class:`~netsurv.training.bags.BagStore` (tiles read from disk when an item is
    asked for, in DataLoader workers too) or a dict ``{patient_id: Bag}`` in memory; None
    without the WSI modality.  In training a bag larger than ``max_instances`` is subsampled,
    different tiles each epoch, and only the chosen rows are read; evaluation always uses the
    full bag."""

    def __init__(self, idx, patients, bags: BagStore | dict[str, Bag] | None,
                 tab: dict[str, np.ndarray], present: dict[str, np.ndarray], time, event, *,
                 targets=None, train: bool = False, max_instances: int | None = None,
                 seed: int = 0, feat_dim: int = 0, offset=None):
        self.idx = np.asarray(idx)
        # per-patient offset (a classical model's linear predictor, netsurv.training.offset)
        self.offset = None if offset is None else np.asarray(offset, np.float32)
        self.patients = patients
        self.bags = bags
        self.tab, self.present = tab, present
        self.time, self.event = np.asarray(time, np.float32), np.asarray(event, np.float32)
        self.targets = targets  # optional (bin index, event) for discrete-time losses
        self.train = train
        self.max_instances = int(max_instances) if max_instances else None
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self._worker_rng = None
        self.feat_dim = int(getattr(bags, "dim", 0) or feat_dim)

    def __len__(self):
        return len(self.idx)

    def _n_tiles(self, j: int) -> int:
        bag = None if self.bags is None else self.bags.get(self.patients[j])
        return 0 if bag is None else int(bag.n_tiles)

    def tile_counts(self) -> np.ndarray:
        """Tiles each item will carry (after training subsampling), in item order: the sizes a
        :class:`TileBudgetBatchSampler` packs by."""
        n = np.array([self._n_tiles(int(j)) for j in self.idx], np.int64)
        if self.train and self.max_instances:
            n = np.minimum(n, self.max_instances)
        return n

    def _rng(self) -> np.random.Generator:
        # In a DataLoader worker the dataset is a copy made when the workers start (each
        # epoch unless persistent): the parent's generator would replay the same subsamples.
        # torch gives every worker of every epoch its own seed (from the loader's generator).
        info = get_worker_info()
        if info is None:
            return self.rng
        if self._worker_rng is None or self._worker_rng[0] != info.seed:
            self._worker_rng = (info.seed, np.random.default_rng([info.seed, self.seed]))
        return self._worker_rng[1]

    def __getitem__(self, i):
        j = int(self.idx[i])
        item = {"pos": j, "time": self.time[j], "event": self.event[j],
                "present": {m: bool(p[j]) for m, p in self.present.items()}}
        for m, x in self.tab.items():
            item[m] = torch.from_numpy(x[j])
        if self.offset is not None:
            item["offset"] = torch.tensor(self.offset[j])
        if self.targets is not None:
            item["bin"], item["bin_event"] = int(self.targets[0][j]), float(self.targets[1][j])
        if self.bags is not None:
            bag = self.bags.get(self.patients[j])
            if bag is None:
                x = torch.zeros((0, self.feat_dim), dtype=torch.float32)
            else:
                n = bag.n_tiles
                if self.train and self.max_instances and n > self.max_instances:
                    rows = np.sort(self._rng().choice(n, self.max_instances, replace=False))
                    x = bag.read(rows)
                else:
                    x = bag.read()
            item[WSI] = x
            item["present"][WSI] = len(x) > 0
        return item


def collate_patients(items: list[dict]) -> dict:
    """Stack tabular vectors; pad bags to the longest in the batch with a validity mask."""
    out = {"pos": torch.tensor([it["pos"] for it in items]),
           "time": torch.tensor([it["time"] for it in items]),
           "event": torch.tensor([it["event"] for it in items]),
           "present": {m: torch.tensor([it["present"][m] for it in items])
                       for m in items[0]["present"]}}
    if "bin" in items[0]:
        out["bin"] = torch.tensor([it["bin"] for it in items])
        out["bin_event"] = torch.tensor([it["bin_event"] for it in items])
    for k in items[0]:
        if k in out or k in (WSI, "bin_event") or not torch.is_tensor(items[0][k]):
            continue
        out[k] = torch.stack([it[k] for it in items])
    if WSI in items[0]:
        n = max(1, max(len(it[WSI]) for it in items))
        d = items[0][WSI].shape[1]
        x = torch.zeros(len(items), n, d)
        mask = torch.zeros(len(items), n, dtype=torch.bool)
        for b, it in enumerate(items):
            k = len(it[WSI])
            x[b, :k] = it[WSI]
            mask[b, :k] = True
        out[WSI], out[WSI_MASK] = x, mask
    return out


class TileBudgetBatchSampler(BatchSampler):
    """Batches of patients whose padded bag tensor stays within ``budget`` tiles.

    ``TileBudgetBatchSampler(sampler, sizes, budget, drop_last=False, max_batch=None)``:
    ``sampler`` yields dataset positions (a ``SequentialSampler(ds)``, a list such as
    ``size_order(sizes)``, or the ``DistributedSampler`` Lightning injects under DDP: the
    argument is named ``sampler`` for that); ``sizes[i]`` = tiles of item ``i``
    (:meth:`PatientDataset.tile_counts`).  Consecutive items are grouped while
    ``len(batch) * max(tiles in batch) <= budget`` (a batch is padded to its longest bag), so a
    batch's features take at most ``budget x D x 4`` bytes; a patient larger than the budget
    forms a batch alone.  ``max_batch`` caps the patients per batch (tabular-only patients
    count as one tile).  Every item of the sampler is in exactly one batch, in sampler order
    (``drop_last`` must stay False; it is there for Lightning, which re-creates samplers).

    For evaluation (validation, test, prediction), where bags are whole: e.g.
    ``DataLoader(ds, batch_sampler=TileBudgetBatchSampler(size_order(ds.tile_counts()),
    ds.tile_counts(), budget=65536), collate_fn=collate_patients)``.
    """

    def __init__(self, sampler, sizes, budget: int, drop_last: bool = False,
                 max_batch: int | None = None):
        budget = int(budget)
        if budget < 1:
            raise ValueError(f"tile budget must be >= 1, got {budget}")
        if max_batch is not None and int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        if drop_last:  # the argument exists for Lightning, which re-creates batch samplers
            raise ValueError("TileBudgetBatchSampler is for evaluation: every patient is in a "
                             "batch (drop_last=True is not supported)")
        super().__init__(sampler, batch_size=1, drop_last=False)
        self.sizes = np.maximum(np.asarray(sizes, np.int64), 1)
        self.budget = budget
        self.max_batch = None if max_batch is None else int(max_batch)

    def __iter__(self):
        batch, longest = [], 0
        for i in self.sampler:
            s = int(self.sizes[int(i)])
            wide = max(longest, s)
            full = self.max_batch is not None and len(batch) >= self.max_batch
            if batch and (full or (len(batch) + 1) * wide > self.budget):
                yield batch
                batch, wide = [], s
            batch.append(int(i))
            longest = wide
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self.__iter__())


def size_order(sizes) -> list[int]:
    """Positions sorted by decreasing size (stable): consecutive patients of similar size pad
    less, and the largest batch comes first (an out-of-memory shows at once)."""
    return [int(i) for i in np.argsort(-np.asarray(sizes, np.int64), kind="stable")]


class SurvivalDataModule(L.LightningDataModule):
    """Fit / validation / test / all-patients datasets of one evaluation split.

    ``batch_size`` is the GLOBAL number of patients per optimiser step: under DDP every rank
    takes its part of the same global batches (:class:`netsurv.training.ddp.GlobalBatchSampler`),
    so the Cox risk sets and the batches do not depend on the number of processes.  Evaluation
    sets are sharded ``rank::world_size`` without padding (every patient counted once).
    ``eval_batch_sampler``: optional ``callable(dataset, positions) -> iterable of lists of
    dataset positions`` that cuts a rank's evaluation patients into batches (e.g. bounded by a
    tile budget); default: ``eval_batch_size`` patients per batch.

    The loaders carry their own sampling, so the Trainer must not replace it
    (``use_distributed_sampler=False``; the runner sets it).
    """

    def __init__(self, datasets: dict, batch_size: int = 32, eval_batch_size: int = 64,
                 seed: int = 0, eval_batch_sampler=None, num_workers: int = 0):
        super().__init__()
        self.datasets = datasets
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.eval_batch_sampler = eval_batch_sampler
        self.num_workers = int(num_workers)

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        from netsurv.training.ddp import rank_world

        return rank_world()

    def train_dataloader(self):
        """Lightning hook: the fit patients, in this rank's share of each global batch."""
        from netsurv.training.ddp import GlobalBatchSampler

        rank, world = self._rank_world()
        sampler = GlobalBatchSampler(len(self.datasets["fit"]), self.batch_size, rank=rank,
                                     world_size=world, seed=self.seed)
        return DataLoader(self.datasets["fit"], batch_sampler=sampler,
                          collate_fn=collate_patients, num_workers=self.num_workers)

    def eval_dataloader(self, name: str, rank: int | None = None, world: int | None = None):
        """This rank's share of the evaluation set ``name`` (fit / val / test / all)."""
        from netsurv.training.ddp import eval_batches, eval_shard

        if rank is None or world is None:
            rank, world = self._rank_world()
        ds = self.datasets[name]
        shard = eval_shard(len(ds), rank, world)
        if self.eval_batch_sampler is not None:
            batches = list(self.eval_batch_sampler(ds, shard))
        else:
            batches = eval_batches(shard, self.eval_batch_size)
        return DataLoader(ds, batch_sampler=batches, collate_fn=collate_patients,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        """Lightning hook: this rank's share of the inner-validation patients."""
        return self.eval_dataloader("val")

    def test_dataloader(self):
        """Lightning hook: this rank's share of the test patients."""
        return self.eval_dataloader("test")

    def predict_dataloader(self):
        """Lightning hook: this rank's share of all patients."""
        return self.eval_dataloader("all")
