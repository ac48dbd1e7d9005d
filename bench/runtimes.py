"""Per-step time of the same config under each runtime (local, ray, Flower simulation), in one invocation.

    python bench/runtimes.py [--configs resnet,deep] [--runtimes local,ray,flower]
                             [--steps 8] [--warmup 2] [--repeats 1] [--threads 0]
                             [--config FILE] [--set KEY=VALUE ...] [--cpuacct FILE] [--json FILE]

How a step is timed (the same for every runtime): the server (the engine's ``Trainer`` and its
``Server``) always runs in this process -- for ``runtime=flower`` the ServerApp runs in a thread
of this process, next to Flower's simulation engine, and only the ClientApps live in Ray
actors. :meth:`mona_sfl.core.server.Server.step` is wrapped to take a time stamp on every call;
the gap between two consecutive calls is one full training step: the server step, the clients'
fused backward of step t and forward of step t+1 (for Ray an actor call per actor, for Flower
one message round trip per node), and the engine's bookkeeping. A run trains
``--warmup + --steps + 1`` steps in one epoch without a sync inside it (``fed.sync_every=0``
unless ``--set`` changes it), the first ``--warmup`` gaps are dropped (Ray actors and Flower's
ClientApps import torch and build their data on first use) and median, mean and min of the
remaining ``--steps`` gaps are reported, with ``ratio`` = median / local median. ``--repeats R``
runs every runtime R times, alternating runtimes (local, ray, flower, local, ...) so that slow
drift of the machine's load hits them alike; the gaps of all repeats are pooled.

Other columns, all over the same measured gaps unless said otherwise:

- ``client/st``, ``server/st``: the engine's timers (``Trainer.timers``): wall time in runtime
  calls (client compute plus transport: Ray round trips, Flower exchanges) and in ``Server.step``.
- ``up MB/st``, ``down MB/st``: the runtime's byte counters (``bytes_up`` / ``bytes_down`` of
  ``summary.json``): activations up, gradients down, as serialised (0 for local, which
  serialises nothing).
- ``startup s``: from the start of the run to the first server step (Ray start, actor processes
  importing torch, data, the first forward); ``load``: the 1-minute load average at the start.
- ``cpu s/st``: CPU time per step of all processes in a cgroup, with ``--cpuacct FILE`` (a
  cgroup-v1 ``cpuacct.usage`` or a cgroup-v2 ``cpu.stat`` file of a cgroup that holds this
  process; the Ray processes started from here inherit it). Other load on a shared machine
  disturbs it much less than wall time::

      mkdir /sys/fs/cgroup/cpuacct/bench && echo $$ > /sys/fs/cgroup/cpuacct/bench/cgroup.procs
      python bench/runtimes.py --cpuacct /sys/fs/cgroup/cpuacct/bench/cpuacct.usage

- ``note``: for Ray the slowest actor's own compute per step over the whole run (``actor``;
  client/st minus it is about Ray's transport), for Flower the time per step spent waiting for
  the nodes' replies (``wait``: ClientApp compute, the simulation engine's polling every 0.1 s,
  on average 0.05 s per exchange, and the Ray call; client/st minus it is message encoding and
  decoding in the ServerApp) and the exchanges per step (1 without syncs).

- ``client ratio``: client/st over local's client/st (the client phase alone).
- ``actors at once`` (note, Ray): the actors' step-request compute summed over the measured steps,
  divided by the wall time during which at least one of them computed: 1.0 if they took turns,
  A if A actors always ran side by side (see ``concurrency``).

Runtimes (``--runtimes``, comma-separated): ``local``; ``ray`` (the config's ``ray.*`` keys) or
``ray:AxC`` (A actors with C CPUs, i.e. C torch threads, each); ``raycluster:NxC`` (N actors on a
``ray.cluster_utils.Cluster`` of N nodes of C CPUs each, started on this machine for the run and
stopped after it: every node has its own raylet and object store, so activations cross nodes
as they would between machines, minus the network); ``flower`` (simulation engine,
``flower.cpus_per_client`` from the config) or ``flower:C`` (C CPUs per ClientApp).
``local`` runs the clients one after another; Ray and Flower run them in parallel processes, as
many as the CPUs allow, so on a machine with many cores their ratio also measures
parallelism. ``ray:1x1`` hosts every client in one actor: its ratio is Ray's transport cost.
``--threads N`` sets the torch threads of this process (the local runtime's clients and the
server of every runtime); Ray actors use ``ray.cpus_per_actor`` threads, Flower's ClientApps get
``OMP_NUM_THREADS`` from Ray (their CPU count) unless it is set in the environment. For a
like-for-like comparison run with ``--threads 1`` and ``OMP_NUM_THREADS=1``.

Configs (``--configs``; ``--set`` overrides apply on top, ``--config FILE`` is the base under them):

  tiny    width 0.125, cut 2, 2 clients, batch 8, K 64, dim 16 (overhead-dominated smoke run)
  resnet  ResNet-18 width 0.25, cut 2, 5 clients, batch 32, K 6000, dim 1024 (compute-dominated)
  deep    as resnet at cut 8: activations 8x smaller (128x4x4), client front 79x larger
          (405k parameters; Flower carries each node's fronts and optimizer state in every message)
  base    the --config file (or the built-in defaults) with --set only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402

from mona_sfl.config import load_config, schema_config  # noqa: E402
from mona_sfl.core.server import Server  # noqa: E402
from mona_sfl.engine import Trainer  # noqa: E402

# Small evaluation at the end (not timed), CPU, no sync inside the epoch: all overridable with --set.
COMMON = ["device=cpu", "fed.sync_every=0", "eval.knn_k=10", "data.test_size=100", "data.bank_size=200"]
RESNET = ["model.arch=resnet18", "model.width=0.25", "data.synthetic_size=2000", "fed.num_clients=5", "train.batch_size=32"]
CONFIGS: dict[str, list[str]] = {
    "tiny": [
        "model.arch=resnet18", "model.width=0.125", "model.cut=2", "algo.K=64", "algo.dim=16", "algo.hidden_dim=32",
        "data.synthetic_size=200", "fed.num_clients=2", "train.batch_size=8",
    ],
    "resnet": [*RESNET, "model.cut=2"],
    "deep": [*RESNET, "model.cut=8"],
    "base": [],
}


def timing_keys(total_steps: int) -> list[str]:
    """Last overrides of every run: one epoch of exactly ``total_steps`` steps, no evaluation or checkpoint inside."""
    return [
        "train.epochs=1", f"train.steps_per_epoch={total_steps}", "train.max_steps=0", "train.checkpoint_every=0",
        "train.checkpoint_minutes=0", "eval.every=0", "eval.linear=false",
    ]


def _actors_x_cpus(spec: str, arg: str) -> tuple[int, float]:
    actors, x, cpus = arg.partition("x")
    try:
        n, c = int(actors), float(cpus)
    except ValueError:
        n, c = 0, 0.0
    if not (x and actors.isdigit() and n > 0 and c > 0):
        raise ValueError(f"runtime {spec!r}: expected {spec.partition(':')[0]}:AxC with A >= 1 actors of C > 0 CPUs, e.g. ray:2x1")
    return n, c


def runtime_overrides(spec: str) -> list[str]:
    """``local``, ``ray``, ``ray:AxC``, ``raycluster:NxC``, ``flower``, ``flower:C`` -> config overrides.

    ``raycluster:NxC`` is ``ray:NxC`` on a cluster of N nodes of C CPUs each (one actor per node),
    started by :func:`measure` with ``ray.cluster_utils.Cluster``; its address is added there.
    """
    name, _, arg = spec.partition(":")
    if name == "local" and not arg:
        return ["runtime=local"]
    if name == "ray" and not arg:
        return ["runtime=ray"]
    if name in ("ray", "raycluster"):
        actors, cpus = _actors_x_cpus(spec, arg)
        return ["runtime=ray", f"ray.num_actors={actors}", f"ray.cpus_per_actor={cpus}"]
    if name == "flower":
        return ["runtime=flower"] + ([f"flower.cpus_per_client={float(arg)}"] if arg else [])
    raise ValueError(f"unknown runtime {spec!r}: use local, ray, ray:AxC, raycluster:NxC, flower or flower:C")


def concurrency(spans: list[list[tuple[float, float]]]) -> float:
    """How many actors computed at once, on average over the time any of them computed.

    ``spans`` holds per actor the (start, end) times of its step requests. The figure is the sum
    of all span lengths over the length of their union: 1.0 when the actors took turns (the
    server waited for one before asking the next), the number of actors when they always ran
    side by side. NaN without spans.
    """
    flat = sorted((a, b) for per in spans for a, b in per if b > a)
    if not flat:
        return float("nan")
    union, (lo, hi) = 0.0, flat[0]
    for a, b in flat[1:]:
        if a > hi:
            union, lo, hi = union + hi - lo, a, b
        else:
            hi = max(hi, b)
    union += hi - lo
    return sum(b - a for a, b in flat) / union


class _Cluster:
    """A ``ray.cluster_utils.Cluster`` of ``nodes`` nodes of ``cpus`` CPUs each on this machine (for raycluster:NxC)."""

    def __init__(self, nodes: int, cpus: float) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
        try:
            for _ in range(nodes - 1):
                self.cluster.add_node(num_cpus=cpus)
            self.cluster.wait_for_nodes()
        except BaseException:
            self.cluster.shutdown()
            raise

    @property
    def address(self) -> str:
        return self.cluster.address

    def close(self) -> None:
        self.cluster.shutdown()


def cpu_seconds(path: str | None) -> float:
    """CPU time of a cgroup: cgroup-v1 ``cpuacct.usage`` (ns) or cgroup-v2 ``cpu.stat`` (usage_usec)."""
    if not path:
        return float("nan")
    text = Path(path).read_text()
    if path.endswith("cpu.stat"):
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        raise ValueError(f"{path} has no usage_usec line")
    return int(text) / 1e9


def measure(overrides: list[str], *, steps: int, warmup: int, config: str | Path | None = None,
            cpuacct: str | None = None, cluster_nodes: int = 0) -> dict[str, Any]:
    """Train one run of ``config`` + ``overrides`` (which select the runtime) and time its steps.

    Returns per-step figures over the ``steps`` gaps after ``warmup`` (see the module docstring)
    plus ``gaps`` (all measured step times), ``startup``, ``wall``, ``load``, ``threads``.
    ``cluster_nodes`` > 0 (Ray only) runs it on a fresh ``ray.cluster_utils.Cluster`` of that many
    nodes of ``ray.cpus_per_actor`` CPUs each, stopped afterwards.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    total = warmup + steps + 1  # n steps make n - 1 gaps between server steps
    keys = [*overrides, *timing_keys(total)]
    cfg = schema_config(keys) if config is None else load_config(config, keys)
    marks: list[dict[str, float]] = []  # one per server step: counters as the step starts
    trainers: list[Trainer] = []
    server_step, trainer_run = Server.step, Trainer.run

    def step(self: Server, acts: Any) -> Any:  # runs in the thread that hosts the server (Flower: the ServerApp's)
        tr = trainers[-1] if trainers else None
        mark = {"t": time.perf_counter(), "cpu": cpu_seconds(cpuacct)}
        if tr is not None:
            rt = tr.runtime
            mark.update(client=tr.timers.client, server=tr.timers.server, up=rt.bytes["up"], down=rt.bytes["down"],
                        wait=getattr(rt, "wait_s", float("nan")), exchanges=getattr(rt, "exchanges", float("nan")))
        marks.append(mark)
        return server_step(self, acts)

    def run(self: Trainer, *args: Any, **kwargs: Any) -> Any:  # also the ServerApp's Trainer subclass
        trainers.append(self)
        return trainer_run(self, *args, **kwargs)

    load = os.getloadavg()[0]
    actor = conc = float("nan")
    cluster = None
    if cluster_nodes:
        if cfg.runtime != "ray":
            raise ValueError("a Ray cluster needs runtime=ray")
        t_cluster = time.perf_counter()
        cluster = _Cluster(cluster_nodes, cfg.ray.cpus_per_actor)
        cfg = load_config(config, [*overrides, *timing_keys(total), f"ray.address={cluster.address}"])
    Server.step, Trainer.run = step, run  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            if cfg.runtime == "flower":
                from mona_sfl.runtime.flower.launch import train_with_flower

                summary = train_with_flower(cfg, Path(tmp) / "run", progress=False)
            else:
                trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
                try:
                    summary = trainer.run()
                    if hasattr(trainer.runtime, "actor_busy"):  # Ray: the slowest actor's own compute per step
                        actor = max(b[0] for b in trainer.runtime.actor_busy()) / total  # type: ignore[attr-defined]
                        # how many actors computed at once over the measured steps (skip the warm-up ones)
                        spans = trainer.runtime.actor_spans()  # type: ignore[attr-defined]
                        conc = concurrency([per[warmup:] for per in spans])
                finally:
                    trainer.runtime.close()
            wall = time.perf_counter() - t0
    finally:
        Server.step, Trainer.run = server_step, trainer_run  # type: ignore[method-assign]
        if cluster is not None:
            cluster.close()
    if len(marks) != total:
        raise RuntimeError(f"expected {total} server steps, saw {len(marks)}")
    first, last = marks[warmup], marks[-1]
    nan = float("nan")

    def per_step(key: str, scale: float = 1.0) -> float:
        return (last.get(key, nan) - first.get(key, nan)) / steps / scale

    gaps = [b["t"] - a["t"] for a, b in zip(marks, marks[1:])][warmup:]
    res: dict[str, Any] = {
        "runtime": cfg.runtime,
        "median": statistics.median(gaps),
        "mean": statistics.fmean(gaps),
        "min": min(gaps),
        "gaps": gaps,
        "client": per_step("client"),
        "server": per_step("server"),
        "up_MB": per_step("up", 1e6),
        "down_MB": per_step("down", 1e6),
        "cpu": per_step("cpu"),
        "startup": marks[0]["t"] - t0,
        "wall": wall,
        "load": load,
        "threads": torch.get_num_threads(),
        "actor": actor,
        "concurrency": conc,
        "steps": summary["steps"],
    }
    if cfg.runtime == "flower":  # time waiting for the nodes' replies (compute + engine polling + Ray), exchanges
        res["wait"] = per_step("wait")
        res["exchanges"] = per_step("exchanges")
    return res


