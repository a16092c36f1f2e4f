"""Report figures from a run directory: time-dependent AUC, Brier score, calibration, hazard-ratio
forest plot, feature selection frequency, and (demo cohort) predicted vs true risk.

Every figure function takes a :class:`RunData` (see :func:`load_run`) and returns a matplotlib
figure; :mod:`netsurv.report.html` turns them into the report. Time-dependent metrics are those
of ``metrics.json``, on its grid (:func:`netsurv.survival.metrics.default_eval_times` of each
split: inside the training follow-up, where the censoring weights exist) with the training
split's censoring weights; survival curves recomputed from the risks use the package's one
Breslow baseline (:class:`netsurv.survival.breslow.Breslow`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from netsurv.survival.breslow import Breslow
from netsurv.survival.metrics import (
    brier_curve,
    default_eval_times,
    followup_limit,
    integrated_brier,
    km_null_survival,
)

SPLIT_ALPHA = 0.35


# --------------------------------------------------------------------------- run loading
@dataclass
class RunData:
    """What :func:`load_run` read from a run directory, for the figure functions.

    Attributes
    ----------
    run_dir : pathlib.Path
        The run directory.
    cfg : dict
        The run's ``config.yaml`` (unresolved), empty when missing.
    metrics : dict or None
        ``metrics.json``, None when missing.
    pred : pandas.DataFrame or None
        ``predictions.csv``, with ``time`` and ``event`` joined when the cohort loads.
    cohort : Cohort or None
        The run's cohort (:class:`netsurv.cohort.schema.Cohort`), None when not loaded.
    target : str
        The endpoint (``metrics.json``'s ``endpoint``, else the config's ``target``).
    problems : list of str
        Why something could not be loaded.
    """

    run_dir: Path
    cfg: dict = field(default_factory=dict)
    metrics: dict | None = None
    pred: pd.DataFrame | None = None      # predictions.csv (+ time, event when the cohort loads)
    cohort: object | None = None          # netsurv.cohort.schema.Cohort or None
    target: str = "os"
    problems: list[str] = field(default_factory=list)  # why something could not be loaded

    @property
    def has_outcome(self) -> bool:
        """True when the predictions carry ``time`` and ``event`` (the cohort was joined)."""
        return self.pred is not None and {"time", "event"} <= set(self.pred.columns)

    def splits(self) -> list[str]:
        """Split names in order of first appearance in the predictions (empty without them)."""
        return [] if self.pred is None else list(dict.fromkeys(self.pred.split.astype(str)))


def load_run(run_dir, cohort_root=None) -> RunData:
    """Read what a training run wrote and join the endpoint from its cohort.

    Nothing here raises for a missing optional file: what could not be read is listed in
    ``RunData.problems``. ``cohort_root`` overrides ``data.root`` of the run's config.yaml.
    """
    run_dir = Path(run_dir)
    rd = RunData(run_dir=run_dir)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            from omegaconf import OmegaConf

            rd.cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
        except Exception as exc:  # noqa: BLE001
            rd.problems.append(f"config.yaml unreadable ({exc})")
    else:
        rd.problems.append("no config.yaml")
    rd.target = str(rd.cfg.get("target", "os"))
    if (run_dir / "metrics.json").is_file():
        rd.metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        rd.target = str(rd.metrics.get("endpoint", rd.target))
    if (run_dir / "predictions.csv").is_file():
        rd.pred = pd.read_csv(run_dir / "predictions.csv", dtype={"patient_id": str, "split": str})
    else:
        rd.problems.append("no predictions.csv")
    root = cohort_root or (rd.cfg.get("data") or {}).get("root")
    if root is None:
        rd.problems.append("no data.root in config.yaml: cohort not loaded")
        return rd
    try:
        from netsurv.cohort.schema import load_cohort

        rd.cohort = load_cohort(root, check_files=False)
    except Exception as exc:  # noqa: BLE001
        rd.problems.append(f"cohort {root} not loaded ({exc})")
        return rd
    if rd.pred is not None:
        t, e = rd.cohort.endpoint(rd.target)
        ep = pd.DataFrame({"patient_id": rd.cohort.patients, "time": t, "event": e})
        ext = (rd.metrics or {}).get("external") if cohort_root is None else None
        if ext and ext.get("test_root"):  # evaluation=external: test patients are another cohort's
            try:
                ep = pd.concat([ep, _external_test(rd, ext)], ignore_index=True)
            except Exception as exc:  # noqa: BLE001
                rd.problems.append(f"test cohort {ext['test_root']} not loaded ({exc})")
        rd.pred = rd.pred.merge(ep, on="patient_id", how="left")
        lost = rd.pred.time.isna()
        if lost.any():
            rd.problems.append(f"{rd.pred.loc[lost, 'patient_id'].nunique()} predicted patient(s) "
                               "are not in the cohort's clinical.csv; left out of the figures")
            rd.pred = rd.pred[~lost].reset_index(drop=True)
    return rd


def _external_test(rd: RunData, ext: dict) -> pd.DataFrame:
    """Endpoint of an external run's test cohort under the ids the run wrote (ids shared with
    the training cohort carry ``external.test_id_prefix``); its true risk joins the cohort's."""
    from netsurv.cohort.schema import load_cohort

    tc = load_cohort(ext["test_root"], check_files=False)
    train, prefix = set(rd.cohort.patients), ext.get("test_id_prefix", "test:")
    ids = [f"{prefix}{p}" if p in train else p for p in tc.patients]
    t, e = tc.endpoint(rd.target)
    if tc.truth is not None and rd.cohort.truth is not None:
        truth = tc.truth.rename(index=dict(zip(tc.patients, ids)))
        rd.cohort.truth = pd.concat([rd.cohort.truth, truth])
    return pd.DataFrame({"patient_id": ids, "time": t, "event": e})


