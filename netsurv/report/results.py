"""The founding study's results table from a multirun: rows = models (± harmonisation),
columns = endpoints, cells = mean test C-index with its 95 % interval over splits; then one row
per run with the comparisons every run makes (classical baseline, paired difference, IBS against
the null model, oracle); below them, the jobs of the sweep that failed (job number, overrides,
error line, log file).

Every job records how it ended in ``<sweep dir>/.jobs/<job number>.json`` (the Hydra callback
below, inside the job; the SLURM launcher for jobs killed from outside), and the table is
rewritten after each job under a file lock: Hydra raises on the first failed job once the batch
is done and never reaches ``on_multirun_end``, and SLURM jobs end in any order, so the last job
to finish leaves the complete table.
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
import uuid
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

JOBS_DIR = ".jobs"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


_STARTED = time.time()  # this process's start (imported when Hydra sets up the callbacks)


def record_job(sweep_dir, num, record: dict, rank: int = 0) -> Path:
    """Write how job ``num`` of a sweep ended (``status`` COMPLETED/FAILED, ``overrides``,
    ``error``, ``log``, ``run`` ...).  Rank > 0 of a multi-process job records only its own
    failure, in a file of its own; rank 0's COMPLETED record removes those of earlier attempts
    (a requeued job that finished), never those of its own attempt."""
    d = Path(sweep_dir) / JOBS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / (f"{num}.json" if rank == 0 else f"{num}.rank{rank}.json")
    _atomic_write(path, json.dumps({"job": int(num), "rank": int(rank), **record}, indent=1))
    if rank == 0 and record.get("status") == "COMPLETED":
        for stale in d.glob(f"{num}.rank*.json"):
            try:
                if stale.stat().st_mtime < _STARTED - 5:  # margin: ranks start together
                    stale.unlink()
            except OSError:
                pass
    return path


def job_failed_recorded(sweep_dir, num) -> bool:
    """Whether some rank of job ``num`` recorded its own failure."""
    for f in (Path(sweep_dir) / JOBS_DIR).glob(f"{num}*.json"):
        if f.name.split(".")[0] != str(num):
            continue
        try:
            if json.loads(f.read_text(encoding="utf-8")).get("status") == "FAILED":
                return True
        except (OSError, ValueError):
            continue
    return False


def job_records(multirun_dir) -> pd.DataFrame:
    """One row per recorded job: the FAILED record of its lowest failing rank if any rank
    failed, else rank 0's record."""
    recs = []
    for f in sorted((Path(multirun_dir) / JOBS_DIR).glob("*.json")):
        try:
            recs.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # being replaced right now: the writer rewrites the table afterwards
    cols = ["job", "rank", "status", "overrides", "error", "log", "run"]
    if not recs:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(recs)
    for c in cols:
        if c not in df.columns:
            df[c] = None
    df["_failed"] = df.status.eq("FAILED")
    # every rank of a job shares its run dir: known from any of its records
    df["run"] = df.groupby("job")["run"].transform(lambda r: r.dropna().iloc[0]
                                                   if r.notna().any() else None)
    df = df.sort_values(["job", "_failed", "rank"], ascending=[True, False, True])
    return df.drop_duplicates("job").drop(columns="_failed").reset_index(drop=True)


def _cohort_name(run_dir: Path) -> str | None:
    """The cohort folder's name (demo: ``n<patients>-seed<seed>-<size>``) from config.yaml."""
    try:
        from omegaconf import OmegaConf

        root = OmegaConf.load(run_dir / "config.yaml").data.root
        return Path(str(root)).name
    except Exception:  # noqa: BLE001 - an older or partial run: the column stays empty
        return None


