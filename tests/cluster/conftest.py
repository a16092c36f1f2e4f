"""The ``slurm`` fixture: a real single-node SLURM for the whole session (tests/cluster/slurm.py).

Where the machine cannot run one (not root and SLURM missing, no apt-get, apt-get offline,
daemons that do not start), every test that needs it is skipped with the reason, which is also
printed to the terminal: ``pytest -rs`` lists it.  NETSURV_SLURM_DIR sets the state directory
(default: a fixed folder in the temp dir, so a later session reuses running daemons);
NETSURV_SLURM_KEEP=1 leaves the daemons this session started running for the next one.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster.slurm import Cluster, SlurmUnavailable, ensure_installed


def _say(config, text: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None:  # pragma: no cover
        print(f"[slurm] {text}", flush=True)
        return
    with capman.global_and_fixture_disabled():  # past pytest's output capture
        tr.write_line(f"[slurm] {text}", yellow=True)


@pytest.fixture(scope="session")
def slurm(request):
    state = Path(os.environ.get("NETSURV_SLURM_DIR")
                 or Path(tempfile.gettempdir()) / "netsurv-slurm")
    t0 = time.monotonic()
    try:
        how = ensure_installed()
        cluster = Cluster(state)
        how += "; " + cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as exc:
        reason = f"no test SLURM cluster: {exc}"
        _say(request.config, reason)
        pytest.skip(reason)
    _say(request.config, f"{how} ({time.monotonic() - t0:.1f} s)")
    yield cluster
    if os.environ.get("NETSURV_SLURM_KEEP") != "1":
        cluster.stop()
