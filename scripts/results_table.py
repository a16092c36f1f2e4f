"""Print (and write as results.md / results.csv) the results table of one or more multirun
folders: python scripts/results_table.py DIR [DIR ...] [--out OUT_DIR].

Several folders (e.g. the same experiments on two demo cohorts) give one table, written into
their common parent unless --out says otherwise."""
import argparse
from pathlib import Path

from netsurv.cli import run_plain
from netsurv.report.results import results_table


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="multirun folder(s) (hydra.sweep.dir)")
    ap.add_argument("--out", default=None, help="where results.md / results.csv go")
    a = ap.parse_args()
    results_table(a.dirs if len(a.dirs) > 1 else a.dirs[0], out_dir=a.out)
    out = Path(a.out) if a.out else None
    if out is None:
        import os

        out = Path(a.dirs[0]) if len(a.dirs) == 1 else Path(
            os.path.commonpath([str(Path(d).resolve()) for d in a.dirs]))
    print((out / "results.md").read_text(encoding="utf-8"), end="")


if __name__ == "__main__":
    run_plain(main)
