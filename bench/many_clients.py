"""What simulating many small clients costs, per-client loop against one batched pass.

    python bench/many_clients.py [--steps 3] [--warmup 1] [--repeats 1] [--quick] [--set KEY=VALUE ...]

All figures come from one invocation, one torch thread for clients and server, synthetic
data, evaluation off, no sync inside the timed steps:

* overhead ratio: step time of N clients x B rows divided by the step time of ONE client
  x N*B rows (the same arithmetic done once), with ``train.client_batching`` off and on,
  for the reference 200-client setup (``configs/resnet18_200clients.toml``: N = 100
  sampled, B = 1, width 1/8) and the 5-client setup (``configs/resnet18_5clients.toml``,
  B = 2, width 1/4, cut 2 and 7);
* speed-up of batched over per-client on the 200-client setup at width 1/8 and 1/4.

With ``--repeats R`` the three runs of a setup alternate R times; every figure is the
median over the repeats, with its range in brackets, and each ratio is taken within one
repeat (a burst of other load then hits one repeat, not one setup).
``--set`` overrides a key in every compared run (after the setup's own keys), e.g.
``--set device=cuda --set train.precision=bf16`` (bench/gpu_check.sh).
Each line also gives the client phase's time (forward + backward of the clients, incl.
data augmentation). The machine load (``os.getloadavg()``) is printed before and after:
on a shared machine every figure moves with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from throughput import measure  # noqa: E402

COMMON = ["data.name=synthetic", "train.client_threads=1", "train.server_threads=1", "fed.sync_every=0", "train.steps_per_epoch=1000"]


def setups(quick: bool) -> list[tuple[str, str, list[str], int, int]]:
    """(name, config, overrides, clients N, rows per client B)."""
    out = [
        ("200 clients, width 1/8", "configs/resnet18_200clients.toml", ["model.width=0.125"], 100, 1),
        ("200 clients, width 1/4", "configs/resnet18_200clients.toml", ["model.width=0.25"], 100, 1),
    ]
    if not quick:
        out += [
            ("5 clients, cut 2, width 1/4", "configs/resnet18_5clients.toml", ["model.width=0.25", "model.cut=2"], 5, 2),
            ("5 clients, cut 7, width 1/4", "configs/resnet18_5clients.toml", ["model.width=0.25", "model.cut=7"], 5, 2),
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the compared runs R times, report medians")
    ap.add_argument("--quick", action="store_true", help="only the 200-client setup")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key in every run")
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.repeats < 1:
        ap.error("--steps and --repeats must be >= 1, --warmup >= 0")
    torch.set_num_threads(1)
    print(f"load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    for name, config, extra, n, b in setups(a.quick):
        base = COMMON + extra
        runs = {
            "per-client": base + [f"train.batch_size={b}", "train.client_batching=off"],
            "batched": base + [f"train.batch_size={b}", "train.client_batching=on"],
            "one client": base + [f"train.batch_size={n * b}", "fed.num_clients=1", "fed.sample_ratio=1.0", "train.client_batching=off"],
        }
        if n < 100:
            runs["per-client"].append(f"fed.num_clients={n}")
            runs["batched"].append(f"fed.num_clients={n}")
        runs = {k: v + a.overrides for k, v in runs.items()}
        reps = []
        for _ in range(a.repeats):
            r = {k: measure(config, v, a.steps, a.warmup) for k, v in runs.items()}
            step = {k: 1.0 / v["steps_per_s"] for k, v in r.items()}
            client = {k: v["client"] * v["wall_s"] / a.steps for k, v in r.items()}
            reps.append({
                **{f"{k} step": step[k] for k in runs},
                **{f"{k} client": client[k] for k in runs},
                "overhead per-client": step["per-client"] / step["one client"],
                "overhead batched": step["batched"] / step["one client"],
                "speed-up step": step["per-client"] / step["batched"],
                "speed-up client": client["per-client"] / client["batched"],
            })  # fmt: skip

        def fig(key: str, unit: str = "") -> str:
            vals = [r[key] for r in reps]
            med = f"{statistics.median(vals):.3f}" if unit == " s" else f"{statistics.median(vals):.2f}"
            return med + unit + (f" ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else "")

        print(f"{name} ({n} x {b} rows vs 1 x {n * b}):")
        for k in runs:
            print(f"  {k:11s} step {fig(f'{k} step', ' s')}, client phase {fig(f'{k} client', ' s')}")
        print(
            f"  overhead ratio: per-client {fig('overhead per-client')}, batched {fig('overhead batched')};"
            f" speed-up batched/per-client: step {fig('speed-up step')}x, client phase {fig('speed-up client')}x"
        )
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
