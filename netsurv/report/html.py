"""A self-contained HTML report of one training run (figures embedded as base64 PNG).

``write_report(run_dir)`` reads what the run wrote and writes
``<run_dir>/report.html`` (and the figures as PNG under ``<run_dir>/figures/``). A missing
optional input (hazard_ratios.csv, attention.h5, truth.csv, ...) omits its section; a figure that
fails becomes one error line in the report, never an exception.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from netsurv.modalities import CLINICAL

log = logging.getLogger(__name__)

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#fafafa;
color:#222}
main{max-width:1120px;margin:0 auto;padding:18px 28px 60px;background:#fff}
h1{font-size:1.5em;margin:.4em 0 .1em}
h2{font-size:1.2em;border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:1.8em}
h3{font-size:1.0em;margin:1.2em 0 .3em}.sub{color:#666;font-size:.9em;margin:0 0 .8em}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0 .8em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto}
figure{margin:.6em 0 1.2em;text-align:center}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.8em;color:#555;margin-top:3px}
.err{color:#a00;font-size:.85em;background:#fff4f4;padding:4px 8px;border-left:3px solid #a00}
.note{font-size:.85em;color:#555}pre{background:#f6f6f6;padding:8px;font-size:.75em;overflow-x:auto;max-height:520px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:10px;align-items:start}
ul.warn li{font-size:.85em;font-family:monospace}
nav a{margin-right:12px;font-size:.85em}table.kv td{text-align:left}
"""

METRIC_NAMES = {"cindex": "Harrell C-index", "cindex_uno": "Uno C-index", "td_auc": "mean td-AUC",
                "ibs": "integrated Brier score",
                "ibs_null": "integrated Brier score, null model (training KM for all)",
                "oracle_cindex": "oracle C-index (true risk)"}


def _with_baseline(m: dict) -> dict:
    """metrics with the baseline's C and the paired difference as rows of the tables
    (``baseline_cindex``, ``cindex_diff``), and their names."""
    b = m.get("baseline") or {}
    if "cindex" not in b:
        return {}
    return {"baseline_cindex": (f"baseline C-index: {b.get('name')}", b["cindex"]),
            "cindex_diff": ("C-index difference model − baseline (95 % CI: paired bootstrap)",
                            b["cindex_diff"])}


def _e(x) -> str:
    return html.escape(str(x))


def _png_b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, caption: str = "", alt: str = "") -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt or caption)}" src="{_png_b64(data)}">{cap}</figure>'


