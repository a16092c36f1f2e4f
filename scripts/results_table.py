"""Write the study's results table from a multirun folder: python scripts/results_table.py DIR."""
import sys

from netsurv.cli import run_plain
from netsurv.report.results import results_table


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/results_table.py <multirun dir>")
    print(results_table(sys.argv[1]).to_string())


if __name__ == "__main__":
    run_plain(main)
