"""The training entry point under ``torchrun --nproc_per_node=2`` (real gloo processes on CPU):
the same results as one process, and only rank 0 writes run outputs.

Each rank runs inside an audit wrapper that records every file it opens for writing (Python's
audit hooks, plus h5py and torch.save, which open files in C), so "rank 1 wrote nothing into
the run directory" is checked, not assumed.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from netsurv.demo.cohort import CLINICAL_COLUMNS, make_demo_cohort, simulate_patients
from netsurv.tasks.train import run

REPO = Path(__file__).resolve().parents[2]
CONFIGS = str(REPO / "configs")
TORCHRUN = Path(sys.executable).with_name("torchrun")
# until configs/trainer/ddp.yaml runs on CPU: the Lightning keys of a 2-process CPU DDP trainer
DDP2 = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]

AUDIT = textwrap.dedent("""
    import atexit, json, os, runpy, sys
    watch = os.path.realpath(os.environ["AUDIT_WATCH"])
    rank = os.environ.get("RANK", "0")
    writes = []

    def note(path, how):
        try:
            p = os.path.realpath(os.fsdecode(path))
        except TypeError:
            return
        if p.startswith(watch + os.sep):
            writes.append([os.path.relpath(p, watch), how])

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            w = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if w:
                note(path, "open")
        elif event in ("os.rename", "os.replace"):
            note(args[1], event)
        elif event in ("os.remove", "os.mkdir", "shutil.rmtree"):
            note(args[0], event)
    sys.addaudithook(hook)

    import h5py, torch
    _h5init, _save = h5py.File.__init__, torch.save
    def h5init(self, name, mode="r", *a, **k):
        if mode != "r" and isinstance(name, (str, os.PathLike)):
            note(name, "h5py")
        return _h5init(self, name, mode, *a, **k)
    def save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            note(f, "torch.save")
        return _save(obj, f, *a, **k)
    h5py.File.__init__, torch.save = h5init, save

    @atexit.register
    def dump():
        with open(os.path.join(os.environ["AUDIT_OUT"], f"rank{rank}.json"), "w") as f:
            json.dump(writes, f)

    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")


def _cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(args, tmp_path: Path, run_dir: Path, timeout=600):
    """``torchrun --nproc_per_node=2 scripts/train.py <args> +output_dir=<run_dir>`` with every
    rank audited; returns {rank: [(relative path, how), ...]} of writes under run_dir."""
    audit = tmp_path / "audit"
    audit.mkdir()
    wrapper = tmp_path / "audited.py"
    wrapper.write_text(AUDIT)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": "0", "AUDIT_WATCH": str(run_dir),
           "AUDIT_OUT": str(audit), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={_free_port()}", str(wrapper),
           str(REPO / "scripts" / "train.py"), *args, f"+output_dir={run_dir}"]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return {r: [tuple(w) for w in json.loads((audit / f"rank{r}.json").read_text())]
            for r in (0, 1)}


def _written(writes) -> set[str]:
    return {p for p, _ in writes}


@pytest.fixture
def clinical_cohort(tmp_path):
    df = simulate_patients(60, seed=3)
    root = tmp_path / "c"
    root.mkdir()
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    df[["patient_id", "true_risk"]].to_csv(root / "truth.csv", index=False)
    return root


def test_classical_splits_dealt_out_to_two_processes(clinical_cohort, tmp_path):
    """Classical splits go to the ranks in turn and are gathered on rank 0: identical outputs
    to one process, written by rank 0 only."""
    args = ["experiment=seed/clinical", "data=cohort", f"data.root={clinical_cohort}",
            "evaluation.seeds=[0,1,2]", "data.clinical.categorical=[sex,smoking,histology,stage]",
            "model.grid.l1_ratio=[0.9]", "inner_repeats=1", "inner_cv=2", "selection.k=[all]",
            "report=false"]
    one = run(_cfg([*args, f"+output_dir={tmp_path / 'one'}"]))
    out = tmp_path / "two"
    writes = torchrun_train(args, tmp_path, out)
    assert writes[1] == []
    assert {"metrics.json", "predictions.csv", "selected_features.csv", "warnings.log",
            "config.yaml", "models/seed1.joblib", "splits/seed1.json"} <= _written(writes[0])
    two = json.loads((out / "metrics.json").read_text())
    for k in ("cindex", "cindex_uno", "td_auc", "ibs", "oracle_cindex"):
        assert two[k] == one[k], k   # deterministic fits: exactly equal
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"),
                                  pd.read_csv(tmp_path / "one" / "predictions.csv"))


TINY = dict(n_patients=24, seed=11, missing_ct=0.15, missing_wsi=0.15, two_slides=0.2,
            artefact_rate=0.0, fine_mpp_rate=0.2)