def _err(what: str, exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f'<p class="err">{_e(what)}: not drawn ({_e(type(exc).__name__)}: {_e(msg[:300])})</p>'


class _Figures:
    """Render figure callables to embedded PNGs, saving copies under ``out_dir``."""

    def __init__(self, out_dir: Path | None, dpi: int = 100):
        self.out_dir, self.dpi = out_dir, dpi
        self.failed: list[str] = []

    def bytes_of(self, fig, name: str) -> bytes:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png", dpi=self.dpi, bbox_inches="tight")
        finally:
            plt.close(fig)
        data = buf.getvalue()
        if self.out_dir is not None:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                (self.out_dir / f"{name}.png").write_bytes(data)
            except OSError as exc:  # a read-only run dir still gets its report
                log.warning("could not save figure %s: %s", name, exc)
        return data

    def __call__(self, name: str, fn, caption: str = "") -> str:
        import matplotlib.pyplot as plt

        try:
            return _img(self.bytes_of(fn(), name), caption, alt=name)
        except Exception as exc:  # noqa: BLE001 - a failing figure must not sink the report
            plt.close("all")
            log.warning("report figure %s failed: %s", name, exc)
            self.failed.append(name)
            return _err(caption or name, exc)


# --------------------------------------------------------------------------- sections
def _metrics_section(m: dict | None) -> str:
    if not m:
        return "<p class='note'>No metrics.json in this run.</p>"
    head = []
    for k in ("experiment", "endpoint", "model", "modalities", "harmonize", "protocol",
              "n_patients", "n_events", "n_warnings"):
        if k in m:
            v = ", ".join(m[k]) if isinstance(m[k], list) else m[k]
            head.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    rows, splits = [], []
    extra = _with_baseline(m)
    named = [(k, name, m.get(k)) for k, name in METRIC_NAMES.items()]
    named += [(k, name, v) for k, (name, v) in extra.items()]
    for _k, name, s in named:
        if not isinstance(s, dict) or "mean" not in s:
            continue
        ci = s.get("ci95", [np.nan, np.nan])
        rows.append(f"<tr><td>{_e(name)}</td><td>{s['mean']:.3f}</td><td>{s.get('std', np.nan):.3f}"
                    f"</td><td>{ci[0]:.3f} – {ci[1]:.3f}</td></tr>")
        for sp in s.get("per_split", {}):
            if sp not in splits:
                splits.append(sp)
    out = f"<table class='kv'>{''.join(head)}</table>"
    out += ("<table><tr><th>test metric</th><th>mean</th><th>std</th><th>95 % CI over splits</th>"
            f"</tr>{''.join(rows)}</table>")
    if splits:
        ph = "".join(f"<th>{_e(s)}</th>" for s in splits)
        pr = []
        for _k, name, s in named:
            if not isinstance(s, dict) or "per_split" not in s:
                continue
            cells = "".join(f"<td>{s['per_split'][sp]:.3f}</td>" if sp in s["per_split"]
                            else "<td>–</td>" for sp in splits)
            pr.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
        boot = m.get("cindex", {}).get("bootstrap_ci95_per_split")
        if boot:
            cells = "".join(f"<td>{boot[sp][0]:.3f}–{boot[sp][1]:.3f}</td>" if sp in boot
                            else "<td>–</td>" for sp in splits)
            pr.append(f"<tr><td>C-index bootstrap 95 % CI</td>{cells}</tr>")
        out += f"<h3>Per split</h3><div class='scroll'><table><tr><th></th>{ph}</tr>{''.join(pr)}</table></div>"
    out += ("<p class='note'>The interval over splits treats overlapping splits of one cohort as "
            "independent and is therefore optimistic.</p>")
    b = m.get("baseline")
    if b and "cindex" in b:
        d = b["cindex_diff"]
        verdict = ("above" if d["ci95"][0] > 0 else "below" if d["ci95"][1] < 0 else
                   "not distinguishable from")
        out += (f"<p class='note'><b>Does the model earn its place?</b> Its C-index is {verdict} "
                f"that of its classical counterpart {_e(b.get('name'))} (fitted on the same "
                f"training patients of every split): difference {d['mean']:+.3f}, 95 % CI "
                f"{d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f} ({_e(d.get('method', ''))}).")
        if b.get("note"):
            out += f" Note: {_e(b['note'])}."
        out += "</p>"
    elif b:
        out += f"<p class='note'>Baseline not compared: {_e(b.get('skipped'))}.</p>"
    if isinstance(m.get("ibs_null"), dict):
        ibs = (m.get("ibs") or {}).get("mean")
        nul = m["ibs_null"]["mean"]
        if ibs is not None:
            out += (f"<p class='note'>Survival curves: IBS {ibs:.3f} against {nul:.3f} for the "
                    "null model (every test patient given the training Kaplan–Meier curve, same "
                    "times); " + ("below the null: the curves add information." if ibs < nul
                                  else "<b>not below the null</b>: the predicted curves are no "
                                  "better than the training KM for everyone.") + "</p>")
    return out


def data_summary(rd) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary rows, per-patient coverage) for the run's cohort."""
    c = rd.cohort
    pts = pd.DataFrame(index=pd.Index(c.patients, name="patient_id"))
    t, e = c.endpoint(rd.target)
    pts["time"], pts["event"] = t, e
    in_run = set(rd.pred.patient_id) if rd.pred is not None else set()
    pts["in_run"] = [p in in_run for p in pts.index]
    pts[CLINICAL] = True
    n_sl = c.slides.groupby("patient_id").size() if c.slides is not None else pd.Series(dtype=int)
    pts["wsi_slides"] = n_sl.reindex(pts.index).fillna(0).astype(int)
    pts["ct"] = pts.index.isin(set(c.ct.patient_id)) if c.ct is not None else False
    for name, f in c.features.items():
        pts[f"features:{name}"] = pts.index.isin(set(f.index))
    rows = []
    for label, sub in (("cohort", pts), ("in this run", pts[pts.in_run])):
        n = len(sub)
        rows.append({"": label, "patients": n, "events": int(sub.event.sum()),
                     "censored": f"{int(n - sub.event.sum())} ({(1 - sub.event.mean()) * 100:.0f} %)"
                     if n else "0",
                     "median time (months)": f"{sub.time.median():.1f}" if n else "–",
                     "clinical": int(sub[CLINICAL].sum()),
                     "WSI (patients / slides)": f"{int((sub.wsi_slides > 0).sum())} / {int(sub.wsi_slides.sum())}",
                     "CT": int(sub.ct.sum()),
                     **{k: int(sub[k].sum()) for k in sub.columns if k.startswith("features:")}})
    return pd.DataFrame(rows), pts