def collect(multirun_dir) -> pd.DataFrame:
    """One row per run: the figures of every ``metrics.json`` found under ``multirun_dir``.

    Columns: experiment, harmonisation, endpoint, protocol, cohort, patient and event counts,
    mean test C-index with its 95 % interval, the classical baseline's name and C-index, the
    paired difference with its interval, IBS, null IBS, oracle C-index and the run directory.

    Raises
    ------
    FileNotFoundError
        If there is no ``metrics.json`` under ``multirun_dir``.
    """
    rows = []
    for f in sorted(Path(multirun_dir).rglob("metrics.json")):
        m = json.loads(f.read_text(encoding="utf-8"))
        c = m["cindex"]
        b = m.get("baseline") or {}
        d = b.get("cindex_diff") or {}
        rows.append({
            "experiment": m["experiment"] + (" (complete cases)" if m.get("complete_cases")
                                             else ""),
            "harmonize": m.get("harmonize", "none"),
            "endpoint": m["endpoint"], "protocol": m.get("protocol"),
            "cohort": _cohort_name(f.parent),
            "n_patients": m.get("n_patients"), "n_events": m.get("n_events"),
            "cindex": c["mean"], "ci_low": c["ci95"][0], "ci_high": c["ci95"][1],
            "baseline": b.get("name") or (f"skipped: {b['skipped']}" if b.get("skipped")
                                          else None),
            "baseline_cindex": (b.get("cindex") or {}).get("mean"),
            "diff": d.get("mean"), "diff_low": (d.get("ci95") or [None, None])[0],
            "diff_high": (d.get("ci95") or [None, None])[1],
            "ibs": (m.get("ibs") or {}).get("mean"),
            "ibs_null": (m.get("ibs_null") or {}).get("mean"),
            "oracle": (m.get("oracle_cindex") or {}).get("mean"), "run": str(f.parent),
        })
    if not rows:
        raise FileNotFoundError(f"no metrics.json under {multirun_dir}")
    return pd.DataFrame(rows)


def _cell(v) -> str:
    return "–" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v).replace(
        "|", "\\|").replace("\n", " ")


def _varying_overrides(jobs: pd.DataFrame) -> dict:
    """job -> its overrides that differ between the sweep's jobs (what the sweep varied); all
    of them when nothing varies."""
    parsed = {j: dict(tok.split("=", 1) if "=" in tok else (tok, "") for tok in
                      str(o or "").split()) for j, o in zip(jobs.job, jobs.overrides)}
    keys = {k for d in parsed.values() for k in d}
    vary = [k for k in sorted(keys) if len({d.get(k) for d in parsed.values()}) > 1]
    if not vary:
        return {}
    return {j: " ".join(f"{k}={d[k]}" if d.get(k, "") != "" else k for k in vary if k in d)
            for j, d in parsed.items()}


def _f(v, fmt="{:.3f}") -> str:
    return "–" if v is None or pd.isna(v) else fmt.format(v)


