"""Survival losses (torch): Cox partial likelihood and discrete-time logistic-hazard NLL.

Convention used throughout netsurv: ``risk`` is a log-hazard score, higher = earlier event.

* :func:`cox_ph_loss` -- negative Cox partial log-likelihood (DeepSurv loss), Efron or Breslow
  ties, O(n log n) time / O(n) memory, stable for large |risk| (log-sum-exp everywhere).
* :class:`TimeBins` + :func:`nll_logistic_hazard` -- discrete-time survival with the same
  binning rule and likelihood as pycox's ``LabTransDiscreteTime(scheme="quantiles")`` /
  ``nll_logistic_hazard`` (Kvamme & Borgan 2019), re-implemented here so that pycox is only a
  test dependency.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "SurvivalLoss",
    "make_loss",
    "canonical_loss",
    "cox_ph_loss",
    "cox_ph_loss_with_flag",
    "CoxPHLoss",
    "TimeBins",
    "nll_logistic_hazard",
    "hazard_to_survival",
    "risk_from_logits",
    "LogisticHazardLoss",
]


# ``loss=`` config value -> loss class; filled by :class:`SurvivalLoss` subclasses (``names``)
LOSSES: dict[str, type[SurvivalLoss]] = {}


def _loss_class(name) -> type[SurvivalLoss]:
    try:
        return LOSSES[str(name)]
    except KeyError:
        raise ValueError(f"loss={name!r}: choose one of {sorted(LOSSES)}") from None


def make_loss(name, *, ties: str = "efron", edges=None) -> SurvivalLoss:
    """The loss object of a loss name (``cox``, its alias ``deepsurv``, ``nll``): what a saved
    model stores (``inputs["loss"]``) to rebuild its loss.  Training builds the loss from the
    ``loss`` config group instead (its ``_target_``, ``hydra.utils.instantiate``).

    ``ties``: Cox tie handling ("efron" | "breslow"); ``edges``: the fitted
    :class:`TimeBins` edges of a loss with ``needs_bins`` (``None`` until they are fitted).
    Each class takes the options it uses.  Raises ``ValueError`` listing the names for an
    unknown one."""
    return _loss_class(name).from_options(ties=ties, edges=edges)


def canonical_loss(name: str) -> str:
    """``loss=`` config value -> "cox" | "nll" (``deepsurv`` is the Cox partial likelihood)."""
    return _loss_class(name).name


class SurvivalLoss(nn.Module):
    """A training objective together with what depends on it (network output size, risk score,
    survival curves).  The training module and the evaluation call these and never switch on the
    loss name, so a new loss is one subclass: set ``name`` / ``names`` (registered in
    :data:`LOSSES`, which :func:`make_loss` reads) and implement the methods.

    Holds no parameters or buffers: a module's ``state_dict`` (checkpoints, saved models) is that
    of its network alone.  Saved models store ``name`` and rebuild the object with
    :func:`make_loss`."""

    name: str = ""                 # canonical name, stored in saved models (inputs["loss"])
    names: tuple[str, ...] = ()    # ``loss=`` config values of this class (aliases included)
    needs_bins: bool = False       # trained on TimeBins targets (batch "bin", "bin_event")
    classical: bool = False        # a classical (linear Cox) model fits the same objective
    sync_log: bool = False         # batch_loss values differ per rank (log with sync_dist)
    edges: np.ndarray | None = None  # time-bin edges (losses with needs_bins)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        for n in cls.__dict__.get("names", ()):
            LOSSES[n] = cls

    @classmethod
    def from_options(cls, *, ties: str = "efron", edges=None) -> SurvivalLoss:
        """The object for :func:`make_loss`'s options (take the ones this loss uses)."""
        raise NotImplementedError

    @property
    def out_dim(self) -> int:
        """Network output size per patient."""
        raise NotImplementedError

    def risk(self, out: Tensor) -> Tensor:
        """[N] scalar risk (higher = earlier event) from the network output ``out`` [N, out_dim]."""
        raise NotImplementedError

    def batch_loss(self, out: Tensor, batch: dict) -> tuple[Tensor, bool, int]:
        """(loss of the global batch, whether it has an event, global batch size); in one
        process the global batch is ``batch`` (:mod:`netsurv.training.ddp`)."""
        raise NotImplementedError

    def survival_fn(self, pred_out, fit_idx, time, event, val_idx=None, held_out=None):
        """``(fn, slope)``: ``fn(idx, times)`` = S(t | patient) [len(idx), len(times)] from the
        network outputs ``pred_out`` [n, out_dim] of all patients; ``slope``: the calibration
        slope applied to the risks, or ``None``."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Cox partial likelihood
# --------------------------------------------------------------------------------------------
def _as_1d(x, like: Tensor, dtype=None) -> Tensor:
    x = torch.as_tensor(x, device=like.device, dtype=dtype)
    return x.reshape(-1)


def cox_ph_loss_with_flag(risk: Tensor, time, event, ties: str = "efron",
                          reduction: str = "mean") -> tuple[Tensor, bool]:
    """Negative Cox partial log-likelihood and whether the batch contained any event.

    Parameters
    ----------
    risk : [N] or [N, 1] float tensor of log-hazards (higher = earlier event).
    time, event : [N] tensors/arrays; ``event`` is bool/0-1 (1 = event observed).
    ties : "efron" (as lifelines / R ``coxph`` default) or "breslow".
    reduction : "mean" (divided by the number of events, as DeepSurv/pycox) or "sum" (= -log PL).

    A batch without events has no comparable pair, so the loss is ``risk.sum() * 0``: exactly
    zero, still attached to the graph (so DDP/optimisers see a gradient of zeros, never NaN).
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if risk.dim() == 2 and risk.shape[1] == 1:
        risk = risk[:, 0]
    if risk.dim() != 1:
        raise ValueError(f"risk must have shape [N] or [N, 1], got {tuple(risk.shape)}")
    time = _as_1d(time, risk)
    event = _as_1d(event, risk).to(torch.bool)
    if not (time.shape[0] == event.shape[0] == risk.shape[0]):
        raise ValueError(f"risk, time, event lengths differ: {risk.shape[0]}, {time.shape[0]}, "
                         f"{event.shape[0]}")
    if torch.isnan(time).any():
        raise ValueError("time contains NaN")

    n_events = int(event.sum())
    if n_events == 0:
        return risk.sum() * 0.0, False

    # Sort by time, descending: the risk set of a time t is then a prefix of the array.
    order = torch.argsort(time, descending=True, stable=True)
    # index_select rather than x[idx]: same result, but much cheaper on busy CPUs (the generic
    # advanced-indexing kernel is parallelised and stalls under thread contention).
    eta, t, d = (x.index_select(0, order) for x in (risk, time, event))
    # Tie groups (unique times) in this order; tied subjects are all in each other's risk set,
    # so the risk-set sum of a group is the cumulative sum at the group's *last* position.
    _, grp, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    n_grp = counts.shape[0]
    last = torch.cumsum(counts, 0) - 1
    log_r = torch.logcumsumexp(eta, 0).index_select(0, last)  # [G] log sum_{R_k} exp(eta)
    log_r_i = log_r.index_select(0, grp)                      # per subject

    if ties == "breslow":
        per_event = eta - log_r_i
    else:
        # Efron: the l-th (l = 0..d_k-1) of the d_k tied events at t_k sees the denominator
        # R_k - (l/d_k) D_k, with D_k = sum of exp(eta) over the tied events. Written as
        # log R_k + log1p(-(l/d_k) * D_k/R_k), with D_k/R_k in (0, 1], which is stable.
        df = d.to(eta.dtype)
        d_k = torch.zeros(n_grp, dtype=eta.dtype, device=eta.device).index_add_(0, grp, df)
        has_ev = d_k > 0
        # Segment log-sum-exp over events only; shift by the (detached) per-group event max.
        # Non-event entries get exponent 0 and weight 0, so neither inf nor NaN reaches autograd.
        masked = torch.where(d, eta.detach(), torch.full_like(eta, -torch.inf))
        m_k = torch.full((n_grp,), -torch.inf, dtype=eta.dtype, device=eta.device)
        m_k = m_k.scatter_reduce(0, grp, masked, reduce="amax", include_self=True)
        m_k = torch.where(has_ev, m_k, torch.zeros_like(m_k))
        expo = torch.where(d, eta - m_k.index_select(0, grp), torch.zeros_like(eta))
        s_k = torch.zeros(n_grp, dtype=eta.dtype, device=eta.device).index_add_(
            0, grp, torch.exp(expo) * df)
        s_k = torch.where(has_ev, s_k, torch.ones_like(s_k))
        # log(D_k / R_k) <= 0 (up to rounding; no clamp, it would cut the gradient when
        # D_k = R_k).  Groups without events get -inf *before* the exp, i.e. a ratio of exactly 0:
        # their placeholder log D_k = 0 minus a very negative log R_k (censored patients with
        # risk -1e4) would overflow to inf, and 0 * inf = NaN in the loss and its gradient.
        log_ratio = torch.where(has_ev, torch.log(s_k) + m_k - log_r,
                                torch.full_like(log_r, -torch.inf))
        ratio = torch.exp(log_ratio)
        # rank l of each event inside its tie group (0-based); order inside a group is irrelevant
        # because the Efron sum is over l only.
        cum = torch.cumsum(d.to(torch.long), 0)
        # events in earlier groups
        before = (cum.index_select(0, last) - d_k.to(torch.long)).index_select(0, grp)
        rank = (cum - 1 - before).to(eta.dtype)
        frac = torch.where(d, rank / d_k.index_select(0, grp).clamp(min=1.0),
                           torch.zeros_like(eta))
        # frac < 1 and ratio <= 1: the log1p argument stays above -1
        per_event = eta - log_r_i - torch.log1p(-frac * ratio.index_select(0, grp))

    # where, not a product: a non-event's term is never needed, and 0 * inf would be NaN
    nll = -torch.where(d, per_event, torch.zeros_like(per_event)).sum()
    if reduction == "mean":
        nll = nll / n_events
    return nll, True


