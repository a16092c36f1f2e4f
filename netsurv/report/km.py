"""Kaplan–Meier curves of test-set risk groups, with numbers at risk and log-rank tests.

Test patients are grouped by cut-offs taken from the **training** risks of the same split (median,
or tertiles): a threshold fitted on the test set itself would be a post-hoc choice that always
separates the groups it was chosen on. Pooled over splits, each test patient is grouped by the
threshold of its own split. Under the holdout protocol a patient can be a test patient in several
splits; the pooled curves and log-rank test count every patient once (:func:`pooled_groups`): the
patient's group is the one it was given most often over the splits where it was tested, a tie
broken by its mean training-risk percentile (its risk's rank among that split's training risks).
Under k-fold every patient is tested once and this is its out-of-fold group.

Inputs are prediction frames with columns ``patient_id, split, role, risk, time, event``
(``predictions.csv`` joined with the endpoint, see :func:`netsurv.report.figures.load_run`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

GROUP_LABELS = {2: ("low risk", "high risk"), 3: ("low risk", "intermediate risk", "high risk")}
GROUP_COLORS = {2: ("#1f77b4", "#d62728"), 3: ("#1f77b4", "#ff7f0e", "#d62728")}


def risk_thresholds(train_risk, n_groups: int = 2) -> np.ndarray:
    """Cut-offs between risk groups from the training risks: the median (2 groups) or the
    tertiles (3 groups)."""
    if n_groups not in GROUP_LABELS:
        raise ValueError(f"n_groups must be 2 (median) or 3 (tertiles), got {n_groups}")
    r = np.asarray(train_risk, float)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        raise ValueError("no finite training risk to take a threshold from")
    return np.quantile(r, np.arange(1, n_groups) / n_groups)


def assign_groups(risk, thresholds) -> np.ndarray:
    """Group index 0 (lowest risk) .. len(thresholds); a risk equal to a cut-off goes up."""
    return np.searchsorted(np.asarray(thresholds, float), np.asarray(risk, float), side="right")


def km_groups(pred: pd.DataFrame, n_groups: int = 2) -> pd.DataFrame:
    """Test rows of every split with their risk group from that split's training threshold.

    Returns ``patient_id, split, risk, time, event, group`` (0 = lowest), ``label``,
    ``thresholds`` (tuple of the split's training cut-offs) and ``train_pct`` (share of the
    split's training risks at or below the patient's risk).
    """
    need = {"patient_id", "split", "role", "risk", "time", "event"}
    missing = need - set(pred.columns)
    if missing:
        raise KeyError(f"prediction frame lacks column(s) {sorted(missing)}")
    out = []
    for _split, df in pred.groupby("split", sort=False):
        tr = df[df.role == "train"]
        te = df[df.role == "test"].copy()
        if len(tr) == 0 or len(te) == 0:
            continue
        thr = risk_thresholds(tr.risk, n_groups)
        te["group"] = assign_groups(te.risk, thr)
        te["label"] = [GROUP_LABELS[n_groups][g] for g in te.group]
        te["thresholds"] = [tuple(float(v) for v in thr)] * len(te)
        # share of the split's training risks at or below the patient's (tie-break of
        # pooled_groups, comparable across splits whose risks have other scales)
        te["train_pct"] = np.searchsorted(np.sort(tr.risk.to_numpy(float)),
                                          te.risk.to_numpy(float), side="right") / len(tr)
        out.append(te[["patient_id", "split", "risk", "time", "event", "group", "label",
                       "thresholds", "train_pct"]])
    if not out:
        raise ValueError("no split has both training and test rows")
    return pd.concat(out, ignore_index=True)


def pooled_groups(groups: pd.DataFrame, n_groups: int = 2) -> pd.DataFrame:
    """One row per patient from :func:`km_groups` rows (one per split where it was tested).

    ``group``: the most frequent group over those splits; on a tie, the group of the patient's
    mean training-risk percentile (cut at 1/2, or 1/3 and 2/3). ``n_tested``: in how many splits
    the patient was tested. Counting a patient once per split would make the pooled log-rank
    test treat repeated patients as independent ones (its p-value too small).
    """
    g = groups
    rows = []
    for pid, df in g.groupby("patient_id", sort=False):
        counts = np.bincount(df.group.to_numpy(int), minlength=n_groups)
        best = np.flatnonzero(counts == counts.max())
        pct = float(df.train_pct.mean())
        grp = int(best[0]) if len(best) == 1 else \
            int(assign_groups([pct], np.arange(1, n_groups) / n_groups)[0])
        rows.append({"patient_id": pid, "time": df.time.iloc[0], "event": df.event.iloc[0],
                     "group": grp, "label": GROUP_LABELS[n_groups][grp],
                     "n_tested": len(df), "tie": len(best) > 1, "train_pct": pct})
    return pd.DataFrame(rows)


def logrank_p(time, event, group) -> float:
    """Log-rank p-value across the groups present (NaN when fewer than two groups or no event):
    lifelines' ``logrank_test`` for two groups, ``multivariate_logrank_test`` for more."""
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    time = np.asarray(time, float)
    event = np.asarray(event, int)
    group = np.asarray(group)
    levels = np.unique(group)
    if len(levels) < 2 or event.sum() == 0:
        return float("nan")
    if len(levels) == 2:
        a, b = group == levels[0], group == levels[1]
        return float(logrank_test(time[a], time[b], event[a], event[b]).p_value)
    return float(multivariate_logrank_test(time, group, event).p_value)


