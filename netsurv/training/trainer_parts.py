"""The callbacks and loggers of a Lightning fit, from the ``callbacks`` and ``logger`` config
groups (``configs/callbacks``, ``configs/logger``): each a dict of named ``_target_`` entries,
as in lightning-hydra-template, built anew for every fit (a split's training, or one inner fold
/ the refit of ``optim.inner_folds``; callbacks and loggers keep per-fit state).

The callbacks that netsurv's training protocol needs (the checkpoint that chooses the model, the
``last.ckpt`` of resuming, early stopping on ``optim.patience``) are added by
:mod:`netsurv.evaluation.deep` itself; these are the user's extra ones.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

from omegaconf import DictConfig

__all__ = ["make_callbacks", "make_loggers", "close_loggers"]


def _entries(node) -> list:
    """The ``_target_`` entries of a callbacks / logger group (null entries switch one off)."""
    if node is None:
        return []
    return [v for v in node.values() if v is not None and "_target_" in v]


def make_callbacks(cfg: DictConfig) -> list:
    """Fresh instances of the ``cfg.callbacks`` entries."""
    from hydra.utils import instantiate

    return [instantiate(node) for node in _entries(cfg.get("callbacks"))]


def _under(out: Path, path) -> str:
    return str(path) if Path(str(path)).is_absolute() else str(out / str(path))


def make_loggers(cfg: DictConfig, out: Path, split: str, fit: str = "") -> list:
    """Fresh Lightning loggers of one fit from ``cfg.logger``, writing under the run folder
    ``out``: a relative ``save_dir`` / ``dir`` and a relative ``file:`` ``tracking_uri`` are taken
    under ``out``.  Each fit is labelled by its split and ``fit`` ("" for a split's only fit,
    ``inner<k>`` / ``refit`` with inner folds), unless the entry sets the argument itself:
    MLflow ``run_name`` and W&B ``name`` = ``<split>/<fit>``; loggers with one folder per run
    (CSV, TensorBoard: ``name`` and ``version``) write ``<save_dir>/<split>/<fit>/``."""
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    label = f"{split}/{fit}" if fit else split
    loggers = []
    for node in _entries(cfg.get("logger")):
        cls = get_class(str(node._target_))
        kw = {k: _under(out, node[k]) for k in ("save_dir", "dir") if node.get(k) is not None}
        uri = node.get("tracking_uri")
        if isinstance(uri, str) and uri.startswith("file:") and "://" not in uri:
            kw["tracking_uri"] = "file:" + _under(out, uri[len("file:"):])
        if issubclass(cls, MLFlowLogger):
            per_fit = {"run_name": label}
            if str(kw.get("tracking_uri", uri) or "").startswith("file:"):
                # MLflow >= 3.x refuses its file store unless told so (it wants a database); a
                # file store in the run folder is what logger=mlflow is for
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        elif issubclass(cls, WandbLogger):  # its `version` is the run id: left to W&B
            per_fit = {"name": label}
        else:
            params = inspect.signature(cls).parameters
            per_fit = {k: v for k, v in (("name", split), ("version", fit)) if k in params}
        kw.update({k: v for k, v in per_fit.items() if node.get(k) is None})
        loggers.append(instantiate(node, **kw))
    return loggers


def close_loggers(trainer) -> None:
    """Ends the W&B run of a finished fit: WandbLogger would otherwise hand the same run on to
    the next fit of the process (it reuses an active ``wandb.run``)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg._experiment.finish()
