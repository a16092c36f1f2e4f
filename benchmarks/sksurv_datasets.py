"""netsurv's classical pipeline vs scikit-survival's own CoxnetSurvivalAnalysis, on the same
splits of scikit-survival's bundled real datasets (GBSG2, veterans lung cancer, GSE7390).

    python benchmarks/sksurv_datasets.py [--seeds 5]

Ours: the founding study's clinical-only model (clinical encoding + CoxNet) and, on GSE7390,
`seed/clinical_radiomics` with the 76 genes as the feature table (correlation filter, top-k
univariate Cox). The inner 3-fold grid on each training split chooses k, l1_ratio and CoxNet's alpha
(on the penalty path of the training split) by pooled out-of-fold C-index. Reference: sksurv's
user-guide recipe — one-hot encoding, standardisation, CoxnetSurvivalAnalysis(l1_ratio=0.9) on all
columns with alpha chosen by GridSearchCV (3-fold KFold, mean of the fold C-indices) over its own
100-penalty path (alpha_min_ratio=0.01) — fitted on each of our training splits and scored on the
test split with the same Harrell C-index.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.datasets import load_breast_cancer, load_gbsg2, load_veterans_lung_cancer
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.preprocessing import OneHotEncoder
from sksurv.util import Surv

from netsurv.survival.metrics import harrell_cindex
from netsurv.tasks.train import run

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
# the founding study's clinical-only CoxNet (`clinical` became the deep tabular baseline)
CLINICAL = "seed/clinical" if (Path(CONFIGS) / "experiment/seed/clinical.yaml").exists() else "clinical"


def write_cohort(root: Path, X: pd.DataFrame, y, clinical_cols, gene_cols=()):
    ev_name, t_name = y.dtype.names
    ids = [f"P{i:04d}" for i in range(len(X))]
    clin = X[clinical_cols].copy()
    clin.insert(0, "patient_id", ids)
    t, e = y[t_name].astype(float), y[ev_name].astype(int)
    # one endpoint in these data sets: used for both OS and PFS columns of the contract
    clin["os_time"], clin["os_event"], clin["pfs_time"], clin["pfs_event"] = t, e, t, e
    root.mkdir(parents=True)
    clin.to_csv(root / "clinical.csv", index=False)
    if gene_cols:
        (root / "features").mkdir()
        g = X[list(gene_cols)].copy()
        g.insert(0, "patient_id", ids)
        g.to_csv(root / "features" / "genes.csv", index=False)
    return ids, t, e


def sksurv_reference(X: pd.DataFrame, t, e, train, test) -> float:
    Xe = OneHotEncoder().fit(X.iloc[train]).transform(X)
    y = Surv.from_arrays(e.astype(bool), t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FitFailedWarning, UserWarning, RuntimeWarning))
        warnings.simplefilter("ignore", category=Warning)
        path = make_pipeline(StandardScaler(), CoxnetSurvivalAnalysis(
            l1_ratio=0.9, alpha_min_ratio=0.01)).fit(Xe.iloc[train], y[train])
        alphas = path.named_steps["coxnetsurvivalanalysis"].alphas_
        gcv = GridSearchCV(
            make_pipeline(StandardScaler(), CoxnetSurvivalAnalysis(l1_ratio=0.9)),
            {"coxnetsurvivalanalysis__alphas": [[a] for a in alphas]},
            cv=KFold(3, shuffle=True, random_state=0), error_score=0.5, n_jobs=1,
        ).fit(Xe.iloc[train], y[train])
    risk = gcv.predict(Xe.iloc[test])
    return harrell_cindex(t[test], e[test], risk)


def ours(root: Path, experiment: str, numeric, categorical, seeds, modalities=None) -> pd.DataFrame:
    over = [f"experiment={experiment}", "report=false", "data=cohort", f"data.root={root}",
            f"data.clinical.numeric=[{','.join(numeric)}]",
            f"data.clinical.categorical=[{','.join(categorical)}]",
            f"evaluation.seeds=[{','.join(map(str, range(seeds)))}]",
            f"+output_dir={root / ('run_' + experiment.replace('/', '_'))}"]
    if modalities:
        over.append(f"modalities=[{','.join(modalities)}]")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=over)
    m = run(cfg)
    pred = pd.read_csv(Path(cfg.output_dir) / "predictions.csv", dtype={"patient_id": str})
    return m, pred


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    datasets = {
        "GBSG2": (load_gbsg2, ["age", "estrec", "pnodes", "progrec", "tsize"],
                  ["horTh", "menostat", "tgrade"], ()),
        "veterans": (load_veterans_lung_cancer, ["Age_in_years", "Karnofsky_score",
                                                  "Months_from_Diagnosis"],
                     ["Celltype", "Prior_therapy", "Treatment"], ()),
        "GSE7390": (load_breast_cancer, ["age", "size"], ["er", "grade"], "genes"),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (loader, num, cat, genes) in datasets.items():
            X, y = loader()
            gene_cols = [c for c in X.columns if c not in num + cat] if genes else []
            ids, t, e = write_cohort(Path(tmp) / name, X, y, num + cat, gene_cols)
            runs = [("clinical", CLINICAL, num + cat, None)]
            if gene_cols:
                runs.append(("seed/clinical_radiomics (genes)", "seed/clinical_radiomics",
                             num + cat + gene_cols, ["clinical", "genes"]))
            for label, exp, cols, mods in runs:
                m, pred = ours(Path(tmp) / name, exp, num, cat, args.seeds, mods)
                ref = []
                for _split, g in pred.groupby("split", sort=False):
                    pos = {p: i for i, p in enumerate(ids)}
                    tr = np.array([pos[p] for p in g[g.role == "train"].patient_id])
                    te = np.array([pos[p] for p in g[g.role == "test"].patient_id])
                    ref.append(sksurv_reference(X[cols], t, e, tr, te))
                rows.append({"dataset": name, "pipeline": label, "n": len(ids),
                             "events": int(e.sum()), "netsurv": m["cindex"]["mean"],
                             "sksurv_coxnet": float(np.mean(ref))})
    df = pd.DataFrame(rows)
    df["difference"] = df.netsurv - df.sksurv_coxnet
    print()
    print(f"Harrell C-index, mean over {args.seeds} stratified 70/30 splits (same splits for both)")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    worst = df.difference.min()
    print(f"\nworst difference (netsurv - sksurv): {worst:+.3f}  "
          f"({'OK' if worst >= -0.01 else 'WORSE by more than 0.01'})")
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
