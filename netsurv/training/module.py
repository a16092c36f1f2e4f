"""Lightning module for deep survival models: Cox partial likelihood or discrete-time NLL.

``loss="cox"`` (alias ``"deepsurv"``): the network outputs one log-hazard per patient and the
loss is the negative Cox partial log-likelihood over the patients of a batch (batches hold
several bags, so the risk sets are real; an event-free batch gives an exact zero loss and is
counted in ``train/eventless_batches``). ``loss="nll"``: the network outputs one hazard logit
per time bin (edges fitted on the fit rows' uncensored times) and the risk used for the C-index
is minus the restricted mean survival time.

Under DDP (several processes) the Cox risk sets are those of the *global* batch (risk, time
and event gathered across ranks with gradients; :mod:`netsurv.training.ddp`), so the loss and
the averaged gradient equal those of one process on the same batch; the NLL is averaged over
the global batch.

The loss is an object (:class:`netsurv.survival.losses.SurvivalLoss`, built by
:func:`~netsurv.survival.losses.make_loss` from a ``loss=`` name): it computes the batch loss,
the risk from the network output and the output size, so the module never switches on the name.

Validation / test C-index is computed once per epoch on all patients of the set (each on
exactly one process, gathered without padding), logged as ``val/cindex`` and ``test/cindex``.
Model selection (checkpoint, early stopping) monitors ``val/cindex_smooth``: the mean ``val/cindex`` of the last
``smooth`` epochs, reported as 0 before epoch ``select_after``. With the few validation patients
of a small cohort the raw C-index of one epoch is noisy enough that an untrained network at
epoch 0 often "wins"; the window and the warm-up keep the choice on a stable, trained model.

That selection state (validation history, the snapshot window and the selected snapshots) is
saved in Lightning checkpoints, so a run resumed from ``last.ckpt`` continues it.
"""
from __future__ import annotations

from collections import deque

import lightning as L
import numpy as np
import torch

from netsurv.modalities import WSI_MASK
from netsurv.survival.losses import SurvivalLoss, make_loss
from netsurv.survival.metrics import MetricError, harrell_cindex
from netsurv.training.ddp import gather_cat

__all__ = ["SurvivalModule"]


