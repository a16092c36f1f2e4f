"""The founding study's results table from a multirun: rows = models (± harmonisation),
columns = endpoints, cells = mean test C-index with its 95 % interval over splits."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def collect(multirun_dir) -> pd.DataFrame:
    rows = []
    for f in sorted(Path(multirun_dir).rglob("metrics.json")):
        m = json.loads(f.read_text(encoding="utf-8"))
        c = m["cindex"]
        rows.append({
            "experiment": m["experiment"], "harmonize": m.get("harmonize", "none"),
            "endpoint": m["endpoint"], "protocol": m.get("protocol"),
            "n_patients": m.get("n_patients"), "n_events": m.get("n_events"),
            "cindex": c["mean"], "ci_low": c["ci95"][0], "ci_high": c["ci95"][1],
            "oracle": (m.get("oracle_cindex") or {}).get("mean"), "run": str(f.parent),
        })
    if not rows:
        raise FileNotFoundError(f"no metrics.json under {multirun_dir}")
    return pd.DataFrame(rows)


def results_table(multirun_dir, out_dir=None) -> pd.DataFrame:
    """Write ``results.md`` and ``results.csv`` into ``out_dir`` (default: the multirun dir)."""
    runs = collect(multirun_dir)
    runs["cell"] = runs.apply(lambda r: f"{r.cindex:.3f} ({r.ci_low:.3f}–{r.ci_high:.3f})", axis=1)
    runs["model"] = runs.experiment + runs.harmonize.map(lambda h: "" if h == "none" else f" + {h}")
    # a sweep may repeat a cell (e.g. other hyperparameters): keep the last run, say so in the CSV
    wide = runs.drop_duplicates(["model", "endpoint"], keep="last").pivot(
        index="model", columns="endpoint", values="cell")
    wide = wide[[c for c in ("os", "pfs") if c in wide.columns]
                + [c for c in wide.columns if c not in ("os", "pfs")]]
    wide.columns = [f"{c.upper()} C-index (95% CI)" for c in wide.columns]
    out = Path(out_dir or multirun_dir)
    runs.drop(columns=["cell"]).to_csv(out / "results.csv", index=False)
    oracle = runs.groupby("endpoint")["oracle"].mean().dropna()
    lines = ["| model | " + " | ".join(wide.columns) + " |",
             "|---|" + "---|" * len(wide.columns)]
    for model, row in wide.iterrows():
        lines.append(f"| {model} | " + " | ".join(str(v) if pd.notna(v) else "–" for v in row) + " |")
    if len(oracle):
        lines.append("")
        lines.append("Oracle C-index (true risk, same test splits): " + ", ".join(
            f"{k.upper()} {v:.3f}" for k, v in oracle.items()))
    proto = ", ".join(sorted(runs.protocol.dropna().unique()))
    lines.insert(0, f"Mean test C-index over splits ({proto}), 95 % t-interval over splits.\n")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return wide


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class ResultsTableCallback(Callback):
    """Hydra callback: write the results table at the end of every multirun."""

    def on_multirun_end(self, config, **kwargs) -> None:
        d = Path(config.hydra.sweep.dir)
        try:
            wide = results_table(d)
            print(f"results table: {d / 'results.md'}\n{wide.to_string()}")
        except FileNotFoundError:
            pass