# --------------------------------------------------------------------------- survival curves
def _split_arrays(pred: pd.DataFrame, split: str):
    """Training (every non-test patient: a deep run's inner-validation patients are training
    patients, as the runner's ``split.train``) and test arrays of one split."""
    df = pred[pred.split == split]
    tr, te = df[df.role != "test"], df[df.role == "test"]
    return (tr.time.to_numpy(float), tr.event.to_numpy(int), tr.risk.to_numpy(float),
            te.time.to_numpy(float), te.event.to_numpy(int), te.risk.to_numpy(float))


def calibration_slope_of(rd: RunData, split: str) -> float:
    """The slope a deep Cox run shrank its risks by before its Breslow baseline
    (``metrics.json`` training info); 1 for every other run."""
    info = ((rd.metrics or {}).get("training") or {}).get(split) or {}
    slope = info.get("calibration_slope")
    return 1.0 if slope is None else float(slope)


def split_survival(rd: RunData, split: str):
    """``surv(risk, times) -> [n, len(times)]`` of one split: S0(t) ** exp(slope * risk), the
    Breslow baseline (:class:`netsurv.survival.breslow.Breslow`) fitted on the split's training
    risks, as the runner's curves of Cox models are (the classical ones' library baselines agree
    with it; a deep Cox run's are this with its calibration slope).  For other risk models it
    is a proportional-hazards approximation, so curves exist for every model."""
    trt, tre, trr, *_ = _split_arrays(rd.pred, split)
    slope = calibration_slope_of(rd, split)
    br = Breslow().fit(slope * trr, trt, tre)
    return lambda risk, times: br.survival(slope * np.asarray(risk, float), times)


def split_eval_times(rd: RunData, split: str) -> np.ndarray:
    """The split's evaluation grid: :func:`netsurv.survival.metrics.default_eval_times`, the
    grid of metrics.json's td-AUC and IBS."""
    trt, _, _, tet, tee, _ = _split_arrays(rd.pred, split)
    return default_eval_times(trt, tet, tee)


def _xlabel() -> str:
    return "months since baseline"