class SurvivalModule(L.LightningModule):
    """Lightning module that trains a survival network with a :class:`SurvivalLoss`.

    Logs ``train/loss``, ``val/cindex``, ``test/cindex`` and the model-selection metric
    ``val/cindex_smooth`` (see the module docstring); optionally keeps the snapshot ensemble of
    the selected epochs (``snapshots``), the validation risks of every epoch (``record_val``) or
    the nets of the last ``keep_last`` epochs.
    """
    def __init__(self, net: torch.nn.Module, loss: str | SurvivalLoss = "cox",
                 ties: str | None = None, edges=None, lr: float = 2e-4,
                 weight_decay: float = 1e-2, select_after: int = 0, smooth: int = 1,
                 snapshots: bool = False, record_val: bool = False, keep_last: int = 0):
        """``loss``: a :class:`SurvivalLoss` object, or a ``loss=`` name built here with
        :func:`make_loss` and ``ties`` (default "efron") / ``edges`` (which only go with a
        name)."""
        super().__init__()
        self.net = net
        if isinstance(loss, SurvivalLoss):
            if ties is not None or edges is not None:
                raise TypeError("SurvivalModule: ties/edges go with a loss name; a loss object "
                                "already has them (make_loss(name, ties=..., edges=...))")
            self.criterion = loss
        else:
            self.criterion = make_loss(loss, ties="efron" if ties is None else ties,
                                       edges=edges)
        self.lr, self.weight_decay = lr, weight_decay
        self.select_after, self.smooth = int(select_after), max(1, int(smooth))
        self.val_history: list[float] = []
        # snapshot ensemble: the nets of the ``smooth`` epochs whose mean val C was selected
        self.snapshots = bool(snapshots)
        self._window: deque = deque(maxlen=self.smooth)
        self.best_snapshots: list[dict] | None = None
        self._best_sel = -np.inf
        self._buf = {"val": [], "test": []}
        self.eventless_batches = 0
        # inner-fold training: (positions, risks) of the validation patients after every epoch
        self.record_val = bool(record_val)
        self.val_records: list[tuple[np.ndarray, np.ndarray]] = []
        # refit without validation: the nets of the last ``keep_last`` epochs (snapshots)
        self.keep_last = int(keep_last)
        if self.keep_last:
            self._window = deque(maxlen=self.keep_last)

    # -- the loss -----------------------------------------------------------------------------
    @property
    def loss_name(self) -> str:
        """Canonical name of the loss ("cox" | "nll"), as saved with models."""
        return self.criterion.name

    @property
    def edges(self) -> np.ndarray | None:
        """Time-bin edges of a discrete-time loss (``None`` for Cox)."""
        return self.criterion.edges

    # -- outputs ------------------------------------------------------------------------------
    def risk(self, out: torch.Tensor) -> torch.Tensor:
        """Risk per patient (higher = earlier event) from the network output ``out``."""
        return self.criterion.risk(out)

    def forward(self, batch):
        """Run the network on ``batch``; returns its output dict (``"out"``: [B, out_dim])."""
        return self.net(batch)

    def _loss(self, out, batch):
        """(loss of the global batch, whether it has an event, global batch size); in one
        process the global batch is this batch."""
        return self.criterion.batch_loss(out, batch)

    # -- steps --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        """Lightning hook: loss of the global batch, logged as ``train/loss``."""
        out = self.net(batch)["out"]
        loss, has_event, n = self._loss(out, batch)
        if not has_event:
            self.eventless_batches += 1
        # Cox: the same global value on every rank; NLL: rank shares whose mean is the global
        # mean, hence sync_dist (a no-op in one process)
        self.log("train/loss", loss, batch_size=n, on_epoch=True, on_step=False,
                 sync_dist=self.criterion.sync_log)
        return loss

    def _eval_step(self, stage, batch):
        out = self.net(batch)["out"]
        self._buf[stage].append((self.risk(out).float(), batch["time"].float(),
                                 batch["event"].float(), batch["pos"]))

    def validation_step(self, batch, batch_idx):
        """Lightning hook: buffer the batch's risks, times, events and positions."""
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        """Lightning hook: buffer the batch's risks, times, events and positions."""
        self._eval_step("test", batch)

    def _epoch_end(self, stage):
        if self._buf[stage]:
            risk, time, event, pos = (torch.cat(x) for x in zip(*self._buf[stage]))
        else:  # a rank without patients of this set still takes part in the gather
            risk = time = event = torch.zeros(0, device=self.device)
            pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self._buf[stage].clear()
        # every patient is on exactly one rank (no padding): the gathered set is the whole set
        risk, time, event, pos = (gather_cat(x) for x in (risk, time, event, pos))
        if len(risk) == 0:
            return
        if (stage == "val" and self.record_val
                and not (self.trainer is not None and self.trainer.sanity_checking)):
            self.val_records.append((pos.cpu().numpy().astype(np.int64),
                                     risk.cpu().numpy().astype(np.float64)))
        try:
            c = harrell_cindex(time.cpu().numpy(), event.cpu().numpy(), risk.cpu().numpy())
        except MetricError:  # no comparable pair in this set: uninformative
            c = 0.5
        self.log(f"{stage}/cindex", float(c), prog_bar=stage == "val", sync_dist=False)
        if stage == "val" and not (self.trainer is not None and self.trainer.sanity_checking):
            self.val_history.append(float(c))
            sel = (float(np.mean(self.val_history[-self.smooth:]))
                   if self.current_epoch >= self.select_after else 0.0)
            self.log("val/cindex_smooth", sel, sync_dist=False)
            if self.snapshots:
                self._window.append({k: v.detach().to("cpu", copy=True)
                                     for k, v in self.net.state_dict().items()})
                # strictly better, as ModelCheckpoint(mode="max") decides
                if self.current_epoch >= self.select_after and sel > self._best_sel:
                    self._best_sel = sel
                    self.best_snapshots = list(self._window)

    def on_validation_epoch_end(self):
        """Lightning hook: log ``val/cindex`` and ``val/cindex_smooth`` of the whole set."""
        self._epoch_end("val")

    def on_train_epoch_end(self):
        """Lightning hook: with ``keep_last``, add this epoch's net to the kept snapshots."""
        if self.keep_last:
            self._window.append({k: v.detach().to("cpu", copy=True)
                                 for k, v in self.net.state_dict().items()})
            self.best_snapshots = list(self._window)

    def on_test_epoch_end(self):
        """Lightning hook: log ``test/cindex`` of the whole test set."""
        self._epoch_end("test")

    # -- selection state in checkpoints (resume from last.ckpt continues the same choice) ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning hook: save the model-selection state in the checkpoint."""
        checkpoint["netsurv_selection"] = {
            "val_history": list(self.val_history), "window": list(self._window),
            "best_snapshots": self.best_snapshots, "best_sel": float(self._best_sel),
            "eventless_batches": int(self.eventless_batches)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Lightning hook: restore the model-selection state saved by :meth:`on_save_checkpoint`."""
        st = checkpoint.get("netsurv_selection")
        if st is None:
            return
        self.val_history = list(st["val_history"])
        self._window = deque(st["window"], maxlen=self._window.maxlen)
        self.best_snapshots = st["best_snapshots"]
        self._best_sel = float(st["best_sel"])
        self.eventless_batches = int(st["eventless_batches"])

    def configure_optimizers(self):
        """Lightning hook: AdamW with the module's ``lr`` and ``weight_decay``."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def predict_snapshots(self, loader, states: list[dict]) -> dict[str, list]:
        """:meth:`predict_loader` averaged over the nets ``states`` (network outputs and tile
        attention averaged; risk recomputed from the mean output).  The validation C that
        chose the epoch is a mean over these same epochs, so their mean prediction is what was
        selected, with less epoch-to-epoch noise than any single one.  The net's weights are
        restored afterwards."""
        keep = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        preds = []
        try:
            for st in states:
                self.net.load_state_dict(st)
                preds.append(self.predict_loader(loader))
        finally:
            self.net.load_state_dict(keep)
        out = np.mean([p["out"] for p in preds], axis=0)
        with torch.inference_mode():
            risk = self.risk(torch.as_tensor(out)).float().numpy()
        attn = None
        if preds[0]["attention"] is not None:
            attn = [np.mean(a, axis=0) for a in zip(*(p["attention"] for p in preds))]
        return {"pos": preds[0]["pos"], "risk": risk, "out": out, "attention": attn}

    # -- inference outside the Trainer (predictions and heatmaps; on the module's device) ----
    @torch.inference_mode()
    def predict_loader(self, loader) -> dict[str, list]:
        """Outputs for the patients of ``loader`` (this process's share under DDP; the caller
        gathers).  Batches are moved to the module's device, results come back to the CPU."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        self.eval()
        res = {"pos": [], "risk": [], "out": [], "attention": []}
        for batch in loader:
            batch = move_data_to_device(batch, self.device)
            o = self.net(batch)
            res["pos"].append(batch["pos"].cpu().numpy())
            res["risk"].append(self.risk(o["out"]).float().cpu().numpy())
            res["out"].append(o["out"].float().cpu().numpy())
            if o["attention"] is not None:
                mask = batch[WSI_MASK]
                for b in range(len(batch["pos"])):
                    res["attention"].append(o["attention"][b][mask[b]].float().cpu().numpy())
        if not res["pos"]:  # no patient on this process
            return {"pos": np.zeros(0, np.int64), "risk": np.zeros(0, np.float32),
                    "out": np.zeros((0, self._out_dim()), np.float32), "attention": None}
        return {"pos": np.concatenate(res["pos"]), "risk": np.concatenate(res["risk"]),
                "out": np.concatenate(res["out"]),
                "attention": res["attention"] or None}

    def _out_dim(self) -> int:
        return self.criterion.out_dim
