"""``mona-sfl attack``: the model-inversion attack on a run's client front, or on an untrained front."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mona_sfl.errors import ConfigError

#: Decoder settings: flag -> attack_front keyword.
ATTACK_OPTIONS = ("epochs", "aux_fraction", "num_test", "batch_size", "decoder_width", "seed")


def add_parser(sub: Any) -> None:
    from mona_sfl.cli import add_settings

    a = sub.add_parser(
        "attack", help="model-inversion attack on a run's client front (or on an untrained front)",
        description="Model-inversion attack: a decoder trained on (activation, image) pairs of an auxiliary share of the "
        "training set reconstructs held-out test images. The run (RUN_DIR) or the config (--config/--set) sets the "
        "model, the data and the device; the flags below set the attacker's decoder.",
    )
    a.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run folder: attacks its synced client front; writes attack.json and attack.png into it")
    a.add_argument("--untrained", action="store_true", help="attack the run's initial front instead (baseline; writes attack_untrained.json/.png)")
    add_settings(a, what="the attacked (untrained) front, instead of RUN_DIR; needs --out")
    a.add_argument("--out", help="output folder with --config (attack.json, attack.png)")
    a.add_argument("--epochs", type=int, default=50, help="decoder training epochs (default 50)")
    a.add_argument("--aux-fraction", type=float, default=0.01, help="attacker's auxiliary share of the training set (default 0.01)")
    a.add_argument("--num-test", type=int, default=128, help="held-out test images to reconstruct (default 128)")
    a.add_argument("--batch-size", type=int, default=32, help="decoder batch size (default 32)")
    a.add_argument("--decoder-width", type=int, default=64, help="decoder channels (default 64)")
    a.add_argument("--seed", type=int, default=0, help="seed of the auxiliary draw and the decoder (default 0)")
    a.add_argument("--device", help="cpu, cuda or auto (default: the config's device key, auto: CUDA when present)")
    a.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.checkpoint import CONFIG, load_run_config, lock_run_dir
    from mona_sfl.config import load_config, resolve_config_path
    from mona_sfl.privacy.attack import ATTACK_JSON, BASELINE_JSON, attack_config, attack_run, check_attack_options

    kw: dict[str, Any] = {k: getattr(args, k) for k in ATTACK_OPTIONS if getattr(args, k, None) is not None}
    device = args.device  # None: the run's or the config's `device` key
    check_attack_options(device, **kw)  # before any data is loaded or decoder trained
    if args.run_dir and args.config:
        raise ConfigError("pass either a RUN_DIR or --config FILE, not both")
    if args.run_dir:
        if args.overrides or args.out:
            raise ConfigError("--set and --out go with --config (a run folder has its own config; results go into it)")
        load_run_config(Path(args.run_dir))  # a missing or foreign folder is refused, not created by the lock
        with lock_run_dir(Path(args.run_dir), "the attack"):  # writable, and no training writing it: checked before the decoder trains
            res = attack_run(args.run_dir, untrained=bool(args.untrained), device=device, progress=not args.quiet, **kw)
        where = Path(args.run_dir)
    elif args.config:
        if not args.out:
            raise ConfigError("--config needs --out DIR for attack.json and attack.png")
        cfg = load_config(resolve_config_path(args.config), args.overrides)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} exists and is not a folder")
        if (Path(args.out) / CONFIG).exists():  # its attack.json/.png belong to that run's trained front
            raise ConfigError(f"--out {args.out} holds a training run: attack it with `mona-sfl attack {args.out} --untrained`, or choose another --out")
        with lock_run_dir(Path(args.out), "the attack"):
            res = attack_config(cfg, args.out, device=device, progress=not args.quiet, **kw)
        where = Path(args.out)
    else:
        raise ConfigError("pass a RUN_DIR (trained run folder) or --config FILE --out DIR (untrained baseline)")
    m = res.meta
    what = "untrained front" if m.get("untrained") else f"trained front (step {m.get('checkpoint_step')})"
    print(f"model inversion attack on the {what}: {m['arch']} cut {m['cut']} ({m['method']})")
    print(f"MSE  {res.mse:.5f}   (mean-image guess: {res.mse_mean_image:.5f})")
    print(f"PSNR {res.psnr:.2f} dB")
    print(f"SSIM {res.ssim:.4f}")
    print(
        f"decoder: {res.epochs} epochs on {res.aux_size} auxiliary training images; {res.num_test} held-out test images; "
        f"no JPEG round trip; {res.train_s:.1f} s"
    )
    stem = BASELINE_JSON if (args.run_dir and m.get("untrained")) else ATTACK_JSON
    print(f"wrote {where / stem} and {res.grid_path}")
    return 0
