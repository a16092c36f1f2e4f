"""Patient-level data for deep survival models: bags of tile embeddings + tabular vectors.

One item = one patient: all tiles of all their slides (slide index kept for heatmaps), the
clinical / radiomics / other feature-table vectors after the fitted feature steps, time, event,
and a ``present`` flag per modality (missing modalities are zero-filled and flagged, the fusion
layer decides what to do with them). Batches hold several patients (bags padded to the longest,
with a mask) so that the Cox partial likelihood compares patients within a batch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["Bag", "load_bags", "TabularSteps", "PatientDataset", "collate_patients",
           "SurvivalDataModule", "inner_split"]


@dataclass
class Bag:
    """All tiles of one patient. ``slide[i]`` indexes ``slide_ids`` for tile i."""

    features: np.ndarray                   # float32 [N, D]
    coords: np.ndarray                     # int64 [N, 2] level-0 top-left (x, y)
    slide: np.ndarray                      # int64 [N]
    slide_ids: list[str] = field(default_factory=list)
    patch_size_level0: list[int] = field(default_factory=list)
    read_mpp: float = float("nan")


def load_bags(slides: pd.DataFrame, emb_dir, patients) -> tuple[dict[str, Bag], list[str]]:
    """Read the embedding HDF5 of every slide (``<emb_dir>/<slide_id>.h5``) and group them by
    patient. Slides without an embedding file (failed tiling/embedding) are left out with a
    warning naming them; a patient with none of their slides left has no WSI modality."""
    import h5py
    from pathlib import Path

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
    """Patients at positions ``idx``. In training a bag larger than ``max_instances`` is
    subsampled (different tiles each epoch); evaluation always uses the full bag."""

    def __init__(self, idx, patients, bags: dict[str, Bag] | None, tab: dict[str, np.ndarray],
                 present: dict[str, np.ndarray], time, event, *, targets=None,
                 train: bool = False, max_instances: int | None = None, seed: int = 0,
                 feat_dim: int = 0):
        self.idx = np.asarray(idx)
        self.patients = patients
        self.bags = bags
        self.tab, self.present = tab, present
        self.time, self.event = np.asarray(time, np.float32), np.asarray(event, np.float32)
        self.targets = targets  # optional (bin index, event) for discrete-time losses
        self.train = train
        self.max_instances = max_instances
        self.rng = np.random.default_rng(seed)
        self.feat_dim = feat_dim

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        j = int(self.idx[i])
        item = {"pos": j, "time": self.time[j], "event": self.event[j],
                "present": {m: bool(p[j]) for m, p in self.present.items()}}
        for m, x in self.tab.items():
            item[m] = torch.from_numpy(x[j])
        if self.targets is not None:
            item["bin"], item["bin_event"] = int(self.targets[0][j]), float(self.targets[1][j])
        if self.bags is not None:
            bag = self.bags.get(self.patients[j])
            if bag is None:
                x = np.zeros((0, self.feat_dim), np.float32)
            else:
                x = bag.features
                if self.train and self.max_instances and len(x) > self.max_instances:
                    x = x[np.sort(self.rng.choice(len(x), self.max_instances, replace=False))]
            item["wsi"] = torch.from_numpy(x)
            item["present"]["wsi"] = len(x) > 0
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
        if k in out or k in ("wsi", "bin_event") or not torch.is_tensor(items[0][k]):
            continue
        out[k] = torch.stack([it[k] for it in items])
    if "wsi" in items[0]:
        n = max(1, max(len(it["wsi"]) for it in items))
        d = items[0]["wsi"].shape[1]
        x = torch.zeros(len(items), n, d)
        mask = torch.zeros(len(items), n, dtype=torch.bool)
        for b, it in enumerate(items):
            k = len(it["wsi"])
            x[b, :k] = it["wsi"]
            mask[b, :k] = True
        out["wsi"], out["wsi_mask"] = x, mask
    return out


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
        return self.eval_dataloader("val")

    def test_dataloader(self):
        return self.eval_dataloader("test")

    def predict_dataloader(self):
        return self.eval_dataloader("all")