def bench(configs: list[str], runtimes: list[str], *, steps: int, warmup: int, repeats: int = 1,
          overrides: list[str] | None = None, config: str | Path | None = None, cpuacct: str | None = None,
          on_result: Any = None) -> list[dict[str, Any]]:
    """Every config under every runtime, ``repeats`` rounds alternating runtimes; one aggregated row per pair.

    A run that fails gives a row with ``error`` (the others go on). ``on_result(config, spec, result)``
    is called after every run (progress output).
    """
    rows: list[dict[str, Any]] = []
    for name in configs:
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}: one of {', '.join(CONFIGS)}")
        base = [*COMMON, *CONFIGS[name], *(overrides or [])]
        runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in runtimes}
        for _ in range(repeats):
            for spec in runtimes:
                nodes = _actors_x_cpus(spec, spec.partition(":")[2])[0] if spec.startswith("raycluster:") else 0
                try:
                    r = measure([*base, *runtime_overrides(spec)], steps=steps, warmup=warmup, config=config, cpuacct=cpuacct,
                                cluster_nodes=nodes)
                except Exception as e:  # noqa: BLE001 - one failing runtime must not lose the others' numbers
                    traceback.print_exc()
                    r = {"error": f"{type(e).__name__}: {e}"}
                runs[spec].append(r)
                if on_result is not None:
                    on_result(name, spec, r)
        config_rows = [aggregate(name, spec, rs) for spec, rs in runs.items()]
        ref = next((r for r in config_rows if r["runtime"] == "local" and "error" not in r), None)
        for r in config_rows:
            if "error" not in r:
                r["ratio"] = r["median"] / ref["median"] if ref else float("nan")
                r["cpu_ratio"] = r["cpu"] / ref["cpu"] if ref else float("nan")
                r["client_ratio"] = r["client"] / ref["client"] if ref else float("nan")
        rows.extend(config_rows)
    return rows


