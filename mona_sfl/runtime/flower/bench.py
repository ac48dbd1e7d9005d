"""Per-step time of the Flower simulation engine against the in-process runtime.

``python -m mona_sfl.runtime.flower.bench [--steps N] [--set KEY=VALUE ...]``

Both runs use the same config (one epoch of N steps, no sync inside the epoch, no
evaluation). The server runs in this process in both cases, so the time between two
consecutive server steps is one full training step (client forward + server step + the
fused backward/forward round trip); the first two steps (Ray actors importing torch,
building data) and the step before the final sync are left out, and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mona_sfl.config import Config, load_config, replace
from mona_sfl.core.server import Server


def _timed_run(cfg: Config, run_dir: Path, flower: bool) -> dict[str, Any]:
    stamps: list[float] = []
    original = Server.step

    def step(self: Server, acts):  # type: ignore[no-untyped-def]
        stamps.append(time.perf_counter())
        return original(self, acts)

    Server.step = step  # type: ignore[method-assign]
    try:
        if flower:
            from mona_sfl.runtime.flower.launch import train_with_flower

            summary = train_with_flower(replace(cfg, runtime="flower"), run_dir, progress=False)
        else:
            from mona_sfl.engine import Trainer

            summary = Trainer(replace(cfg, runtime="local"), run_dir, progress=False).run()
    finally:
        Server.step = original  # type: ignore[method-assign]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][2:]
    return {
        "step_s_median": statistics.median(gaps) if gaps else float("nan"),
        "step_s_min": min(gaps) if gaps else float("nan"),
        "steps": summary["steps"],
        "wall_s": summary["wall_s"],
        **{k: summary[k] for k in ("flower_exchanges", "flower_wait_s", "bytes_up", "bytes_down") if k in summary},
    }


def bench(cfg: Config) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        local = _timed_run(cfg, Path(tmp) / "local", flower=False)
        flower = _timed_run(cfg, Path(tmp) / "flower", flower=True)
    return {"local": local, "flower": flower, "ratio": flower["step_s_median"] / local["step_s_median"]}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    p = argparse.ArgumentParser(prog="python -m mona_sfl.runtime.flower.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads in this process (0 = torch's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    fixed = ["train.epochs=1", f"train.steps_per_epoch={args.steps}", "fed.sync_every=0", "eval.every=0", "eval.linear=false"]
    cfg = load_config(args.config, [*args.overrides, *fixed])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = bench(cfg)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
