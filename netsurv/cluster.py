"""Running netsurv on clusters: the SLURM launcher of sweeps and the Lightning Trainer of a job.

* :class:`SweepJobsMixin` makes Hydra's submitit SLURM launcher (``hydra/launcher=slurm``,
  class ``hydra_plugins.netsurv_launcher.SlurmLauncher``) do what a real site needs: a job
  whose run raised exits non-zero (SLURM says FAILED and the traceback is in the job's log,
  not only in submitit's result pickle); the sweep waits for every job, so the
  results table lists the finished and the failed jobs (also jobs killed without a word: out of
  memory, time limit, cancelled); and the trainer is checked against the requested resources
  before anything is submitted (one task per device for DDP, GPUs only when the trainer uses
  them).
* :func:`make_trainer` builds the ``lightning.Trainer`` of one split from ``cfg.trainer`` (its
  ``_target_``, with ``hydra.utils.instantiate``): the OmegaConf resolvers
  ``${netsurv.precision:<accelerator>}`` / ``${netsurv.num_nodes:}`` (:func:`register_resolvers`)
  and ``devices: auto`` follow the accelerator and the processes torchrun or SLURM started,
  Lightning's own SLURM auto-requeue is off (submitit requeues the job, the runner resumes it),
  and a multi-process DDP that Lightning would have to start by re-executing the command line
  is refused (see :func:`check_trainer`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["SweepJobsMixin", "make_trainer", "trainer_kwargs", "check_trainer", "LaunchError",
           "register_resolvers"]


class LaunchError(RuntimeError):
    """The trainer and the launcher/processes of the job do not fit together."""


# ---------------------------------------------------------------------------------- trainer
def _int_env(key: str) -> int | None:
    v = os.environ.get(key)
    if not v:
        return None
    try:
        return int(str(v).split("(")[0].split(",")[0])  # SLURM may write "2(x3)"
    except ValueError:
        return None


def _external_topology() -> tuple[int, int] | None:
    """(processes per node, nodes) when torchrun or a multi-task SLURM step started this
    process, else None."""
    from netsurv.distributed import dist_env

    env = dist_env()
    if env.source == "torchrun":
        per_node = _int_env("LOCAL_WORLD_SIZE") or env.world_size
        return per_node, max(1, env.world_size // per_node)
    if env.source == "slurm":
        per_node = _int_env("SLURM_NTASKS_PER_NODE") or _int_env("SLURM_STEP_TASKS_PER_NODE")
        nodes = _int_env("SLURM_NNODES") or _int_env("SLURM_JOB_NUM_NODES") or 1
        return (per_node or max(1, env.world_size // nodes)), nodes
    return None


def _uses_cuda(accelerator: str) -> bool:
    import torch

    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def auto_precision(accelerator: str) -> str:
    """bf16 autocast on GPUs that have it (fp16 on older ones), full fp32 on CPUs: CPU autocast
    is slow where the CPU lacks native bf16 and would change the numbers of CPU runs."""
    if _uses_cuda(accelerator):
        import torch

        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def auto_num_nodes() -> int:
    """The node count of the torchrun / SLURM launch of this process, 1 without one."""
    topo = _external_topology()
    return topo[1] if topo is not None else 1


def register_resolvers() -> None:
    """OmegaConf resolvers of the trainer configs (registered when netsurv is imported), so that
    ``cfg.trainer`` holds Lightning Trainer arguments only, computed in each process:
    ``${netsurv.precision:<accelerator>}`` -> :func:`auto_precision`,
    ``${netsurv.num_nodes:}`` -> :func:`auto_num_nodes`."""
    OmegaConf.register_new_resolver("netsurv.precision",
                                    lambda acc="auto": auto_precision(str(acc)), replace=True)
    OmegaConf.register_new_resolver("netsurv.num_nodes", auto_num_nodes, replace=True)


def trainer_kwargs(trainer_cfg: DictConfig | dict) -> dict[str, Any]:
    """Lightning Trainer keyword arguments from ``cfg.trainer`` (resolved, without ``_target_``).

    The resolvers of :func:`register_resolvers` compute precision / num_nodes; the older values
    ``precision: auto`` -> :func:`auto_precision` and ``num_nodes: auto`` (below) are still
    understood (configs written before the trainer configs had a ``_target_``).
    ``devices: auto`` -> one device per process
    when torchrun/SLURM started the processes (Lightning wants devices = processes per node and
    would otherwise count 1 CPU or all GPUs), else Lightning's auto; ``num_nodes: auto`` -> the
    launcher's node count, else 1.  The cluster environment is the one netsurv.distributed
    takes the ranks from (torchrun's wins, also inside an sbatch allocation).  Under SLURM,
    Lightning's own requeue on SIGUSR1 is turned off: the launcher requeues the whole job
    (submitit, USR2) and the runner resumes it; two requeue mechanisms would race, and
    Lightning's HPC checkpoint of one split would be restored into the next split's Trainer
    (they share ``default_root_dir``)."""
    kw = (OmegaConf.to_container(trainer_cfg, resolve=True) if OmegaConf.is_config(trainer_cfg)
          else dict(trainer_cfg))
    kw.pop("_target_", None)
    accelerator = str(kw.get("accelerator", "auto"))
    topo = _external_topology()
    if str(kw.get("precision", "")) == "auto":
        kw["precision"] = auto_precision(accelerator)
    if str(kw.get("devices", "auto")) == "auto" and topo is not None:
        kw["devices"] = topo[0]
    if str(kw.get("num_nodes", 1)) == "auto":
        kw["num_nodes"] = topo[1] if topo is not None else 1
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    from netsurv.distributed import dist_env

    plugins = kw.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, ClusterEnvironment) for p in plugins):
        if dist_env().source == "torchrun":
            # torchrun inside an sbatch allocation: Lightning would pick SLURM's (one task)
            plugins.append(TorchElasticEnvironment())
        elif "SLURM_NTASKS" in os.environ and SLURMEnvironment.detect():
            plugins.append(SLURMEnvironment(auto_requeue=False))
    if plugins:
        kw["plugins"] = plugins
    return kw


def _refuse_script_relaunch(trainer) -> None:
    """Lightning starts the other ranks of a local DDP run by re-executing ``sys.argv`` at the
    first ``fit`` (its subprocess-script launcher).  netsurv cannot work that way: every rank
    must run the job from the start (the cached-data stages before training are sharded over
    the ranks and meet at barriers; one Trainer is fitted per split), and in a ``-m`` sweep the
    re-executed command line is the whole sweep again (a second multirun folder).  torchrun and
    SLURM start all ranks at the beginning, which is what the runner needs."""
    from lightning.fabric.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher as FabricLauncher,
    )
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher as PLLauncher,
    )

    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    if not isinstance(launcher, (PLLauncher, FabricLauncher)):
        return
    if strategy.cluster_environment.creates_processes_externally:
        return
    n = int(launcher.num_processes) * int(launcher.num_nodes)
    if n <= 1:
        return
    per_node = int(launcher.num_processes)
    raise LaunchError(
        f"the trainer wants {n} DDP processes ({per_node} per node x {launcher.num_nodes} "
        "node(s)) but only this one was started; start them with torchrun or SLURM.\n"
        "netsurv runs every rank from the start of the job (the cached-data stages are shared "
        "between the ranks), so Lightning's re-execution of the command line at the first fit "
        "is not used.  One run:\n"
        f"  torchrun --nproc_per_node={per_node} scripts/train.py trainer=ddp ...\n"
        "Sweeps (-m) and clusters, one SLURM task per device:\n"
        f"  python scripts/train.py -m hydra/launcher=slurm hydra.launcher.tasks_per_node="
        f"{per_node} trainer=ddp trainer.devices={per_node} ...\n"
        "One process: trainer=cpu or trainer=gpu.")


def check_trainer(trainer_cfg) -> None:
    """Fail early (before any stage runs) when the trainer cannot run in this process: the same
    checks as :func:`make_trainer`, on a throw-away Trainer that writes nothing."""
    logging.disable(logging.INFO)  # no accelerator banner for a probe
    try:
        make_trainer(trainer_cfg, logger=False, enable_checkpointing=False)
    finally:
        logging.disable(logging.NOTSET)


def make_trainer(trainer_cfg, **kwargs):
    """``hydra.utils.instantiate(trainer_cfg, **resolved, **kwargs)``: the config's Trainer
    (``_target_``, ``lightning.pytorch.Trainer``) with the values :func:`trainer_kwargs` resolves
    for this process (devices, num_nodes, precision, cluster environment) and the run's own
    ``kwargs`` (callbacks, logger, epochs, ...), refusing a DDP run whose processes nobody
    started (:func:`_refuse_script_relaunch`)."""
    from hydra.utils import instantiate

    kw = trainer_kwargs(trainer_cfg)
    kw.update(kwargs)
    # the callbacks / loggers / plugins objects reach the Trainer as they are (not copies)
    trainer = instantiate(trainer_cfg, **kw)
    _refuse_script_relaunch(trainer)
    return trainer


# --------------------------------------------------------------------------------- launcher
def _as_int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _devices_per_node(devices) -> int | None:
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    n = _as_int(devices)
    return n if n is not None and n > 0 else None


def fit_resources(params: dict, trainer_cfg) -> dict:
    """The launcher's parameters checked against (and completed from) the job's trainer.

    * A trainer on GPUs with no GPU request (``gpus_per_node``/``gpus_per_task``/``gres``) gets
      ``gpus_per_node`` = its devices per node (or the tasks per node): a CPU partition is never
      asked for a GPU (sbatch rejects it: "invalid generic resource"), a GPU trainer never
      starts on a node without one.
    * DDP needs one SLURM task per device and the same node count as the trainer: a mismatch is
      an error here, before anything is submitted, instead of a Lightning error inside every
      job after its stages ran.
    """
    params = dict(params)
    if trainer_cfg is None:
        return params
    t = OmegaConf.to_container(trainer_cfg, resolve=False) if OmegaConf.is_config(
        trainer_cfg) else dict(trainer_cfg)
    accelerator = str(t.get("accelerator", "auto"))
    devices = _devices_per_node(t.get("devices", "auto"))
    tasks = int(params.get("tasks_per_node") or 1)
    nodes = int(params.get("nodes") or 1)
    strategy = str(t.get("strategy", "auto"))
    ddp = strategy.startswith(("ddp", "fsdp")) or strategy == "deepspeed"
    if ddp and devices is not None and devices != tasks:
        raise LaunchError(
            f"trainer.devices={devices} but hydra.launcher.tasks_per_node={tasks}: under SLURM "
            "each device is driven by one task (Lightning's SLURMEnvironment). Set "
            f"hydra.launcher.tasks_per_node={devices} (and cpus_per_task/mem_gb for "
            f"{devices} tasks), or trainer.devices={tasks}")
    if ddp and devices is None and tasks > 1:
        devices = tasks  # devices: auto -> one per task (netsurv.cluster.trainer_kwargs)
    num_nodes = _as_int(t.get("num_nodes", 1))
    if num_nodes is not None and num_nodes != nodes:
        raise LaunchError(
            f"trainer.num_nodes={num_nodes} but hydra.launcher.nodes={nodes}: set both to the "
            "same number (trainer.num_nodes=auto follows the launcher)")
    if not ddp and tasks > 1:
        raise LaunchError(
            f"hydra.launcher.tasks_per_node={tasks} starts {tasks} copies of every job, but the "
            f"trainer (strategy={strategy}) is a single process: use trainer=ddp "
            f"trainer.devices={tasks} for one process per device, or tasks_per_node=1")
    wants_gpu = accelerator in ("gpu", "cuda")
    asked = params.get("gpus_per_node") or params.get("gpus_per_task") or params.get("gres")
    gpn = _as_int(params.get("gpus_per_node"))
    if ddp and gpn and accelerator in ("gpu", "cuda", "auto") and devices and gpn < devices:
        raise LaunchError(
            f"hydra.launcher.gpus_per_node={gpn} but {devices} DDP processes per node: each "
            f"process drives one GPU; set hydra.launcher.gpus_per_node={devices}")
    if wants_gpu and not asked:
        params["gpus_per_node"] = devices or tasks
        log.info("trainer.accelerator=%s: requesting gpus_per_node=%s", accelerator,
                 params["gpus_per_node"])
    return params


def _submitit_failure(exc: BaseException) -> tuple[int, str]:
    """(failing task, one error line) from a submitit job error.  FailedJobError carries the
    task's traceback (its last line is the error); UncompletedJobError (no result: killed by
    SLURM) carries the job state and the end of its error log."""
    import re

    text = str(exc)
    m = re.search(r"\(task[=:] ?(\d+)\)", text)
    task = int(m.group(1)) if m else 0
    if "has not produced any output" in text:
        state = re.search(r"state: ([A-Z_]+)", text)
        tail = [ln.strip() for ln in text.split("-" * 40)[-1].splitlines() if ln.strip()]
        line = (f"job {state.group(1) if state else 'ended'} without a result"
                + (f": {tail[-1]}" if len(text.split("-" * 40)) > 1 and tail else ""))
    else:
        parts = text.split("-" * 22)
        lines = [ln.strip() for ln in (parts[1] if len(parts) > 2 else text).splitlines()
                 if ln.strip()]
        line = lines[-1] if len(parts) > 2 and lines else (
            f"{type(exc).__name__}: {lines[0] if lines else ''}")
    return task, (f"task {task}: {line}" if task else line)


def _task_paths(job, task: int):
    from submitit.core.utils import JobPaths

    return JobPaths(job.paths.folder, job_id=job.job_id, task_id=task)


class SweepJobsMixin:
    """Mixed into Hydra's submitit launchers (hydra_plugins/netsurv_launcher: Hydra only loads
    launcher classes defined under ``hydra_plugins``): jobs that fail loudly, sweeps that
    survive failed jobs, resources checked against the trainer."""

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        """Run one sweep job inside its SLURM task; re-raise the job's exception if it failed.

        Hydra's ``run_job`` returns a failed job's exception inside its ``JobReturn``; raising it
        here makes submitit record the error and the task exit non-zero (SLURM state FAILED).
        """
        # Runs inside the SLURM job (every task).  Hydra's run_job catches the task's exception
        # and returns it in a JobReturn: submitit would pickle that as a success and SLURM would
        # call the job COMPLETED.  Re-raising makes submitit record the error, Python print the
        # traceback into the task's .err log, and the task exit non-zero (job FAILED).
        from hydra.core.utils import JobStatus

        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        if ret.status == JobStatus.FAILED:
            raise ret._return_value
        return ret

    def make_executor(self, params: dict):
        """submitit's executor for the launcher's parameters (as Hydra's launcher builds it)."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": params["max_num_timeout"]}
            if "max_num_timeout" in params else {})
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            k if k in generic else f"{self._EXECUTOR}_{k}": v for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout")})
        if self._EXECUTOR == "slurm" and int(params.get("tasks_per_node") or 1) * int(
                params.get("nodes") or 1) > 1:
            # one rank that dies must end the job: the others would wait in a collective until
            # the time limit
            executor.update_parameters(slurm_srun_args=["--kill-on-bad-exit=1"])
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        """Submit the sweep's jobs as one job array and wait for all of them.

        Unlike Hydra's ``launch``, a failed job does not stop the collection of the others: it
        becomes a FAILED ``JobReturn`` (recorded in the sweep's results table when the job could
        not record itself), and the results table is rewritten with every job.

        Parameters
        ----------
        job_overrides : sequence of sequence of str
            The overrides of each job of the batch.
        initial_job_idx : int
            Job number of the first job of the batch.

        Returns
        -------
        list of JobReturn
            One per job, in submission order.
        """
        # Hydra's launch() returns [job.results()[0] for job in jobs]: the first failed job
        # raises there and the remaining results are never collected.  Written here instead:
        # the same submission, then every job is waited for; failures become FAILED JobReturns
        # (Hydra's sweeper raises the first one after the batch, so the sweep still exits
        # non-zero) and the results table is rewritten with all of them.
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobReturn, JobStatus, filter_overrides

        assert self.config is not None
        executor = self.make_executor(fit_resources(self.params, self.config.get("trainer")))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        nums = [initial_job_idx + i for i in range(len(job_overrides))]
        for num, ov in zip(nums, job_overrides):
            log.info(f"\t#{num} : {' '.join(filter_overrides(ov))}")
        state = Singleton.get_state()
        jobs = executor.map_array(self, [list(o) for o in job_overrides],
                                  ["hydra.sweep.dir"] * len(nums), nums,
                                  [f"job_id_for_{n}" for n in nums], [state] * len(nums))
        from netsurv.report.results import job_failed_recorded, record_job, update_results

        returns, failed = [], 0
        for num, ov, job in zip(nums, job_overrides, jobs):
            try:
                returns.append(job.results()[0])
                continue
            except Exception as exc:  # noqa: BLE001 - a failed job must not hide the others
                err = exc
            failed += 1
            ret = JobReturn(overrides=list(ov), status=JobStatus.FAILED)
            ret.return_value = err
            returns.append(ret)
            # A task that raised recorded its error itself (callback).  A job killed from
            # outside (time limit, memory, scancel, node failure) never got there, and with
            # several tasks, rank 0 may have finished while another rank failed: record the
            # job as failed from here, with the failing task's log.
            if not job_failed_recorded(sweep_dir, num):
                task, line = _submitit_failure(err)
                record_job(sweep_dir, num, {
                    "status": "FAILED", "overrides": " ".join(filter_overrides(ov)),
                    "error": line, "log": str(_task_paths(job, task).stderr),
                    "slurm_job_id": str(job.job_id)})
        try:
            # printed here only when jobs failed: Hydra then stops before on_multirun_end,
            # which prints the table of a sweep that succeeded
            update_results(sweep_dir, quiet=not failed)
        except Exception as exc:  # noqa: BLE001 - the table must not hide the jobs' own errors
            log.warning("results table not written: %s", exc)
        if failed:
            log.error("%d of %d job(s) failed; see the failures in %s", failed, len(jobs),
                      sweep_dir / "results.md")
        return returns