def cox_ph_loss(risk: Tensor, time, event, ties: str = "efron",
                reduction: str = "mean") -> Tensor:
    """Negative Cox partial log-likelihood; see :func:`cox_ph_loss_with_flag`."""
    return cox_ph_loss_with_flag(risk, time, event, ties=ties, reduction=reduction)[0]


class CoxPHLoss(SurvivalLoss):
    """Negative Cox partial log-likelihood (``loss=cox``, alias ``deepsurv``); the network outputs
    one log-hazard per patient, which is the risk.  ``last_has_events`` tells whether the last
    batch had any event (a zero loss from an event-free batch should not be logged as a real loss
    value)."""

    name = "cox"
    names = ("cox", "deepsurv")
    classical = True
    sync_log = False  # the loss of the gathered global batch: the same value on every rank

    def __init__(self, ties: str = "efron", reduction: str = "mean"):
        super().__init__()
        self.ties, self.reduction = ties, reduction
        self.last_has_events: bool | None = None

    @classmethod
    def from_options(cls, *, ties: str = "efron", edges=None) -> CoxPHLoss:
        """The Cox loss for :func:`make_loss`'s options: uses ``ties``, ignores ``edges``."""
        return cls(ties=ties)

    def forward(self, risk: Tensor, time, event) -> Tensor:
        """Negative Cox partial log-likelihood of ``risk`` in this batch.

        Also sets ``last_has_events`` (see :func:`cox_ph_loss_with_flag`).
        """
        loss, self.last_has_events = cox_ph_loss_with_flag(risk, time, event, self.ties,
                                                           self.reduction)
        return loss

    @property
    def out_dim(self) -> int:
        """One output per patient: the log-hazard."""
        return 1

    def risk(self, out: Tensor) -> Tensor:
        """The log-hazard ``out[:, 0]`` is the risk."""
        return out[:, 0]

    def batch_loss(self, out: Tensor, batch: dict) -> tuple[Tensor, bool, int]:
        """Risk sets of the global batch (gathered across ranks); mean over its events."""
        loss, self.last_has_events, n = global_cox_loss(out[:, 0], batch["time"],
                                                        batch["event"], ties=self.ties)
        return loss, self.last_has_events, n

    def survival_fn(self, pred_out, fit_idx, time, event, val_idx=None, held_out=None):
        """A network's log-hazard is over-dispersed on new patients (it was fitted on the fit
        patients), which makes its curves overconfident.  The calibration slope (one-covariate
        Cox fit of the inner-validation patients' risks, :func:`netsurv.survival.calibration.
        calibration_slope`) shrinks it, and the Breslow baseline hazard (the package's one,
        :class:`netsurv.survival.breslow.Breslow`) is fitted on the training patients' shrunk
        risks.  ``held_out``: ``(positions, risks)`` of out-of-fold risks (inner folds) to fit
        the slope on instead of ``val_idx``.  Without either the slope is 1 and Breslow uses the
        fit patients."""
        from netsurv.survival.breslow import Breslow
        from netsurv.survival.calibration import calibration_slope

        risk = pred_out[:, 0]
        slope, idx = 1.0, np.asarray(fit_idx)
        if held_out is not None:
            hp, hr = held_out
            slope = calibration_slope(hr, time[hp], event[hp])
        elif val_idx is not None and len(val_idx):
            slope = calibration_slope(risk[val_idx], time[val_idx], event[val_idx])
            idx = np.concatenate([idx, np.asarray(val_idx)])
        br = Breslow().fit(slope * risk[idx], time[idx], event[idx])

        def fn(idx, times):
            return br.survival(slope * risk[idx], times)
        return fn, float(slope)


