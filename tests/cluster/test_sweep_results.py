"""The sweep results table with failed jobs (netsurv/report/results.py), without a cluster:
records written by the jobs, the table and failure list they give, and two local `-m` sweeps
through the real entry point (Hydra's basic launcher): one job failing, and `trainer=ddp` with
2 devices refused before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from netsurv.report.results import job_failed_recorded, job_records, record_job, results_table

REPO = Path(__file__).resolve().parents[2]


def _metrics(d: Path, endpoint: str, c: float) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({
        "experiment": "clinical", "harmonize": "none", "endpoint": endpoint,
        "protocol": "holdout", "n_patients": 50, "n_events": 20,
        "cindex": {"mean": c, "ci95": [c - 0.1, c + 0.1]}}))


def test_table_lists_finished_runs_and_failed_jobs(tmp_path):
    base = "data=cohort experiment=clinical"
    _metrics(tmp_path / "0", "os", 0.70)
    record_job(tmp_path, 0, {"status": "COMPLETED", "overrides": f"{base} target=os",
                             "run": str(tmp_path / "0")})
    # job 1 failed although an earlier attempt left a metrics.json: not a finished run
    _metrics(tmp_path / "1", "pfs", 0.99)
    record_job(tmp_path, 1, {"status": "FAILED", "overrides": f"{base} target=pfs",
                             "error": "ValueError: bad | value", "log": "/logs/1.out",
                             "run": str(tmp_path / "1")})
    # job 2: rank 0 finished, rank 1 failed -> the job failed, with rank 1's error
    _metrics(tmp_path / "2", "os", 0.80)
    record_job(tmp_path, 2, {"status": "FAILED", "overrides": f"{base} target=os",
                             "error": "BlockingIOError: lock", "log": "/logs/2_1.out"}, rank=1)
    record_job(tmp_path, 2, {"status": "COMPLETED", "overrides": f"{base} target=os",
                             "run": str(tmp_path / "2")})
    assert job_failed_recorded(tmp_path, 2) and not job_failed_recorded(tmp_path, 0)
    wide = results_table(tmp_path)
    assert list(wide.columns) == ["OS C-index (95% CI)"]
    assert wide.loc["clinical", "OS C-index (95% CI)"] == "0.700 (0.600–0.800)"
    md = (tmp_path / "results.md").read_text()
    assert "Failed jobs (2 of 3)" in md
    assert "| 1 | target=pfs | ValueError: bad \\| value | /logs/1.out |" in md
    assert "| 2 | target=os | BlockingIOError: lock | /logs/2_1.out |" in md
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv.job) == [0, 1, 2] and list(csv.status) == ["COMPLETED", "FAILED", "FAILED"]
    assert csv.cindex.iloc[0] == pytest.approx(0.70) and csv.cindex.iloc[1:].isna().all()
    assert csv.error.iloc[2] == "BlockingIOError: lock" and csv.n_patients.iloc[0] == 50


def test_every_job_failed_still_writes_the_list(tmp_path):
    record_job(tmp_path, 0, {"status": "FAILED", "overrides": "target=os", "error": "E: x",
                             "log": "l"})
    wide = results_table(tmp_path)
    assert wide.empty
    md = (tmp_path / "results.md").read_text()
    assert "No job of this sweep finished." in md and "| 0 | target=os | E: x | l |" in md
    with pytest.raises(FileNotFoundError):
        results_table(tmp_path / "nothing_here_yet")


def test_finished_rank0_clears_rank_failures_of_earlier_attempts_only(tmp_path):
    old = record_job(tmp_path, 3, {"status": "FAILED", "error": "E: first attempt"}, rank=1)
    past = time.time() - 3600
    os.utime(old, (past, past))  # written by an attempt before this process started
    record_job(tmp_path, 3, {"status": "COMPLETED", "overrides": "x=1"})
    assert not old.exists() and job_records(tmp_path).status.tolist() == ["COMPLETED"]
    record_job(tmp_path, 4, {"status": "FAILED", "error": "E: this attempt"}, rank=1)
    record_job(tmp_path, 4, {"status": "COMPLETED"})
    assert job_records(tmp_path).set_index("job").status.to_dict() == {3: "COMPLETED",
                                                                       4: "FAILED"}


def _train(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def clinical(tmp_path_factory):
    from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients

    root = tmp_path_factory.mktemp("clin")
    simulate_patients(60, seed=5)[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    return root


def test_local_sweep_with_a_failing_job_keeps_the_others(clinical, tmp_path):
    """Hydra's basic launcher: job 1 fails, job 2 after it still runs, the table has jobs 0
    and 2, the failure is listed with the job's log (which holds the traceback), exit 1."""
    sweep = tmp_path / "sweep"
    res = _train(["-m", "data=cohort", f"data.root={clinical}", "experiment=seed/clinical",
                  "target=os,dfs,pfs", "evaluation.seeds=[0]", "inner_cv=2", "inner_repeats=1",
                  "selection.k=[3]", "data.clinical.categorical=[sex,histology]", "report=false",
                  f"hydra.sweep.dir={sweep}"], tmp_path)
    assert res.returncode == 1
    assert "target='dfs' is not an endpoint" in res.stderr
    csv = pd.read_csv(sweep / "results.csv")
    assert csv.set_index("job").status.to_dict() == {0: "COMPLETED", 1: "FAILED",
                                                     2: "COMPLETED"}
    assert sorted(csv.endpoint.dropna()) == ["os", "pfs"]
    bad = csv[csv.status == "FAILED"].iloc[0]
    assert bad.error.startswith("CohortError: target='dfs' is not an endpoint")
    assert Path(bad.log) == sweep / "1" / "train.log"
    assert "Traceback (most recent call last)" in Path(bad.log).read_text()
    md = (sweep / "results.md").read_text()
    assert "| 1 | target=dfs | CohortError: target='dfs'" in md


def test_local_ddp_sweep_is_refused_before_any_work(clinical, tmp_path):
    """`-m ... trainer=ddp trainer.devices=2` without torchrun/SLURM: every job fails at once
    with the commands that work; no second multirun folder (Lightning never re-executed the
    command line)."""
    res = _train(["-m", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "experiment=clinical", "target=os,pfs", "data=cohort",
                  f"data.root={clinical}", "report=false"], tmp_path)
    assert res.returncode == 1
    assert "torchrun --nproc_per_node=2 scripts/train.py trainer=ddp" in res.stderr
    (sweep,) = list((tmp_path / "multirun").iterdir())  # one sweep folder
    csv = pd.read_csv(sweep / "results.csv")
    assert list(csv.status) == ["FAILED", "FAILED"]
    assert all(e.startswith("LaunchError: the trainer wants 2 DDP processes") for e in csv.error)
    assert not list(sweep.rglob("metrics.json")) and not list(sweep.rglob("checkpoints"))
