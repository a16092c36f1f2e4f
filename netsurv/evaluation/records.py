"""What the split-fitters share with the runner, and finished-split records for resuming.

A requeued cluster job (submitit/SLURM requeue after a timeout or preemption) reruns the same
command in the same run directory.  Every finished split is committed to
``<run>/splits/<split>.json`` (metrics, predictions, selected features, training info) after
its model files; the JSON is written to a temporary name and renamed, so it exists only
complete.  A rerun reuses the records whose key matches: the hash of the resolved config
(outputs-only keys left out), of the patients and of the split's train/test patients.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

# keys that change what is written or shown, never what is fitted
NOT_HASHED = {("report",), ("output_dir",), ("optimized_metric",), ("logger",),
              ("trainer", "enable_progress_bar"), ("trainer", "enable_model_summary"),
              ("embed", "progress"), ("tile", "progress")}


@dataclass
class RunData:
    """Everything a split-fitter needs, identical on every rank."""

    cfg: DictConfig
    cohort: Any
    patients: list[str]                 # the modelled patients (positions index everything)
    frames: dict[str, pd.DataFrame]     # tabular modalities, indexed by patient_id
    time: np.ndarray
    event: np.ndarray
    truth: np.ndarray | None            # demo cohorts: the generating risk
    meta: pd.DataFrame | None           # acquisition columns (ComBat batches)
    bags: Any = None                    # tile-embedding bags (deep models with modality wsi)
    bags_info: dict | None = None       # the embedding stage's summary
    aux: dict = field(default_factory=dict)  # derived tables built once per run (embedding means)


@dataclass
class SplitFit:
    """A fitted split on the process that holds its results (rank 0 for deep models)."""

    risk: np.ndarray                    # one risk per patient of RunData.patients
    role: np.ndarray                    # "train" / "val" / "test"
    surv: Callable | None               # times -> S(t) of the split's test patients
    selected: list[str]
    model: Any                          # what models/<split>.* holds
    info: dict = field(default_factory=dict)                      # deep: training summary
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # inner_search, hazard_ratios
    attention: list = field(default_factory=list)                 # test patients' attention
    # the classical counterpart fitted on the same training patients (deep runs):
    # {"name": str, "risk": np.ndarray}, one risk per patient of RunData.patients like ``risk``
    baseline: dict | None = None


def _drop(tree: dict, path: tuple) -> None:
    node = tree
    for k in path[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def config_hash(cfg: DictConfig) -> str:
    """Hash of what in the resolved config can change a fit (16 hex characters).

    Keys that only change what is written or shown (``NOT_HASHED``: report, output dir,
    logger, progress bars, ...) are left out, so changing them does not refit finished splits.
    """
    tree = OmegaConf.to_container(cfg, resolve=True)
    for path in NOT_HASHED:
        _drop(tree, path)
    blob = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_key(cfg_hash: str, patients, split) -> str:
    """Identity of one split's fit: config, modelled patients, train/test positions."""
    h = hashlib.sha256(cfg_hash.encode())
    h.update("\n".join(map(str, patients)).encode())
    h.update(np.asarray(split.train, np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(split.test, np.int64).tobytes())
    return h.hexdigest()[:16]


class SplitRecords:
    """``<run>/splits/<split>.json``: one committed record per finished split."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "splits"

    def path(self, name: str) -> Path:
        """The record file of split ``name``."""
        return self.dir / f"{name}.json"

    def finished(self, keys: dict[str, str]) -> dict[str, dict]:
        """Records of the splits in ``keys`` ({name: split key}) whose key matches."""
        out = {}
        for name, key in keys.items():
            p = self.path(name)
            if not p.is_file():
                continue
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # unreadable: refit
            if rec.get("key") == key:
                out[name] = rec
        return out

    def save(self, record: dict) -> Path:
        """Write ``record`` (its ``split`` key names the file) atomically and return its path.

        The record goes to a temporary file first and replaces the split's file in one step, so
        a reader never sees a half-written record.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(record["split"])
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=_json_default), encoding="utf-8")
        os.replace(tmp, p)
        return p


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
