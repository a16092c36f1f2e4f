"""netsurv on a real single-node SLURM (slurmctld + slurmd + munge, 2 CPUs; tests/cluster/slurm.py):
the README's SLURM commands on a tiny demo cohort, failures, requeue."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.cluster.slurm import PARTITION, wait_job

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
# as fast as the pipeline allows: one split, 2 epochs, tiny encoder, coarse tiles, no report
FAST = ["evaluation.seeds=[0]", "inner_cv=2", "inner_repeats=1", "selection.k=[3]",
        "data.clinical.categorical=[sex,histology]", "report=false"]
DEEP_FAST = ["encoder=test_tiny", "tiling.target_mpp=1.0", "optim.max_epochs=2",
             "optim.min_epochs=1", "optim.patience=0", "optim.select_after=0", "optim.smooth=1",
             "optim.max_instances=16", "embed.progress=false",
             "tile.progress=false", "tile.qc=false", "morphology.max_tiles=4"]
# a CPU job of the test cluster: 1 CPU, little memory, so two jobs run side by side
SMALL_JOB = [f"hydra.launcher.partition={PARTITION}", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20"]


def _train(slurm, args, cwd, env=None, timeout=1200, check=True):
    """scripts/train.py with the test cluster's SLURM_CONF; (result, wall seconds)."""
    env = {**slurm.env, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), **(env or {})}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    if check:
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res, wall


def _slurm_jobs(sweep: Path) -> dict[str, Path]:
    """SLURM job id (array task) -> its submitit folder, from the sweep's .submitit."""
    return {d.name: d for d in sorted((sweep / ".submitit").iterdir()) if d.is_dir()
            and any(d.glob("*_submitted.pkl"))}


