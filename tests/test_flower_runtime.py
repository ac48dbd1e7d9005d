"""The Flower runtime: codec, exact equivalence with the in-process runtime, bytes, faults,
and the deployed path (SuperLink + SuperNodes as separate processes, large messages).

Equivalence is bit-exact when every process computes with one thread: Flower's Ray backend
gives each ClientApp one CPU, and Ray sets OMP_NUM_THREADS=1 there, so the in-process
reference must run single-threaded too (multi-threaded conv backward sums in another order;
with 2 threads the runs drift at ~1e-6 relative per step).
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same, crash_in_server_step, load_checkpoint, losses, step_records, tiny_overrides
from mona_sfl import build
from mona_sfl.config import load_config, schema_config, replace

flwr = pytest.importorskip("flwr")

from flwr.app import Array, Context, Message, RecordDict  # noqa: E402
from flwr.app.error import Error  # noqa: E402

from mona_sfl.engine import Trainer  # noqa: E402
from mona_sfl.runtime.flower.client_app import make_client_app  # noqa: E402
from mona_sfl.runtime.flower.codec import (  # noqa: E402
    record_bytes,
    record_to_state_dict,
    records_to_tree,
    state_dict_to_record,
    tensor_to_array,
    tree_to_records,
)
from mona_sfl.runtime.flower.run_config import config_from_run_config, config_to_run_config  # noqa: E402
from mona_sfl.runtime.flower.runtime import FlowerRuntime  # noqa: E402

TINY = tiny_overrides(drop=("device", "eval.knn_k"))  # the default device and kNN k


@pytest.fixture(autouse=True)
def _flower_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))


def tiny(*extra: str):
    return schema_config(TINY + list(extra))


def assert_same_checkpoints(a_dir: Path, b_dir: Path, *, same_process: bool = True) -> None:
    """Everything but the runtime name, transport counters and wall time; ``torch_rng`` (the
    process's global generator, which training never draws from) only for runs in this process."""
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    skip = {"config", "bytes", "train_time"} | (set() if same_process else {"torch_rng"})
    for key in a:
        if key in skip:
            continue
        assert_same(a[key], b[key], key)


# ----------------------------------------------------------------------------- (1) codec
def test_codec_round_trips_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(5, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "bf16_0d": torch.tensor(1.5, dtype=torch.bfloat16),
        "i64_0d": torch.tensor(12345678901),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8).reshape(16, 16),
        "bool": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "strided": torch.randn(4, 6, generator=g).t(),  # non-contiguous
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }
    back = record_to_state_dict(state_dict_to_record(tensors))
    assert list(back) == list(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k].view(torch.uint8) if k == "special" else back[k], t.contiguous().view(torch.uint8) if k == "special" else t), k
        back[k].add_(0) if back[k].is_floating_point() else None  # writable
    for t in tensors.values():
        a = tensor_to_array(t)
        assert a.stype == "numpy.ndarray"
        assert len(a.data) == 128 + t.numel() * t.element_size()  # npy header + raw bytes
    assert record_bytes(state_dict_to_record(tensors)) == sum(128 + t.numel() * t.element_size() for t in tensors.values())

    # nested states: an optimizer state dict (int keys, None, bools) and a client group's state
    p = torch.nn.Parameter(torch.randn(3, generator=g))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    p.grad = torch.ones(3)
    opt.step()
    tree = {"opt": opt.state_dict(), "t": (1, 2.5, "x", None), "$odd": {3: [True, {"$t": "not a ref"}]}, "nan": float("nan")}
    arrays, config = tree_to_records(tree)
    out = records_to_tree(arrays, config)
    assert np.isnan(out.pop("nan")) and np.isnan(tree.pop("nan"))
    assert_same(out, tree)
    opt2 = torch.optim.SGD([torch.nn.Parameter(p.detach().clone())], lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(out["opt"])

    group = build.build_host(tiny(), [0, 1])
    group.begin_epoch(0, [0, 1])
    st = group.state_dict()
    assert_same(records_to_tree(*tree_to_records(st)), st)

    with pytest.raises(ValueError):  # object arrays would need pickle: refused
        Array(np.array([object()], dtype=object))


def test_run_config_round_trip() -> None:
    cfg = tiny("seed=3", "algo.align_momentum=false")
    rc = config_to_run_config(cfg, out="/tmp/x")
    assert rc["out"] == "/tmp/x" and rc["model.width"] == 0.125 and rc["runtime"] == "flower"
    back = config_from_run_config(rc)
    assert back == replace(cfg, runtime="flower")
    kebab = {k.replace("_", "-"): v for k, v in rc.items()}
    assert config_from_run_config(kebab) == back


def test_pyproject_snippet_is_a_valid_flower_app_config(tmp_path: Path) -> None:
    """What `flwr run .` reads: [tool.flwr.app.config] flattened, then --run-config overrides."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from mona_sfl.runtime.flower.run_config import pyproject_snippet

    cfg = tiny()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0.1.0"\n\n' + pyproject_snippet(cfg, out="runs/x"))
    overrides = parse_config_args(["model.cut=4 fed.num_clients=3 out='runs/y'"])
    rc = get_fused_config_from_dir(tmp_path, overrides)
    assert rc["out"] == "runs/y"
    assert config_from_run_config(rc) == replace(cfg, runtime="flower", model=replace(cfg.model, cut=4), fed=replace(cfg.fed, num_clients=3))


def test_repository_pyproject_flower_app_matches_the_config() -> None:
    """`flwr run .` only accepts --run-config keys listed in [tool.flwr.app.config]: all of them, no stale ones."""
    import tomllib

    from flwr.common.config import flatten_dict

    from mona_sfl.config import Config, to_flat
    from mona_sfl.runtime.flower.run_config import APP_KEYS

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    app = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app")
    if app is None:
        pytest.skip("pyproject.toml has no [tool.flwr.app] yet")
    assert app["components"] == {
        "serverapp": "mona_sfl.runtime.flower.server_app:app",
        "clientapp": "mona_sfl.runtime.flower.client_app:app",
    }
    keys = set(flatten_dict(app.get("config", {})))
    assert keys == set(to_flat(Config())) | set(APP_KEYS)
    config_from_run_config(flatten_dict(app["config"]))  # valid values
    # and the values are the bundled default config's: `flwr run .` trains what `mona-sfl train` does
    from mona_sfl.config import load_config, schema_config, resolve_config_path
    from mona_sfl.runtime.flower.run_config import app_config_toml, config_to_run_config

    default = load_config(resolve_config_path(None))
    assert flatten_dict(app["config"]) == config_to_run_config(default), (
        "pyproject.toml's [tool.flwr.app.config] differs from configs/default.toml; its body should be:\n"
        + app_config_toml(default)
    )


# ----------------------------------------------------------------------------- a Grid without Flower's engine
class FakeGrid:
    """Calls the ClientApp in-process, one Context per node; ``drop`` / ``crash`` inject faults.

    ``crash(node_partition, message_type, n)``: the n-th message of that type to that node raises.
    ``drop(...)``: same, but the node never replies (a timeout).
    """

    def __init__(self, app, num_nodes: int) -> None:
        self.app = app
        rng = np.random.default_rng(7)
        self.contexts = {
            int(nid): Context(run_id=1, node_id=int(nid), node_config={"partition-id": i, "num-partitions": num_nodes}, state=RecordDict(), run_config={})
            for i, nid in enumerate(rng.integers(1, 2**62, size=num_nodes))
        }
        self.part = {nid: i for i, nid in enumerate(self.contexts)}
        self.replies: dict[str, Message] = {}
        self.faults: dict[tuple[int, str, int], str] = {}
        self.seen: dict[tuple[int, str], int] = {}

    def crash(self, part: int, mtype: str, n: int) -> None:
        self.faults[(part, mtype, n)] = "crash"

    def drop(self, part: int, mtype: str, n: int) -> None:
        self.faults[(part, mtype, n)] = "drop"

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            nid = m.metadata.dst_node_id
            key = (self.part[nid], m.metadata.message_type)
            self.seen[key] = self.seen.get(key, 0) + 1
            fault = self.faults.get((*key, self.seen[key]))
            ids.append(mid)
            if fault == "drop":
                continue
            if fault == "crash":
                self.replies[mid] = Message(Error(code=2, reason="injected crash"), reply_to=m)
                continue
            self.replies[mid] = self.app(m, self.contexts[nid])
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture()
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are created outside a Flower process here: give them a run id (private API)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_fake_grid_matches_local_and_survives_faults(tmp_path: Path, one_thread, task_identity, caplog: pytest.LogCaptureFixture) -> None:
    """The runtime's protocol without the engine: exact vs local; then a crash and a timeout."""
    # 3 clients on 2 nodes, 2 of them sampled per epoch (idle clients keep their MocoSFL momentum fronts)
    cfg = tiny("fed.num_clients=3", "fed.sample_ratio=0.67", "flower.num_supernodes=2", "algo.align_momentum=false", "train.checkpoint_every=2")
    local = tmp_path / "local"
    Trainer(cfg, local, progress=False).run()

    fcfg = replace(cfg, runtime="flower")
    grid = FakeGrid(make_client_app(config_to_run_config(fcfg)), 2)
    rt = FlowerRuntime(fcfg, grid)
    assert sorted(rt.node_of) == [0, 1] and rt.node_of[1] == list(grid.contexts)[1]
    flower = tmp_path / "flower"
    Trainer(fcfg, flower, progress=False, runtime=rt).run()
    assert losses(flower) == losses(local)
    assert_same_checkpoints(local, flower)
    assert rt.exchanges > 0 and not rt.lost

    # faults: node 1 (client 1) crashes in its 2nd train.step (step 1's backward + step 2's forward);
    # node 0 (clients 0, 2) never answers its 6th (the forward of epoch 1's first step)
    fcfg = replace(fcfg, fed=replace(fcfg.fed, sample_ratio=1.0), flower=replace(fcfg.flower, step_timeout_s=0.5))
    grid = FakeGrid(make_client_app(config_to_run_config(fcfg)), 2)
    grid.crash(1, "train.step", 2)
    grid.drop(0, "train.step", 6)
    rt = FlowerRuntime(fcfg, grid)
    caplog.set_level(logging.WARNING, logger="mona_sfl.flower")
    summary = Trainer(fcfg, tmp_path / "faults", progress=False, runtime=rt).run()
    assert summary["steps"] == 6
    recs = step_records(tmp_path / "faults")
    assert [r["clients"] for r in recs] == [3, 2, 2, 1, 1, 1]  # lost for the rest of the epoch, back in the next
    text = caplog.text
    assert "injected crash" in text and "no reply within 0.5 s" in text and "lost for the rest of epoch" in text
    assert "keeps its clients' state from the previous checkpoint" in text  # node 0 is still busy at the end


def test_fake_grid_batchnorm_statistics_match_local(tmp_path: Path, one_thread, task_identity) -> None:
    """BatchNorm fronts: the recompute must neither lose nor double the running statistics of the forward."""
    cfg = tiny("model.norm=batch", "train.checkpoint_every=1")
    Trainer(cfg, tmp_path / "local", progress=False).run()
    fcfg = replace(cfg, runtime="flower")
    rt = FlowerRuntime(fcfg, FakeGrid(make_client_app(config_to_run_config(fcfg)), 2))
    Trainer(fcfg, tmp_path / "flower", progress=False, runtime=rt).run()
    assert losses(tmp_path / "flower") == losses(tmp_path / "local")
    assert_same_checkpoints(tmp_path / "local", tmp_path / "flower")
    ckpt = load_checkpoint(tmp_path / "flower")
    assert any("running_mean" in k for k in ckpt["global_online"])


def test_resume_on_fresh_supernodes_is_exact(tmp_path: Path, one_thread, task_identity, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash in step 6, resume from the step-4 checkpoint on new nodes (empty contexts): same as uninterrupted."""
    from mona_sfl.runtime.flower.server_app import flower_runtime

    cfg = tiny("train.checkpoint_every=2")
    full = tmp_path / "full"
    Trainer(cfg, full, progress=False).run()

    fcfg = replace(cfg, runtime="flower")
    app = make_client_app(config_to_run_config(fcfg))
    part = tmp_path / "part"
    with crash_in_server_step(monkeypatch, 6):
        Trainer(fcfg, part, progress=False, runtime=flower_runtime(FakeGrid(app, 2))).run()
    trainer = Trainer.resume(part, progress=False, runtime=flower_runtime(FakeGrid(app, 2)))  # new SuperNodes, empty state
    assert trainer.global_step == 4
    trainer.run(resumed=True)
    assert losses(part) == losses(full)
    assert_same_checkpoints(full, part)


# ----------------------------------------------------------------------------- (2) + (4) simulation engine
@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict:
    from mona_sfl.runtime.flower.launch import train_with_flower

    root = tmp_path_factory.mktemp("sim")
    cfg = tiny()
    s_local = Trainer(cfg, root / "local", progress=False).run()
    s_flower = train_with_flower(cfg, root / "flower", progress=False)
    return {"cfg": cfg, "local": root / "local", "flower": root / "flower", "s_local": s_local, "s_flower": s_flower}


def test_simulation_equals_local(sim_runs: dict) -> None:
    """Flower's simulation engine (Ray backend, 2 SuperNodes) gives bit-identical losses and weights."""
    local, flower = sim_runs["local"], sim_runs["flower"]
    assert losses(flower) == losses(local)
    assert len(losses(flower)) == 6
    assert_same(step_records(flower), step_records(local))  # sync divergence statistics too
    assert_same_checkpoints(local, flower)
    s = sim_runs["s_flower"]
    assert s["runtime"] == "flower" and s["flower_nodes"] == 2
    assert {"config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= {p.name for p in flower.iterdir()}
    assert json.loads((flower / "summary.json").read_text())["bytes_up"] == s["bytes_up"]


def npy_bytes(shape: tuple[int, ...], dtype=np.float32) -> int:
    return len(Array(np.zeros(shape, dtype=dtype)).data)


def test_bytes_match_activation_sizes(sim_runs: dict) -> None:
    """The runtime's ledger counts payload bytes (numel x itemsize), as every runtime and ``comms``
    do; the Flower transport's wire counters add the npy headers of what it really sent."""
    cfg, s = sim_runs["cfg"], sim_runs["s_flower"]
    front, _ = build.build_models(cfg)
    rows = 2 * cfg.train.batch_size  # client-side symmetric doubling
    with torch.no_grad():
        a = front(torch.zeros(rows, 3, cfg.data.image_size, cfg.data.image_size))
    raw = a.numel() * a.element_size()  # analytic bytes of one activation tensor
    steps, clients = s["steps"], cfg.fed.num_clients
    assert s["bytes_up"] == steps * clients * 2 * raw  # a_q and a_k
    assert s["bytes_down"] == steps * clients * raw  # dL/da_q
    assert s["bytes_up"] == sim_runs["s_local"]["bytes_up"] and s["bytes_down"] == sim_runs["s_local"]["bytes_down"]
    assert s["bytes_sync"] == sim_runs["s_local"]["bytes_sync"]
    assert s["flower_wire_up"] == steps * clients * 2 * npy_bytes(tuple(a.shape))
    assert s["flower_wire_down"] == steps * clients * npy_bytes(tuple(a.shape))
    assert 1.0 < s["flower_wire_up"] / s["bytes_up"] < 1.001  # 128 B npy header per array
    sd = front.state_dict()
    front_raw = sum(t.numel() * t.element_size() for t in sd.values())
    front_npy = sum(npy_bytes(tuple(t.shape), t.numpy().dtype) for t in sd.values())
    assert cfg.algo.align_momentum  # the merged momentum front is downloaded too
    # per sync: every participating client uploads online + momentum and downloads both merged fronts
    assert s["bytes_sync"] == s["syncs"] * clients * 4 * front_raw
    nodes = 2  # on the wire the merged fronts travel once per node
    assert s["flower_wire_sync"] == s["syncs"] * (clients * 2 * front_npy + nodes * 2 * front_npy)


@pytest.mark.slow
def test_axis_aggregation_in_simulation_equals_local(tmp_path: Path, one_thread) -> None:
    """fed.aggregation=axis: the merge is the engine's, so Flower's simulation engine gives the
    in-process run's records and global fronts exactly (all but the seconds the merges took)."""
    from mona_sfl.runtime.flower.launch import train_with_flower

    cfg = tiny("fed.aggregation=axis", "fed.axis_keep=0.2")
    Trainer(cfg, tmp_path / "local", progress=False).run()
    train_with_flower(cfg, tmp_path / "flower", progress=False)
    timed = ("merge_s", "merge_s_m")
    loc, sim = ([{k: v for k, v in r.items() if k not in timed} for r in step_records(tmp_path / d)] for d in ("local", "flower"))
    assert sim == loc and sum("kept_energy" in r for r in sim) == 4
    a, b = load_checkpoint(tmp_path / "local"), load_checkpoint(tmp_path / "flower")
    for key in ("global_online", "global_momentum", "server"):
        assert_same(a[key], b[key], key)