def run_lines(runs: pd.DataFrame) -> list[str]:
    """Markdown rows, one per run: test C (95 % CI over splits), the classical baseline's C on
    the same splits, the paired difference (95 % paired-bootstrap CI), IBS against the null
    model's (training KM for everyone), and the oracle (true risk, same test patients)."""
    out = ["Per run: test C-index (95 % CI over splits); deep runs' classical baseline (the "
           "tabular modalities' CoxNet, same splits) and the paired difference model − baseline "
           "(95 % paired-bootstrap CI); integrated Brier score vs the null model (training KM "
           "for all); oracle = C-index of the true risk on the same test patients.", "",
           "| cohort | experiment | endpoint | n | test C (95 % CI) | baseline C | "
           "model − baseline (95 % CI) | IBS | null IBS | oracle |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    order = runs.sort_values(["cohort", "endpoint", "experiment"], na_position="last")
    for r in order.itertuples():
        diff = (f"{r.diff:+.3f} ({r.diff_low:+.3f} to {r.diff_high:+.3f})"
                if r.diff is not None and pd.notna(r.diff) else "–")
        base = "–" if r.baseline_cindex is None or pd.isna(r.baseline_cindex) else \
            f"{r.baseline_cindex:.3f}"
        if base == "–" and isinstance(r.baseline, str) and r.baseline.startswith("skipped"):
            base = "skipped"
        exp = r.experiment + ("" if r.harmonize == "none" else f" + {r.harmonize}")
        out.append(f"| {_cell(r.cohort)} | {_cell(exp)}"
                   f" | {r.endpoint} | {_f(r.n_patients, '{:.0f}')} | "
                   f"{r.cindex:.3f} ({r.ci_low:.3f}–{r.ci_high:.3f}) | {base} | {diff} | "
                   f"{_f(r.ibs)} | {_f(r.ibs_null)} | {_f(r.oracle)} |")
    return out


def _each(dirs, fn) -> pd.DataFrame:
    parts = []
    for d in dirs:
        try:
            parts.append(fn(d))
        except FileNotFoundError:
            continue
    parts = [p for p in parts if len(p)]
    if not parts:
        raise FileNotFoundError(f"no metrics.json under {', '.join(map(str, dirs))}")
    return pd.concat(parts, ignore_index=True)


def results_table(multirun_dir, out_dir=None) -> pd.DataFrame:
    """Write ``results.md`` and ``results.csv`` into ``out_dir`` (default: the multirun dir;
    for a list of multirun dirs, their common parent): the table of the finished runs and the
    list of the failed jobs.  Returns the table (empty when every job failed);
    FileNotFoundError when there is neither."""
    dirs = [multirun_dir] if isinstance(multirun_dir, (str, os.PathLike)) else list(multirun_dir)
    if len(dirs) == 1:
        multirun_dir = dirs[0]
    else:
        multirun_dir = Path(os.path.commonpath([str(Path(d).resolve()) for d in dirs]))
    jobs = pd.concat([job_records(d) for d in dirs], ignore_index=True)
    failed = jobs[jobs.status.eq("FAILED")]
    try:
        runs = _each(dirs, collect)
    except FileNotFoundError:
        if failed.empty:
            raise
        runs = pd.DataFrame(columns=["experiment", "harmonize", "endpoint", "protocol", "cindex",
                                     "ci_low", "ci_high", "oracle", "run", "cohort"])
    # attach job number / overrides; a run dir whose job failed (e.g. a stale metrics.json of
    # an earlier attempt) is not a finished run
    by_run = {str(Path(r).resolve()): j for r, j in zip(jobs.run, jobs.index)
              if isinstance(r, str) and r}
    idx = [by_run.get(str(Path(r).resolve())) for r in runs.run]
    for c in ("job", "status", "overrides"):
        runs[c] = [jobs.at[i, c] if i is not None else None for i in idx]
    runs["status"] = runs.status.fillna("COMPLETED")
    runs = runs[runs.status.ne("FAILED")].reset_index(drop=True)
    out = Path(out_dir or multirun_dir)
    lines = []
    if len(runs):
        runs["cell"] = runs.apply(
            lambda r: f"{r.cindex:.3f} ({r.ci_low:.3f}–{r.ci_high:.3f})", axis=1)
        runs["model"] = runs.experiment + runs.harmonize.map(
            lambda h: "" if h == "none" else f" + {h}")
        if runs.cohort.nunique() > 1:  # several cohorts (e.g. two demo sizes): one row each
            runs["model"] = runs.cohort.fillna("?") + " · " + runs.model
        # a sweep may repeat a cell (e.g. other hyperparameters): keep the last run, the CSV
        # has them all
        wide = runs.drop_duplicates(["model", "endpoint"], keep="last").pivot(
            index="model", columns="endpoint", values="cell")
        wide = wide[[c for c in ("os", "pfs") if c in wide.columns]
                    + [c for c in wide.columns if c not in ("os", "pfs")]]
        wide.columns = [f"{c.upper()} C-index (95% CI)" for c in wide.columns]
        proto = ", ".join(sorted(runs.protocol.dropna().unique()))
        lines += [f"Mean test C-index over splits ({proto}), 95 % t-interval over splits.\n",
                  "| model | " + " | ".join(wide.columns) + " |",
                  "|---|" + "---|" * len(wide.columns)]
        for model, row in wide.iterrows():
            lines.append(f"| {model} | " + " | ".join(
                str(v) if pd.notna(v) else "–" for v in row) + " |")
        oracle = runs.groupby("endpoint")["oracle"].mean().dropna()
        if len(oracle) and runs.cohort.nunique() <= 1:
            lines.append("")
            lines.append("Oracle C-index (true risk, same test splits): " + ", ".join(
                f"{k.upper()} {v:.3f}" for k, v in oracle.items()))
        lines += ["", *run_lines(runs)]
        runs = runs.drop(columns=["cell", "model"])
    else:
        wide = pd.DataFrame()
        lines.append("No job of this sweep finished.")
    if len(failed):
        shown = _varying_overrides(jobs)
        lines += ["", f"Failed jobs ({len(failed)} of {len(failed) + len(runs)}): not in the "
                  "table above; the traceback is in the log.", "",
                  "| job | overrides | error | log |", "|---|---|---|---|"]
        for r in failed.itertuples():
            lines.append(f"| {r.job} | {_cell(shown.get(r.job, r.overrides))} | {_cell(r.error)} | "
                         f"{_cell(r.log)} |")
    fail_rows = failed[["job", "status", "overrides", "error", "log", "run"]]
    table = pd.concat([runs, fail_rows], ignore_index=True) if len(failed) else runs
    table = table.astype({c: "Int64" for c in ("job", "n_patients", "n_events")
                          if c in table.columns})
    _atomic_write(out / "results.csv", table.to_csv(index=False))
    _atomic_write(out / "results.md", "\n".join(lines) + "\n")
    return wide


def update_results(multirun_dir, quiet: bool = True) -> pd.DataFrame | None:
    """Rewrite the sweep's table under a lock (jobs of a SLURM sweep finish concurrently; the
    lock makes the last writer see every record written before it).  None if there is nothing
    to tabulate yet."""
    from filelock import FileLock, Timeout

    d = Path(multirun_dir)
    (d / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(d / JOBS_DIR / "table.lock"))
    try:
        lock.acquire(timeout=300)
    except Timeout:  # a stuck lock on a shared filesystem: write anyway, the next job fixes it
        log.warning("results table lock %s held for 5 min; writing without it", lock.lock_file)
        lock = None
    try:
        wide = results_table(d)
    except FileNotFoundError:
        return None
    finally:
        if lock is not None:
            lock.release()
    if not quiet:
        failed = job_records(d).query("status == 'FAILED'")
        print(f"results table: {d / 'results.md'}" + (f"\n{wide.to_string()}" if len(wide) else "")
              + "".join(f"\nFAILED job #{r.job} ({r.overrides}): {r.error}  [log: {r.log}]"
                        for r in failed.itertuples()), flush=True)
    return wide


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


def _job_log(config) -> str:
    """Where this job's traceback can be read: submitit's stdout log of this task (the job's
    console) or, without submitit, Hydra's job log file."""
    if os.environ.get("SUBMITIT_FOLDER"):
        try:
            import submitit

            return str(submitit.JobEnvironment().paths.stdout)
        except Exception:  # noqa: BLE001 - not inside a submitit job after all
            pass
    out = Path(str(config.hydra.runtime.output_dir))
    return str(out / f"{config.hydra.job.name}.log")


def status_line(exc) -> str:
    """``"<ExceptionType>: <first line of the message>"`` for a job record or table cell."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class ResultsTableCallback(Callback):
    """Hydra callback: record how every job of a multirun ended and keep the sweep's results
    table (finished runs + failed jobs) up to date; print it at the end of the multirun."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        """Record the job's end (multirun only) and, on rank 0, rewrite the results table.

        Ranks other than 0 record only a failure.  A failed job's traceback is logged into its own
        log, since Hydra keeps the exception without printing it.
        """
        from hydra.core.utils import JobStatus, filter_overrides
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        from netsurv.distributed import dist_env

        rank = dist_env().rank
        failed = job_return.status == JobStatus.FAILED
        if rank != 0 and not failed:
            return
        num = config.hydra.job.num
        rec = {"status": "FAILED" if failed else "COMPLETED",
               "overrides": " ".join(filter_overrides(job_return.overrides or [])),
               "run": str(config.hydra.runtime.output_dir)}
        if failed:
            exc = job_return._return_value
            rec.update(error=status_line(exc), log=_job_log(config))
            # Hydra keeps the exception in the JobReturn without printing it: into the job's
            # log with it (the main process raises it again after the batch)
            log.error("job #%s (%s) failed:\n%s", num, rec["overrides"],
                      "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        sweep = Path(str(config.hydra.sweep.dir))
        record_job(sweep, num, rec, rank=rank)
        if rank == 0:
            update_results(sweep)

    def on_multirun_end(self, config, **kwargs) -> None:
        """Rewrite the results table a last time and print it with the failed jobs."""
        update_results(Path(config.hydra.sweep.dir), quiet=False)
