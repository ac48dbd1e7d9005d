"""The Ray runtime: exact equivalence with the in-process runtime, byte counts, faults, resume, multi-node.

One Ray cluster serves the whole module: a ``ray.cluster_utils.Cluster`` with a CPU-less head
(the driver: server and engine) and two 1-CPU worker nodes, so the two client actors of every
run sit on two different nodes. Warm actors are reused between runs
(``MONA_SFL_RAY_REUSE_ACTORS=1``): starting one costs several CPU-seconds (torch, torchvision).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ray = pytest.importorskip("ray")

from conftest import assert_same, load_checkpoint, losses, step_records, tiny_overrides, train  # noqa: E402
from mona_sfl.build import split_info  # noqa: E402
from mona_sfl.config import ConfigError, schema_config  # noqa: E402
from mona_sfl.core.schedule import sample_clients  # noqa: E402
from mona_sfl.engine import Trainer  # noqa: E402
from mona_sfl.runtime import AllClientsLost  # noqa: E402
from mona_sfl.runtime.ray_runtime import RayRuntime, check_address, drain_pool  # noqa: E402

TINY = tiny_overrides("fed.num_clients=3", "ray.num_actors=2")  # clients 0, 2 in actor 0; client 1 in actor 1
LOGGER = "mona_sfl.runtime.ray"


def tiny_cfg(*extra: str):
    return schema_config(TINY + list(extra))


MB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster():
    # Bit-exactness needs the same intra-op thread count for the same computation: torch's CPU
    # kernels split reductions by thread. Actors get 1 thread (ray.cpus_per_actor=1), so the
    # driver (server, and the in-process clients of the local reference) uses 1 thread too.
    from ray.cluster_utils import Cluster

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reuse = os.environ.get("MONA_SFL_RAY_REUSE_ACTORS")
    os.environ["MONA_SFL_RAY_REUSE_ACTORS"] = "1"
    if ray.is_initialized():
        ray.shutdown()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        c = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 128 * MB},
        )
        workers = [c.add_node(num_cpus=1, object_store_memory=128 * MB) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield {"cluster": c, "workers": {w.node_id for w in workers}}
    finally:
        drain_pool()
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        torch.set_num_threads(threads)
        if reuse is None:
            os.environ.pop("MONA_SFL_RAY_REUSE_ACTORS", None)
        else:
            os.environ["MONA_SFL_RAY_REUSE_ACTORS"] = reuse


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cluster: dict[str, Any]) -> dict[str, Any]:
    """The tiny run, once in-process and once on Ray."""
    base = tmp_path_factory.mktemp("ref")
    _, s_local = train(tiny_cfg("runtime=local"), base / "local")
    t_ray, s_ray = train(tiny_cfg("runtime=ray"), base / "ray")
    return {"local": base / "local", "ray": base / "ray", "s_local": s_local, "s_ray": s_ray, "trainer": t_ray, **cluster}


# ---------------------------------------------------------------------------- equivalence


def test_ray_equals_local_exactly(reference: dict[str, Any]) -> None:
    """Same seed, same config: identical per-step losses, sync metrics and final weights (exact)."""
    loc, ray_ = step_records(reference["local"]), step_records(reference["ray"])
    assert [r["step"] for r in ray_] == [1, 2, 3, 4, 5, 6]
    assert all(r["clients"] == 3 for r in ray_)
    assert ray_ == loc  # bitwise: losses, sync flags and divergence metrics
    a, b = load_checkpoint(reference["local"]), load_checkpoint(reference["ray"])
    assert_same(a["server"], b["server"], "server")
    assert_same(a["global_online"], b["global_online"], "global_online")
    # the gathered client state equals the local host's (records, streams, globals)
    assert_same(a["clients"], b["clients"], "clients")
    assert reference["s_ray"]["knn_top1"] == reference["s_local"]["knn_top1"]
    assert reference["s_ray"]["runtime"] == "ray"


def test_clients_ran_in_actors_on_two_nodes(reference: dict[str, Any]) -> None:
    """Many clients per actor, and the actors of the (exactly equal) run on different nodes."""
    rt: RayRuntime = reference["trainer"].runtime
    assert rt.num_actors == 2
    assert rt.actor_clients(0) == [0, 2] and rt.actor_clients(1) == [1]
    nodes = rt.actor_nodes
    assert len(set(nodes)) == 2 and set(nodes) == reference["workers"], nodes
    assert rt.client_nodes() == {0: nodes[0], 1: nodes[1], 2: nodes[0]}


# ---------------------------------------------------------------------------- bytes


def activation_bytes(cfg) -> int:
    """What one client sends up in one step: a_q and a_k, (B_c, C, H, W) float32, B_c = 2B."""
    return 2 * cfg.rows_per_client * split_info(cfg).activation_numel * 4


def test_bytes_counted_from_real_payloads(reference: dict[str, Any]) -> None:
    cfg = tiny_cfg()
    info = split_info(cfg)
    steps, clients = 6, 3
    s = reference["s_ray"]
    assert s["bytes_up"] == steps * clients * activation_bytes(cfg)
    assert s["bytes_down"] == s["bytes_up"] // 2
    # syncs at steps 2, 3, 5, 6; each: every client uploads (online, momentum) and downloads
    # the averaged online and (MonAcoSFL) momentum fronts
    front = 4 * info.client_state_numel
    assert s["bytes_sync"] == 4 * clients * (2 * front + 2 * front)
    # one ledger, one meaning: the in-process runtime counts the same payloads
    assert {k: reference["s_local"][k] for k in ("bytes_up", "bytes_down", "bytes_sync")} == {
        k: s[k] for k in ("bytes_up", "bytes_down", "bytes_sync")
    }


def test_mocosfl_with_client_sampling_equals_local(tmp_path: Path, reference: dict[str, Any]) -> None:
    """MocoSFL (personal momentum fronts) with 2 of 3 clients per epoch: still exact; clients
    that missed syncs download the latest average once, when next sampled."""
    extra = ("algo.align_momentum=false", "fed.sample_ratio=0.67", "seed=1")  # epochs sample [1, 2] then [0, 2]
    train(tiny_cfg("runtime=local", *extra), tmp_path / "local")
    t, s = train(tiny_cfg("runtime=ray", *extra), tmp_path / "ray")
    assert step_records(tmp_path / "ray") == step_records(tmp_path / "local")
    assert all(r["clients"] == 2 for r in step_records(tmp_path / "ray"))
    a, b = load_checkpoint(tmp_path / "local"), load_checkpoint(tmp_path / "ray")
    assert_same(a["clients"], b["clients"], "clients")
    assert_same(a["server"], b["server"], "server")

    cfg = tiny_cfg(*extra)
    pools = [set(sample_clients(cfg.seed, e, 3, cfg.clients_per_epoch)) for e in range(2)]
    assert len(pools[1] - pools[0]) == 1
    front = 4 * split_info(cfg).client_state_numel
    # 4 syncs of 2 clients: up (online, momentum), down (online only under MocoSFL); plus the
    # clients new in epoch 1 fetch the average they missed
    assert s["bytes_sync"] == 4 * 2 * (2 * front + front) + len(pools[1] - pools[0]) * front
    assert s["bytes_up"] == 6 * 2 * activation_bytes(cfg)


def test_axis_aggregation_on_ray_equals_local(tmp_path: Path, cluster: dict[str, Any]) -> None:
    """fed.aggregation=axis: the merge is the engine's, so Ray gives local's numbers exactly
    (all but the seconds the merges took)."""
    extra = ("fed.aggregation=axis", "fed.axis_keep=0.2")
    train(tiny_cfg("runtime=local", *extra), tmp_path / "local")
    train(tiny_cfg("runtime=ray", *extra), tmp_path / "ray")
    timed = ("merge_s", "merge_s_m")
    loc, ray_ = ([{k: v for k, v in r.items() if k not in timed} for r in step_records(tmp_path / d)] for d in ("local", "ray"))
    assert ray_ == loc and any("kept_energy" in r for r in ray_)
    a, b = load_checkpoint(tmp_path / "local"), load_checkpoint(tmp_path / "ray")
    for key in ("global_online", "global_momentum"):
        assert_same(a[key], b[key], key)


# ---------------------------------------------------------------------------- faults


def _inject(rt: RayRuntime, faults: dict[int, Any]) -> None:
    """Run ``faults[n](rt)`` just before the n-th fused backward + forward request (once per epoch here)."""
    orig = rt._step
    seen = {"n": 0}

    def wrapped(ids):
        if rt._pending and ids:  # the request the hosts report as "backward_forward"
            seen["n"] += 1
            if seen["n"] in faults:
                faults[seen["n"]](rt)
        return orig(ids)

    rt._step = wrapped  # type: ignore[method-assign]


def _kill(*actors: int):
    def go(rt: RayRuntime) -> None:
        for i in actors:
            ray.kill(rt.actor_handle(i), no_restart=True)

    return go


def _stall(actor: int, seconds: float):
    def go(rt: RayRuntime) -> None:
        rt.actor_handle(actor).debug_sleep.remote(seconds)  # queued before the step: a straggler

    return go


def test_all_actors_killed_then_resume_is_exact(tmp_path: Path, reference: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Every actor dies in epoch 1: AllClientsLost, the epoch-0 checkpoint is kept, and resuming
    it on new actors finishes the run with the same losses and weights as the local reference."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cfg = tiny_cfg("runtime=ray")
    run = tmp_path / "run"
    rt = RayRuntime(cfg)
    _inject(rt, {2: _kill(0, 1)})
    with pytest.raises(AllClientsLost):
        train(cfg, run, runtime=rt)
    assert "actor 0" in caplog.text and "actor 1" in caplog.text
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 3

    t = Trainer.resume(run, progress=False)
    try:
        t.run(resumed=True)
    finally:
        t.runtime.close()
    assert losses(run) == losses(reference["local"])
    a, b = load_checkpoint(reference["local"]), load_checkpoint(run)
    assert_same(a["server"], b["server"], "server")
    assert_same(a["global_online"], b["global_online"], "global_online")
    assert b["bytes"] == reference["trainer"].runtime.bytes  # byte counters survive the resume


@pytest.mark.slow
def test_straggler_and_killed_actor_drop_their_clients(tmp_path: Path, reference: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Epoch 0: actor 1 stalls past ray.step_timeout_s; epoch 1: actor 0 is killed. Training completes."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cfg = tiny_cfg("runtime=ray", "ray.step_timeout_s=5")
    rt = RayRuntime(cfg)
    _inject(rt, {1: _stall(1, 120), 2: _kill(0)})
    _, summary = train(cfg, tmp_path / "run", runtime=rt)
    assert summary["steps"] == 6
    # step 1 ran with everyone; client 1 was dropped in step 1's backward (timeout) for the rest
    # of epoch 0, came back in a recreated actor for epoch 1, where actor 0 (clients 0, 2) died
    assert [r["clients"] for r in step_records(tmp_path / "run")] == [3, 2, 2, 3, 1, 1]
    text = caplog.text
    assert "actor 1" in text and "did not finish backward_forward within 5s" in text and "[1] are lost" in text
    assert "actor 1 recreated" in text
    assert "actor 0" in text and "died in backward_forward" in text and "[0, 2] are lost" in text
    # bytes: exactly the activations the server used, and one gradient for each
    used = sum(r["clients"] for r in step_records(tmp_path / "run"))
    assert summary["bytes_up"] == used * activation_bytes(cfg)
    assert summary["bytes_down"] == summary["bytes_up"] // 2


# ---------------------------------------------------------------------------- multi-node (keep last)


@pytest.mark.slow
def test_attach_by_address(tmp_path: Path, reference: dict[str, Any]) -> None:
    """A fresh driver attaches with ray.address (the package shipped as py_modules): same losses."""
    drain_pool()
    ray.shutdown()  # the runtime makes its own connection, and closes it
    cfg = tiny_cfg("runtime=ray", f"ray.address={reference['cluster'].address}")
    t = Trainer(cfg, tmp_path / "run", progress=False)
    try:
        rt: RayRuntime = t.runtime  # type: ignore[assignment]
        assert set(rt.actor_nodes) == reference["workers"]
        t.run()
    finally:
        t.runtime.close()
    assert not ray.is_initialized()
    assert losses(tmp_path / "run") == losses(reference["local"])


def test_unreachable_address_fails_fast() -> None:
    with pytest.raises(ConfigError, match="no Ray cluster answers"):
        check_address("127.0.0.1:1")
    with pytest.raises(ConfigError, match="not a Ray address"):
        check_address("nonsense")
    check_address("auto")  # resolved by Ray itself


def test_batched_clients_in_an_actor_equal_local(tmp_path: Path, cluster: dict[str, Any]) -> None:
    """train.client_batching=on inside a Ray actor: bit-identical to the in-process host with
    batching on (one actor holds all clients, as the local host does: grouped convolutions
    over different sets of clients round differently)."""
    cfg = ("train.client_batching=on", "ray.num_actors=1", "fed.sample_ratio=0.67")
    train(tiny_cfg("runtime=local", *cfg), tmp_path / "local")
    train(tiny_cfg("runtime=ray", *cfg), tmp_path / "ray")
    assert step_records(tmp_path / "ray") == step_records(tmp_path / "local")
    a, b = load_checkpoint(tmp_path / "local"), load_checkpoint(tmp_path / "ray")
    for key in ("server", "global_online", "clients"):
        assert_same(a[key], b[key], key)


def test_default_layout_is_one_actor_per_free_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.num_actors=0``: one actor per CPU the cluster has free, at most one per client, at least one
    (measured fastest on 2 cores: docs/performance.md, 'Clients in parallel on Ray'); no cluster needed."""
    from mona_sfl.runtime.ray_runtime import RayTransport

    def layout(free: dict[str, float], *overrides: str) -> int:
        t = object.__new__(RayTransport)  # only the layout logic, no Ray connection
        t.cfg = schema_config(["fed.num_clients=5", *overrides])
        t._reuse = False
        monkeypatch.setattr(ray, "available_resources", lambda: dict(free))
        return t.num_actors()

    assert layout({"CPU": 2.0}) == 2  # this machine: ray:2x1
    assert layout({"CPU": 16.0}) == 5  # never more actors than clients
    assert layout({"CPU": 0.0}) == 1 and layout({}) == 1  # at least one
    assert layout({"CPU": 3.0}, "ray.cpus_per_actor=2") == 1
    assert layout({"CPU": 2.0}, "ray.cpus_per_actor=0.5") == 4
    assert layout({"CPU": 8.0, "GPU": 1.0}, "ray.gpus_per_actor=0.5") == 2  # GPUs bound it too
    assert layout({"CPU": 8.0}, "ray.num_actors=3") == 3  # an explicit layout wins
    assert layout({"CPU": 8.0}, "ray.num_actors=9") == 5
