"""CT radiomics throughput and ComBat's effect on the scanner batch effect, on the demo cohort.

    python benchmarks/radiomics.py [--cases 20] [--params original default]

For each parameter set: serial direct pyradiomics (``RadiomicsFeatureExtractor.execute`` on the
files, SimpleITK with its default threads), netsurv with n_jobs=1 (overhead = hashing, geometry
checks, caching) and with n_jobs=2 (process pool, SimpleITK single-threaded per worker), each on
an empty cache. Then, on all demo cases with the `original` set: fraction of features with a
significant scanner effect (Kruskal-Wallis p < 0.05) before and after ComBat.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# pyradiomics package ("radiomics"); drop that entry before anything imports pyradiomics.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import logging
import shutil
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy.stats import kruskal

from netsurv.features.harmonize import ComBat
from netsurv.radiology.radiomics import extract_cohort, make_extractor
from netsurv.tasks.cohort import resolve_cohort

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def params_for(name: str) -> dict:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="extract_radiomics", overrides=[f"radiology={name}"])
    return cfg, OmegaConf.to_container(cfg.radiology, resolve=True)


def direct(ct: pd.DataFrame, params: dict) -> tuple[float, int]:
    ext = make_extractor(params)
    t0 = time.perf_counter()
    n = 0
    for row in ct.itertuples():
        res = ext.execute(row.image, row.mask, label=1)
        n = sum(1 for k in res if not k.startswith("diagnostics_"))
    return time.perf_counter() - t0, n


def netsurv_time(ct, params, n_jobs) -> float:
    out = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        table, fail = extract_cohort(ct, params, out, n_jobs=n_jobs, progress=False)
        dt = time.perf_counter() - t0
        assert len(fail) == 0, fail
        return dt
    finally:
        shutil.rmtree(out)


def scanner_effect(table: pd.DataFrame, feats) -> float:
    sig = 0
    for f in feats:
        groups = [g[f].to_numpy() for _, g in table.groupby("scanner")]
        if np.ptp(table[f]) == 0:
            continue
        sig += kruskal(*groups).pvalue < 0.05
    return sig / len(feats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--params", nargs="+", default=["original", "default"])
    args = ap.parse_args()
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    cfg, _ = params_for("original")
    cohort = resolve_cohort(cfg.data)
    ct = cohort.ct.head(args.cases)
    print(f"{len(ct)} demo CT cases, 2 cores\n")
    print(f"{'params':9} {'features':>8} {'direct serial':>14} {'netsurv n_jobs=1':>17} "
          f"{'overhead':>9} {'netsurv n_jobs=2':>17} {'speed-up':>9}")
    for name in args.params:
        _, params = params_for(name)
        direct(ct.head(1), params)  # warm-up: imports, wavelet/LoG code paths
        t_dir, n_feat = direct(ct, params)
        t1 = netsurv_time(ct, params, 1)
        t2 = netsurv_time(ct, params, 2)
        print(f"{name:9} {n_feat:8d} {t_dir:12.1f} s {t1:15.1f} s {100 * (t1 / t_dir - 1):+8.1f}% "
              f"{t2:15.1f} s {t_dir / t2:8.2f}x")
        print(f"{'':9} {'':8} {t_dir / len(ct):10.2f} s/case {t1 / len(ct):11.2f} s/case "
              f"{'':9} {t2 / len(ct):11.2f} s/case")

    # ComBat on all demo cases (original features), fitted on all rows here: a descriptive check
    # of the batch effect, not a model evaluation
    _, params = params_for("original")
    out = Path(tempfile.mkdtemp())
    table, _ = extract_cohort(cohort.ct, params, out, n_jobs=2, progress=False)
    shutil.rmtree(out)
    feats = [c for c in table.columns if c.startswith("original_")]
    X = table.set_index("patient_id")[feats]
    keep = [c for c in feats if X[c].std() > 0]
    meta = table.set_index("patient_id")[["scanner"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Z = ComBat(batch_col="scanner").fit(X[keep], meta=meta).transform(X[keep], meta=meta)
    before = scanner_effect(table, keep)
    after = scanner_effect(Z.join(meta).reset_index(), keep)
    print(f"\nscanner effect (Kruskal-Wallis p < 0.05) over {len(keep)} original features, "
          f"{len(table)} cases, {table.scanner.nunique()} scanners: "
          f"{100 * before:.0f}% before ComBat, {100 * after:.0f}% after")


if __name__ == "__main__":
    main()
