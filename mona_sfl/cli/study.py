"""``mona-sfl study``: MonAcoSFL vs MocoSFL over cut layers (accuracy, inversion attack, bytes), resumable."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from mona_sfl.cli import add_settings

    p = sub.add_parser(
        "study",
        help="split-depth study: MonAcoSFL vs MocoSFL over cut layers (CSV + plots, resumable)",
        description="MonAcoSFL vs MocoSFL over cut layers: accuracy, model-inversion attack, communication. "
        "Rows already in OUT/split_depth.csv are skipped; unfinished runs are resumed.",
    )
    add_settings(p, what="every run")
    p.add_argument("--cuts", help="comma-separated cut layers (default 1..9; --quick: 1,4,8)")
    p.add_argument("--methods", default="MonAcoSFL,MocoSFL", help="comma-separated: MonAcoSFL (mona), MocoSFL (moco)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--out", default="runs/split_depth_study", help="study folder (default runs/split_depth_study)")
    p.add_argument("--attack-epochs", type=int, help="decoder training epochs (default 50; --quick 10)")
    p.add_argument("--attack-aux-fraction", type=float, help="attacker's share of the training set (default 0.01)")
    p.add_argument("--attack-num-test", type=int, help="held-out test images attacked (default 128)")
    p.add_argument("--attack-width", type=int, help="decoder channels (default 64)")
    p.add_argument("--baseline", action="store_true", help="also attack the untrained front of every (cut, seed)")
    p.add_argument("--regime", help="a reference training regime: batch20, batch2, clients20, clients200 "
                   "(clients, batch, sampling, sync cadence; README 'Regimes')")
    p.add_argument("--steps", type=int, help="step budget of every run (train.max_steps; regime default: its budget)")
    p.add_argument("--width", type=float, help="model.width of every run")
    p.add_argument("--curve-every", type=int, help="kNN every N steps for the learning curves (regime default: budget / 10)")
    p.add_argument("--no-attack", action="store_true", help="skip the model-inversion attack (accuracy and curves only)")
    p.add_argument("--quick", action="store_true", help="tiny synthetic version (a few minutes on 2 CPU cores)")
    p.add_argument("--threads", type=int, help="torch CPU threads of every run, for client and server compute and evaluation alike (sets train.client_threads and train.server_threads; default: the config's, server 0 = every CPU; --quick: 1, which is much faster on a busy machine)")
    p.add_argument("--progress", action="store_true", help="show training progress")
    p.add_argument("--no-plots", action="store_true", help="write the CSV only")


def run(args: argparse.Namespace) -> int:
    import logging

    from mona_sfl.studies.split_depth import attack_settings, parse_ints, parse_methods, run_study

    logging.getLogger("mona_sfl").setLevel(logging.INFO)
    attack = attack_settings(
        args.quick, epochs=args.attack_epochs, aux_fraction=args.attack_aux_fraction,
        num_test=args.attack_num_test, decoder_width=args.attack_width,
    )
    run_study(
        args.out,
        config=args.config,
        overrides=args.overrides,
        cuts=parse_ints(args.cuts, "cuts") if args.cuts else None,
        methods=parse_methods(args.methods),
        seeds=parse_ints(args.seeds, "seeds"),
        attack=attack,
        no_attack=args.no_attack,
        regime=args.regime,
        steps=args.steps,
        width=args.width,
        curve_every=args.curve_every,
        baseline=args.baseline,
        quick=args.quick,
        threads=args.threads,
        progress=args.progress,
        plots=not args.no_plots,
        report=lambda line: print(line, flush=True),
    )
    return 0