# --------------------------------------------------------------------------- td-AUC
def td_auc_curves(rd: RunData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cumulative/dynamic AUC(t) per split on the split's evaluation grid
    (:func:`split_eval_times`): the curves whose mean is metrics.json's td-AUC."""
    from netsurv.survival.metrics import td_auc

    out = {}
    for s in rd.splits():
        trt, tre, _, tet, tee, ter = _split_arrays(rd.pred, s)
        try:
            t, auc, _ = td_auc(trt, tre, tet, tee, ter, times=split_eval_times(rd, s))
        except Exception:  # noqa: BLE001 - one degenerate split must not sink the figure
            continue
        out[s] = (t, auc)
    if not out:
        raise ValueError("time-dependent AUC undefined in every split")
    return out


def fig_td_auc(rd: RunData):
    """Time-dependent AUC curves per split and their mean (:func:`td_auc_curves`).

    Raises
    ------
    ValueError
        If the AUC is undefined in every split.
    """
    import matplotlib.pyplot as plt

    curves = td_auc_curves(rd)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s, (t, a) in curves.items():
        ax.plot(t, a, "-o", ms=2.5, lw=1, alpha=SPLIT_ALPHA, label=s)
    mt, ma = _mean_interp(curves)
    ax.plot(mt, ma, "k-", lw=2.2, label="mean over splits")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel(_xlabel())
    ax.set_ylabel("cumulative/dynamic AUC(t)")
    title = "Time-dependent AUC (test sets)"
    m = (rd.metrics or {}).get("td_auc")
    if m:
        title += f" · mean td-AUC {m['mean']:.3f} ± {m['std']:.3f}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- Brier
def stored_brier_curves(rd: RunData):
    """The run's own Brier curves (``brier_curves.csv``, written by the runner on the grid of
    its IBS), as :func:`brier_curves` returns them, with the IBS of ``metrics.json``; None for
    runs that did not write them."""
    f = rd.run_dir / "brier_curves.csv"
    if not f.is_file():
        return None
    df = pd.read_csv(f, dtype={"split": str})
    m = rd.metrics or {}
    per = (m.get("ibs") or {}).get("per_split", {})
    per_null = (m.get("ibs_null") or {}).get("per_split", {})
    out = {}
    for s, d in df.groupby("split", sort=False):
        d = d.sort_values("time")
        t = d.time.to_numpy(float)
        b = d["model"].to_numpy(float) if "model" in d else np.full(len(t), np.nan)
        bn = d["null"].to_numpy(float)
        integ = (lambda v, t=t: float(np.trapezoid(v, t) / (t[-1] - t[0]))) if len(t) > 1 else None
        out[s] = (t, b, bn, per.get(s, integ(b) if integ else np.nan),
                  per_null.get(s, integ(bn) if integ else np.nan))
    return out or None


def brier_curves(rd: RunData):
    """Per split: (times, Brier(t) of the model, Brier(t) of the training KM, IBS, null IBS),
    recomputed from the predictions as the runner computes metrics.json's (same grid,
    :func:`split_eval_times`; same functions of :mod:`netsurv.survival.metrics`), with the
    model's curves those of :func:`split_survival`.  For Cox models these are the model's own
    curves, so the IBS are metrics.json's; :func:`fig_brier` draws the run's stored curves
    (:func:`stored_brier_curves`) when it wrote them."""
    out = {}
    for s in rd.splits():
        trt, tre, _, tet, tee, ter = _split_arrays(rd.pred, s)
        try:
            times = split_eval_times(rd, s)
            surv = split_survival(rd, s)
            model = lambda t, surv=surv, ter=ter: surv(ter, t)  # noqa: E731
            null = km_null_survival(trt, tre)(len(ter))
            ibs = integrated_brier(trt, tre, tet, tee, model, times=times)
            ibn = integrated_brier(trt, tre, tet, tee, null, times=times)
            b = brier_curve(trt, tre, tet, tee, model, times)
            bn = brier_curve(trt, tre, tet, tee, null, times)
        except Exception:  # noqa: BLE001 - one degenerate split must not sink the figure
            continue
        out[s] = (times, b, bn, ibs, ibn)
    if not out:
        raise ValueError("Brier score undefined in every split (fewer than two valid times)")
    return out


def _mean_interp(curves: dict, min_frac: float = 0.5):
    """Mean over splits of curves on their own grids: each interpolated on the union of the
    grids inside its own time range; kept where at least ``min_frac`` of the splits have one."""
    grid = np.unique(np.concatenate([t for t, _ in curves.values()]))
    M = np.full((len(curves), len(grid)), np.nan)
    for i, (t, v) in enumerate(curves.values()):
        inside = (grid >= t[0]) & (grid <= t[-1])
        M[i, inside] = np.interp(grid[inside], t, v)
    ok = np.isfinite(M).sum(axis=0) >= max(1, int(np.ceil(min_frac * len(curves))))
    with np.errstate(invalid="ignore"):
        return grid[ok], np.nanmean(M[:, ok], axis=0) if ok.any() else np.array([])


def fig_brier(rd: RunData):
    """Brier curves per split and their mean; the legend's IBS are those of ``metrics.json``
    (same curves, same grid) when the run wrote its curves, so report and metrics agree."""
    import matplotlib.pyplot as plt

    cur = stored_brier_curves(rd)
    own = cur is not None
    if not own:
        cur = brier_curves(rd)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    has_model = any(np.isfinite(v[1]).any() for v in cur.values())
    for s, (t, b, _, _, _) in cur.items():
        if np.isfinite(b).any():
            ax.plot(t, b, "-", lw=1, alpha=SPLIT_ALPHA, label=s)
    m = rd.metrics or {}

    def ibs_text(key, idx):
        """metrics.json's IBS whenever it has one (the report shows one IBS); curves recomputed
        from the risks that integrate to another value (a model that is not a Cox model, e.g. a
        discrete-time one, whose own curves the run did not keep) say so beside it."""
        vals = np.array([v[idx] for v in cur.values()], float)
        sd = np.nanstd(vals, ddof=1) if len(vals) > 1 else 0.0
        mine = f"{np.nanmean(vals):.3f} ± {sd:.3f}"
        v = m.get(key)
        if not isinstance(v, dict) or "mean" not in v:
            return mine
        text = f"{v['mean']:.3f} ± {v.get('std', 0):.3f}"
        per = v.get("per_split") or {}
        if not own and not all(s in per and abs(per[s] - c[idx]) < 1e-6 for s, c in cur.items()):
            text += f"; these recomputed curves {mine}"
        return text

    if has_model:
        mt, mb = _mean_interp({s: (v[0], v[1]) for s, v in cur.items()
                               if np.isfinite(v[1]).all()})
        ax.plot(mt, mb, "k-", lw=2.2, label=f"model, mean (IBS {ibs_text('ibs', 3)})")
    nt, nb = _mean_interp({s: (v[0], v[2]) for s, v in cur.items()})
    ax.plot(nt, nb, "k--", lw=1.5, label=f"null: training KM for all, mean (IBS "
                                          f"{ibs_text('ibs_null', 4)})")
    ax.set_xlabel(_xlabel())
    ax.set_ylabel("Brier score (IPCW)")
    ax.set_ylim(bottom=0)
    how = ("the model's survival curves, on the grid of metrics.json's IBS" if own else
           "curves S0(t)^exp(risk), Breslow on training, on the grid of metrics.json's IBS")
    ax.set_title(f"Brier score over follow-up (test sets; {how})", fontsize=9)
    ax.legend(fontsize=7, ncol=2, frameon=False, loc="upper left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- calibration
def default_horizon(rd: RunData) -> float:
    """Median event time, kept inside every split's training and test follow-up."""
    df = rd.pred.drop_duplicates("patient_id")
    h = float(np.median(df.time[df.event == 1]))
    lim = min(followup_limit(_split_arrays(rd.pred, s)[0]) for s in rd.splits())
    return min(h, float(np.nextafter(lim, -np.inf)))


def calibration_table(rd: RunData, horizon: float | None = None, n_bins: int = 5) -> pd.DataFrame:
    """Pooled test patients binned by predicted S(horizon | x) (quantile bins); per bin the mean
    predicted survival and the observed KM survival at the horizon with its 95 % CI."""
    from lifelines import KaplanMeierFitter

    horizon = default_horizon(rd) if horizon is None else float(horizon)
    rows = []
    for s in rd.splits():
        _, _, _, tet, tee, ter = _split_arrays(rd.pred, s)
        pred_s = split_survival(rd, s)(ter, [horizon])[:, 0]
        rows.append(pd.DataFrame({"split": s, "time": tet, "event": tee, "pred": pred_s}))
    df = pd.concat(rows, ignore_index=True)
    n_bins = max(1, min(int(n_bins), len(df) // 5))
    df["bin"] = pd.qcut(df.pred.rank(method="first"), n_bins, labels=False)
    out = []
    for b, sub in df.groupby("bin"):
        km = KaplanMeierFitter().fit(sub.time, sub.event)
        obs = float(km.survival_function_at_times(horizon).iloc[0])
        ci = km.confidence_interval_survival_function_
        ci = ci[ci.index <= horizon].iloc[-1] if (ci.index <= horizon).any() else ci.iloc[0]
        out.append({"bin": int(b) + 1, "n": len(sub), "events": int(sub.event.sum()),
                    "predicted": float(sub.pred.mean()), "observed": obs,
                    "observed_lo": float(ci.iloc[0]), "observed_hi": float(ci.iloc[1])})
    t = pd.DataFrame(out)
    t.attrs["horizon"] = horizon
    return t


def fig_calibration(rd: RunData, horizon: float | None = None, n_bins: int = 5):
    """Calibration plot at ``horizon``: predicted vs observed KM survival per quantile group.

    See :func:`calibration_table`; ``horizon`` defaults to :func:`default_horizon`.
    """
    import matplotlib.pyplot as plt

    t = calibration_table(rd, horizon, n_bins)
    h = t.attrs["horizon"]
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    yerr = np.vstack([t.observed - t.observed_lo, t.observed_hi - t.observed]).clip(min=0)
    ax.errorbar(t.predicted, t.observed, yerr=yerr, fmt="o-", color="#1f77b4", capsize=3)
    for _, r in t.iterrows():
        ax.annotate(f"n={int(r.n)}", (r.predicted, r.observed), textcoords="offset points",
                    xytext=(5, -10), fontsize=6, color="grey")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"predicted S({h:.3g} months)")
    ax.set_ylabel(f"observed KM S({h:.3g} months)")
    ax.set_title(f"Calibration at {h:.3g} months\n(pooled test sets, {len(t)} quantile groups)",
                 fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- classical models
def _log_ticks(ax) -> None:
    """Readable HR ticks on a log axis (matplotlib's minor 'a×10^b' labels overlap)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = ax.get_xlim()
    nice = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5,
                     10, 20, 50, 100])
    ticks = nice[(nice >= lo) & (nice <= hi)]
    while len(ticks) > 9:  # thin out, keeping 1
        keep = np.zeros(len(ticks), bool)
        keep[::2] = True
        keep[ticks == 1] = True
        ticks = ticks[keep]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def forest_table(hr: pd.DataFrame, n_splits: int | None = None) -> pd.DataFrame:
    """Per feature over splits: median HR and median 95 % CI bounds, splits selected."""
    lo, hi = "exp(coef) lower 95%", "exp(coef) upper 95%"
    need = {"feature", "exp(coef)", lo, hi}
    if not need <= set(hr.columns):
        raise KeyError(f"hazard_ratios.csv lacks column(s) {sorted(need - set(hr.columns))}")
    g = hr.groupby("feature")
    t = pd.DataFrame({"hr": g["exp(coef)"].median(), "lo": g[lo].median(), "hi": g[hi].median(),
                      "n_splits": g.size()})
    if "p" in hr.columns:
        t["p_median"] = g["p"].median()
    t.attrs["n_splits"] = n_splits or (hr.split.nunique() if "split" in hr.columns else 1)
    return t.sort_values(["n_splits", "hr"], ascending=[False, True])


def fig_forest(rd: RunData, max_features: int = 30):
    """Forest plot of the Cox hazard ratios in ``hazard_ratios.csv`` (:func:`forest_table`).

    Shows at most ``max_features`` features, those selected in most splits first, with the
    per-split values beside the medians when the file has a ``split`` column.
    """
    import matplotlib.pyplot as plt

    hr = pd.read_csv(rd.run_dir / "hazard_ratios.csv")
    t = forest_table(hr, len(rd.splits()) or None).head(max_features)
    N = t.attrs["n_splits"]
    t = t.iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.32 * len(t)))
    y = np.arange(len(t))
    clip = lambda v: np.clip(np.asarray(v, float), 1e-3, 1e3)  # noqa: E731
    ax.errorbar(clip(t.hr), y, xerr=[clip(t.hr) - clip(t.lo), clip(t.hi) - clip(t.hr)],
                fmt="s", color="k", ms=4, capsize=2, lw=1, zorder=3)
    if "split" in hr.columns:
        pos = {f: i for i, f in enumerate(t.index)}
        sub = hr[hr.feature.isin(pos)]
        ax.scatter(clip(sub["exp(coef)"]), [pos[f] + 0.18 for f in sub.feature], s=8,
                   color="#1f77b4", alpha=0.5, zorder=2, label="per split")
        ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.axvline(1, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    _log_ticks(ax)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{f} ({n}/{N})" for f, n in zip(t.index, t.n_splits)], fontsize=7)
    ax.set_xlabel("hazard ratio per unit of the (standardised) input, 95 % CI (log scale)")
    ax.set_title("Cox hazard ratios: median over the splits that selected the feature "
                 "(selected/splits)", fontsize=9)
    fig.tight_layout()
    return fig


def selection_frequency(sel: pd.DataFrame, n_splits: int | None = None) -> pd.Series:
    """Share of splits in which each feature was selected, most frequent first.

    Parameters
    ----------
    sel : pandas.DataFrame
        ``selected_features.csv``: one row per (``split``, ``feature``).
    n_splits : int, optional
        Number of splits to divide by; defaults to the splits present in ``sel``.
    """
    n = n_splits or sel.split.nunique()
    return (sel.groupby("feature").split.nunique() / n).sort_values(ascending=False)


def fig_selection(rd: RunData, max_features: int = 40):
    """Bar chart of :func:`selection_frequency` from ``selected_features.csv``.

    Raises
    ------
    ValueError
        If ``selected_features.csv`` is empty.
    """
    import matplotlib.pyplot as plt

    sel = pd.read_csv(rd.run_dir / "selected_features.csv")
    if len(sel) == 0:
        raise ValueError("selected_features.csv is empty")
    freq = selection_frequency(sel, len(rd.splits()) or None)
    shown = freq.head(max_features).iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.26 * len(shown)))
    ax.barh(np.arange(len(shown)), shown.to_numpy(), color="#4c72b0")
    ax.set_yticks(np.arange(len(shown)))
    ax.set_yticklabels(shown.index, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(shown) - 0.4)
    ax.set_xlabel("fraction of splits in which the feature entered the model")
    more = f" (top {max_features} of {len(freq)})" if len(freq) > max_features else ""
    ax.set_title(f"Feature selection frequency over {sel.split.nunique()} splits{more}",
                 fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- demo truth
def fig_truth(rd: RunData):
    """Predicted vs true risk of test patients (demo cohort: truth.csv)."""
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr

    truth = rd.cohort.truth["true_risk"]
    te = rd.pred[rd.pred.role == "test"].copy()
    te["true"] = te.patient_id.map(truth)
    te = te.dropna(subset=["true"])
    if len(te) == 0:
        raise ValueError("no test patient in truth.csv")
    fig, ax = plt.subplots(figsize=(5, 4.4))
    rhos = []
    for s, d in te.groupby("split", sort=False):
        ax.scatter(d.true, d.risk, s=10, alpha=0.6, label=s)
        rhos.append(spearmanr(d.true, d.risk)[0])
    ax.set_xlabel("true risk (generator)")
    ax.set_ylabel("predicted risk")
    ax.set_title(f"Predicted vs true risk (test sets)\nSpearman ρ per split: mean "
                 f"{np.nanmean(rhos):.2f}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
