"""Write the HTML report of a training run: python scripts/report.py <run dir> [options]."""
import argparse

import matplotlib

matplotlib.use("Agg")

from netsurv.cli import run_plain
from netsurv.report.html import write_report


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", help="a run directory written by scripts/train.py")
    ap.add_argument("--cohort-root", help="cohort folder (default: data.root of config.yaml)")
    ap.add_argument("--groups", type=int, choices=(2, 3), default=2,
                    help="KM risk groups: 2 = training median, 3 = training tertiles")
    ap.add_argument("--horizon", type=float, help="calibration horizon in months")
    ap.add_argument("--calibration-bins", type=int, default=5, help="5 (quintiles) or 10")
    ap.add_argument("--patients", nargs="*", help="attention heatmaps for these patients "
                    "(default: the top/bottom-risk test patients)")
    ap.add_argument("--split", help="split for the attention heatmaps (default: the first)")
    ap.add_argument("--n-top", type=int, default=2)
    ap.add_argument("--n-bottom", type=int, default=2)
    a = ap.parse_args()
    att = {"patients": a.patients or None, "split": a.split, "n_top": a.n_top,
           "n_bottom": a.n_bottom}
    out = write_report(a.run_dir, cohort_root=a.cohort_root, n_groups=a.groups,
                       horizon=a.horizon, calibration_bins=a.calibration_bins, attention=att)
    print(out)


if __name__ == "__main__":
    run_plain(main)