def test_cluster_runs_tasks_and_batch_jobs(slurm, tmp_path):
    """The fixture's cluster is real: a 2-task step runs on 2 CPUs, a batch script's exit code
    reaches SLURM (state FAILED, ExitCode 3)."""
    res = slurm.run("srun", "-p", PARTITION, "-n2", "-c1", "--mem=200M", "bash", "-c",
                    "echo $SLURM_PROCID/$SLURM_NTASKS", timeout=120)
    assert sorted(res.stdout.split()) == ["0/2", "1/2"]
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo task $SLURM_PROCID'\nexit 3\n")
    out = tmp_path / "job.out"
    sub = slurm.run("sbatch", "--parsable", "-p", PARTITION, "-n2", "-c1", "--mem=200M",
                    "-o", str(out), str(script))
    job = sub.stdout.strip().split(";")[0]
    info = wait_job(slurm, job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0"
    assert sorted(out.read_text().split("\n")[:2]) == ["task 0", "task 1"]
    comp = [r for r in slurm.jobcomp() if r.get("JobId") == job]
    assert comp and comp[-1]["JobState"] == "FAILED" and comp[-1]["ExitCode"] == "3:0"


@pytest.fixture(scope="module")
def clinical(tmp_path_factory):
    """A clinical-only cohort (clinical.csv): what the classical sweeps need, instantly."""
    from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients

    root = tmp_path_factory.mktemp("clinical")
    simulate_patients(60, seed=7)[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    return root


def test_classical_sweep_two_jobs(slurm, clinical, tmp_path):
    """The README's classical sweep on SLURM: 2 array jobs, both COMPLETED, one metrics.json
    each, the results table with both endpoints."""
    sweep = tmp_path / "sweep"
    _, wall = _train(slurm, ["-m", "hydra/launcher=slurm", *SMALL_JOB, "experiment=seed/clinical",
                             "target=os,pfs", "data=cohort", f"data.root={clinical}", *FAST,
                             f"hydra.sweep.dir={sweep}"], tmp_path)
    print(f"classical SLURM sweep (2 jobs): {wall:.1f} s")
    jobs = _slurm_jobs(sweep)
    assert len(jobs) == 2
    for jid in jobs:
        info = wait_job(slurm, jid, timeout=60)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info
        assert info["Partition"] == PARTITION and info["NumCPUs"] == "1"
        assert "gres" not in info.get("TRES", "")  # a CPU job asks for no GPU
    metrics = sorted(sweep.glob("*/metrics.json"))
    assert len(metrics) == 2
    assert {json.loads(m.read_text())["endpoint"] for m in metrics} == {"os", "pfs"}
    table = pd.read_csv(sweep / "results.csv")
    assert sorted(table.endpoint) == ["os", "pfs"] and set(table.status) == {"COMPLETED"}
    md = (sweep / "results.md").read_text()
    assert "| seed/clinical |" in md and "Failed jobs" not in md


def test_failed_job_exits_nonzero_and_sweep_lists_it(slurm, clinical, tmp_path):
    """One job of the sweep fails (an endpoint the cohort lacks): its SLURM job exits non-zero
    with the traceback in its log, the other job's results are tabulated, the failure is
    listed (job, overrides, error line, log) and the sweep itself exits non-zero."""
    sweep = tmp_path / "sweep"
    res, wall = _train(slurm, ["-m", "hydra/launcher=slurm", *SMALL_JOB,
                               "experiment=seed/clinical", "target=os,dfs", "data=cohort",
                               f"data.root={clinical}", *FAST, f"hydra.sweep.dir={sweep}"],
                       tmp_path, check=False)
    print(f"classical SLURM sweep with a failing job: {wall:.1f} s")
    assert res.returncode != 0
    assert "target='dfs' is not an endpoint" in res.stderr
    states = {}
    for jid, folder in _slurm_jobs(sweep).items():
        info = wait_job(slurm, jid, timeout=60)
        states[info["ArrayTaskId"]] = (info["JobState"], info["ExitCode"])
        if info["ArrayTaskId"] == "1":
            err = (folder / f"{jid}_0_log.err").read_text()
            assert "Traceback (most recent call last)" in err
            assert "CohortError: target='dfs' is not an endpoint" in err
    assert states == {"0": ("COMPLETED", "0:0"), "1": ("FAILED", "1:0")}
    table = pd.read_csv(sweep / "results.csv")
    ok, bad = table[table.status == "COMPLETED"], table[table.status == "FAILED"]
    assert list(ok.endpoint) == ["os"] and 0 < ok.cindex.iloc[0] < 1 and ok.job.iloc[0] == 0
    assert len(bad) == 1 and bad.job.iloc[0] == 1 and "target=dfs" in bad.overrides.iloc[0]
    assert bad.error.iloc[0].startswith("CohortError: target='dfs' is not an endpoint")
    log = Path(bad.log.iloc[0])
    assert log.is_file() and "CohortError: target='dfs'" in log.read_text()
    md = (sweep / "results.md").read_text()
    assert "| seed/clinical | 0." in md
    assert "Failed jobs (1 of 2)" in md and "| 1 | target=dfs | CohortError: " in md


@pytest.fixture(scope="module")
def preempted(slurm, tmp_path_factory):
    """A one-job sweep of 4 splits whose SLURM job gets the preemption signal (USR2, what
    ``--signal`` sends before the time limit) once the first split's model is saved."""
    from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients

    tmp = tmp_path_factory.mktemp("requeue")
    root = tmp / "cohort"
    root.mkdir()
    simulate_patients(200, seed=3)[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    sweep = tmp / "sweep"
    args = [sys.executable, str(REPO / "scripts" / "train.py"), "-m", "hydra/launcher=slurm",
            *SMALL_JOB, "experiment=seed/clinical", "data=cohort", f"data.root={root}",
            "evaluation.seeds=[0,1,2,3]", "inner_cv=3", "inner_repeats=1", "report=false",
            f"hydra.sweep.dir={sweep}"]
    env = {**slurm.env, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    models, records = sweep / "0" / "models", sweep / "0" / "splits"
    first = None
    while time.monotonic() - t0 < 300 and proc.poll() is None:
        # a split is finished once its record is committed (after its model file): a model
        # file seen while still being written changed its mtime when the write ended
        done = sorted(records.glob("*.json")) if records.is_dir() else []
        if done:
            first = models / f"{done[0].stem}.joblib"
            break
        time.sleep(0.05)
    assert first is not None, proc.communicate()
    first_mtime = first.stat().st_mtime_ns
    (jid,) = _slurm_jobs(sweep)
    slurm.run("scancel", "--signal=USR2", jid)
    out, err = proc.communicate(timeout=600)
    wall = time.monotonic() - t0
    print(f"preempted + requeued one-job sweep: {wall:.1f} s")
    return dict(rc=proc.returncode, out=out, err=err, sweep=sweep, jid=jid, first=first,
                first_mtime=first_mtime)


def test_preempted_job_is_requeued_and_completes(slurm, preempted):
    """submitit's signal handler checkpoints the launcher and requeues the job (same SLURM job
    id, Restarts=1); the requeued job finishes into the same run dir and the sweep succeeds."""
    p = preempted
    assert p["rc"] == 0, p["out"][-3000:] + p["err"][-3000:]
    info = wait_job(slurm, p["jid"], timeout=60)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    log = next((p["sweep"] / ".submitit" / p["jid"]).glob("*_log.out")).read_text()
    assert "this job is preempted" in log and f"Requeued job {p['jid']}" in log
    assert log.count("Starting with JobEnvironment") == 2
    runs = list(p["sweep"].glob("*/metrics.json"))
    assert [r.parent.name for r in runs] == ["0"]
    m = json.loads(runs[0].read_text())
    assert len(m["cindex"]["per_split"]) == 4
    table = pd.read_csv(p["sweep"] / "results.csv")
    assert list(table.status) == ["COMPLETED"]


def test_requeued_job_resumes_finished_splits(preempted):
    """The split finished before the preemption is not fitted again by the requeued job."""
    assert preempted["rc"] == 0
    assert preempted["first"].stat().st_mtime_ns == preempted["first_mtime"]


@pytest.mark.slow  # ~70 s: a two-task DDP sweep from an empty cache (the launcher's
# resources and a classical SLURM sweep stay in the default suite)
def test_readme_ddp_sweep_on_slurm_from_empty_cache(slurm, tmp_path):
    """The README's DDP command on SLURM, 2 tasks x 1 CPU per job, from an empty cache: the
    stages (demo cohort, tiling, embedding) run inside the jobs; each job trains with 2
    gloo ranks and writes exactly one metrics.json and attention.h5 (rank 0 only)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    sweep = tmp_path / "sweep"
    res, wall = _train(slurm, [
        "-m", "hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}",
        "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=8", "hydra.launcher.timeout_min=30", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "experiment=clinical_pathomics",
        "target=os,pfs", "data.demo.n_patients=24", "evaluation.seeds=[0]",
        *DEEP_FAST, f"hydra.sweep.dir={sweep}"], tmp_path, env={"NETSURV_CACHE": str(cache)},
        check=False)
    print(f"README DDP sweep on SLURM (2 jobs x 2 tasks, empty cache): {wall:.1f} s")
    jobs = _slurm_jobs(sweep)
    assert len(jobs) == 2
    states = {jid: wait_job(slurm, jid, timeout=60) for jid in jobs}
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for jid, info in states.items():
        assert (info["JobState"], info["ExitCode"], info["NumTasks"]) == (
            "COMPLETED", "0:0", "2"), info
        logs = [(jobs[jid] / f"{jid}_{t}_log.out").read_text() for t in (0, 1)]
        # only rank 0 reports (and writes) the run's results
        assert sum(log.count("test C-index") for log in logs) == 1
    import h5py

    for d in sorted(p.parent for p in sweep.glob("*/.hydra")):
        assert len(list(d.rglob("metrics.json"))) == 1 and len(list(d.rglob("attention.h5"))) == 1
        assert len(list(d.rglob("report.html"))) == 1
        m = json.loads((d / "metrics.json").read_text())
        assert m["experiment"] == "clinical_pathomics" and m["n_patients"] == 24
        # trained by the 2 SLURM tasks as one DDP group (the runner records its processes)
        assert {s.get("processes") for s in m["training"].values()} == {2}
        assert m["embeddings"]["encoder"] == "test_tiny"
        with h5py.File(d / "attention.h5", "r") as f:
            assert len(f["seed0"]) > 0
    assert (cache / "demo" / "n24-seed0-small" / ".complete").is_file()  # generated in the jobs
    table = pd.read_csv(sweep / "results.csv")
    assert sorted(table.endpoint) == ["os", "pfs"] and set(table.status) == {"COMPLETED"}