def aggregate(config: str, spec: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the gaps of all repeats (median/mean/min); average the other figures."""
    ok = [r for r in runs if "error" not in r]
    row: dict[str, Any] = {"config": config, "runtime": spec, "repeats": len(ok)}
    if not ok:
        row["error"] = runs[0]["error"] if runs else "not run"
        return row
    gaps = [g for r in ok for g in r["gaps"]]
    row.update(median=statistics.median(gaps), mean=statistics.fmean(gaps), min=min(gaps), gaps=gaps)
    for key in ("client", "server", "up_MB", "down_MB", "cpu", "startup", "wall", "load", "actor", "concurrency", "wait",
                "exchanges"):
        if key in ok[0]:
            row[key] = statistics.fmean(r[key] for r in ok)
    row["threads"] = ok[0]["threads"]
    if len(ok) < len(runs):
        row["error"] = f"{len(runs) - len(ok)} of {len(runs)} runs failed"
    return row


COLUMNS = [  # header, key, format
    ("config", "config", "{:8}"), ("runtime", "runtime", "{:12}"), ("median s", "median", "{:9.4f}"),
    ("mean s", "mean", "{:8.4f}"), ("min s", "min", "{:8.4f}"), ("ratio", "ratio", "{:6.3f}"),
    ("client/st", "client", "{:9.4f}"), ("client ratio", "client_ratio", "{:12.3f}"), ("server/st", "server", "{:9.4f}"), ("up MB/st", "up_MB", "{:8.3f}"),
    ("down MB/st", "down_MB", "{:10.3f}"), ("startup s", "startup", "{:9.2f}"), ("load", "load", "{:5.2f}"),
    ("cpu s/st", "cpu", "{:8.4f}"), ("cpu ratio", "cpu_ratio", "{:9.3f}"),
]


def _width(fmt: str) -> int:
    return int(fmt.strip("{}:").rstrip("sfd").split(".")[0])


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [" ".join(f"{h:<{_width(f)}}" if k in ("config", "runtime") else f"{h:>{_width(f)}}" for h, k, f in COLUMNS) + " note"]
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            cells.append(fmt.format(v) if v is not None and v == v else f"{'-':>{_width(fmt)}}")  # '-': absent or NaN
        notes = []
        if r.get("actor", float("nan")) == r.get("actor"):
            notes.append(f"actor {r['actor']:.4f} s/st")
        if r.get("concurrency", float("nan")) == r.get("concurrency"):
            notes.append(f"{r['concurrency']:.2f} actors at once")
        if "wait" in r:
            notes.append(f"wait {r['wait']:.4f} s/st over {r['exchanges']:.2f} exch/st")
        if "error" in r:
            notes.append(f"FAILED: {r['error']}" if "median" not in r else r["error"])
        lines.append(" ".join(cells) + (" " + "; ".join(notes) if notes else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="resnet,deep", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--runtimes", default="local,ray,flower",
                    help="comma-separated: local, ray, ray:AxC, raycluster:NxC, flower, flower:C")
    ap.add_argument("--steps", type=int, default=8, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each run")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all runtimes, alternating them")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch's default)")
    ap.add_argument("--config", default=None, help="base config file under the named configs (default: built-in defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    ap.add_argument("--cpuacct", default=None, help="cgroup cpuacct.usage (v1) or cpu.stat (v2) file to read CPU time from")
    ap.add_argument("--json", default=None, help="also write the rows (with every step time) to this JSON file")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    runtimes = [r for r in args.runtimes.split(",") if r]
    for spec in runtimes:
        runtime_overrides(spec)  # refuse a bad spec before the first run
    config = None
    if args.config:
        from mona_sfl.config import resolve_config_path

        config = resolve_config_path(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, driver threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, load {os.getloadavg()[0]:.2f}; "
          f"{args.steps} steps after {args.warmup} warm-up, {args.repeats} repeat(s)", flush=True)

    def progress(name: str, spec: str, r: dict[str, Any]) -> None:
        state = r["error"] if "error" in r else f"median {r['median']:.4f} s/step, startup {r['startup']:.1f} s"
        print(f"  {name} {spec}: {state}", file=sys.stderr, flush=True)

    rows = bench(configs, runtimes, steps=args.steps, warmup=args.warmup, repeats=args.repeats, overrides=args.overrides,
                 config=config, cpuacct=args.cpuacct, on_result=progress)
    print(format_table(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
