"""`_target_` configs of the deep runs: trainer, callbacks, logger, loss and harmonize are built
with hydra.utils.instantiate; each logger option writes its files offline (no network) in a
tiny deep training."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=["report=false", *overrides])


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


# ------------------------------------------------------------------------------------ trainer
@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_configs_hold_only_trainer_arguments(option):
    from lightning.pytorch import Trainer

    t = _cfg(f"trainer={option}").trainer
    assert t._target_ == "lightning.pytorch.Trainer"
    allowed = set(inspect.signature(Trainer.__init__).parameters)
    assert set(t) - {"_target_"} <= allowed
    # resolvable anywhere netsurv is imported: no netsurv-only values left
    kw = OmegaConf.to_container(t, resolve=True)
    assert kw.get("precision", "32-true") in ("32-true", "bf16-mixed", "16-mixed")
    assert isinstance(kw.get("num_nodes", 1), int)


def test_trainer_is_instantiated_with_the_run_arguments(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from netsurv.cluster import make_trainer

    trainer = instantiate(_cfg("trainer=cpu").trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, Trainer) and trainer.precision == "32-true"
    ddp = _cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1").trainer
    ckpt = ModelCheckpoint(dirpath=tmp_path)
    trainer = make_trainer(ddp, callbacks=[ckpt], logger=False, max_epochs=3)
    assert trainer.max_epochs == 3 and trainer.num_nodes == 1 and trainer.precision == "32-true"
    assert trainer.checkpoint_callback is ckpt  # the object given, not a copy


# -------------------------------------------------------------------------- callbacks, logger
def test_callbacks_group_adds_user_callbacks_and_null_switches_one_off(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor

    from netsurv.training.trainer_parts import make_callbacks

    assert make_callbacks(_cfg()) == []
    lr = "lightning.pytorch.callbacks.LearningRateMonitor"
    cfg = _cfg(f"+callbacks.lr_monitor._target_={lr}", "+callbacks.lr_monitor.logging_interval=epoch")
    (cb,) = make_callbacks(cfg)
    assert isinstance(cb, LearningRateMonitor) and cb.logging_interval == "epoch"
    assert make_callbacks(cfg)[0] is not cb  # a fresh one for every fit
    assert make_callbacks(_cfg(f"+callbacks.lr_monitor._target_={lr}", "callbacks.lr_monitor=null")) == []


def test_logger_group_defaults_to_csv_under_the_run_folder(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from netsurv.training.trainer_parts import make_loggers

    (lg,) = make_loggers(_cfg(), tmp_path, "seed0")
    assert isinstance(lg, CSVLogger) and Path(lg.log_dir) == tmp_path / "logs" / "seed0"
    (lg,) = make_loggers(_cfg(), tmp_path, "seed0", "inner1")
    assert Path(lg.log_dir) == tmp_path / "logs" / "seed0" / "inner1"
    assert make_loggers(_cfg("logger=none"), tmp_path, "seed0") == []
    pytest.importorskip("tensorboardX")
    both = make_loggers(_cfg("logger=[csv,tensorboard]"), tmp_path, "seed0", "refit")
    assert [type(x) for x in both] == [CSVLogger, TensorBoardLogger]
    assert Path(both[1].log_dir) == tmp_path / "tensorboard" / "seed0" / "refit"


# --------------------------------------------------------------------------------- loss, ComBat
@pytest.mark.parametrize("option", _options("loss"))
def test_loss_configs_build_the_loss_objects(option):
    from netsurv.survival.losses import CoxPHLoss, LogisticHazardLoss, SurvivalLoss

    cfg = _cfg(f"loss={option}")
    assert "name" not in cfg.loss  # the class says what it is; no loss-name switches
    loss = instantiate(cfg.loss)
    assert isinstance(loss, SurvivalLoss)
    if loss.needs_bins:
        assert isinstance(loss, LogisticHazardLoss) and (loss.n_bins, loss.scheme) == (
            8, "event_quantiles")
        assert instantiate(cfg.loss, edges=[0.0, 1.0, 3.0]).out_dim == 3
    else:
        assert isinstance(loss, CoxPHLoss) and loss.ties == "efron" and loss.name == "cox"


def test_harmonize_configs_build_combat_or_nothing():
    from netsurv.evaluation.inputs import harmonize_method, make_harmonizer
    from netsurv.features.harmonize import ComBat

    meta = pd.DataFrame({"scanner": ["A", "B"]}, index=["p1", "p2"])
    none = _cfg("harmonize=none")
    assert none.harmonize is None and harmonize_method(none) == "none"
    assert make_harmonizer(none, "radiomics", meta) is None
    cfg = _cfg("harmonize=combat", "harmonize.covariates=[age]", "harmonize.unseen=pass")
    assert cfg.harmonize._target_ == "netsurv.features.harmonize.ComBat"
    assert harmonize_method(cfg) == "combat" and list(cfg.harmonize_modalities) == ["radiomics"]
    h = make_harmonizer(cfg, "radiomics", meta)
    assert isinstance(h, ComBat) and h is not make_harmonizer(cfg, "radiomics", meta)
    assert (h.batch_col, list(h.covariates), h.unseen, h.unseen_min_cases) == (
        "scanner", ["age"], "pass", 10)
    assert make_harmonizer(cfg, "pathomics", meta) is None  # not in harmonize_modalities
    # every key of the config is a ComBat argument
    assert set(cfg.harmonize) - {"_target_"} <= set(inspect.signature(ComBat).parameters)


# ------------------------------------------------------------------- loggers in a deep training
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    df = simulate_patients(40, seed=5)
    root = tmp_path_factory.mktemp("loggers") / "c"
    root.mkdir()
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    return root


@pytest.fixture
def offline(monkeypatch):
    """Nothing may leave the machine: W&B offline and quiet, MLflow's telemetry off, no tracking
    server from the environment."""
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_DISABLE_GIT": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "DO_NOT_TRACK": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _train(cohort, out, *overrides):
    from netsurv.tasks.train import run

    return run(_cfg("experiment=clinical", "data=cohort", f"data.root={cohort}",
                    "evaluation.seeds=[0]", "data.clinical.categorical=[sex,smoking,histology,stage]",
                    "optim.max_epochs=3", "optim.min_epochs=1", "optim.patience=0",
                    "optim.select_after=1", "optim.smooth=1", "optim.inner_folds=0",
                    "optim.batch_size=16", "selection.k=[3]", "offset.modalities=none",
                    "baseline=none", f"+output_dir={out}", *overrides))


def test_csv_logger_and_a_user_callback_in_a_deep_training(cohort, tmp_path, offline):
    m = _train(cohort, tmp_path, "+callbacks.lr_monitor._target_="
               "lightning.pytorch.callbacks.LearningRateMonitor")
    log = pd.read_csv(tmp_path / "logs" / "seed0" / "metrics.csv")
    assert log["val/cindex"].notna().sum() == 3 and log["epoch"].max() == 2
    assert any(c.startswith("lr-") for c in log.columns)  # the user's callback logged
    assert m["training"]["seed0"]["epochs"] == 3


def test_no_logger_trains_all_the_same(cohort, tmp_path, offline):
    m = _train(cohort, tmp_path, "logger=none")
    assert not (tmp_path / "logs").exists() and np.isfinite(m["cindex"]["mean"])


def test_tensorboard_logger_writes_event_files(cohort, tmp_path, offline):
    pytest.importorskip("tensorboardX")
    _train(cohort, tmp_path, "logger=tensorboard")
    events = list((tmp_path / "tensorboard" / "seed0").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    assert not (tmp_path / "logs").exists()


def test_mlflow_logger_writes_a_local_file_store(cohort, tmp_path, offline):
    pytest.importorskip("mlflow")
    _train(cohort, tmp_path, "logger=mlflow")
    store = tmp_path / "mlruns"
    metric = list(store.glob("*/*/metrics/val/cindex"))  # <experiment>/<run>/metrics/<key>
    assert len(metric) == 1
    rows = metric[0].read_text().split("\n")
    assert len([r for r in rows if r.strip()]) == 3  # one value per epoch
    run_dir = metric[0].parents[2]
    assert (run_dir / "tags" / "mlflow.runName").read_text() == "seed0"
    assert (store / run_dir.parent.name / "meta.yaml").read_text().count("name: clinical") == 1


def test_wandb_logger_writes_an_offline_run(cohort, tmp_path, offline):
    pytest.importorskip("wandb")
    _train(cohort, tmp_path, "logger=wandb")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the run's records, for a later `wandb sync`
