"""``train.client_batching = "on"``: one batched pass over a host's clients computes what the
per-client loop computes.

Tolerances: in float64 the two agree to rtol 1e-9 / atol 1e-12 over several steps (on CPU
they are bitwise equal); in float32 the first activations agree to 2e-6 of each tensor's
largest entry and one whole step to 1e-4 (|a - b|_max <= tol * |a|_max). Over many
float32 steps the runs drift apart the way any two float32 runs with different conv
kernels do (the rounding of step 1 is amplified by training), so multi-step comparisons
are made in float64.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TEST_DEVICE, assert_same, crash_in_server_step, load_checkpoint, losses, tiny_overrides, train
from mona_sfl.config import schema_config
from mona_sfl.core.batched import stack_front
from mona_sfl.core.client import ClientHParams
from mona_sfl.core.host import ClientHost
from mona_sfl.core.schedule import sample_clients
from mona_sfl.core.server import Server
from mona_sfl.core.sync import GlobalFronts, fedavg
from mona_sfl.engine import Trainer
from mona_sfl.errors import ConfigError
from mona_sfl.models.split import build_split

TIGHT = {"rtol": 1e-9, "atol": 1e-12}  # float64


class Stream:
    """Deterministic views of one client: draw d depends only on (client, d); the last client
    draws smaller batches (as the last batch of a pass can be)."""

    def __init__(self, cid: int, batch: int, dtype: torch.dtype) -> None:
        self.cid, self.size, self.dtype, self.draws = cid, batch, dtype, 0

    def batch(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 * self.cid + d)
        return tuple(torch.randn(self.size, 3, 8, 8, generator=g, dtype=self.dtype) for _ in range(2))  # type: ignore[return-value]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.draws += 1
        return self.batch(self.draws - 1)

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.draws = int(s["draws"])


def make(arch: str, cut: int, norm: str, symmetric: str, schedule: str, dtype: torch.dtype = torch.float64, clients: int = 5):
    """Two hosts (batching off, on) and two servers with equal weights."""
    torch.manual_seed(0)
    front, net = build_split(arch, cut, width=0.125, norm=norm, proj_hidden=16, proj_dim=8)
    front, net = front.to(dtype), net.to(dtype)
    out = {}
    for b in ("off", "on"):
        hp = ClientHParams(lr=0.1, m=0.9, symmetric=symmetric, schedule=schedule, epochs=3, batching=b)
        streams = {i: Stream(i, 1 if i == clients - 1 else 2, dtype) for i in range(clients)}
        host = ClientHost(copy.deepcopy(front), hp, streams, device=torch.device(TEST_DEVICE))
        srv = Server(copy.deepcopy(net), K=16, dim=8, T=0.1, m=0.99, lr=0.1, symmetric=symmetric, queue_seed=0, device=TEST_DEVICE)
        srv.queue.queue = srv.queue.queue.to(dtype)
        out[b] = (host, srv)
    return out


def close(a, b, where: str, tol: dict) -> None:
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            close(a[k], b[k], f"{where}.{k}", tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{where}[{i}]", tol)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_pair(pair, epochs: int, steps: int, align: bool, tol: dict, *, rebuild: bool = False) -> None:
    """Train both hosts side by side (sampling 3 of 5 clients per epoch, a sync every 2 steps)
    and compare activations, server gradients, the clients' gradients and whole host states.
    ``rebuild``: the host is rebuilt from its state before every step (a stateless Flower node)."""
    grads: dict[str, dict] = {"off": {}, "on": {}}
    for e in range(epochs):
        pool = sample_clients(3, e, 5, 3)
        for b in pair:
            pair[b][0].begin_epoch(e, pool)
        for s in range(steps):
            acts = {}
            for b, (host, srv) in pair.items():
                if rebuild:
                    fresh = ClientHost(host.template, host.hp, host.streams)
                    fresh.load_state_dict(copy.deepcopy(host.state_dict()))
                    pair[b] = (host := fresh, srv)
                acts[b] = host.step(grads[b], pool)
                res = srv.step([acts[b][c] for c in pool])
                grads[b] = res.grads
                acts[b] = (acts[b], res.loss)
            close(acts["off"][1], acts["on"][1], f"loss e{e}s{s}", tol)
            for c in pool:
                close(acts["off"][0][c].a_q, acts["on"][0][c].a_q, f"a_q {c} e{e}s{s}", tol)
                close(acts["off"][0][c].a_k, acts["on"][0][c].a_k, f"a_k {c} e{e}s{s}", tol)
                close(grads["off"][c], grads["on"][c], f"server grad {c} e{e}s{s}", tol)
            if s % 2 == 1 or s == steps - 1:
                for b, (host, _) in pair.items():
                    host.step(grads[b], [])
                    grads[b] = {}
                    fr = host.fronts(pool)
                    on = fedavg([fr[c][0] for c in pool])
                    mo = fedavg([fr[c][1] for c in pool]) if align else None
                    host.load(GlobalFronts(on, mo))
                off, on_ = pair["off"][0], pair["on"][0]
                for c in pool:
                    if not rebuild:
                        for p, q in zip(off.live[c].online.parameters(), on_.live[c].online.parameters()):
                            close(p.grad, q.grad, f"param grad {c} e{e}s{s}", tol)
                close(off.state_dict(), on_.state_dict(), f"host state e{e}s{s}", tol)


CASES = [
    ("resnet18", 2, "group", "client", "epoch", True),
    ("resnet18", 2, "group", "client", "reference", False),  # the batch-2 regime's MocoSFL at cut 2
    ("resnet18", 7, "batch", "original", "reference", False),
    ("mobilenetv2", 3, "group", "none", "reference", True),
    ("mobilenetv2", 8, "batch", "client", "epoch", False),
]


@pytest.mark.parametrize("arch,cut,norm,symmetric,schedule,align", CASES)
def test_batched_equals_per_client_loop(arch: str, cut: int, norm: str, symmetric: str, schedule: str, align: bool) -> None:
    """Float64, 2 epochs of 3 steps, 3 of 5 clients sampled, syncs (MonAcoSFL or MocoSFL),
    one client with a smaller batch: activations, losses, gradients, weights, optimizer and
    BatchNorm states agree."""
    run_pair(make(arch, cut, norm, symmetric, schedule), 2, 3, align, TIGHT)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_batched_recompute_equals_per_client(norm: str) -> None:
    """A host rebuilt from its state for every message (Flower) recomputes the forward in one
    batched pass; BatchNorm running statistics are counted once."""
    run_pair(make("resnet18", 2, norm, "client", "reference"), 2, 2, False, TIGHT, rebuild=True)


def test_float32_one_step() -> None:
    """Float32: the first activations agree to 2e-6 of their largest entry, the server's
    gradients, the clients' gradients and weights after one step to 1e-4 (the server's
    InfoNCE at T = 0.1 amplifies the activations' rounding)."""
    pair = make("resnet18", 3, "group", "client", "epoch", torch.float32)
    pool = [0, 1, 2, 3, 4]
    acts, grads = {}, {}
    for b, (host, srv) in pair.items():
        host.begin_epoch(0, pool)
        acts[b] = host.step({}, pool)
        grads[b] = srv.step([acts[b][c] for c in pool]).grads
        host.step(grads[b], [])
    worst = {}

    def rel(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        worst[what] = max(worst.get(what, 0.0), float((a - b).abs().max() / a.abs().max()))

    for c in pool:
        rel(acts["off"][c].a_q, acts["on"][c].a_q, "a_q")
        rel(grads["off"][c], grads["on"][c], "server grad")
        for p, q in zip(pair["off"][0].live[c].online.parameters(), pair["on"][0].live[c].online.parameters()):
            rel(p.grad, q.grad, "param grad")
            rel(p.detach(), q.detach(), "weight")
    assert worst["a_q"] <= 2e-6 and max(worst.values()) <= 1e-4, worst  # measured: 4e-7, 4e-5


def test_batched_host_augments_every_client_at_once_with_the_same_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """With real client streams a batching host draws all its clients' views in one batched
    augmentation, and they are bitwise the views the per-client loop draws, for the forward
    and for a rebuilt host's recomputation; the draw counters advance the same way."""
    import mona_sfl.core.batched as batched_mod
    import mona_sfl.core.client as client_mod
    from mona_sfl.data import make_synthetic
    from mona_sfl.data.stream import ClientStream
    from mona_sfl.data.views import TwoViews

    data = make_synthetic(40, seed=0, image_size=16)
    fed: dict[str, list] = {"off": [], "on": []}
    side = ["off"]
    per_client_fwd, batched_fwd = client_mod.ClientWorker.forward, batched_mod.BatchedClients.forward
    per_client_bwd, batched_bwd = client_mod.ClientWorker.backward, batched_mod.BatchedClients.backward

    def rec_fwd(self, x1, x2):
        fed[side[0]].append(("fwd", self.client_id, x1, x2))
        return per_client_fwd(self, x1, x2)

    def rec_bfwd(self, workers, views):
        fed[side[0]].extend(("fwd", w.client_id, x1, x2) for w, (x1, x2) in zip(workers, views))
        return batched_fwd(self, workers, views)

    def rec_bwd(self, g, recompute=None):
        if recompute is not None:
            fed[side[0]].append(("re", self.client_id, *recompute))
        return per_client_bwd(self, g, recompute=recompute)

    def rec_bbwd(self, workers, grads, recompute):
        fed[side[0]].extend(("re", cid, x1, x2) for cid, (x1, x2) in sorted(recompute.items()))
        return batched_bwd(self, workers, grads, recompute)

    monkeypatch.setattr(client_mod.ClientWorker, "forward", rec_fwd)
    monkeypatch.setattr(batched_mod.BatchedClients, "forward", rec_bfwd)
    monkeypatch.setattr(client_mod.ClientWorker, "backward", rec_bwd)
    monkeypatch.setattr(batched_mod.BatchedClients, "backward", rec_bbwd)
    aug = []
    many = TwoViews.augment_many
    monkeypatch.setattr(TwoViews, "augment_many", lambda self, imgs, seeds, copies=2: aug.append(len(imgs)) or many(self, imgs, seeds, copies))

    torch.manual_seed(0)
    front, net = build_split("resnet18", 2, width=0.125, norm="batch", proj_hidden=16, proj_dim=8)
    views = TwoViews(data.mean, data.std, size=16)
    pool = [0, 1, 2, 3]
    for b in ("off", "on"):
        side[0] = b
        streams = {c: ClientStream(data, list(range(c * 10, c * 10 + 10)), 3, seed=1, client_id=c, views=views) for c in pool}
        host = ClientHost(copy.deepcopy(front), ClientHParams(lr=0.1, m=0.9, symmetric="client", batching=b), streams)
        srv = Server(copy.deepcopy(net), K=16, dim=8, T=0.1, m=0.99, lr=0.1, symmetric="client", queue_seed=0)
        host.begin_epoch(0, pool)
        grads: dict = {}
        for step in range(5):  # 10 images at batch 3: draw 3 holds one image
            if step >= 3:  # a host rebuilt per message (Flower) recomputes the forward from the views
                fresh = ClientHost(host.template, host.hp, host.streams)
                fresh.load_state_dict(copy.deepcopy(host.state_dict()))
                host = fresh
            acts = host.step(grads, pool)
            grads = srv.step([acts[c] for c in pool]).grads
        fed[b].append(("draws", tuple(int(s.draws) for s in streams.values()), None, None))
        if b == "on":
            assert aug and set(aug) == {len(pool)}, aug  # every pass augments all clients at once
            aug_on = len(aug)
        aug.clear()
    assert aug_on == 5 + 2  # five forwards, two recomputations
    key = lambda r: (r[0], r[1]) if r[0] != "draws" else (r[0], -1)  # noqa: E731
    assert len(fed["off"]) == len(fed["on"]) == 5 * 4 + 2 * 4 + 1
    for a, b in zip(sorted(fed["off"], key=key), sorted(fed["on"], key=key)):
        assert a[:2] == b[:2]
    off_by, on_by = {}, {}
    for recs, by in ((fed["off"], off_by), (fed["on"], on_by)):
        for r in recs:
            by.setdefault((r[0], r[1]), []).append(r[2:])
    for k in off_by:
        for x, y in zip(off_by[k], on_by[k]):
            assert all(u is None and v is None or torch.equal(u, v) for u, v in zip(x, y)), k


def test_gradients_in_two_calls_and_a_dropped_client() -> None:
    """The batched graph serves gradients that arrive in separate calls; a dropped client's
    graph is forgotten and it is not stepped."""
    pair = make("mobilenetv2", 2, "batch", "client", "epoch")
    pool = [0, 1, 2, 4]
    grads = {}
    for b, (host, srv) in pair.items():
        host.begin_epoch(0, pool)
        acts = host.step({}, pool)
        grads[b] = srv.step([acts[c] for c in pool]).grads
        host.step({0: grads[b][0]}, [])
        host.step({4: grads[b][4], 2: grads[b][2]}, [])
        host.drop(1)
    off, on = pair["off"][0], pair["on"][0]
    assert on.live[1].steps == 0 and on.live[0].steps == 1 and not on.batched.graphs
    close(off.state_dict(), on.state_dict(), "host state", TIGHT)


def test_idle_clients_are_not_stacked_and_state_format_is_unchanged() -> None:
    pair = make("resnet18", 2, "group", "client", "epoch", clients=5)
    for b, (host, srv) in pair.items():
        host.begin_epoch(0, [1, 3])
        acts = host.step({}, [1, 3])
        host.step(srv.step([acts[c] for c in (1, 3)]).grads, [])
        host.end_epoch()
    off, on = pair["off"][0], pair["on"][0]
    assert set(on.records) == {1, 3} and on.memory_bytes() == off.memory_bytes()
    assert list(on.batched._stacked) == [2]  # one stacked network, for the two sampled clients
    close(off.state_dict(), on.state_dict(), "host state", TIGHT)


def test_bad_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="train.client_batching='yes' is not supported: choose one of off, on"):
        schema_config(["train.client_batching=yes"])
    with pytest.raises(ConfigError, match="layer Linear cannot be batched"):
        stack_front(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), 2)
    with pytest.raises(ConfigError, match="train.client_batching='yes'"):
        ClientHost(nn.Sequential(), ClientHParams(lr=0.1, batching="yes"), {})