@dataclass
class KMResult:
    """Risk groups and log-rank tests of a run, as :func:`km_analysis` returns them.

    Attributes
    ----------
    groups : pandas.DataFrame
        Test rows of every split with their group (:func:`km_groups`).
    n_groups : int
        2 (median split) or 3 (tertiles).
    p_split : dict of str to float
        Log-rank p-value per split.
    p_pooled : float
        Log-rank p-value over ``pooled`` (each patient once).
    pooled : pandas.DataFrame or None
        One row per patient (:func:`pooled_groups`).
    """

    groups: pd.DataFrame                      # km_groups() output
    n_groups: int
    p_split: dict[str, float] = field(default_factory=dict)
    p_pooled: float = float("nan")            # log-rank over ``pooled``: each patient once
    pooled: pd.DataFrame | None = None        # pooled_groups() output

    def pooled_how(self) -> str:
        """How the pooled curves count patients (for the figure and its caption)."""
        if self.pooled is None:
            return ""
        n_rep = int((self.pooled.n_tested > 1).sum())
        if n_rep == 0:
            return f"each of the {len(self.pooled)} patients once (tested in one split each)"
        return (f"each of the {len(self.pooled)} patients once: {n_rep} tested in several splits "
                f"take their majority group ({int(self.pooled.tie.sum())} tie(s) broken by the mean "
                "training-risk percentile)")

    def table(self) -> pd.DataFrame:
        """Per split (and pooled): patients and events per group, log-rank p."""
        rows = []
        pooled = self.pooled if self.pooled is not None else self.groups
        for name, df in list(self.groups.groupby("split", sort=False)) + [("pooled", pooled)]:
            row = {"split": name}
            for g, lab in enumerate(GROUP_LABELS[self.n_groups]):
                sub = df[df.group == g]
                row[f"{lab} (n/events)"] = f"{len(sub)}/{int(sub.event.sum())}"
            row["logrank_p"] = self.p_pooled if name == "pooled" else self.p_split.get(name)
            rows.append(row)
        return pd.DataFrame(rows)


def km_analysis(pred: pd.DataFrame, n_groups: int = 2) -> KMResult:
    """Risk groups and log-rank p-values per split and pooled over splits (each patient once,
    see :func:`pooled_groups`)."""
    g = km_groups(pred, n_groups)
    res = KMResult(groups=g, n_groups=n_groups, pooled=pooled_groups(g, n_groups))
    for split, df in g.groupby("split", sort=False):
        res.p_split[str(split)] = logrank_p(df.time, df.event, df.group)
    res.p_pooled = logrank_p(res.pooled.time, res.pooled.event, res.pooled.group)
    return res


def _fmt_p(p) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def plot_km(df: pd.DataFrame, n_groups: int = 2, ax=None, title: str = "", p=None,
            at_risk: bool = True, at_risk_rows=("At risk", "Events"), ci: bool = True,
            xlabel: str = "months"):
    """KM curve per risk group (CI bands), numbers at risk below the axis, log-rank p in the
    title. ``df`` has ``time, event, group``. Returns the axis."""
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5))
    fitters = []
    for g, lab in enumerate(GROUP_LABELS[n_groups]):
        sub = df[df.group == g]
        if len(sub) == 0:
            continue
        kmf = KaplanMeierFitter(label=f"{lab} (n={len(sub)})")
        kmf.fit(sub.time, sub.event)
        kmf.plot_survival_function(ax=ax, ci_show=ci, color=GROUP_COLORS[n_groups][g],
                                   show_censors=True, censor_styles={"ms": 4, "marker": "|"})
        fitters.append(kmf)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("survival probability")
    if p is None:
        p = logrank_p(df.time, df.event, df.group)
    ax.set_title(f"{title}{' · ' if title else ''}log-rank p = {_fmt_p(p)}", fontsize=10)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    if at_risk and fitters:
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=list(at_risk_rows), fontsize=7)
    return ax


def km_figures(res: KMResult, *, endpoint: str = "", per_split: bool = True):
    """Figures for a :class:`KMResult`: ``{"km_pooled": fig, "km_splits": fig}``."""
    import matplotlib.pyplot as plt

    how = "training median" if res.n_groups == 2 else "training tertiles"
    ep = f"{endpoint.upper()} · " if endpoint else ""
    figs = {}
    fig, ax = plt.subplots(figsize=(7.5, 5.8))
    pooled = res.pooled if res.pooled is not None else res.groups
    plot_km(pooled, res.n_groups, ax=ax, p=res.p_pooled,
            title=f"{ep}test patients pooled over {res.groups.split.nunique()} splits ({how})")
    if res.pooled is not None:  # say how patients tested in several splits were counted
        import textwrap

        fig.text(0.5, 0.005, "\n".join(textwrap.wrap(f"Counted {res.pooled_how()}.", 110)),
                 ha="center", va="bottom", fontsize=7, color="#444")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    figs["km_pooled"] = fig
    if per_split:
        splits = list(dict.fromkeys(res.groups.split))
        ncol = min(3, len(splits))
        nrow = int(np.ceil(len(splits) / ncol))
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 4.4 * nrow), squeeze=False)
        for ax, s in zip(axes.flat, splits):
            plot_km(res.groups[res.groups.split == s], res.n_groups, ax=ax, p=res.p_split.get(s),
                    title=str(s), at_risk_rows=("At risk",), ci=True)
            ax.set_xlabel("")
            ax.legend(loc="lower left", fontsize=7, frameon=False)
        for ax in list(axes.flat)[len(splits):]:
            ax.set_visible(False)
        fig.suptitle(f"{ep}per split, test patients grouped by the split's {how}", fontsize=11)
        fig.tight_layout(h_pad=2.5)
        figs["km_splits"] = fig
    return figs
