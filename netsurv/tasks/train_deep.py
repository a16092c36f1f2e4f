"""Deep multimodal survival training over the evaluation protocol's splits.

Per split (patients by position; nothing fitted sees the test patients):
  training split -> stratified fit / inner-validation patients (``optim.val_fraction``);
  tabular feature steps and time bins fitted on the fit patients;
  Lightning trains the network, early stopping and checkpoint choice on ``val/cindex``;
  the best checkpoint predicts every patient (``role`` = train / val / test in predictions.csv)
  and, for MIL models, writes test patients' tile attention to ``attention.h5``.

Embeddings come from ``netsurv.tasks.embed.embed_cohort`` (tiles and embeds slides that have no
cached output yet, so the first run on a cohort does the whole chain).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from netsurv.features.select import UnivariateCoxSelector

log = logging.getLogger(__name__)

TABULAR = ("clinical", "radiomics")


class ImagingSteps:
    """A feature-table modality for deep models: ImagingBlock (invalid columns, imputation,
    scaling, optional ComBat, correlation filter) then the top-k univariate Cox features; small
    cohorts cannot feed hundreds of radiomics features to a network."""

    def __init__(self, block, k, meta=None):
        self.block, self.k, self.meta = block, k, meta

    def fit_transform(self, X: pd.DataFrame, y) -> pd.DataFrame:
        Z = self.block.fit_transform(X, y, self.meta)
        k = "all" if self.k in (None, "all") else min(int(self.k), Z.shape[1])
        self.sel_ = UnivariateCoxSelector(k=k, min_events_per_feature=None).fit(Z, y)
        return self.sel_.transform(Z)

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        return self.sel_.transform(self.block.transform(X, self.meta))


def wsi_bags(cohort, cfg: DictConfig, patients):
    """Bags of every patient with slides: a BagStore read from disk on demand (features of
    ``embeddings.dir`` when set, else of the embedding stage, run first where needed)."""
    from netsurv.training.bags import wsi_bag_store

    return wsi_bag_store(cohort, cfg, patients)


def build_net(cfg: DictConfig, dims: dict[str, int], out_dim: int):
    from netsurv.models.fusion import SurvivalNet, TabularMLP

    mc = cfg
    branches = {}
    for m, d in dims.items():
        if m == "wsi":
            branches[m] = instantiate(cfg.model.mil, in_dim=d)
        else:
            branches[m] = TabularMLP(d, dim=int(mc.tabular.dim), hidden=list(mc.tabular.hidden),
                                     dropout=float(mc.tabular.dropout))
    emb = {m: int(b.dim) for m, b in branches.items()}
    fusion = instantiate(cfg.fusion.module, dims=emb, out_dim=out_dim)
    linear = ({m: d for m, d in dims.items() if m != "wsi"}
              if bool(mc.tabular.get("linear", False)) else None)
    return SurvivalNet(branches, fusion, modality_dropout=float(cfg.fusion.modality_dropout),
                       linear=linear)


def _trainer(cfg: DictConfig, out: Path, split: str):
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    # Lightning's banner (GPU/TPU availability, tips) would repeat once per split
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    oc = cfg.optim
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints" / split, filename="best",
                           monitor="val/cindex_smooth", mode="max", save_top_k=1,
                           enable_version_counter=False)
    callbacks = [ckpt]
    if oc.patience:
        callbacks.append(EarlyStopping(monitor="val/cindex_smooth", mode="max",
                                       patience=int(oc.patience)))
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("_target_", None)
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(max_epochs=int(oc.max_epochs), min_epochs=int(oc.get("min_epochs", 0)),
                        callbacks=callbacks,
                        logger=CSVLogger(out / "logs", name=split, version=""),
                        default_root_dir=out, **kwargs)
    return trainer, ckpt


def prepare_inputs(cohort, cfg: DictConfig, frames: dict, patients: list[str]):
    """(tabular frames, bags or None, embedding info) for the modalities of cfg."""
    bags = info = None
    if "wsi" in cfg.modalities:
        bags, info = wsi_bags(cohort, cfg, patients)
    tab = {m: f for m, f in frames.items() if m != "wsi"}
    return tab, bags, info


def run_split(cfg, split, patients, tab_frames, bags, time, event, meta, out: Path,
              feat_dim: int):
    """Train on one evaluation split; returns (predictions dict, fitted module, extra info)."""
    import lightning as L

    from netsurv.models.classical import ImagingBlock
    from netsurv.survival.losses import TimeBins
    from netsurv.training.datamodule import (PatientDataset, SurvivalDataModule, TabularSteps,
                                             inner_split)
    from netsurv.survival.losses import canonical_loss
    from netsurv.training.module import SurvivalModule
    from netsurv.tasks.train import make_harmonizer

    oc = cfg.optim
    seed = int(cfg.seed)
    L.seed_everything(seed, workers=True, verbose=False)
    tr, te = split.train, split.test
    f_rel, v_rel = inner_split(event[tr], float(oc.val_fraction), seed)
    fit, val = tr[f_rel], tr[v_rel]

    def make_steps(m):
        if m == "clinical":
            return instantiate(cfg.clinical_encoder)
        block = ImagingBlock(harmonizer=make_harmonizer(cfg, m, meta),
                             corr_threshold=cfg.selection.corr_threshold)
        return ImagingSteps(block, cfg.tabular.k, meta)

    steps = TabularSteps(make_steps).fit(tab_frames, patients, fit, time, event)
    X, present = steps.transform(tab_frames, patients)
    loss = canonical_loss(cfg.loss.name)
    edges = targets = None
    if loss == "nll":
        bins = TimeBins(int(cfg.loss.n_bins), scheme=str(cfg.loss.scheme)).fit(time[fit], event[fit])
        edges = bins.edges_
        targets = bins.transform(time, event)
    dims = {m: X[m].shape[1] for m in X}
    if bags is not None:
        dims["wsi"] = feat_dim
    out_dim = 1 if loss == "cox" else len(edges)
    net = build_net(cfg, dims, out_dim)
    module = SurvivalModule(net, loss=loss, ties=str(cfg.loss.get("ties", "efron")),
                            edges=edges, lr=float(oc.lr), weight_decay=float(oc.weight_decay),
                            select_after=int(oc.get("select_after", 0)),
                            smooth=int(oc.get("smooth", 1)),
                            snapshots=bool(oc.get("snapshot_ensemble", False)))

    def ds(idx, train=False):
        return PatientDataset(idx, patients, bags, X, present, time, event, targets=targets,
                              train=train, max_instances=oc.max_instances, seed=seed,
                              feat_dim=feat_dim)

    everyone = np.arange(len(patients))
    dm = SurvivalDataModule({"fit": ds(fit, True), "val": ds(val), "test": ds(te),
                             "all": ds(everyone)},
                            batch_size=int(oc.batch_size), seed=seed)
    trainer, ckpt = _trainer(cfg, out, split.name)
    with warnings.catch_warnings():
        # Lightning's advice about DataLoader workers does not apply to in-memory bags
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")  # torch/lightning internal
        trainer.fit(module, datamodule=dm)
    best_epoch = None
    if ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        best_epoch = int(state.get("epoch", -1))
    if module.best_snapshots:
        pred = module.predict_snapshots(dm.predict_dataloader(), module.best_snapshots)
    else:
        pred = module.predict_loader(dm.predict_dataloader())
    role = np.full(len(patients), "train", dtype=object)
    role[val] = "val"
    role[te] = "test"
    info = {"best_epoch": best_epoch, "epochs": int(trainer.current_epoch),
            "best_val_cindex": float(ckpt.best_model_score) if ckpt.best_model_score is not None
            else None, "eventless_batches": module.eventless_batches,
            "snapshots": len(module.best_snapshots or []),
            "features": steps.columns_}
    return pred, module, role, edges, info


def survival_fn(loss: str, pred_out, fit_idx, time, event, edges):
    """S(t | patient) for the integrated Brier score. Cox: Breslow baseline hazard fitted on
    the fit patients' risks (scikit-survival's BreslowEstimator). NLL: the model's own
    discrete survival curve, a step function over the bin edges."""
    if loss == "cox":
        from sksurv.linear_model.coxph import BreslowEstimator

        risk = pred_out[:, 0]
        br = BreslowEstimator().fit(risk[fit_idx], event[fit_idx].astype(bool), time[fit_idx])

        def fn(idx, times):
            return np.vstack([f(times) for f in br.get_survival_function(risk[idx])])
        return fn
    from netsurv.survival.losses import hazard_to_survival

    surv = hazard_to_survival(torch.as_tensor(pred_out)).numpy()

    def fn(idx, times):
        j = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 1)
        return surv[idx][:, j]
    return fn


def write_attention(path: Path, split: str, patients, idx, pred, bags, role):
    """Tile attention of the given patients (the split's test patients) into ``attention.h5``
    (format: :mod:`netsurv.report.heatmap`), for heatmaps and tile galleries."""
    from netsurv.report.heatmap import write_attention as write
    from netsurv.training.bags import attention_record

    if pred["attention"] is None:
        return
    row = {int(p): r for r, p in enumerate(pred["pos"])}
    records = []
    for j in idx:
        bag, r = bags.get(patients[j]), row[int(j)]
        if bag is None or len(pred["attention"][r]) != bag.n_tiles:
            continue  # no slide for this patient
        rec = attention_record(bag, split, patients[j], pred["attention"][r],
                               float(pred["risk"][r]), str(role[j]))
        if rec is not None:  # None: features without tile coordinates
            records.append(rec)
    write(path, records)