# the fast overrides of test_train_deep.py; no random dropout and no tile subsampling, so
# that one and two processes train on the same global batches with the same computation
DEEP = ["experiment=clinical_pathomics", "data=cohort", "encoder=test_tiny", "target=pfs",
        "evaluation.seeds=[0]", "optim.max_epochs=2", "optim.min_epochs=1", "optim.patience=0",
        "embed.progress=false", "tile.progress=false", "tile.qc=false", "selection.k=[3]",
        "data.clinical.categorical=[sex,smoking,histology,stage]", "optim.max_instances=null",
        "morphology.max_tiles=4", "tiling.target_mpp=1.0", "tabular.dropout=0",
        "fusion.module.dropout=0", "net.mil.dropout=0", "optim.batch_size=8",
        # fp32 embeddings on every CPU: with bf16 ones (CPUs with native bf16) the rounding noise
        # the tolerances below allow for is larger, so the comparison would depend on the CPU
        "encoder.precision=fp32"]


@pytest.mark.slow
def test_torchrun_deep_run_matches_one_process_and_only_rank0_writes(tmp_path):
    root = tmp_path / "demo"
    make_demo_cohort(root, verbose=False, n_jobs=2, **TINY)
    args = [*DEEP, f"data.root={root}", "report=true"]
    # one process first (it also tiles and embeds the slides; the 2-process run reuses them)
    one = run(_cfg([*args, f"+output_dir={tmp_path / 'one'}"]))
    out = tmp_path / "two"
    writes = torchrun_train([*args, *DDP2], tmp_path, out)

    assert writes[1] == [], writes[1]
    w0 = _written(writes[0])
    assert {"metrics.json", "predictions.csv", "attention.h5", "report.html",
            "models/seed0.pt", "splits/seed0.json"} <= w0
    for name in ("metrics.json", "predictions.csv", "attention.h5", "report.html"):
        assert len(list(tmp_path.joinpath("cwd").rglob(name))) == 0   # nothing in Hydra's dirs
        assert (out / name).is_file()
    two = json.loads((out / "metrics.json").read_text())
    assert two["training"]["seed0"]["processes"] == 2
    assert two["training"]["seed0"]["epochs"] == one["training"]["seed0"]["epochs"]
    # Tolerance: both runs see the same global batches and the same global Cox loss, so they
    # differ only by float32 summation order (rank parts vs one batch, gathers).  AdamW divides
    # each gradient by its running magnitude, so a parameter whose gradient is rounding noise
    # (the Cox loss is invariant to shifting every risk, so the output bias is one) still moves
    # by about lr per step in a noise-chosen direction: risks may differ by a near-constant
    # shift of order lr x steps (~1e-3 here) and by far less otherwise.  Rankings, hence every
    # C-index, must be equal; the IBS (Breslow baseline on the risks) within 1e-3.
    a = pd.read_csv(tmp_path / "one" / "predictions.csv")
    b = pd.read_csv(out / "predictions.csv")
    assert (a.patient_id == b.patient_id).all() and (a.role == b.role).all()
    ca, cb = a.risk - a.risk.mean(), b.risk - b.risk.mean()
    assert np.abs(a.risk - b.risk).max() < 5e-3
    assert np.abs(ca - cb).max() < 1e-3 * max(1.0, np.abs(ca).max())
    for k in ("cindex", "cindex_uno", "td_auc", "oracle_cindex"):
        assert two[k]["mean"] == pytest.approx(one[k]["mean"], abs=1e-9), k
    assert two["ibs"]["mean"] == pytest.approx(one["ibs"]["mean"], rel=1e-3)
    # attention of the same test patients, one weight per tile
    import h5py

    with h5py.File(tmp_path / "one" / "attention.h5", "r") as f1, \
            h5py.File(out / "attention.h5", "r") as f2:
        assert sorted(f1["seed0"]) == sorted(f2["seed0"]) and len(f2["seed0"]) > 0
        for p in f2["seed0"]:
            np.testing.assert_allclose(f2[f"seed0/{p}/attention"][:],
                                       f1[f"seed0/{p}/attention"][:], atol=1e-4)


def test_trainer_wanting_more_processes_than_the_job_has_is_refused(clinical_cohort, tmp_path):
    """Lightning would start copies of the whole script itself (each redoing the stages);
    the runner asks for one process per device from the launcher instead."""
    cfg = _cfg(["experiment=clinical", "data=cohort", f"data.root={clinical_cohort}",
                "evaluation.seeds=[0]", "optim.max_epochs=1", "report=false", *DDP2,
                "data.clinical.categorical=[sex,smoking,histology,stage]",
                f"+output_dir={tmp_path / 'r'}"])
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        run(cfg)