# --------------------------------------------------------------------------------------------
# Discrete time (logistic hazard)
# --------------------------------------------------------------------------------------------
def _km_survival(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier S(t) at every unique observed time (censored ones included), with (0, 1)
    prepended when all times are > 0. Written as exp(cumsum(log)) like pycox so that the
    quantile search below sees bit-identical levels."""
    ut, inv = np.unique(time, return_inverse=True)
    n_at = len(time) - np.concatenate(([0], np.cumsum(np.bincount(inv))[:-1]))
    d = np.bincount(inv, weights=event.astype(float))
    q = 1.0 - d / n_at
    surv = np.zeros_like(q)
    zero = np.flatnonzero(q == 0)
    stop = zero[0] if zero.size else len(q)             # S stays 0 after it hits 0
    surv[:stop] = np.exp(np.cumsum(np.log(q[:stop])))
    if ut[0] > 0:
        ut, surv = np.concatenate(([0.0], ut)), np.concatenate(([1.0], surv))
    return ut, surv


class TimeBins:
    """Discretise (time, event) for discrete-time models; same rule as pycox
    ``LabTransDiscreteTime(n_bins, scheme=...)`` so fitted edges and indices match it.

    Edges (``edges_``, also the model's output size ``n_bins_ = len(edges_)``):
      * ``scheme="event_quantiles"`` (default): 0, then the quantiles at
        ``linspace(0, 1, n_bins)[1:-1]`` of the training split's UNCENSORED times, then the maximum
        training time; censored times only set the horizon. Duplicates removed (with a warning).
      * ``scheme="quantiles"`` (pycox's rule, kept for parity): fit the Kaplan-Meier curve on the TRAINING split and
        take, for ``n_bins`` survival levels equally spaced between min S and 1, the largest
        training time whose S(t) is >= the level. So edges sit at quantiles of the
        censoring-corrected event-time distribution (the KM only drops at event times; an edge
        is the end of a KM plateau, which can be a censored time). Duplicates are removed (with
        a warning, so ``n_bins_`` can be < ``n_bins``), the first edge is set to 0 and the last
        edge is the maximum training time.
      * ``scheme="equidistant"``: ``linspace(0, max training time, n_bins)``.

    Mapping (``transform``), bin j <-> time ``edges_[j]``:
      * an event at t goes to the first edge >= t (events in (e_{j-1}, e_j] -> j);
      * a censored t goes to the last edge <= t, i.e. the subject is counted as having survived
        bin j (through time e_j) but not bin j+1 -- censoring is moved to the left edge, which
        never claims survival beyond what was observed;
      * t > last edge (test data beyond the training horizon) -> last bin, event set to 0
        (the subject survived the whole modelled horizon).
    """

    def __init__(self, n_bins: int = 20, scheme: str = "event_quantiles"):
        self.n_bins = n_bins
        self.scheme = scheme

    def fit(self, time, event, n_bins: int | None = None) -> TimeBins:
        """Fit the bin edges on training times and events with the configured ``scheme``.

        Duplicate edges are removed with a warning, so ``n_bins_`` can be below ``n_bins``.

        Parameters
        ----------
        time : array-like
            Finite, non-negative survival or censoring times.
        event : array-like
            Event indicators (true or 1 = event).
        n_bins : int, optional
            Replaces ``self.n_bins`` when given (at least 2).

        Returns
        -------
        TimeBins
            ``self``, with ``edges_`` (strictly increasing, starting at 0) and ``n_bins_`` set.

        Raises
        ------
        ValueError
            On invalid inputs, an unknown ``scheme``, a quantile scheme without any event, or
            edges that are not strictly increasing.
        """
        if n_bins is not None:
            self.n_bins = n_bins
        if self.n_bins < 2:
            raise ValueError("n_bins must be >= 2")
        time = np.asarray(time, dtype=np.float64).reshape(-1)
        event = np.asarray(event).reshape(-1).astype(bool)
        if time.shape != event.shape or time.size == 0:
            raise ValueError("time and event must be non-empty and of equal length")
        if not np.isfinite(time).all() or (time < 0).any():
            raise ValueError("time must be finite and >= 0")
        if self.scheme == "equidistant":
            edges = np.linspace(0.0, time.max(), self.n_bins)
        elif self.scheme == "event_quantiles":
            if not event.any():
                raise ValueError("TimeBins(scheme='event_quantiles') needs at least one event")
            inner = np.quantile(time[event], np.linspace(0.0, 1.0, self.n_bins)[1:-1])
            edges = np.unique(np.concatenate([[0.0], inner[inner > 0], [time.max()]]))
            if len(edges) != self.n_bins:
                warnings.warn(f"TimeBins: duplicate edges removed, {len(edges)} bins instead of "
                              f"{self.n_bins}", UserWarning, stacklevel=2)
        elif self.scheme == "quantiles":
            if not event.any():
                raise ValueError("TimeBins(scheme='quantiles') needs at least one event")
            ut, surv = _km_survival(time, event)
            levels = np.linspace(surv.min(), surv.max(), self.n_bins)
            # surv is non-increasing; on the reversed (non-decreasing) curve the first index
            # with S >= level is the largest time with S(t) >= level.
            pos = np.searchsorted(surv[::-1], levels)
            edges = np.unique(ut[::-1][pos])
            if len(edges) != self.n_bins:
                warnings.warn(f"TimeBins: duplicate edges removed, {len(edges)} bins instead of "
                              f"{self.n_bins}", UserWarning, stacklevel=2)
            edges[0] = 0.0
        else:
            raise ValueError("scheme must be 'event_quantiles', 'quantiles' or 'equidistant', "
                             f"got {self.scheme!r}")
        if (np.diff(edges) <= 0).any():
            raise ValueError("TimeBins: edges are not strictly increasing (all times equal?)")
        self.edges_ = edges
        self.n_bins_ = len(edges)
        return self

    def transform(self, time, event) -> tuple[np.ndarray, np.ndarray]:
        """-> (idx int64 [N] in 0..n_bins_-1, event float32 [N]); see the class docstring."""
        if not hasattr(self, "edges_"):
            raise RuntimeError("TimeBins: call fit() first")
        time = np.asarray(time, dtype=np.float64).reshape(-1)
        event = np.asarray(event).reshape(-1).astype(bool).copy()
        if np.isnan(time).any() or (time < 0).any():
            raise ValueError("time must be >= 0 and not NaN")
        e = self.edges_
        beyond = time > e[-1]
        event[beyond] = False
        t = np.minimum(time, e[-1])
        idx_event = np.searchsorted(e, t, side="left")            # first edge >= t
        idx_cens = np.searchsorted(e, t, side="right") - 1        # last edge <= t
        idx = np.where(event, idx_event, idx_cens).astype(np.int64)
        return idx, event.astype(np.float32)

    def fit_transform(self, time, event, n_bins: int | None = None):
        """:meth:`fit` on ``time`` / ``event``, then :meth:`transform` them."""
        return self.fit(time, event, n_bins=n_bins).transform(time, event)


def nll_logistic_hazard(logits: Tensor, idx, event, reduction: str = "mean") -> Tensor:
    """Discrete-time NLL with hazard h_j = sigmoid(logits[:, j]) (pycox ``nll_logistic_hazard``).

    Subject i with bin k contributes -sum_{j<k} log(1-h_j) - (event ? log h_k : log(1-h_k)),
    i.e. a censored subject in bin k survived bin k (matches :class:`TimeBins`).
    reduction: "mean" over subjects (as pycox), "sum" or "none".
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, n_bins], got {tuple(logits.shape)}")
    idx = _as_1d(idx, logits, dtype=torch.long)
    event = _as_1d(event, logits).to(logits.dtype)
    if idx.shape[0] != logits.shape[0] or event.shape[0] != logits.shape[0]:
        raise ValueError("logits, idx, event must have the same length")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= logits.shape[1]):
        raise ValueError(f"idx out of range for logits with {logits.shape[1]} bins")
    target = torch.zeros_like(logits).scatter(1, idx[:, None], event[:, None])
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = bce.cumsum(1).gather(1, idx[:, None])[:, 0]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def hazard_to_survival(logits: Tensor) -> Tensor:
    """S[:, j] = P(T > edges_[j]) = prod_{l<=j} (1 - sigmoid(logits[:, l])).

    Computed as exp(cumsum(logsigmoid(-logits))): exact and without pycox's +1e-7 epsilon, so
    values are in [0, 1] and non-increasing along bins."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))


def risk_from_logits(logits: Tensor, edges=None) -> Tensor:
    """Scalar risk for the C-index: minus the restricted mean survival time up to the last edge,
    RMST = sum_j S_j * (edges[j+1] - edges[j]) (S is a step function, S_j on [e_j, e_{j+1})).

    With ``edges=None`` unit widths are used (RMST in bins), which is enough for ranking within
    one model. Higher = earlier event, like the Cox ``risk``."""
    s = hazard_to_survival(logits)
    if edges is None:
        widths = torch.ones(s.shape[1] - 1, dtype=s.dtype, device=s.device)
    else:
        e = torch.as_tensor(np.asarray(edges, dtype=np.float64), dtype=s.dtype, device=s.device)
        if e.shape[0] != s.shape[1]:
            raise ValueError(f"edges has {e.shape[0]} entries, logits have {s.shape[1]} bins")
        widths = torch.diff(e)
    return -(s[:, :-1] * widths).sum(1)


class LogisticHazardLoss(SurvivalLoss):
    """Discrete-time logistic-hazard NLL (``loss=nll``, :func:`nll_logistic_hazard`); the network
    outputs one hazard logit per time bin (``edges``: the fitted :class:`TimeBins` edges, trained
    on their ``bin`` / ``bin_event`` targets) and the risk is minus the restricted mean survival
    time (:func:`risk_from_logits`).  ``n_bins`` / ``scheme``: how the training code fits those
    :class:`TimeBins` on each split's fit patients (``needs_bins``), before building the loss
    again with ``edges``."""

    name = "nll"
    names = ("nll",)
    needs_bins = True
    sync_log = True  # rank shares whose mean is the global mean

    def __init__(self, reduction: str = "mean", edges=None, n_bins: int = 8,
                 scheme: str = "event_quantiles"):
        super().__init__()
        self.reduction = reduction
        self.edges = None if edges is None else np.asarray(edges, float)
        self.n_bins, self.scheme = int(n_bins), str(scheme)

    @classmethod
    def from_options(cls, *, ties: str = "efron", edges=None) -> LogisticHazardLoss:
        """The loss for :func:`make_loss`'s options: uses ``edges``, ignores ``ties``."""
        return cls(edges=edges)

    def forward(self, logits: Tensor, idx, event) -> Tensor:
        """Discrete-time NLL of ``logits`` for bin targets ``idx`` / ``event``.

        See :func:`nll_logistic_hazard`.
        """
        return nll_logistic_hazard(logits, idx, event, self.reduction)

    def _edges(self) -> np.ndarray:
        if self.edges is None:
            raise ValueError("LogisticHazardLoss: no time-bin edges (LogisticHazardLoss(edges=...)"
                             " or make_loss(..., edges=))")
        return self.edges

    @property
    def out_dim(self) -> int:
        """One hazard logit per time-bin edge.

        Raises
        ------
        ValueError
            If the loss was built without ``edges``.
        """
        return len(self._edges())

    def risk(self, out: Tensor) -> Tensor:
        """Minus the restricted mean survival time of the logits (:func:`risk_from_logits`)."""
        return risk_from_logits(out, self.edges)

    def batch_loss(self, out: Tensor, batch: dict) -> tuple[Tensor, bool, int]:
        """Mean over the global batch (under DDP each rank returns its share)."""
        loss, n = global_nll_loss(out, batch["bin"], batch["bin_event"])
        return loss, True, n

    def survival_fn(self, pred_out, fit_idx, time, event, val_idx=None, held_out=None):
        """The model's own discrete survival curve, a step function over the bin edges (slope
        ``None``)."""
        edges = self._edges()
        surv = hazard_to_survival(torch.as_tensor(pred_out)).numpy()

        def fn(idx, times):
            j = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 1)
            return surv[idx][:, j]
        return fn, None


