"""Seconds per training step of a deployed Flower federation against Flower's simulation, in one invocation.

    python bench/deploy.py [--modes sim,stock,polls,persistent] [--config-name tiny] [--steps 6] [--warmup 2]
                           [--nodes N] [--set KEY=VALUE ...] [--json FILE]

Every mode trains the same config (``bench/runtimes.py``'s named configs, no sync inside the
epoch) for ``--warmup + --steps + 1`` steps; a step is timed on the ServerApp's side as the
gap between two consecutive ``train.step`` exchanges (``flower_step_gaps_s`` of
``flower_transport.json``: the server step, one message round trip per node, the clients'
compute), and the first ``--warmup`` gaps are dropped. Medians over the timed steps:

  server   gap minus wait: the server step, encoding and decoding, pushing the messages
  wait     from the push of a step's messages to the last node's reply
  compute  the slowest node's own work (rebuild its host from context.state, recompute, step,
           save), as the ClientApp measured it (``compute_s`` of its reply)

wait minus compute is the transport: Flower's polling, HTTP requests, starting a ClientApp.
Modes:

  sim         Flower's simulation engine in this process (``runtime=flower``)
  stock       ``mona-sfl deploy-local`` as Flower ships it: ``flower-supernode`` (3 s idle poll,
              0.5 s reply poll), a fresh ``flwr-clientapp`` process per message
  polls       as stock, with the SuperNodes' poll intervals shortened (--poll, default 0.05 s)
  persistent  as polls, with one ClientApp process per SuperNode that stays up (the default
              of ``deploy-local``)

Every deployment is a loopback SuperLink and ``--nodes`` SuperNodes (default: one per client),
started and stopped by :func:`mona_sfl.runtime.flower.deploy.deploy`. ``load`` is the 1-minute
load average when the mode started.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from mona_sfl.config import schema_config  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = ("sim", "stock", "polls", "persistent")


def _runtimes_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_runtimes", HERE / "runtimes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deploy_options(mode: str, poll_s: float) -> dict[str, Any]:
    """``deploy()`` keyword arguments of a deployed mode."""
    if mode == "stock":
        return {"clientapp": "per-message", "supernode_poll_s": None}
    if mode == "polls":
        return {"clientapp": "per-message", "supernode_poll_s": poll_s}
    if mode == "persistent":
        return {"clientapp": "persistent", "supernode_poll_s": poll_s}
    raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")


def measure(mode: str, overrides: list[str], *, steps: int, warmup: int, nodes: int = 0, poll_s: float = 0.05) -> dict[str, Any]:
    """One run of ``mode``; the step gaps after ``warmup`` and their median."""
    b = _runtimes_bench()
    node_keys = [f"flower.num_supernodes={nodes}"] if nodes else []
    cfg = schema_config([*overrides, "runtime=flower", *node_keys, *b.timing_keys(warmup + steps + 1)])
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        if mode == "sim":
            from mona_sfl.runtime.flower.launch import train_with_flower

            summary = train_with_flower(cfg, run, progress=False)
            transport = json.loads((run / "flower_transport.json").read_text())
        else:
            from mona_sfl.runtime.flower.deploy import deploy

            with open(Path(tmp) / "deploy.log", "w") as log:
                res = deploy(cfg, cfg.num_nodes, run, timeout_s=1200.0, log=log, **deploy_options(mode, poll_s))
            summary = res["summary"]
            transport = json.loads((run / "flower_transport.json").read_text())
    # exchange i begins gap i; the last exchange is the final backward (no forward): not a full step
    window = slice(warmup, warmup + steps)
    gaps = transport["flower_step_gaps_s"][window]
    if len(gaps) != steps:
        raise RuntimeError(f"{mode}: expected {steps} timed steps, got {len(gaps)}")
    wait, compute = transport["flower_step_wait_s"][window], transport["flower_step_compute_s"][window]
    return {"mode": mode, "median": statistics.median(gaps), "min": min(gaps), "max": max(gaps), "gaps": gaps,
            "wait": statistics.median(wait), "compute": statistics.median(compute),
            "server": statistics.median(g - w for g, w in zip(gaps, wait)),
            "wall": time.perf_counter() - t0, "load": load, "nodes": transport["flower_nodes"],
            "loss": summary.get("final_loss"), "steps": summary.get("steps")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--config-name", default="tiny", help="a named config of bench/runtimes.py (default tiny: 2 clients, 2 nodes)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=0, help="SuperNodes (0: one per client)")
    ap.add_argument("--poll", type=float, default=0.05, help="SuperNode idle poll of the polls/persistent modes (s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m != "sim":
            deploy_options(m, args.poll)
    b = _runtimes_bench()
    if args.config_name not in b.CONFIGS:
        ap.error(f"--config-name {args.config_name!r}: one of {', '.join(b.CONFIGS)}")
    overrides = [*b.COMMON, *b.CONFIGS[args.config_name], *args.overrides]
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}; config {args.config_name}; {args.steps} steps after "
          f"{args.warmup} warm-up", flush=True)
    rows = []
    for m in modes:
        try:
            r = measure(m, overrides, steps=args.steps, warmup=args.warmup, nodes=args.nodes, poll_s=args.poll)
        except Exception as e:  # noqa: BLE001 - keep the other modes' numbers
            r = {"mode": m, "error": f"{type(e).__name__}: {e}"}
        rows.append(r)
        state = r["error"] if "error" in r else f"median {r['median']:.3f} s/step"
        print(f"  {m}: {state}", file=sys.stderr, flush=True)
    sim = next((r for r in rows if r["mode"] == "sim" and "error" not in r), None)
    print(f"{'mode':12} {'median s/step':>13} {'min':>7} {'max':>7} {'x sim':>6} {'server':>7} {'wait':>7} {'compute':>7} "
          f"{'load':>5} {'wall s':>7} final loss")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:12} FAILED: {r['error']}")
            continue
        ratio = r["median"] / sim["median"] if sim else float("nan")
        print(f"{r['mode']:12} {r['median']:13.3f} {r['min']:7.3f} {r['max']:7.3f} {ratio:6.2f} {r['server']:7.3f} {r['wait']:7.3f} "
              f"{r['compute']:7.3f} {r['load']:5.2f} {r['wall']:7.1f} {r['loss']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
