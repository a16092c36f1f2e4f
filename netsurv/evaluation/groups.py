"""The model config groups and the one top-k key, read the same way everywhere.

- ``model`` (configs/model): the classical Cox estimator (``estimator`` + inner-search ``grid``):
  the model of a classical run, and the classical offset / baseline of a deep run
  (``model@offset.model``, ``baseline``).
- ``net`` (configs/net): the deep network (``mil``: the MIL module of the ``wsi`` branch); null
  for classical runs.  **A run is deep iff ``net`` is set** (:func:`is_deep`).
- ``selection.k``: the top-k univariate-Cox features of each feature table, for every run.  A
  list is searched by the classical inner CV (a classical run's model; a deep run's offset and
  baseline); a deep network has no search over k and takes the list's first entry
  (:func:`net_top_k`), as the classical pipeline does when nothing is searched.

Older layouts (``model=abmil`` with ``model.kind: deep``, ``tabular.k``) stop with a message
naming the new group / key (:func:`check_groups`); a run directory saved with that layout is read
by :func:`upgrade_saved` (its fitted steps already hold their k).
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from netsurv.cohort.schema import CohortError

__all__ = ["ConfigGroupError", "check_groups", "is_deep", "net_top_k", "upgrade_saved"]

log = logging.getLogger(__name__)



class ConfigGroupError(CohortError):
    """A config uses a group or key of the old layout; the message names the new one."""


def is_deep(cfg: DictConfig) -> bool:
    """Deep run iff the ``net`` group is set (``net: null`` = classical)."""
    return cfg.get("net") is not None


def _check_k(k, where: str) -> None:
    if isinstance(k, bool) or not (k == "all" or (isinstance(k, int) and k >= 1)):
        raise ConfigGroupError(f"{where}={k!r}: a top-k is a positive integer or 'all'")


def net_top_k(cfg: DictConfig):
    """The top-k of a deep network's feature-table branches: ``selection.k``, or its first
    entry when it is a list (the rest is searched by the classical offset / baseline only)."""
    k = cfg.selection.k
    return list(k)[0] if OmegaConf.is_list(k) else k


def check_groups(cfg: DictConfig) -> None:
    """Stop on the old layout (deep network in ``model``, ``tabular.k``) or a top-k that cannot
    apply, with what to write instead."""
    for path, group in (("model", "model"), ("offset.model", "model@offset.model")):
        node = OmegaConf.select(cfg, path)
        if not isinstance(node, DictConfig) or not ("_moved_" in node or "mil" in node):
            continue
        use = str(node.get("_moved_") or "net=abmil")
        raise ConfigGroupError(
            f"{group}={use.split('=')[-1]}: deep networks are the `net` group now "
            f"(abmil | transmil | meanpool | maxpool): use `{use}`; `{group}` takes the classical "
            "Cox estimators only (coxnet | coxph)")
    tab = cfg.get("tabular")
    if tab is not None and tab.get("k") is not None:
        raise ConfigGroupError(
            f"tabular.k={tab.k} was replaced by selection.k, the one top-k of classical and deep "
            f"runs: use selection.k={tab.k} (a list is searched by the classical inner CV; a deep "
            "network takes its first entry)")
    k = cfg.selection.k
    if OmegaConf.is_list(k):
        if len(k) == 0:
            raise ConfigGroupError("selection.k=[]: give a top-k (e.g. 10) or a list to search "
                                   "(e.g. [5,10,20,all])")
        for v in k:
            _check_k(v, "selection.k entry")
    else:
        _check_k(k, "selection.k")


def upgrade_saved(cfg: DictConfig, where: str = "config.yaml") -> DictConfig:
    """A run config saved with the old layout (``model.kind: deep`` + ``model.mil``), read in the
    new one: ``net.mil`` from ``model.mil``, ``model`` the classical offset model.  Configs of the
    new layout (and old classical ones, whose ``model`` is unchanged) are returned as they are."""
    if "net" in cfg or str(cfg.model.get("kind", "classical")) != "deep":
        return cfg
    if "mil" not in cfg.model:
        raise ConfigGroupError(f"{where}: a deep run of an unknown layout (model.kind=deep, no "
                               "model.mil); train it again to predict with it")
    log.info("%s: saved with the old layout (model=<deep net>); read as net.mil=model.mil", where)
    with open_dict(cfg):
        cfg.net = OmegaConf.create({"mil": cfg.model.mil})
        cfg.model = cfg.offset.model if "offset" in cfg and "model" in cfg.offset else None
    return cfg
