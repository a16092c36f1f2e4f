"""Trainer and launcher configuration for clusters, without a cluster: what `trainer=ddp`
resolves to under torchrun/SLURM/a plain process, the refusal of Lightning's command-line
re-execution, the resources checked against the trainer and the sbatch script they give."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from netsurv.cluster import (
    LaunchError,
    auto_precision,
    check_trainer,
    fit_resources,
    make_trainer,
    trainer_kwargs,
)

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")

TORCHRUN = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "3", "LOCAL_RANK": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "GROUP_RANK": "1",
            "TORCHELASTIC_RUN_ID": "test"}
SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "2",
              "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
              "SLURM_JOB_NUM_NODES": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
              "SLURM_NODEID": "0", "SLURM_STEP_ID": "0", "SLURM_NODELIST": "localhost"}


@pytest.fixture
def plain_env(monkeypatch):
    """No launcher variables (the test process may itself run under SLURM or torchrun)."""
    import os

    for k in list(os.environ):
        if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in (
                "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
            monkeypatch.delenv(k)
    return monkeypatch


def _trainer(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides)).trainer


def _launcher(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    return cfg


def test_ddp_on_cpu_is_fp32_gloo_with_the_usual_keys(plain_env):
    kw = trainer_kwargs(_trainer("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                 "trainer.num_nodes=1"))
    assert kw["precision"] == "32-true" and kw["devices"] == 2 and kw["num_nodes"] == 1
    assert kw["strategy"] == "ddp" and "plugins" not in kw
    # devices/num_nodes "auto" without a launcher: Lightning's own auto, one node
    kw = trainer_kwargs(_trainer("trainer=ddp"))
    assert kw["devices"] == "auto" and kw["num_nodes"] == 1


def test_precision_auto_follows_the_accelerator(monkeypatch):
    import torch

    assert auto_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_precision("auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_precision("gpu") == "bf16-mixed" and auto_precision("cuda") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_precision("gpu") == "16-mixed"  # e.g. V100: fp16 autocast
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_precision("auto") == "16-mixed"
    # configs/trainer: a resolver, so that cfg.trainer holds Lightning values only
    gpu = _trainer("trainer=gpu")
    assert OmegaConf.to_container(gpu)["precision"] == "${netsurv.precision:${.accelerator}}"
    assert gpu.precision == "16-mixed" and trainer_kwargs(gpu)["precision"] == "16-mixed"
    # the older spelling (run configs written before the trainer configs had a _target_)
    assert trainer_kwargs(_trainer("trainer=gpu", "trainer.precision=auto"))["precision"] == "16-mixed"


def test_auto_devices_and_nodes_follow_torchrun(plain_env):
    for k, v in TORCHRUN.items():
        plain_env.setenv(k, v)
    kw = trainer_kwargs(_trainer("trainer=ddp", "trainer.accelerator=cpu"))
    assert (kw["devices"], kw["num_nodes"]) == (2, 2)
    (env,) = kw["plugins"]
    assert type(env).__name__ == "TorchElasticEnvironment"
    # torchrun inside a one-task sbatch allocation: torchrun's ranks, not SLURM's
    for k, v in {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "job"}.items():
        plain_env.setenv(k, v)
    trainer = make_trainer(_trainer("trainer=ddp", "trainer.accelerator=cpu"), logger=False,
                           enable_checkpointing=False)
    assert (trainer.global_rank, trainer.world_size, trainer.num_nodes) == (3, 4, 2)
    # explicit values are left to Lightning (which checks them against torchrun's world)
    kw = trainer_kwargs(_trainer("trainer=ddp", "trainer.devices=1", "trainer.num_nodes=4"))
    assert (kw["devices"], kw["num_nodes"]) == (1, 4)


def test_slurm_step_gives_ranks_and_no_lightning_requeue(plain_env):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for k, v in SLURM_STEP.items():
        plain_env.setenv(k, v)
    kw = trainer_kwargs(_trainer("trainer=ddp", "trainer.accelerator=cpu"))
    assert (kw["devices"], kw["num_nodes"]) == (2, 1)
    (env,) = kw["plugins"]
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    trainer = make_trainer(_trainer("trainer=ddp", "trainer.accelerator=cpu"), logger=False,
                           enable_checkpointing=False)
    # Lightning's ranks are SLURM's (no process of its own is started)
    assert trainer.global_rank == 1 and trainer.world_size == 2
    assert trainer.strategy.cluster_environment.creates_processes_externally


def test_local_multiprocess_ddp_is_refused_with_the_commands_that_work(plain_env):
    with pytest.raises(LaunchError) as e:
        check_trainer(_trainer("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"))
    msg = str(e.value)
    assert "torchrun --nproc_per_node=2 scripts/train.py trainer=ddp" in msg
    assert "hydra/launcher=slurm hydra.launcher.tasks_per_node=2" in msg
    import os

    assert "LOCAL_RANK" not in os.environ  # refused before Lightning spawned anything
    check_trainer(_trainer("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"))
    check_trainer(_trainer("trainer=cpu"))
    for k, v in TORCHRUN.items():  # the same trainer under torchrun is fine
        plain_env.setenv(k, v)
    check_trainer(_trainer("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                           "trainer.num_nodes=2"))


def _params(cfg) -> dict:
    """The launcher's keyword arguments, as Hydra instantiates it (without ``_target_``)."""
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_") == "hydra_plugins.netsurv_launcher.SlurmLauncher"
    return params


