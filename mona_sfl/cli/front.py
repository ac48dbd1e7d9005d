"""``mona-sfl front RUN_DIR ...``: how healthy each run's client front is, trained against untrained."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

#: Table columns: heading -> the cell of one FrontStats.
COLUMNS: dict[str, Callable[[Any], str]] = {
    "dead ch": lambda s: f"{s.dead_channels}/{s.channels}",
    "zeros": lambda s: f"{s.zero_fraction:.3f}",
    "mean |a|": lambda s: f"{s.mean_abs:.4f}",
    "eff. rank": lambda s: f"{s.effective_rank:.1f}",
    "PC1 share": lambda s: f"{s.top_share:.3f}",
    "channel CV": lambda s: f"{s.channel_cv:.3f}",
    "|w|^2": lambda s: f"{s.weight_sq:.4g}",
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "front",
        help="statistics of run folders' client-front activations: dead channels, spread, effective rank",
        description="For each run folder, pass test images (drawn class by class) through its synced client front (the checkpoint's "
        "global_online) and through the run's untrained front, and print per front: channels that are 0 for every image "
        "('dead ch', of all channels), the share of exact zeros, the mean |activation|, the effective rank of the "
        "images' activations (exp of the entropy of the principal components' variance shares), the first component's "
        "share, the median over channels of std/mean-|.| of the channel's mean across images (about 0: the channel "
        "says the same for every image) and the front's squared weight norm. A front whose clients stopped learning "
        "shows it here while the server keeps the loss low.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (train or study runs) with a checkpoint")
    p.add_argument("--num-test", type=int, default=1000, help="test images to pass through, drawn class by class (default 1000, at least 2)")
    p.add_argument("--device", help="cpu, cuda or auto (default: each run's device key)")
    p.add_argument("--knn", action="store_true", help="also the kNN top-1 of each front's own activations (flattened), on the run's "
                   "kNN bank and test set with its eval.knn_k and eval.knn_t: what the front alone still tells apart")
    p.add_argument("--depth", action="store_true", help="also the kNN top-1 along each run's encoder, untrained and trained: features "
                   "averaged over positions after the front and after every server unit, and the projector's output (the run's "
                   "kNN bank and test set): where what tells the classes apart is gained or lost")
    p.add_argument("--json", action="store_true", help="print one JSON object per run instead of the table")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.eval.front import inspect_run
    from mona_sfl.runs import table

    rows: list[list[str]] = []
    depth_rows: list[list[str]] = []
    for run_dir in args.runs:
        res = inspect_run(run_dir, num_test=args.num_test, device=args.device, knn=args.knn, depth=args.depth)
        if args.json:
            print(json.dumps({"run": run_dir, **res, "untrained": res["untrained"].to_dict(), "trained": res["trained"].to_dict()}))
            continue
        for which, label in (("untrained", "untrained"), ("trained", f"step {res['step']}")):
            knn = [f"{res['knn'][which]:.2f}"] if args.knn else []
            rows.append([run_dir, label, *(cell(res[which]) for cell in COLUMNS.values()), *knn])
        if args.depth:
            depth_rows.extend(
                [run_dir, where, f"{res['depth']['untrained'][where]:.2f}", f"{res['depth']['trained'][where]:.2f}"]
                for where in res["depth"]["trained"]
            )
    if not args.json:
        print(table(["run", "front", *COLUMNS, *(["front kNN %"] if args.knn else [])], rows), end="")
        print(f"on {args.num_test} test images of each run drawn class by class, fronts in eval mode")
        if args.depth:
            print()
            print(table(["run", "features after", "untrained kNN %", "trained kNN %"], depth_rows), end="")
            print("kNN top-1 on each run's kNN bank and test set; features averaged over positions, L2-normalised")
    return 0
