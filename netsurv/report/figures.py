"""Report figures from a run directory: time-dependent AUC, Brier score, calibration, hazard-ratio
forest plot, feature selection frequency, and (demo cohort) predicted vs true risk.

Every figure function takes a :class:`RunData` (see :func:`load_run`) and returns a matplotlib
figure; :mod:`netsurv.report.html` turns them into the report. Time-dependent metrics use the
training split for the censoring weights and are evaluated only at times inside the training
follow-up (scikit-survival fails, or silently mis-weights, beyond it; see
:mod:`netsurv.survival.metrics`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from netsurv.survival.metrics import _clip_to_followup, _surv, followup_limit

SPLIT_ALPHA = 0.35


# --------------------------------------------------------------------------- run loading
@dataclass
class RunData:
    run_dir: Path
    cfg: dict = field(default_factory=dict)
    metrics: dict | None = None
    pred: pd.DataFrame | None = None      # predictions.csv (+ time, event when the cohort loads)
    cohort: object | None = None          # netsurv.cohort.schema.Cohort or None
    target: str = "os"
    problems: list[str] = field(default_factory=list)  # why something could not be loaded

    @property
    def has_outcome(self) -> bool:
        return self.pred is not None and {"time", "event"} <= set(self.pred.columns)

    def splits(self) -> list[str]:
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


def _split_arrays(pred: pd.DataFrame, split: str):
    df = pred[pred.split == split]
    tr, te = df[df.role == "train"], df[df.role == "test"]
    return (tr.time.to_numpy(float), tr.event.to_numpy(int), tr.risk.to_numpy(float),
            te.time.to_numpy(float), te.event.to_numpy(int), te.risk.to_numpy(float))


# --------------------------------------------------------------------------- survival curves
def breslow_survival(train_time, train_event, train_risk):
    """``surv(risk, times) -> [n, len(times)]``: S(t | x) = S0(t) ** exp(risk), with the Breslow
    baseline S0 fitted on the training times, events and risks of one split.

    Why: not every model predicts survival curves (a MIL network, a ranking loss, a random
    forest's score), but every model gives a risk. Treating the risk as a Cox linear predictor
    and estimating the baseline hazard on the training split yields curves for any risk model,
    so Brier scores and calibration can be drawn the same way for all of them. For Cox models
    this is exactly the Breslow estimator of the fitted model; for others it is a proportional-
    hazards approximation (their calibration plot shows how good it is).
    """
    t = np.asarray(train_time, float)
    e = np.asarray(train_event, int).astype(bool)
    r = np.asarray(train_risk, float)
    centre = float(np.mean(r))  # S0 absorbs any shift of the risk; centring avoids overflow
    w = np.exp(np.clip(r - centre, -50, 50))
    ut = np.unique(t[e])
    d = np.array([np.sum(e & (t == u)) for u in ut], float)
    at_risk = np.array([w[t >= u].sum() for u in ut], float)
    H0 = np.cumsum(d / at_risk)

    def surv(risk, times) -> np.ndarray:
        times = np.atleast_1d(np.asarray(times, float))
        idx = np.searchsorted(ut, times, side="right") - 1
        h = np.where(idx >= 0, H0[np.clip(idx, 0, None)] if len(H0) else 0.0, 0.0)
        rel = np.exp(np.clip(np.asarray(risk, float) - centre, -50, 50))
        return np.exp(-rel[:, None] * h[None, :])

    surv.baseline_times, surv.baseline_cumhaz = ut, H0
    return surv


def eval_grid(rd: RunData, n: int = 20) -> np.ndarray:
    """Common evaluation times: quantiles 10–80 % of the event times of all patients."""
    df = rd.pred.drop_duplicates("patient_id")
    ev = df.time[df.event == 1].to_numpy(float)
    if len(ev) == 0:
        raise ValueError("no events: time-dependent figures are undefined")
    return np.unique(np.quantile(ev, np.linspace(0.1, 0.8, n)))


def valid_times(grid, train_time, test_time) -> np.ndarray:
    """Grid times inside the training follow-up (IPCW weights exist) and the test follow-up."""
    limit = followup_limit(train_time)
    tt = _clip_to_followup(test_time, limit)
    g = np.asarray(grid, float)
    return g[(g < limit) & (g >= tt.min()) & (g < tt.max())]


def _mean_curve(grid, curves: dict, min_frac: float = 0.5):
    """Mean over splits at each grid time where at least ``min_frac`` of the splits have a value."""
    M = np.full((len(curves), len(grid)), np.nan)
    for i, (t, v) in enumerate(curves.values()):
        M[i, np.searchsorted(grid, t)] = v
    cnt = np.sum(np.isfinite(M), axis=0)
    ok = cnt >= max(1, int(np.ceil(min_frac * len(curves))))
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(np.where(ok[None, :], M, np.nan), axis=0) if ok.any() else M[0] * np.nan
    return grid[ok], mean[ok]


def _xlabel() -> str:
    return "months since baseline"


# --------------------------------------------------------------------------- td-AUC
def td_auc_curves(rd: RunData, grid=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cumulative/dynamic AUC(t) per split on the common grid (restricted per split)."""
    from netsurv.survival.metrics import td_auc

    grid = eval_grid(rd) if grid is None else grid
    out = {}
    for s in rd.splits():
        trt, tre, _, tet, tee, ter = _split_arrays(rd.pred, s)
        times = valid_times(grid, trt, tet)
        if len(times) == 0 or tee.sum() == 0:
            continue
        try:
            t, auc, _ = td_auc(trt, tre, tet, tee, ter, times=times)
        except Exception:  # noqa: BLE001 - one degenerate split must not sink the figure
            continue
        out[s] = (t, auc)
    if not out:
        raise ValueError("time-dependent AUC undefined in every split")
    return out


def fig_td_auc(rd: RunData):
    import matplotlib.pyplot as plt

    grid = eval_grid(rd)
    curves = td_auc_curves(rd, grid)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s, (t, a) in curves.items():
        ax.plot(t, a, "-o", ms=2.5, lw=1, alpha=SPLIT_ALPHA, label=s)
    mt, ma = _mean_curve(grid, curves)
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


def brier_curves(rd: RunData, grid=None):
    """Per split: (times, Brier(t) of S0(t)^exp(risk), Brier(t) of the training KM, IBS, null IBS).

    This recomputes curves from the predictions (a Breslow baseline on the training risks);
    :func:`fig_brier` draws the run's own curves (:func:`stored_brier_curves`) when it wrote them.
    """
    from lifelines import KaplanMeierFitter
    from sksurv.metrics import brier_score, integrated_brier_score

    grid = eval_grid(rd) if grid is None else grid
    out = {}
    for s in rd.splits():
        trt, tre, trr, tet, tee, ter = _split_arrays(rd.pred, s)
        times = valid_times(grid, trt, tet)
        if len(times) < 2:
            continue
        surv = breslow_survival(trt, tre, trr)
        est = surv(ter, times)
        km = KaplanMeierFitter().fit(trt, tre)
        null = np.tile(km.survival_function_at_times(times).to_numpy(), (len(ter), 1))
        ytr = _surv(trt, tre)
        yte = _surv(_clip_to_followup(tet, followup_limit(trt)), tee)
        try:
            _, b = brier_score(ytr, yte, est, times)
            _, bn = brier_score(ytr, yte, null, times)
            ibs = integrated_brier_score(ytr, yte, est, times)
            ibn = integrated_brier_score(ytr, yte, null, times)
        except Exception:  # noqa: BLE001
            continue
        out[s] = (times, np.asarray(b), np.asarray(bn), float(ibs), float(ibn))
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
        cur = brier_curves(rd, eval_grid(rd))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    has_model = any(np.isfinite(v[1]).any() for v in cur.values())
    for s, (t, b, _, _, _) in cur.items():
        if np.isfinite(b).any():
            ax.plot(t, b, "-", lw=1, alpha=SPLIT_ALPHA, label=s)
    m = rd.metrics or {}

    def ibs_text(key, idx):
        if own and isinstance(m.get(key), dict):
            v = m[key]
            return f"{v['mean']:.3f} ± {v.get('std', 0):.3f}"
        vals = np.array([v[idx] for v in cur.values()], float)
        return f"{np.nanmean(vals):.3f} ± {np.nanstd(vals, ddof=1) if len(vals) > 1 else 0:.3f}"

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
           "curves S0(t)^exp(risk), Breslow on training")
    ax.set_title(f"Brier score over follow-up (test sets; {how})", fontsize=9)
    ax.legend(fontsize=7, ncol=2, frameon=False, loc="upper left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- calibration
def default_horizon(rd: RunData) -> float:
    """Median event time, kept inside every split's training and test follow-up."""
    df = rd.pred.drop_duplicates("patient_id")
    h = float(np.median(df.time[df.event == 1]))
    lim = min(followup_limit(rd.pred[(rd.pred.split == s) & (rd.pred.role == "train")].time)
              for s in rd.splits())
    return min(h, float(np.nextafter(lim, -np.inf)))


def calibration_table(rd: RunData, horizon: float | None = None, n_bins: int = 5) -> pd.DataFrame:
    """Pooled test patients binned by predicted S(horizon | x) (quantile bins); per bin the mean
    predicted survival and the observed KM survival at the horizon with its 95 % CI."""
    from lifelines import KaplanMeierFitter

    horizon = default_horizon(rd) if horizon is None else float(horizon)
    rows = []
    for s in rd.splits():
        trt, tre, trr, tet, tee, ter = _split_arrays(rd.pred, s)
        pred_s = breslow_survival(trt, tre, trr)(ter, [horizon])[:, 0]
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
    n = n_splits or sel.split.nunique()
    return (sel.groupby("feature").split.nunique() / n).sort_values(ascending=False)


def fig_selection(rd: RunData, max_features: int = 40):
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
