"""Training throughput for a config: images/s, steps/s and where the step time goes.

    python bench/throughput.py [--config FILE] [--set KEY=VALUE ...] [--steps 30] [--warmup 5]

Evaluation is switched off; the first --warmup steps are not timed. The shares are of the
timed wall time: client compute (forward + backward of the sampled clients, incl. data
augmentation), server compute (server step), sync (FedAvg + divergence metrics) and other
(logging, checkpoint, loop overhead).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from mona_sfl.config import resolve_config_path
from mona_sfl.config import load_config
from mona_sfl.engine import Trainer


def measure(config: str | None, overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    cfg = load_config(resolve_config_path(config), overrides + ["eval.every=0", "eval.linear=false", f"train.max_steps={warmup + steps}"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        marks: dict[str, float] = {}

        def on_step(t: Trainer) -> None:
            if t.global_step == warmup:
                t.timers.reset()
                marks["start"] = time.perf_counter()
                marks["images"] = t.images
            marks["end"] = time.perf_counter()

        trainer.on_step = on_step
        if warmup == 0:  # no step reaches global_step 0: start the clock before the first one
            trainer.timers.reset()
            marks["start"], marks["images"] = time.perf_counter(), trainer.images
        trainer.run()
        wall = marks["end"] - marks["start"]
        T = trainer.timers
        images = trainer.images - marks["images"]
        return {
            "images_per_s": images / wall,
            "steps_per_s": steps / wall,
            "client": T.client / wall,
            "server": T.server / wall,
            "sync": T.sync / wall,
            "other": max(0.0, 1 - (T.client + T.server + T.sync) / wall),
            "wall_s": wall,
            "device": str(trainer.device),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    r = measure(a.config, a.overrides, a.steps, a.warmup)
    print(f"device {r['device']}: {r['images_per_s']:.1f} images/s, {r['steps_per_s']:.2f} steps/s over {a.steps} steps ({r['wall_s']:.1f} s)")
    print(f"share of step time: client {r['client']:.1%}, server {r['server']:.1%}, sync {r['sync']:.1%}, other {r['other']:.1%}")


if __name__ == "__main__":
    main()