def test_slurm_launcher_cpu_defaults_request_no_gpu(slurm, plain_env, tmp_path):
    # slurm: submitit writes the sbatch script only where srun exists (the session's SLURM)
    cfg = _launcher("hydra/launcher=slurm", "hydra.launcher.partition=cpu",
                    f"hydra.sweep.dir={tmp_path}")
    params = _params(cfg)
    assert params["gpus_per_node"] is None and params["max_num_timeout"] > 0
    fitted = fit_resources(params, cfg.trainer)
    assert fitted["gpus_per_node"] is None
    text = _sbatch(fitted)
    assert "--gpus-per-node" not in text and "--gres" not in text
    for flag in ("--partition=cpu", "--cpus-per-task=4", "--mem=16GB", "--time=240",
                 "--signal=USR2@120", "--ntasks-per-node=1", "--nodes=1"):
        assert f"#SBATCH {flag}" in text, flag
    assert "--kill-on-bad-exit" not in text


def test_slurm_launcher_gpu_and_ddp_resources(slurm, plain_env, tmp_path):
    # slurm: submitit writes the sbatch script only where srun exists (the session's SLURM)
    cfg = _launcher("hydra/launcher=slurm_gpu", "trainer=gpu", f"hydra.sweep.dir={tmp_path}")
    text = _sbatch(fit_resources(_params(cfg), cfg.trainer))
    assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --cpus-per-task=8" in text
    # a GPU trainer on the CPU launcher asks for its GPUs instead of starting without one
    cfg = _launcher("hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=gpu",
                    "trainer.devices=4", "hydra.launcher.tasks_per_node=4",
                    f"hydra.sweep.dir={tmp_path}")
    fitted = fit_resources(_params(cfg), cfg.trainer)
    assert fitted["gpus_per_node"] == 4
    text = _sbatch(fitted)
    assert "#SBATCH --ntasks-per-node=4" in text and "--kill-on-bad-exit=1" in text
    # the README's CPU DDP command
    cfg = _launcher("hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
                    "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=8", "trainer=ddp",
                    "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.sweep.dir={tmp_path}")
    fitted = fit_resources(_params(cfg), cfg.trainer)
    assert fitted["gpus_per_node"] is None
    text = _sbatch(fitted)
    assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --mem=8GB" in text
    # nodes with trainer.num_nodes=auto
    cfg = _launcher("hydra/launcher=slurm", "hydra.launcher.nodes=2",
                    "hydra.launcher.tasks_per_node=2", "trainer=ddp", f"hydra.sweep.dir={tmp_path}")
    assert "#SBATCH --nodes=2" in _sbatch(fit_resources(_params(cfg), cfg.trainer))


@pytest.mark.parametrize("overrides,needle", [
    (["trainer=ddp", "trainer.devices=2"], "hydra.launcher.tasks_per_node=2"),
    (["trainer=ddp", "trainer.devices=2", "hydra.launcher.tasks_per_node=2",
      "trainer.num_nodes=2"], "hydra.launcher.nodes=1"),
    (["trainer=cpu", "hydra.launcher.tasks_per_node=2"], "trainer=ddp trainer.devices=2"),
    (["hydra/launcher=slurm_gpu", "trainer=ddp", "hydra.launcher.tasks_per_node=4"],
     "hydra.launcher.gpus_per_node=4"),
])
def test_slurm_launcher_refuses_resources_that_do_not_fit_the_trainer(plain_env, tmp_path,
                                                                      overrides, needle):
    launcher = [o for o in overrides if o.startswith("hydra/launcher=")] or ["hydra/launcher=slurm"]
    cfg = _launcher(*launcher, *[o for o in overrides if o not in launcher],
                    f"hydra.sweep.dir={tmp_path}")
    with pytest.raises(LaunchError, match=needle.replace(".", r"\.")):
        fit_resources(_params(cfg), cfg.trainer)


def _sbatch(params: dict) -> str:
    """The sbatch script netsurv's launcher would submit with these parameters."""
    from hydra_plugins.netsurv_launcher import SlurmLauncher

    ex = SlurmLauncher(**params).make_executor(params)
    return ex._executor._make_submission_file_text("python -m submitit.core._submit x", "u")


def test_launcher_is_a_discoverable_hydra_plugin():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    names = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert "hydra_plugins.netsurv_launcher.SlurmLauncher" in names