# ----------------------------------------------------------------------------- whole runs
TINY = tiny_overrides("train.client_batching=on", "fed.num_clients=3", "fed.sample_ratio=0.67", "train.checkpoint_every=2")


def test_resume_with_batching_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    cfg = schema_config(TINY + ["model.norm=batch"])
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, full)
    with crash_in_server_step(monkeypatch, 6):
        Trainer(cfg, part, progress=False).run()
    Trainer.resume(part, progress=False).run(resumed=True)
    assert losses(part) == losses(full) and len(losses(full)) == 6
    a, b = load_checkpoint(full), load_checkpoint(part)
    for key in ("global_online", "server", "clients"):
        assert_same(a[key], b[key], key)


def test_flower_nodes_with_batching_equal_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    """A stateless Flower node (its host rebuilt per message, the forward recomputed in one
    batched pass, BatchNorm statistics counted once) gives the numbers of the in-process host
    with batching on, bit for bit. One node holds all clients, as the local host does: float32
    grouped convolutions over a different set of clients round differently (about 1e-7
    relative in the first loss), so hosts of different sizes agree only to float tolerance."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from mona_sfl.config import replace
    from mona_sfl.runtime.flower.client_app import make_client_app
    from mona_sfl.runtime.flower.run_config import config_to_run_config
    from mona_sfl.runtime.flower.runtime import FlowerRuntime
    from test_flower_runtime import FakeGrid

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = schema_config(TINY + ["flower.num_supernodes=1", "model.norm=batch", "fed.sample_ratio=1.0"])
    train(cfg, tmp_path / "local")
    fcfg = replace(cfg, runtime="flower")
    rt = FlowerRuntime(fcfg, FakeGrid(make_client_app(config_to_run_config(fcfg)), 1))
    Trainer(fcfg, tmp_path / "flower", progress=False, runtime=rt).run()
    assert losses(tmp_path / "flower") == losses(tmp_path / "local")
    a, b = load_checkpoint(tmp_path / "local"), load_checkpoint(tmp_path / "flower")
    for key in ("global_online", "server", "clients"):
        assert_same(a[key], b[key], key)
