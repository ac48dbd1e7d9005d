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
    p.add_argument("--keys", action="store_true", help="also the key-source probe: InfoNCE of queries from probe clients' online fronts "
                   "against negatives made of the same images through the client's own momentum front and through other clients' "
                   "momentum fronts (a loss far lower with the other fronts' negatives: the server tells keys by the front that made "
                   "them, not by the image); half of --num-test images are queries, half negatives")
    p.add_argument("--after", type=int, default=0, metavar="N", help="with --keys: probe the state N steps after the checkpoint "
                   "(a temporary copy of the run continued; the run folder is not touched), between syncs, where the clients' "
                   "fronts have moved apart; N must end before the next sync (default 0: the checkpoint itself)")
    p.add_argument("--probe-clients", type=int, default=8, metavar="N", help="with --keys: probe up to N clients, evenly spaced over "
                   "the clients of the probed epoch (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object per run instead of the table")


#: Key-source table columns: heading -> the cell of one KeySources.
KEY_COLUMNS: dict[str, Callable[[Any], str]] = {
    "step": lambda k: str(k.step),
    "probed": lambda k: f"{len(k.clients)}/{k.sources}",
    "loss own": lambda k: f"{k.loss_own:.3f}",
    "loss others": lambda k: f"{k.loss_others:.3f}",
    "loss queue": lambda k: f"{k.loss_queue:.3f}",
    "q.k+": lambda k: f"{k.cos_pos:.3f}",
    "q.neg own": lambda k: f"{k.cos_own:.3f}",
    "q.neg others": lambda k: f"{k.cos_others:.3f}",
    "key cos": lambda k: f"{k.key_cos:.3f}",
}


def run(args: argparse.Namespace) -> int:
    from mona_sfl.config import ConfigError
    from mona_sfl.eval.front import inspect_run
    from mona_sfl.eval.keys import probe_run
    from mona_sfl.runs import table

    if args.after and not args.keys:
        raise ConfigError("--after needs --keys (it sets where the key-source probe looks)")
    rows: list[list[str]] = []
    depth_rows: list[list[str]] = []
    key_rows: list[list[str]] = []
    for run_dir in args.runs:
        res = inspect_run(run_dir, num_test=args.num_test, device=args.device, knn=args.knn, depth=args.depth)
        keys = probe_run(run_dir, num_test=args.num_test, clients=args.probe_clients, device=args.device, after=args.after) if args.keys else None
        if args.json:
            print(json.dumps({"run": run_dir, **res, "untrained": res["untrained"].to_dict(), "trained": res["trained"].to_dict(),
                              **({"keys": keys.to_dict()} if keys is not None else {})}))
            continue
        if keys is not None:
            key_rows.append([run_dir, *(cell(keys) for cell in KEY_COLUMNS.values())])
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
        if args.keys:
            print()
            print(table(["run", *KEY_COLUMNS], key_rows), end="")
            print("key-source probe: InfoNCE (the run's temperature) and mean cosines of probe clients' queries against negatives "
                  "from their own momentum front and from other clients' (same images and views), and against the checkpoint's "
                  "queue; key cos: one image's key from the two fronts")
    return 0