def _table(df: pd.DataFrame, index: bool = False, floatfmt: str = "{:.3g}") -> str:
    return df.to_html(index=index, border=0, escape=True, na_rep="–",
                      float_format=lambda v: floatfmt.format(v))


def _data_section(rd) -> str:
    if rd.cohort is None:
        return "<p class='note'>Cohort not available: " + _e("; ".join(rd.problems)) + "</p>"
    summ, pts = data_summary(rd)
    out = (f"<p class='note'>Cohort {_e(rd.cohort.root)} · endpoint {_e(rd.target.upper())} "
           "(event 1 = observed, 0 = censored).</p>") + _table(summ)
    per = pts.reset_index()
    per["event"] = per.event.astype(int)
    out += (f"<details><summary>Per-patient modality coverage ({len(per)} patients)</summary>"
            f"<div class='scroll'>{_table(per)}</div></details>")
    return out


def _km_section(rd, figs: _Figures, n_groups: int) -> str:
    from netsurv.report.km import km_analysis, km_figures

    try:
        res = km_analysis(rd.pred, n_groups)
        fs = km_figures(res, endpoint=rd.target)
    except Exception as exc:  # noqa: BLE001
        return _err("Kaplan–Meier risk groups", exc)
    how = "median" if n_groups == 2 else "tertiles"
    out = (f"<p class='note'>Test patients of each split are grouped by the {how} of the same "
           "split's <b>training</b> risks. The pooled curves and their log-rank test count "
           f"{_e(res.pooled_how())}; per split, every test patient of the split counts.</p>")
    out += figs("km_pooled", lambda: fs["km_pooled"], "KM curves of risk groups, pooled test sets")
    out += _table(res.table())
    if "km_splits" in fs:
        out += figs("km_splits", lambda: fs["km_splits"], "KM curves per split")
    return out


def _attention_section(run_dir: Path, opts: dict) -> str:
    from netsurv.report.heatmap import attention_figures

    try:
        results = attention_figures(run_dir, **opts)
    except Exception as exc:  # noqa: BLE001
        return _err("attention heatmaps", exc)
    if not results:
        return "<p class='note'>attention.h5 holds none of the chosen patients.</p>"
    out = ("<p class='note'>Attention percentiles over each patient's tiles (all slides jointly) "
           "on the slide thumbnail; tiles shown as read by the model.</p>")
    for r in results:
        pa = r.record
        out += f"<h3>{_e(pa.patient_id)} · {_e(pa.split)} · {_e(pa.role)} · risk {pa.risk:.3g}</h3>"
        for png, cap in ((r.heatmap_png, "attention heatmap"), (r.gallery_png, "top/bottom tiles")):
            if png is not None and Path(png).is_file():
                out += _img(Path(png).read_bytes(), f"{pa.patient_id}: {cap}")
        for e in r.errors:
            out += f"<p class='err'>{_e(e)}</p>"
    return out


