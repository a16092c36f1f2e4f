"""netsurv.cli: a user's data error is one console line plus where the full log is; bugs keep
their traceback; HYDRA_FULL_ERROR=1 and SLURM logs keep everything; a failing multirun job is
still a failed job for Hydra."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

APP = '''
import hydra
from netsurv.cli import user_errors
from netsurv.cohort.schema import CohortError


@hydra.main(version_base="1.3", config_path=None, config_name=None)
@user_errors
def main(cfg):
    fail = cfg.get("fail")
    if fail == "user":
        raise CohortError("/data/clinical.csv, line 5: column 'os_time' is inf (not finite)")
    if fail == "bug":
        raise KeyError("oops")
    if fail == "wrapped":
        raise RuntimeError("stage failed") from CohortError("/data/ct.csv: wrapped")
    print("done", fail)


if __name__ == "__main__":
    main()
'''

RECORDER = '''
import json
from hydra.experimental.callback import Callback


class Recorder(Callback):
    """What a sweep's callbacks see of each job (as the results table does)."""

    def __init__(self, out):
        self.out = out

    def on_job_end(self, config, job_return, **kw):
        with open(self.out, "a") as f:
            ret = job_return._return_value
            f.write(json.dumps({"fail": config.get("fail"), "status": job_return.status.name,
                                "type": type(ret).__name__}) + "\\n")
'''


def _run(tmp_path, *args, env=None, script="app.py"):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "recorder.py").write_text(RECORDER)
    e = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SLURM_JOB_ID")}
    e["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    e.update(env or {})
    return subprocess.run([sys.executable, str(tmp_path / script), *args], cwd=tmp_path,
                          capture_output=True, text=True, env=e, timeout=120)


def test_user_error_is_one_line_and_the_log_has_the_traceback(tmp_path):
    r = _run(tmp_path, "+fail=user", "hydra.run.dir=run")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr
    assert ("error: /data/clinical.csv, line 5: column 'os_time' is inf (not finite)\n"
            f"full log: {tmp_path / 'run' / 'app.log'}\n") in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) <= 4, r.stderr
    log = (tmp_path / "run" / "app.log").read_text()
    assert "Traceback" in log and "CohortError: /data/clinical.csv, line 5" in log


def test_cause_of_a_wrapped_user_error_is_shown(tmp_path):
    r = _run(tmp_path, "+fail=wrapped", "hydra.run.dir=run")
    assert r.returncode == 1 and "error: /data/ct.csv: wrapped" in r.stderr
    assert "Traceback" not in r.stderr


def test_bugs_keep_their_traceback(tmp_path):
    r = _run(tmp_path, "+fail=bug", "hydra.run.dir=run")
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'oops'" in r.stderr
    assert "error: " not in r.stderr


def test_hydra_full_error_shows_everything(tmp_path):
    r = _run(tmp_path, "+fail=user", "hydra.run.dir=run", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert "netsurv.cohort.schema.CohortError: /data/clinical.csv, line 5" in r.stderr


def test_slurm_job_log_keeps_the_traceback(tmp_path):
    r = _run(tmp_path, "+fail=user", "hydra.run.dir=run", env={"SLURM_JOB_ID": "4242"})
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert "CohortError: /data/clinical.csv" in r.stderr
    assert "error: /data/clinical.csv, line 5" in r.stderr  # and still the line, last


def test_without_a_log_file_the_line_alone(tmp_path):
    r = _run(tmp_path, "+fail=user", "hydra.run.dir=run", "hydra/job_logging=stdout")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: /data/clinical.csv, line 5" in r.stderr and "full log" not in r.stderr


def test_multirun_job_fails_as_a_job_and_the_others_run(tmp_path):
    rec = tmp_path / "jobs.jsonl"
    r = _run(tmp_path, "-m", "+fail=user,none", "hydra.sweep.dir=multi",
             "+hydra.callbacks.rec._target_=recorder.Recorder", f"+hydra.callbacks.rec.out={rec}")
    jobs = [json.loads(ln) for ln in rec.read_text().splitlines()]
    # the failed job's JobReturn holds the original exception: sweeps list it as failed
    assert jobs == [{"fail": "user", "status": "FAILED", "type": "CohortError"},
                    {"fail": "none", "status": "COMPLETED", "type": "NoneType"}]
    assert "done none" in r.stdout
    assert (f"error: /data/clinical.csv, line 5: column 'os_time' is inf (not finite)\n"
            f"full log: {tmp_path / 'multi' / '0' / 'app.log'}") in r.stderr
    assert "Traceback" in (tmp_path / "multi" / "0" / "app.log").read_text()
    assert r.returncode != 0  # Hydra's sweeper still reports the failure at the end


def test_plain_scripts(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("import sys\nfrom netsurv.cli import run_plain\n\n"
                      "def main():\n"
                      "    if sys.argv[1] == 'missing':\n"
                      "        raise FileNotFoundError('no metrics.json under /x/multirun')\n"
                      "    raise ZeroDivisionError('bug')\n\n"
                      "run_plain(main)\n")
    r = _run(tmp_path, "missing", script="plain.py")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no metrics.json under /x/multirun\n")
    r = _run(tmp_path, "bug", script="plain.py")
    assert r.returncode == 1 and "ZeroDivisionError: bug" in r.stderr and "Traceback" in r.stderr


def test_every_hydra_entry_point_uses_the_mechanism():
    for path in sorted((REPO / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [ast.unparse(d) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                 for d in f.decorator_list]
        text = path.read_text()
        if any(n.startswith("hydra.main") for n in names):
            # order matters: user_errors must wrap the task function, inside hydra.main
            assert names.index("user_errors") == names.index(
                next(n for n in names if n.startswith("hydra.main"))) + 1, path
        else:
            assert "run_plain(main)" in text, path


@pytest.mark.slow
def test_train_script_on_a_broken_cohort(tmp_path):
    import pandas as pd

    from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients

    df = simulate_patients(30, seed=3)[CLINICAL_COLUMNS].astype({"os_time": object})
    df.loc[3, "os_time"] = "inf"
    (tmp_path / "c").mkdir()
    df.to_csv(tmp_path / "c" / "clinical.csv", index=False)
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.pop("HYDRA_FULL_ERROR", None)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "data=cohort",
                        f"data.root={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env=e, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (f"error: {tmp_path / 'c' / 'clinical.csv'}, line 5: column 'os_time' is inf (not "
            "finite) for patient 'NET004'") in r.stderr
    assert pd.notna(r.stderr) and f"full log: {tmp_path / 'run' / 'train.log'}" in r.stderr


def test_split_and_bag_errors_are_user_errors():
    """Too few events for the protocol and unreadable feature files are the user's data, not
    bugs: one line, not a traceback."""
    from netsurv.cli import find_user_error
    from netsurv.cohort.splits import SplitError
    from netsurv.training.bags import BagError

    for exc in (SplitError("too few events"), BagError("/f/s1.h5: 'features' has 0 tiles")):
        assert find_user_error(exc) is exc
        wrapped = RuntimeError("stage failed")
        wrapped.__cause__ = exc
        assert find_user_error(wrapped) is exc
    assert find_user_error(ValueError("a bug")) is None
