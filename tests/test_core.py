"""Golden tests of the algorithm core: loss, queue, EMA, server routing, FedAvg, alignment."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TEST_DEVICE
from mona_sfl.core.client import Activations, ClientHParams, ClientWorker
from mona_sfl.core.host import ClientHost as ClientGroup
from mona_sfl.core.schedule import sample_clients
from mona_sfl.core.sync import GlobalFronts
from mona_sfl.core.moco import KeyQueue, ema_update, infonce
from mona_sfl.core.server import Server
from mona_sfl.core.sync import divergence, fedavg


def tiny_front() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.GroupNorm(1, 4), nn.ReLU())


class TinyServerNet(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(6, dim)

    def features(self, a: torch.Tensor) -> torch.Tensor:
        return self.body(a).mean(dim=(2, 3))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(a))


class FixedStream:
    """Deterministic views for a client: draw d depends only on (client, d)."""

    def __init__(self, cid: int, batch: int = 3) -> None:
        self.cid, self.batch, self.draws = cid, batch, 0

    def batch_at(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 * self.cid + d)
        return torch.randn(self.batch, 3, 8, 8, generator=g), torch.randn(self.batch, 3, 8, 8, generator=g)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch_at(self.draws)
        self.draws += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.draws = int(s["draws"])


# ---------------------------------------------------------------- loss, queue, EMA


@pytest.mark.parametrize("K", [1, 7, 100])
def test_infonce_identical_vectors_is_log_k_plus_1(K: int) -> None:
    v = F.normalize(torch.randn(1, 16), dim=1)
    q = v.repeat(5, 1)
    queue = v.t().repeat(1, K)  # every negative equals the positive
    loss = infonce(q, q, queue, T=0.1)
    assert math.isclose(float(loss), math.log(K + 1), rel_tol=1e-6)


def test_infonce_matches_explicit_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 5, generator=g), dim=0)
    expected = 0.0
    for i in range(4):
        logits = torch.cat([(q[i] * k[i]).sum().view(1), q[i] @ queue]) / 0.2
        expected += float(-torch.log_softmax(logits, 0)[0])
    assert math.isclose(float(infonce(q, k, queue, 0.2)), expected / 4, rel_tol=1e-6)


def test_queue_wraps_fifo() -> None:
    q = KeyQueue(dim=2, K=5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(q.queue.norm(dim=0), torch.ones(5))
    keys = torch.arange(8, dtype=torch.float32).view(4, 2)  # rows 0..3
    q.enqueue(keys)
    assert int(q.ptr) == 4
    q.enqueue(keys[:3] + 100)  # writes slots 4, 0, 1
    assert int(q.ptr) == 2
    cols = q.queue.t()
    assert torch.equal(cols[4], keys[0] + 100)
    assert torch.equal(cols[0], keys[1] + 100)
    assert torch.equal(cols[1], keys[2] + 100)
    assert torch.equal(cols[2], keys[2]) and torch.equal(cols[3], keys[3])


def test_queue_more_keys_than_slots_keeps_last_k() -> None:
    q = KeyQueue(dim=1, K=3)
    q.enqueue(torch.arange(7, dtype=torch.float32).view(7, 1))
    assert int(q.ptr) == 7 % 3
    # slots hold the last 3 keys (4, 5, 6) in FIFO positions
    assert sorted(q.queue.view(-1).tolist()) == [4.0, 5.0, 6.0]
    assert q.queue[0, (int(q.ptr) - 1) % 3] == 6.0


def test_ema_m0_copies_m1_keeps_and_mixes() -> None:
    a, b = tiny_front(), tiny_front()
    b0 = copy.deepcopy(b)
    ema_update(b, a, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(b.parameters(), b0.parameters()))
    ema_update(b, a, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(b.parameters(), a.parameters()))
    c = copy.deepcopy(b0)
    ema_update(c, a, 0.75)
    for pc, p0, pa in zip(c.parameters(), b0.parameters(), a.parameters()):
        assert torch.allclose(pc, 0.75 * p0 + 0.25 * pa)


# ---------------------------------------------------------------- server routing


def make_server(symmetric: str = "client", K: int = 16, device: str = "cpu") -> Server:
    torch.manual_seed(0)
    return Server(TinyServerNet(), K=K, dim=8, T=0.1, m=0.99, lr=0.1, symmetric=symmetric, queue_seed=0, device=device)


def test_server_routes_gradients_by_client_id_with_unequal_batches() -> None:
    srv = make_server()
    ref = copy.deepcopy(srv)
    g = torch.Generator().manual_seed(1)
    acts = [Activations(7, torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)),
            Activations(3, torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g))]
    res = srv.step(acts)
    assert set(res.grads) == {7, 3}
    assert res.grads[7].shape == (2, 4, 8, 8) and res.grads[3].shape == (5, 4, 8, 8)
    # the same computation done by hand, unsplit
    Q = torch.cat([a.a_q for a in acts]).requires_grad_(True)
    ema_update(ref.momentum, ref.online, 0.99)
    q = F.normalize(ref.online(Q), dim=1)
    k = F.normalize(ref.momentum(torch.cat([a.a_k for a in acts])), dim=1).detach()
    loss = infonce(q, k, ref.queue.queue.clone(), 0.1)
    loss.backward()
    assert res.loss == float(loss.detach())
    assert torch.equal(res.grads[7], Q.grad[:2]) and torch.equal(res.grads[3], Q.grad[2:])
    # keys were enqueued after the loss used the old queue
    assert torch.equal(srv.queue.queue[:, :7], k.t())


def test_server_original_symmetric_two_terms() -> None:
    srv = make_server("original")
    ref = copy.deepcopy(srv)
    g = torch.Generator().manual_seed(2)
    a = Activations(0, torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g))
    res = srv.step([a])
    ema_update(ref.momentum, ref.online, 0.99)
    Q = a.a_q.clone().requires_grad_(True)
    queue = ref.queue.queue.clone()
    l1 = infonce(F.normalize(ref.online(Q), dim=1), F.normalize(ref.momentum(a.a_k), dim=1).detach(), queue, 0.1)
    l2 = infonce(F.normalize(ref.online(a.a_k), dim=1), F.normalize(ref.momentum(Q.detach()), dim=1).detach(), queue, 0.1)
    (l1 + l2).backward()
    assert math.isclose(res.loss, float((l1 + l2).detach()), rel_tol=1e-6)
    assert torch.allclose(res.grads[0], Q.grad, atol=0, rtol=0)
    assert int(srv.queue.ptr) == 6  # 2B keys enqueued


def test_split_step_matches_unsplit_gradients_for_many_clients() -> None:
    """Sum of client gradients equals the unsplit gradient on the concatenated batch (identical clients)."""
    torch.manual_seed(0)
    front = tiny_front().to(TEST_DEVICE)
    srv = make_server(device=TEST_DEVICE)
    hp = ClientHParams(lr=0.1, m=0.99, symmetric="none")
    workers = [ClientWorker(i, copy.deepcopy(front), copy.deepcopy(front), hp) for i in range(3)]
    g = torch.Generator().manual_seed(3)
    xs = [(torch.randn(2, 3, 8, 8, generator=g).to(TEST_DEVICE), torch.randn(2, 3, 8, 8, generator=g).to(TEST_DEVICE)) for _ in range(3)]
    # unsplit reference: one front on the concatenated batch
    full_front, full_mom = copy.deepcopy(front), copy.deepcopy(front)
    ref_srv = copy.deepcopy(srv)
    ema_update(full_mom, full_front, 0.99)
    ema_update(ref_srv.momentum, ref_srv.online, 0.99)
    x1 = torch.cat([x[0] for x in xs])
    x2 = torch.cat([x[1] for x in xs])
    q = F.normalize(ref_srv.online(full_front(x1)), dim=1)
    with torch.no_grad():
        k = F.normalize(ref_srv.momentum(full_mom(x2)), dim=1)
    infonce(q, k, ref_srv.queue.queue.clone(), 0.1).backward()
    # split
    acts = [w.forward(*x) for w, x in zip(workers, xs)]
    res = srv.step(acts)
    for w in workers:
        w.optimizer.zero_grad()
        w._out.backward(res.grads[w.client_id])  # type: ignore[union-attr]
    for i, p_full in enumerate(full_front.parameters()):
        summed = sum(list(w.online.parameters())[i].grad for w in workers)
        assert torch.allclose(summed, p_full.grad, rtol=1e-5, atol=1e-7)


def test_client_worker_recompute_backward_equals_cached() -> None:
    torch.manual_seed(0)
    front = tiny_front()
    hp = ClientHParams(lr=0.1, m=0.9, symmetric="client")
    a = ClientWorker(0, copy.deepcopy(front), copy.deepcopy(front), hp)
    b = ClientWorker(0, copy.deepcopy(front), copy.deepcopy(front), hp)
    x = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    ya = a.forward(*x)
    yb = b.forward(*x)
    b.drop_graph()
    grad = torch.randn_like(ya.a_q)
    a.backward(grad)
    b.backward(grad, recompute=x)
    assert torch.equal(ya.a_q, yb.a_q) and ya.a_q.shape[0] == 4  # doubled batch
    assert all(torch.equal(p, q) for p, q in zip(a.online.parameters(), b.online.parameters()))
    with pytest.raises(ValueError, match="gradient shape"):
        a.forward(*x)
        a.backward(torch.randn(1, 4, 8, 8))


# ---------------------------------------------------------------- FedAvg and alignment


def test_fedavg_is_mean_in_order_and_checks_keys() -> None:
    sds = [{"w": torch.full((2,), float(i)), "n": torch.tensor(i)} for i in (1, 2, 6)]
    avg = fedavg(sds)
    assert torch.equal(avg["w"], torch.full((2,), 3.0))
    assert int(avg["n"]) == 3 and avg["n"].dtype == sds[0]["n"].dtype
    with pytest.raises(ValueError):
        fedavg([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError):
        fedavg([])


def _group(num: int, align_hp: ClientHParams | None = None) -> ClientGroup:
    torch.manual_seed(0)
    hp = align_hp or ClientHParams(lr=0.1, m=0.9, symmetric="client")
    return ClientGroup(tiny_front(), hp, {i: FixedStream(i) for i in range(num)})


def _train_steps(group: ClientGroup, pool: list[int], srv: Server, steps: int) -> None:
    for _ in range(steps):
        acts = group.forward(pool)
        res = srv.step([acts[c] for c in pool])
        group.backward(res.grads)


def test_fedavg_with_sampling_equals_mean_of_sampled_clients() -> None:
    group = _group(6)
    pool = sample_clients(seed=3, epoch=0, num_clients=6, k=3)
    assert len(set(pool)) == 3 and pool == sample_clients(3, 0, 6, 3)
    group.begin_epoch(0, pool)
    _train_steps(group, pool, make_server(), 2)
    fr = group.fronts(pool)
    expected = {k: sum(fr[c][0][k] for c in pool) / 3 for k in fr[pool[0]][0]}
    avg = fedavg([fr[c][0] for c in pool])
    for k in expected:
        assert torch.allclose(avg[k], expected[k], atol=1e-7)
    group.load(GlobalFronts(avg, None))
    # every client, sampled or not, now has the average online front
    for cid in range(6):
        w = group._materialise(cid) if cid not in group.live else group.live[cid]
        for k, v in w.online.state_dict().items():
            assert torch.equal(v, avg[k])


def test_align_momentum_changes_momentum_fronts_and_nothing_else() -> None:
    runs = {}
    for align in (False, True):
        group = _group(3)
        srv = make_server()
        pool = [0, 1, 2]
        group.begin_epoch(0, pool)
        _train_steps(group, pool, srv, 2)
        fr = group.fronts(pool)
        on = fedavg([fr[c][0] for c in pool])
        mo = fedavg([fr[c][1] for c in pool])
        group.load(GlobalFronts(on, mo if align else None))
        runs[align] = (group, srv, mo)
    (g0, s0, _), (g1, s1, mo) = runs[False], runs[True]
    for cid in range(3):
        w0, w1 = g0.live[cid], g1.live[cid]
        assert all(torch.equal(a, b) for a, b in zip(w0.online.state_dict().values(), w1.online.state_dict().values()))
        assert w0.optimizer.state_dict().__repr__() == w1.optimizer.state_dict().__repr__()
        assert all(torch.equal(v, mo[k]) for k, v in w1.momentum.state_dict().items())
        assert not all(torch.equal(v, mo[k]) for k, v in w0.momentum.state_dict().items())
    for a, b in zip(s0.state_dict()["online"].values(), s1.state_dict()["online"].values()):
        assert torch.equal(a, b)
    assert torch.equal(s0.queue.queue, s1.queue.queue)


def test_divergence_metrics_exact() -> None:
    on = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 5.0])}]
    mo = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.0, 1.0])}]
    d = divergence(on, mo, fedavg(on), fedavg(mo))
    assert d["ol_og"] == pytest.approx(1.0)  # each client is 1 away per element
    assert d["ol_ml"] == pytest.approx(((0 + 4) / 2 + (4 + 16) / 2) / 2)
    assert d["ml_mg"] == 0.0


def test_idle_clients_cost_no_weights() -> None:
    """After a sync, clients that never trained hold no tensors; MonAcoSFL keeps only optimizer state."""
    group = _group(50)
    base = group.memory_bytes()
    pool = [0, 1]
    group.begin_epoch(0, pool)
    _train_steps(group, pool, make_server(), 1)
    fr = group.fronts(pool)
    group.load(GlobalFronts(fedavg([fr[c][0] for c in pool]), fedavg([fr[c][1] for c in pool])))
    group.end_epoch()
    assert set(group.records) == {0, 1}
    assert all(r.online is None and r.momentum is None and r.optimizer is not None for r in group.records.values())
    per_front = sum(v.numel() * 4 for v in group.global_online.values())
    # two SGD momentum buffers, and the two retired clients' (online, momentum) modules kept for
    # the next epoch's clients (as many as were live, whatever the number of clients)
    assert len(group.spare) == 2
    assert group.memory_bytes() == base + 2 * per_front + 2 * 2 * per_front


@pytest.mark.parametrize("align", [True, False])
def test_reused_client_modules_equal_fresh_copies(align: bool) -> None:
    """Epochs that reuse retired clients' modules train exactly as with fresh deep copies."""
    hp = ClientHParams(lr=0.1, m=0.9, symmetric="client")

    def run(reuse: bool) -> tuple[ClientGroup, list[nn.Module]]:
        group, srv, seen = _group(6, hp), make_server(), []
        for epoch in range(3):
            pool = sample_clients(seed=5, epoch=epoch, num_clients=6, k=3)
            group.end_epoch()
            if not reuse:
                group.spare.clear()
            group.begin_epoch(epoch, pool)
            seen += [group.live[c].online for c in pool]
            _train_steps(group, pool, srv, 2)
            fr = group.fronts(pool)
            group.load(GlobalFronts(fedavg([fr[c][0] for c in pool]), fedavg([fr[c][1] for c in pool]) if align else None))
            _train_steps(group, pool, srv, 1)  # records left unsynced at the epoch end
        group.end_epoch()
        return group, seen

    (reused, seen_r), (fresh, seen_f) = run(True), run(False)
    assert len({id(m) for m in seen_r}) == 3 and len({id(m) for m in seen_f}) == 9  # the same three pairs, reused
    a, b = reused.state_dict(), fresh.state_dict()
    assert a["records"].keys() == b["records"].keys() and len(a["records"]) >= 4
    for cid in a["records"]:
        ra, rb = a["records"][cid], b["records"][cid]
        assert ra["steps"] == rb["steps"] > 0
        for key in ("online", "momentum"):
            assert (ra[key] is None) == (rb[key] is None)
            if ra[key] is not None:
                assert all(torch.equal(ra[key][k], rb[key][k]) for k in ra[key])
        for sa, sb in zip(ra["optimizer"]["state"].values(), rb["optimizer"]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert all(torch.equal(a["global_online"][k], b["global_online"][k]) for k in a["global_online"])
    assert all(p.grad is None for m in reused.spare for p in m[0].parameters())
    assert all(not p.requires_grad for m in reused.spare for p in m[1].parameters())


def test_group_state_dict_round_trip_mid_epoch() -> None:
    g1 = _group(4)
    pool = [2, 0]
    g1.begin_epoch(0, pool)
    srv1 = make_server()
    _train_steps(g1, pool, srv1, 2)
    state = copy.deepcopy(g1.state_dict())
    srv_state = copy.deepcopy(srv1.state_dict())
    _train_steps(g1, pool, srv1, 2)
    g2 = _group(4)
    g2.load_state_dict(state)
    srv2 = make_server()
    srv2.load_state_dict(srv_state)
    _train_steps(g2, pool, srv2, 2)
    for cid in pool:
        for a, b in zip(g1.live[cid].online.state_dict().values(), g2.live[cid].online.state_dict().values()):
            assert torch.equal(a, b)


def test_sample_clients_pure_and_complete() -> None:
    assert sample_clients(0, 5, 10, 10) == list(range(10))
    a = sample_clients(1, 2, 100, 10)
    assert a == sample_clients(1, 2, 100, 10) and len(set(a)) == 10
    assert a != sample_clients(1, 3, 100, 10)
    assert all(0 <= c < 100 for c in a)
    assert isinstance(np.int64(a[0]).item(), int)
