"""Per-step time of ``runtime=ray`` against ``runtime=local``, side by side in one process.

Run: ``python bench/ray_vs_local.py [--steps 8] [--warmup 2] [--configs tiny,resnet] [--ray 2x1,1x2]``

For each config, one training run per runtime (same seed, same machine, same driver threads)
through :class:`mona_sfl.engine.Trainer`; the time of every step is taken between consecutive
step records (server step + the clients' fused backward/forward), the first ``--warmup`` steps
are dropped, and the median and mean of the rest are printed with the ratio to local.
Start-up (Ray, actor processes) and the final evaluation are not in the step times; they are
printed separately. ``--ray AxC`` runs Ray with A actors of C CPUs (C torch threads) each.
``client/st`` is the engine's client time per step (for Ray: the round trips), ``actor/st``
the slowest actor's own compute per step; their difference is Ray's transport cost.

``--cpuacct PATH`` (a cgroup-v1 ``cpuacct.usage`` file of a cgroup holding this process; Ray's
processes started from here inherit it) adds the CPU time per step of all processes together,
a measure that other load on a shared machine disturbs much less than wall time::

    mkdir /sys/fs/cgroup/cpuacct/bench && echo $$ > /sys/fs/cgroup/cpuacct/bench/cgroup.procs
    python bench/ray_vs_local.py --cpuacct /sys/fs/cgroup/cpuacct/bench/cpuacct.usage

Configs:
  tiny    width 0.125, cut 2, 2 clients, batch 8, K 64, dim 16 (overhead-dominated)
  resnet  ResNet-18 width 0.25, cut 2, 5 clients, batch 32, K 6000, dim 1024 (compute-dominated)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from mona_sfl.config import load_config  # noqa: E402
from mona_sfl.engine import Trainer  # noqa: E402

COMMON = ["eval.linear=false", "eval.every=0", "data.test_size=100", "data.bank_size=200", "eval.knn_k=10", "device=cpu"]
CONFIGS = {
    "tiny": [
        "model.width=0.125", "model.cut=2", "algo.K=64", "algo.dim=16", "algo.hidden_dim=32",
        "data.synthetic_size=200", "fed.num_clients=2", "train.batch_size=8",
    ],
    "resnet": [
        "model.arch=resnet18", "model.width=0.25", "model.cut=2", "data.synthetic_size=2000",
        "fed.num_clients=5", "train.batch_size=32",
    ],
}


def cpu_seconds(path: str | None) -> float:
    if not path:
        return float("nan")
    with open(path) as f:
        return int(f.read()) / 1e9


def run_once(overrides: list[str], steps: int, warmup: int, cpuacct: str | None = None) -> dict[str, float]:
    total = steps + warmup
    cfg = load_config(None, overrides + COMMON + ["train.epochs=1", f"train.steps_per_epoch={total}", "fed.sync_every=0"])
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, Path(d) / "run", progress=False)
        startup = time.perf_counter() - t0
        stamps: list[float] = []
        cpu: list[float] = []
        log = trainer._log

        def stamped(rec: dict) -> None:
            if "loss" in rec:
                stamps.append(time.perf_counter())
                cpu.append(cpu_seconds(cpuacct))
            log(rec)

        trainer._log = stamped  # type: ignore[method-assign]
        busy_max = float("nan")
        try:
            t1 = time.perf_counter()
            trainer.run()
            wall = time.perf_counter() - t1
            if hasattr(trainer.runtime, "actor_busy"):
                busy = trainer.runtime.actor_busy()  # type: ignore[attr-defined]
                busy_max = max(b[0] for b in busy) / total  # the slowest actor's compute per step
        finally:
            trainer.runtime.close()
    starts = [t1] + stamps[:-1]
    per_step = [b - a for a, b in zip(starts, stamps)][warmup:]
    tm = trainer.timers
    return {
        "median": statistics.median(per_step),
        "mean": statistics.fmean(per_step),
        "min": min(per_step),
        "startup": startup,
        "wall": wall,
        "client": tm.client / total,
        "server": tm.server / total,
        "sync": tm.sync,
        "up_MB": trainer.runtime.bytes["up"] / 1e6 / total,
        "actor": busy_max,
        "cpu": (cpu[-1] - cpu[warmup - 1]) / (len(cpu) - warmup) if warmup >= 1 else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--configs", default="tiny,resnet")
    ap.add_argument("--ray", default="2x1", help="comma-separated AxC: A actors with C CPUs each")
    ap.add_argument("--repeats", type=int, default=1, help="alternate local/ray this many times")
    ap.add_argument("--threads", type=int, default=0, help="driver torch threads (0: torch's default)")
    ap.add_argument("--cpuacct", default=None, help="cgroup-v1 cpuacct.usage file to read CPU time from")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, driver threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.2f}")
    hdr = f"{'config':8} {'runtime':12} {'median s':>9} {'mean s':>8} {'min s':>8} {'ratio':>6} {'client/st':>9} {'server/st':>9} {'up MB/st':>8} {'startup s':>9} {'cpu s/st':>8} {'cpu ratio':>9} {'actor/st':>8}"
    print(hdr)
    for name in args.configs.split(","):
        base = CONFIGS[name]
        variants = [("local", ["runtime=local"])] + [
            (f"ray {v}", ["runtime=ray", f"ray.num_actors={v.split('x')[0]}", f"ray.cpus_per_actor={v.split('x')[1]}"])
            for v in args.ray.split(",")
        ]
        results: dict[str, list[dict[str, float]]] = {k: [] for k, _ in variants}
        for _ in range(args.repeats):
            for label, extra in variants:
                results[label].append(run_once(base + extra, args.steps, args.warmup, args.cpuacct))
        ref = statistics.median(r["median"] for r in results["local"])
        ref_cpu = statistics.median(r["cpu"] for r in results["local"])
        for label, _ in variants:
            rs = results[label]
            med = statistics.median(r["median"] for r in rs)
            print(
                f"{name:8} {label:12} {med:9.4f} {statistics.fmean(r['mean'] for r in rs):8.4f} "
                f"{min(r['min'] for r in rs):8.4f} {med / ref:6.3f} {statistics.fmean(r['client'] for r in rs):9.4f} "
                f"{statistics.fmean(r['server'] for r in rs):9.4f} {rs[0]['up_MB']:8.2f} {statistics.fmean(r['startup'] for r in rs):9.2f} "
                f"{statistics.median(r['cpu'] for r in rs):8.4f} {statistics.median(r['cpu'] for r in rs) / ref_cpu:9.3f} {statistics.fmean(r['actor'] for r in rs):8.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
