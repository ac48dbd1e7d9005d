"""``mona-sfl plot RUN_DIR ...``: loss, kNN, learning rate and misalignment over steps, runs overlaid (PNG + PDF)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plot",
        help="learning curves of run folders (loss, kNN, learning rate, misalignment) as PNG and PDF",
        description="Draw training loss, kNN accuracy, learning rate and online/momentum misalignment over "
        "steps, the runs overlaid and labelled by how their configs differ: loss, knn, lr, misalignment "
        ".png (200 dpi) and .pdf.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by mona-sfl train")
    p.add_argument("--out", help="folder for the figures (default: RUN_DIR/plots for one run, ./plots for several)")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.plots import plot_runs
    from mona_sfl.runs import labels, load_runs

    runs = load_runs(args.runs)
    out = Path(args.out) if args.out else (runs[0].path / "plots" if len(runs) == 1 else Path("plots"))
    paths = plot_runs(runs, labels(runs), out)
    if not paths:
        print("nothing to plot: the runs hold no records yet")
    for path in paths:
        print(path)
    return 0
