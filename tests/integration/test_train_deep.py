"""Deep training end to end on a tiny demo cohort: every experiment config, missing modalities,
multirun sweeps, the submitit launcher and the optuna sweeper."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from netsurv.demo.cohort import make_demo_cohort
from netsurv.tasks.train import run

REPO = Path(__file__).resolve().parents[2]
CONFIGS = str(REPO / "configs")
EXPERIMENTS = sorted(str(p.relative_to(Path(CONFIGS) / "experiment").with_suffix(""))
                     for p in (Path(CONFIGS) / "experiment").rglob("*.yaml"))
TINY = dict(n_patients=24, seed=11, missing_ct=0.15, missing_wsi=0.15, two_slides=0.2,
            artefact_rate=0.0, fine_mpp_rate=0.2)
FAST = ["encoder=test_tiny", "target=pfs", "evaluation.seeds=[0]", "optim.max_epochs=2", "optim.min_epochs=1",
        "optim.patience=0", "embed.progress=false", "tile.progress=false", "tile.qc=false",
        "inner_cv=2", "selection.k=[3]",
        "data.clinical.categorical=[sex,smoking,histology,stage]", "optim.max_instances=16", "report=false",
        "morphology.max_tiles=4", "tiling.target_mpp=1.0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep") / "demo"
    make_demo_cohort(root, verbose=False, n_jobs=2, **TINY)
    return root


def _cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _base(root):
    return ["data=cohort", f"data.root={root}", *FAST]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_one_fast_step(tiny, tmp_path, experiment):
    out = tmp_path / "run"
    extra = ["model.grid.l1_ratio=[0.9]"] if experiment.startswith("seed/") else []
    cfg = _cfg([f"experiment={experiment}", *_base(tiny), *extra, f"+output_dir={out}"])
    metrics = run(cfg)
    assert metrics["experiment"] == experiment
    pred = pd.read_csv(out / "predictions.csv")
    assert np.isfinite(pred.risk).all() and set(pred.role) >= {"train", "test"}
    assert 0.0 <= metrics["cindex"]["mean"] <= 1.0
    if "wsi" in cfg.modalities:
        assert metrics["embeddings"]["encoder"] == "test_tiny"
    if cfg.get("net") is not None:  # the classical offset: the tabular modalities, else the probe
        want = [m for m in cfg.modalities if m != "wsi"] or ["embeddings"]
        got = [(t.get("offset") or {}).get("modalities") for t in metrics["training"].values()]
        # with CT, the 13 complete cases of this tiny cohort are too few for the offset's
        # inner search (a warning; the clinical-only offset, or none without clinical)
        assert got == [want] or ("radiomics" in want and got == [
            ["clinical"] if "clinical" in want else None])
        assert "val_cindex" in metrics  # what hparams_search=optuna optimises (inner folds too)
        if "wsi" in cfg.modalities and want != ["embeddings"] and got == [want]:
            for t in metrics["training"].values():  # the slide probes were stacked
                pr = t["offset"]["probes"]
                assert pr["probe_p"] is None and set(pr["used"]) <= {"embeddings", "pathomics"}
                # both probes were fitted (pathomics extracted from the slides for them)
                assert set(pr["models"]) == {"embeddings", "pathomics"}
                assert pr["lr_p"] is None or 0.0 <= pr["lr_p"] <= 1.0


def test_missing_modalities_train_and_predict(tiny, tmp_path):
    out = tmp_path / "mm"
    cfg = _cfg(["experiment=multimodal", *_base(tiny), f"+output_dir={out}", "fusion=gated",
                "fusion.modality_dropout=0.3", "loss=nll"])
    metrics = run(cfg)
    from netsurv.cohort import load_cohort

    c = load_cohort(tiny)
    no_wsi = set(c.patients) - set(c.slides.patient_id)
    no_ct = set(c.patients) - set(c.ct.patient_id)
    assert no_wsi and no_ct
    pred = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert metrics["n_patients"] == len(c.patients) == pred.patient_id.nunique()
    assert np.isfinite(pred.risk).all()
    # patients lacking a modality get risks that differ (they are not a constant placeholder)
    assert pred.set_index("patient_id").risk.loc[list(no_wsi | no_ct)].nunique() > 1
    assert metrics["loss"] == "nll" and "ibs" in metrics
    # attention of test patients, one weight per tile, summing to 1
    import h5py

    with h5py.File(out / "attention.h5", "r") as f:
        groups = [f[f"seed0/{p}"] for p in f["seed0"]]
        assert groups
        for g in groups:
            assert g["attention"].shape[0] == g["coords"].shape[0] == g["slide"].shape[0]
            assert g["attention"][:].sum() == pytest.approx(1.0, abs=1e-4)
            assert g.attrs["role"] == "test"


def _cli(args, tmp_path, timeout=600):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_two_job_sweep_and_submitit_local(tiny, tmp_path):
    base = ["experiment=clinical", *_base(tiny)]
    sweep = tmp_path / "sweep"
    _cli(["-m", *base, "optim.lr=1e-3,3e-4", f"hydra.sweep.dir={sweep}"], tmp_path)
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2
    assert (sweep / "results.csv").is_file()
    lrs = {json.loads((j / "metrics.json").read_text())["experiment"] for j in jobs}
    assert lrs == {"clinical"}
    sub = tmp_path / "submitit"
    _cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *base,
          "optim.lr=1e-3,3e-4", f"hydra.sweep.dir={sub}"], tmp_path)
    assert len(list(sub.glob("*/metrics.json"))) == 2
    assert list((sub / ".submitit").glob("*/*_log.out"))   # ran through submitit's executor


@pytest.mark.slow
def test_optuna_sweeper_runs_two_trials_on_validation_cindex(tiny, tmp_path):
    sweep = tmp_path / "optuna"
    _cli(["-m", "hparams_search=optuna", "experiment=clinical", *_base(tiny),
          "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
          f"hydra.sweep.dir={sweep}"], tmp_path)
    best = (sweep / "optimization_results.yaml").read_text()
    vals = [json.loads(p.read_text())["val_cindex"]["mean"] for p in sweep.glob("*/metrics.json")]
    assert len(vals) == 2
    assert f"best_value: {max(vals)}" in best


def test_probe_tables_are_built_from_the_slides_or_skipped_with_a_reason(tiny, tmp_path):
    """The offset's pathomics probe reads a table the run does not model: it is extracted from
    the slides; a cohort whose slides cannot be read loses that probe with a warning naming
    it, not the run."""
    import warnings

    from netsurv.cohort import load_cohort
    from netsurv.evaluation.inputs import probe_frames

    cfg = _cfg(["experiment=clinical_pathomics", *_base(tiny)])
    c = load_cohort(tiny)
    got = probe_frames(c, cfg, ["embeddings", "pathomics"])
    assert list(got) == ["pathomics"]          # embeddings come from the run's bags
    tab = got["pathomics"]
    assert set(tab.index) <= set(c.slides.patient_id) and len(tab) >= len(c.patients) // 2
    assert tab.shape[1] > 10 and np.isfinite(tab.to_numpy(float)).any(axis=0).all()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "clinical.csv").write_bytes((tiny / "clinical.csv").read_bytes())
    s = pd.read_csv(tiny / "slides.csv")
    s["path"] = [f"missing/{p}" for p in s.path]
    s.to_csv(bad / "slides.csv", index=False)
    cfg_bad = _cfg(["experiment=clinical_pathomics", "data=cohort", f"data.root={bad}", *FAST])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert probe_frames(load_cohort(bad), cfg_bad, ["pathomics"]) == {}
    assert any("offset probe 'pathomics' skipped" in str(x.message) and "slides" in str(x.message)
               for x in w), [str(x.message) for x in w]


def test_complete_cases_gives_the_classical_counterparts_patients_and_splits(tiny):
    """complete_cases=true: a deep multimodal run models exactly the patients (hence the
    splits) of the classical clinical+radiomics run; by default it keeps those without CT."""
    from netsurv.evaluation.runner import prepare

    deep = prepare(_cfg(["experiment=multimodal", *_base(tiny), "complete_cases=true"]))
    classical = prepare(_cfg(["experiment=seed/clinical_radiomics", *_base(tiny)]))
    every = prepare(_cfg(["experiment=multimodal", *_base(tiny)]))
    assert deep.patients == classical.patients
    assert np.array_equal(deep.event, classical.event) and np.array_equal(deep.time, classical.time)
    assert set(deep.patients) < set(every.patients)   # the tiny cohort has patients without CT
    assert set(deep.patients) == set(deep.frames["radiomics"].index)
