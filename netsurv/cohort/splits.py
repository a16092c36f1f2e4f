"""Patient-level evaluation splits: stratified by event, recorded by name."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedShuffleSplit


@dataclass(frozen=True)
class Split:
    """One evaluation split: a name and the train / test patients as integer positions.

    Positions index the cohort's patient order (:attr:`netsurv.cohort.schema.Cohort.patients`).
    """

    name: str
    train: np.ndarray  # integer positions into the cohort's patient order
    test: np.ndarray


class SplitError(ValueError):
    """The requested splits cannot be made or fitted with this cohort's events."""


def holdout_splits(event, *, seeds=(0, 1, 2, 3, 4), test_size: float = 0.3) -> list[Split]:
    """The founding study's protocol: one stratified train/test split per seed."""
    event = np.asarray(event).astype(int)
    out = []
    for seed in seeds:
        sss = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=int(seed))
        tr, te = next(sss.split(np.zeros(len(event)), event))
        out.append(Split(f"seed{seed}", np.sort(tr), np.sort(te)))
    return out


def kfold_splits(event, *, n_splits: int = 5, n_repeats: int = 1, seed: int = 0) -> list[Split]:
    """Repeated stratified k-fold; split names are ``r{repeat}f{fold}``."""
    event = np.asarray(event).astype(int)
    rkf = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=int(seed))
    out = []
    for i, (tr, te) in enumerate(rkf.split(np.zeros(len(event)), event)):
        out.append(Split(f"r{i // n_splits}f{i % n_splits}", np.sort(tr), np.sort(te)))
    return out


def make_splits(protocol: dict, event) -> list[Split]:
    """Build the splits named by an ``evaluation`` config and check they can be fitted."""
    event = np.asarray(event).astype(int)
    kind = protocol.get("name")
    n_ev = int(event.sum())
    min_per_class = int(min(n_ev, len(event) - n_ev))
    if kind == "holdout":
        if min_per_class < 2:
            raise SplitError(
                f"holdout needs at least 2 events and 2 censored patients to stratify; found "
                f"{n_ev} events in {len(event)} patients. Use another endpoint or cohort."
            )
        splits = holdout_splits(event, seeds=tuple(protocol.get("seeds", range(5))),
                                test_size=float(protocol.get("test_size", 0.3)))
    elif kind == "kfold":
        k = int(protocol.get("n_splits", 5))
        if min_per_class < k:
            raise SplitError(
                f"kfold with n_splits={k} needs at least {k} events and {k} censored patients; "
                f"found {n_ev} events in {len(event)} patients. Lower evaluation.n_splits."
            )
        splits = kfold_splits(event, n_splits=k, n_repeats=int(protocol.get("n_repeats", 1)),
                              seed=int(protocol.get("seed", 0)))
    else:
        raise SplitError(f"evaluation.name={kind!r} unknown; use 'holdout', 'kfold' or 'external' "
                         "(evaluation=external, which needs evaluation.test_root)")
    for s in splits:
        if event[s.train].sum() == 0:
            raise SplitError(
                f"split {s.name}: the training set has no events, so no survival model can be "
                "fitted; use evaluation=kfold or fewer splits."
            )
    return splits
