"""Who am I in a multi-process job, and how do the processes meet.

A netsurv job runs as one process, as ``torchrun --nproc_per_node=K`` ranks (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), or as the tasks of a SLURM step (``srun``/submitit:
``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``, ``SLURM_LOCALID``).  Stages that
produce cached data (tiling, embedding, radiomics, ...) shard their items by :func:`dist_env`,
meet at :func:`barrier`, and let rank 0 merge index files; only rank 0 writes run outputs.

The process group is created lazily, the first time ranks must meet, from the same address and
port Lightning would use (its cluster environments), so Lightning's Trainer later finds it
initialised and reuses it instead of creating its own.  Collectives of this module run on a
separate gloo group with a long timeout: one rank may embed slides for hours while another,
with a lighter share, already waits at the barrier (the default 30 min timeout would kill it).
"""
from __future__ import annotations

import atexit
import datetime as _dt
import os
from dataclasses import dataclass

__all__ = ["DistEnv", "dist_env", "is_distributed", "is_rank_zero", "init_process_group",
           "barrier", "all_gather_object", "broadcast_object", "shard_indices", "device_for"]

# how long a rank may wait at a stage barrier for the others (minutes)
STAGE_TIMEOUT_MIN = float(os.environ.get("NETSURV_STAGE_TIMEOUT_MIN", 24 * 60))

_STAGE_GROUP = None


@dataclass(frozen=True)
class DistEnv:
    """Position of this process in the job (see :func:`dist_env`).

    Attributes
    ----------
    rank : int
        Global rank, 0 in a single process.
    world_size : int
        Number of processes.
    local_rank : int
        Rank on this node (selects the GPU, see :func:`device_for`).
    source : str
        Where the values came from: ``"single"``, ``"torchrun"`` or ``"slurm"``.
    """

    rank: int
    world_size: int
    local_rank: int
    source: str  # "single" | "torchrun" | "slurm"

    @property
    def is_zero(self) -> bool:
        """True on rank 0 (the process that writes run outputs)."""
        return self.rank == 0


def _int(env, key, default=None):
    v = env.get(key)
    if v is None or str(v).strip() == "":
        return default
    try:
        return int(str(v).split("(")[0])  # SLURM writes e.g. "2(x3)" in some *_PER_NODE vars
    except ValueError as exc:
        raise ValueError(f"environment variable {key}={v!r} is not an integer") from exc


def dist_env(env=None) -> DistEnv:
    """(rank, world size, local rank) of this process.

    torchrun's variables win (torchrun may itself run inside a one-task SLURM job); then a
    SLURM step with several tasks; otherwise one process.  Under SLURM the step's task count is
    used (``SLURM_STEP_NUM_TASKS``, set by srun) so that a plain ``python`` in an sbatch script
    that asked for several tasks is still one process and never waits for absent peers.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env:
        world, rank = _int(env, "WORLD_SIZE", 1), _int(env, "RANK", 0)
        local, source = _int(env, "LOCAL_RANK", rank), "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and env.get(
            "SLURM_JOB_NAME") not in ("bash", "interactive"):
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        rank, local, source = _int(env, "SLURM_PROCID", 0), _int(env, "SLURM_LOCALID", 0), "slurm"
    else:
        return DistEnv(0, 1, 0, "single")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent process variables: rank {rank} of world size {world} "
                         f"({source})")
    if world == 1:
        return DistEnv(0, 1, 0, source)
    return DistEnv(rank, world, local, source)


def is_distributed(env: DistEnv | None = None) -> bool:
    """True when the job has more than one process (``env`` defaults to :func:`dist_env`)."""
    return (env or dist_env()).world_size > 1


def is_rank_zero(env: DistEnv | None = None) -> bool:
    """True on rank 0 (``env`` defaults to :func:`dist_env`)."""
    return (env or dist_env()).rank == 0


def device_for(device: str | None = "auto", env: DistEnv | None = None) -> str:
    """``auto`` -> ``cuda:<local rank>`` when CUDA is present, else ``cpu``; ``cuda`` ->
    ``cuda:<local rank>`` (every rank its own GPU, never all on cuda:0)."""
    import torch

    env = env or dist_env()
    device = "auto" if device is None else str(device)
    if device == "auto":
        return f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{env.local_rank}"
    return device


def init_process_group(backend: str | None = None) -> bool:
    """Initialise ``torch.distributed`` for this job if it has several processes; idempotent.

    Returns True when a process group exists afterwards.  The address/port come from
    Lightning's cluster environment (torchrun's MASTER_ADDR/MASTER_PORT, or SLURM's first node
    and a job-id derived port), so the group is the one Lightning would have made."""
    global _STAGE_GROUP
    import torch
    import torch.distributed as dist

    env = dist_env()
    if env.world_size == 1:
        return False
    if not dist.is_initialized():
        if env.source == "slurm":
            from lightning.fabric.plugins.environments import SLURMEnvironment

            ce = SLURMEnvironment(auto_requeue=False)
        else:
            from lightning.fabric.plugins.environments import TorchElasticEnvironment

            ce = TorchElasticEnvironment()
        os.environ["MASTER_ADDR"] = ce.main_address
        os.environ["MASTER_PORT"] = str(ce.main_port)
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    if _STAGE_GROUP is None:
        _STAGE_GROUP = dist.new_group(
            backend="gloo", timeout=_dt.timedelta(minutes=STAGE_TIMEOUT_MIN))
        atexit.register(_destroy)
    return True


def _destroy() -> None:
    """At exit: tear the process groups down.  A rank that exits with live gloo threads (the
    rank hosting the store gone first) can abort in C++ ("terminate called without an active
    exception", SIGABRT) after its work is done, and the launcher then reports the job as
    failed; seen with two ranks on a loaded 2-core machine."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; nothing left to report to
        pass


def barrier() -> None:
    """Wait for every process of the job (no-op in a single process)."""
    if init_process_group():
        import torch.distributed as dist

        dist.barrier(group=_STAGE_GROUP)


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not init_process_group():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist_env().world_size
    dist.all_gather_object(out, obj, group=_STAGE_GROUP)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not init_process_group():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_STAGE_GROUP)
    return box[0]


def shard_indices(n: int, env: DistEnv | None = None) -> range:
    """Positions ``rank::world_size`` of ``n`` items (sort the items the same way on every rank
    first, e.g. by id)."""
    env = env or dist_env()
    return range(env.rank, n, env.world_size)