# --------------------------------------------------------------------------- entry point
def write_report(run_dir, *, cohort_root=None, n_groups: int = 2, horizon: float | None = None,
                 calibration_bins: int = 5, attention: dict | None = None,
                 save_figures: bool = True, dpi: int = 100) -> Path:
    """Write ``<run_dir>/report.html`` (self-contained) and return its path.

    ``n_groups``: 2 (training median) or 3 (training tertiles) KM risk groups; ``horizon``:
    calibration time in months (default: median event time inside the training follow-up);
    ``calibration_bins``: quantile groups (5 or 10); ``attention``: keyword arguments of
    :func:`netsurv.report.heatmap.attention_figures` (patients, split, n_top, n_bottom, k,
    thumb_mpp); ``save_figures``: also write the PNGs to ``<run_dir>/figures/``; ``dpi`` of the
    embedded PNGs.
    """
    from netsurv.report import figures as F

    run_dir = Path(run_dir)
    rd = F.load_run(run_dir, cohort_root=cohort_root)
    figs = _Figures(run_dir / "figures" if save_figures else None, dpi=dpi)
    m = rd.metrics or {}
    title = " · ".join(str(m[k]) for k in ("experiment", "endpoint", "model") if k in m) \
        or run_dir.name
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    sections.append(("metrics", "Test metrics", _metrics_section(rd.metrics)))
    try:
        sections.append(("data", "Data", _data_section(rd)))
    except Exception as exc:  # noqa: BLE001
        sections.append(("data", "Data", _err("data summary", exc)))

    if rd.has_outcome:
        sections.append(("km", "Risk groups (Kaplan–Meier)", _km_section(rd, figs, n_groups)))
        body = figs("td_auc", lambda: F.fig_td_auc(rd), "time-dependent AUC per split and mean")
        body += figs("brier", lambda: F.fig_brier(rd), "Brier score over follow-up")
        body += figs("calibration", lambda: F.fig_calibration(rd, horizon, calibration_bins),
                     "calibration at the horizon")
        body += ("<p class='note'>The td-AUC and Brier figures use the grid of the metrics "
                 "table (per split, quantiles of the test event times inside the training "
                 "follow-up), and the Brier figure's IBS are those of the metrics table. It draws "
                 "the run's own survival curves (<code>brier_curves.csv</code>); for runs without "
                 "that file, and for the calibration plot, survival curves are "
                 "S0(t)<sup>exp(risk)</sup> with a Breslow baseline fitted on each split's "
                 "training risks (the curves of Cox models; for other models an approximation, "
                 "so they exist for every risk model).</p>")
        sections.append(("time", "Discrimination and calibration over time", body))
    elif rd.pred is not None:
        sections.append(("km", "Risk groups and time-dependent figures",
                         "<p class='note'>Omitted: the endpoint could not be joined ("
                         + _e("; ".join(rd.problems)) + ").</p>"))

    body = ""
    if (run_dir / "hazard_ratios.csv").is_file():
        body += figs("forest", lambda: F.fig_forest(rd), "Cox hazard ratios (forest plot)")
    if (run_dir / "selected_features.csv").is_file():
        body += figs("selection", lambda: F.fig_selection(rd), "feature selection frequency")
    if body:
        sections.append(("model", "Model", body))

    if rd.has_outcome and rd.cohort is not None and rd.cohort.truth is not None:
        sections.append(("truth", "Against the true risk (demo cohort)",
                         figs("truth", lambda: F.fig_truth(rd), "predicted vs true risk")))

    if (run_dir / "attention.h5").is_file():
        sections.append(("attention", "Attention (MIL)",
                         _attention_section(run_dir, dict(attention or {}))))

    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        sections.append(("config", "Configuration",
                         f"<pre>{_e(cfg_path.read_text(encoding='utf-8'))}</pre>"))

    wpath = run_dir / "warnings.log"
    if wpath.is_file():
        lines = [ln for ln in wpath.read_text(encoding="utf-8").splitlines() if ln.strip()]
        body = ("<ul class='warn'>" + "".join(f"<li>{_e(ln)}</li>" for ln in lines) + "</ul>"
                if lines else "<p class='note'>No warnings.</p>")
        sections.append(("warnings", f"Warnings ({len(lines)})", body))

    if rd.problems:
        sections.insert(0, ("problems", "Inputs not found",
                            "<ul>" + "".join(f"<li>{_e(p)}</li>" for p in rd.problems) + "</ul>"))

    nav = "".join(f"<a href='#{a}'>{_e(t)}</a>" for a, t, _ in sections)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    doc = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>netsurv report: {_e(title)}</title><style>{CSS}</style></head><body><main>",
           f"<h1>netsurv report: {_e(title)}</h1>",
           f"<p class='sub'>{_e(run_dir.resolve())} · generated {now}</p><nav>{nav}</nav>"]
    for a, t, b in sections:
        doc.append(f"<section id='{a}'><h2>{_e(t)}</h2>{b}</section>")
    doc.append("</main></body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(doc), encoding="utf-8")
    if figs.failed:
        log.warning("report %s: %d figure(s) failed: %s", out, len(figs.failed), figs.failed)
    return out

