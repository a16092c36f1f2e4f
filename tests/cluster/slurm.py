"""A real single-node SLURM for the cluster tests: munged + slurmctld + slurmd on localhost.

Debian's ``slurm-wlm`` (22.05 on bookworm) and ``munge`` are installed with apt-get when missing
(root only).  The daemons run from a private state directory with their own ports, munge key
and socket, so they never touch a site's /etc/slurm; clients find them through ``SLURM_CONF``.
The configuration avoids everything a container lacks: no cgroups (proctrack/linuxproc,
task/none), no accounting database (jobs' end states are in the jobcomp file and, for
``MinJobAge`` seconds, in ``scontrol show job``), and node resources from the config
(``SlurmdParameters=config_overrides``).  Daemons of an earlier session with the same state
directory are reused when healthy; only what this process started is stopped.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol",
            "scancel")
PACKAGES = ("slurm-wlm", "munge")
PARTITION = "cpu"
NODE = "localhost"
# bump when the configuration below changes: running daemons with another version are replaced
CONF_VERSION = 3


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster (the reason is the message)."""


def _run(cmd, timeout=60, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          check=check)


def ensure_installed(timeout: float = 1200) -> str:
    """Install slurm-wlm and munge with apt-get if a binary is missing.  Returns what was done;
    raises SlurmUnavailable with the reason when it cannot."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return "slurm-wlm and munge already installed"
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and not root: install "
                               f"{' '.join(PACKAGES)} (apt-get install {' '.join(PACKAGES)})")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get on this "
                               f"machine: install {' '.join(PACKAGES)} with its package manager")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.monotonic()
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        try:
            res = _run(cmd, timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` timed out after {timeout:.0f} s") from None
        if res.returncode != 0:
            tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {res.returncode}): "
                                   + " / ".join(tail))
    still = [b for b in BINARIES if shutil.which(b) is None]
    if still:
        raise SlurmUnavailable(f"apt-get installed {' '.join(PACKAGES)} but {still} are missing")
    return f"installed {' '.join(PACKAGES)} with apt-get in {time.monotonic() - t0:.0f} s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def _pid_alive(pidfile: Path, name: str, state: Path) -> int | None:
    """The pid in ``pidfile`` if that process is ``name`` started with our state dir."""
    try:
        pid = int(pidfile.read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = Path(f"/proc/{pid}/stat").read_text().split()
    except (OSError, ValueError):
        return None
    if name not in cmd or str(state) not in cmd or stat[2] == "Z":
        return None
    return pid


class Cluster:
    """The test cluster in ``state`` (see the module docstring)."""

    def __init__(self, state: Path, cpus: int = 2, mem_mb: int | None = None):
        self.state = Path(state)
        self.cpus = cpus
        self.mem_mb = mem_mb or max(2048, int(_mem_mb() * 0.9))
        self.conf = self.state / "slurm.conf"
        self.started: list[tuple[str, int]] = []
        self.reused = False

    # ----------------------------------------------------------------- client side
    @property
    def env(self) -> dict:
        """Environment for SLURM clients (and the jobs they submit) to reach this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd, timeout=60, check=True) -> subprocess.CompletedProcess:
        return _run(list(cmd), timeout=timeout, env=self.env, check=check)

    def node_state(self) -> str:
        res = self.run("sinfo", "-h", "-N", "-n", NODE, "-o", "%T", timeout=15, check=False)
        return res.stdout.strip().lower() if res.returncode == 0 else ""

    def healthy(self) -> bool:
        if not self.conf.exists() or f"version {CONF_VERSION}\n" not in self.conf.read_text():
            return False
        try:
            ping = self.run("scontrol", "ping", timeout=15, check=False)
        except subprocess.TimeoutExpired:
            return False
        return "UP" in ping.stdout and self.node_state().rstrip("*") in ("idle", "mixed",
                                                                         "allocated")

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` fields (the ctld keeps finished jobs MinJobAge seconds)."""
        res = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        out = {}
        for line in res.stdout.splitlines():
            for tok in line.split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    out.setdefault(k, v)
        return out

    def jobcomp(self) -> list[dict]:
        """Every finished job (array tasks included) from the jobcomp file."""
        path = self.state / "jobcomp.txt"
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                rows.append(dict(tok.split("=", 1) for tok in line.split() if "=" in tok))
        return rows

    # ----------------------------------------------------------------- daemons
    def _write_config(self) -> None:
        s = self.state
        for d in ("ctld", "spool", "log"):
            (s / d).mkdir(parents=True, exist_ok=True)
        key = s / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(f"""\
# single-node test cluster written by tests/cluster/slurm.py, version {CONF_VERSION}
ClusterName=netsurvtest
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s)
AuthInfo=socket={s}/munge.socket,cred_expire=10
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={s}/jobcomp.txt
SchedulerType=sched/backfill
# schedule every 2 s (default 60/30 s): a requeued job starts as soon as it is eligible
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=1024
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
InactiveLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, cmd: list[str], pidfile: Path) -> None:
        res = _run(cmd, timeout=60, env=self.env, check=False)
        pid = None
        for _ in range(100):
            pid = _pid_alive(pidfile, name, self.state)
            if pid:
                break
            time.sleep(0.1)
        if res.returncode != 0 or pid is None:
            logs = sorted((self.state / "log").glob(f"{name.rstrip('d')}*.log"))
            tail = logs[0].read_text().splitlines()[-5:] if logs else []
            raise SlurmUnavailable(f"{name} did not start (exit {res.returncode}): "
                                   + " / ".join([res.stderr.strip(), *tail]))
        self.started.append((name, pid))

    def stop_stale(self) -> None:
        """Stop daemons of an earlier session on this state dir that are not healthy."""
        for name, pidfile in (("slurmd", "slurmd.pid"), ("slurmctld", "slurmctld.pid"),
                              ("munged", "munged.pid")):
            pid = _pid_alive(self.state / pidfile, name, self.state)
            if pid:
                os.kill(pid, signal.SIGTERM)
                _wait_gone(pid)

    def start(self, timeout: float = 60) -> str:
        """Reuse healthy daemons on ``state`` or start new ones; wait until the node is idle."""
        if self.healthy():
            self.reused = True
            return f"reused the running test cluster in {self.state}"
        self.stop_stale()
        self._write_config()
        s = self.state
        self._daemon("munged", ["munged", "--force", f"--socket={s}/munge.socket",
                                f"--key-file={s}/munge.key", f"--log-file={s}/log/munged.log",
                                f"--pid-file={s}/munged.pid", f"--seed-file={s}/munged.seed"],
                     s / "munged.pid")
        # -c: forget jobs and node states of an earlier cluster on this state dir
        self._daemon("slurmctld", ["slurmctld", "-c", "-f", str(self.conf)], s / "slurmctld.pid")
        self._daemon("slurmd", ["slurmd", "-f", str(self.conf), "-N", NODE], s / "slurmd.pid")
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            state = self.node_state().rstrip("*")
            if state == "idle":
                return f"started munged, slurmctld and slurmd in {s}"
            if state in ("down", "drained", "draining", "fail"):
                self.run("scontrol", "update", f"nodename={NODE}", "state=resume", check=False)
            time.sleep(0.5)
        reason = self.run("sinfo", "-R", check=False).stdout.strip()
        self.stop()
        raise SlurmUnavailable(f"node {NODE} not idle after {timeout:.0f} s "
                               f"(state {state!r}; {reason})")

    def stop(self) -> None:
        """Stop the daemons this object started (slurmd first), nothing else."""
        for _name, pid in reversed(self.started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            _wait_gone(pid)
        self.started.clear()


def _wait_gone(pid: int, timeout: float = 20) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().split()
        except OSError:
            return
        if stat[2] == "Z":  # exited, its parent has not reaped it
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_job(cluster: Cluster, job_id: str, timeout: float = 600) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        info = cluster.job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                    "NODE_FAIL", "BOOT_FAIL", "DEADLINE"):
            return info
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {cluster.job(job_id)}")
