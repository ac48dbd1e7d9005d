"""``mona-sfl compare RUN_DIR ...``: a table of the runs' summaries and the config keys they differ in."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="a table of run folders: the config keys they differ in and their results",
        description="Print one row per run folder: the config keys whose values differ between the runs, then "
        "kNN and linear-probe accuracy, the loss, steps and throughput from its summary.json.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by mona-sfl train")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.runs import compare_rows, load_runs, table

    print(table(*compare_rows(load_runs(args.runs))), end="")
    return 0