# ----------------------------------------------------------------------------- global batch (DDP)
# Losses of the global batch when training runs on several processes (netsurv.training.ddp
# explains the arithmetic); in one process they are the plain single-process losses.
def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_cat(x: Tensor, *, grad: bool = False) -> Tensor:
    """``x`` of every rank concatenated along dim 0 in rank order; the ranks' lengths may differ
    (collectives need equal shapes: padded to the longest, trimmed after).  ``grad=True``: the
    result is differentiable (``torch.distributed.nn``); its backward sums over ranks."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    if x.shape[0] < longest:
        x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - x.shape[0]))
    if grad:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            # the functional replacement is private API; this one is public and maintained
            warnings.filterwarnings("ignore", ".*all_gather is deprecated.*", FutureWarning)
            parts = all_gather(x.contiguous())
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def global_cox_loss(risk: Tensor, time: Tensor, event: Tensor, ties: str = "efron"
                    ) -> tuple[Tensor, bool, int]:
    """Negative Cox partial log-likelihood (mean over events) of the global batch:
    (loss, whether the global batch has an event, global batch size)."""
    risk = risk.reshape(-1)
    r = gather_cat(risk, grad=True)
    t = gather_cat(time.reshape(-1).to(risk.dtype))
    e = gather_cat(event.reshape(-1).to(risk.dtype))
    loss, has_event = cox_ph_loss_with_flag(r, t, e, ties=ties)
    return loss, has_event, int(r.shape[0])


def global_nll_loss(logits: Tensor, idx: Tensor, event: Tensor) -> tuple[Tensor, int]:
    """Discrete-time NLL whose DDP average is the mean over the global batch:
    (this rank's share, global batch size).  The returned value differs per rank; the mean of
    the ranks' values (what DDP and ``sync_dist`` average) is the global mean."""
    import torch.distributed as dist

    _, world = rank_world()
    total = nll_logistic_hazard(logits, idx, event, reduction="sum")
    if world == 1:
        return total / max(1, logits.shape[0]), int(logits.shape[0])
    n = torch.tensor([float(logits.shape[0])], device=logits.device)
    dist.all_reduce(n)
    n_global = int(n.item())
    return total * world / max(1, n_global), n_global
