"""The server refuses malformed client activations without touching its state.

For every kind of bad input from one client, a server that received it must end the step in
exactly the state of a server the client never reached: same weights, momentum net, queue
(pointer and content), optimizer state, loss, and bit-identical gradients for the others.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same, step_records
from mona_sfl import build
from mona_sfl.config import schema_config
from mona_sfl.core.client import Activations
from mona_sfl.core.server import ActivationSpec, ActivationsRejected, Server
from mona_sfl.engine import Trainer
from mona_sfl.runtime.local import LocalRuntime

TINY = [
    "model.width=0.0625",
    "model.cut=2",
    "algo.K=16",
    "algo.dim=8",
    "algo.hidden_dim=8",
    "data.synthetic_size=40",
    "data.image_size=16",
    "fed.num_clients=3",
    "train.batch_size=2",
]


CFG = schema_config(TINY)
SPEC = build.activation_spec(CFG)


@pytest.fixture(scope="module")
def cfg():
    return CFG


@pytest.fixture(scope="module")
def fresh(cfg) -> Server:
    """A server as build_server makes it, after one ordinary step (so the optimizer has momentum)."""
    torch.manual_seed(0)
    srv = build.build_server(cfg, torch.device("cpu"))
    srv.step([good(0, 4, 100), good(1, 4, 101), good(2, 4, 102)])
    return srv


def good(cid: int, rows: int, seed: int, shape: tuple[int, int, int] | None = None) -> Activations:
    """Legal activations: ``rows`` rows of the cut's (C, H, W), seeded."""
    shape = shape or SPEC.shape
    g = torch.Generator().manual_seed(seed)
    return Activations(cid, torch.randn(rows, *shape, generator=g), torch.randn(rows, *shape, generator=g))


def _with(a: Activations, **kw: object) -> Activations:
    return Activations(kw.get("client_id", a.client_id), kw.get("a_q", a.a_q), kw.get("a_k", a.a_k))  # type: ignore[arg-type]


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0, 0, 0] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[-1, -1, -1, -1] = float("-inf")
    return t


# Each bad kind: (id, make(client-1's good activations, spec) -> bad entry or entries, phrase in the reason)
BAD: list[tuple[str, Callable[[Activations, ActivationSpec], object], str]] = [
    ("wrong-channels", lambda a, s: _with(a, a_q=torch.randn(3, s.shape[0] + 1, *s.shape[1:]), a_k=torch.randn(3, s.shape[0] + 1, *s.shape[1:])), "expected (rows,"),
    ("wrong-spatial", lambda a, s: _with(a, a_q=torch.randn(1, s.shape[0], s.shape[1] - 1, s.shape[2]), a_k=torch.randn(1, s.shape[0], s.shape[1] - 1, s.shape[2])), "expected (rows,"),
    ("wrong-rank", lambda a, s: _with(a, a_q=a.a_q.flatten(1), a_k=a.a_k.flatten(1)), "expected (rows, C, H, W)"),
    ("q-k-mismatch", lambda a, s: _with(a, a_k=a.a_k[:1].clone()), "differs from a_k shape"),
    ("no-rows", lambda a, s: _with(a, a_q=a.a_q[:0], a_k=a.a_k[:0]), "has no rows"),
    ("too-many-rows", lambda a, s: _with(a, a_q=torch.randn(s.max_rows + 1, *s.shape), a_k=torch.randn(s.max_rows + 1, *s.shape)), "oversized payload"),
    ("oversized", lambda a, s: _with(a, a_q=torch.randn(50 * s.max_rows, *s.shape), a_k=torch.randn(50 * s.max_rows, *s.shape)), "oversized payload"),
    ("float64", lambda a, s: _with(a, a_q=a.a_q.double(), a_k=a.a_k.double()), "dtype torch.float64, expected torch.float32"),
    ("float16-keys", lambda a, s: _with(a, a_k=a.a_k.half()), "a_k has dtype torch.float16"),
    ("int", lambda a, s: _with(a, a_q=a.a_q.to(torch.int32), a_k=a.a_k.to(torch.int32)), "dtype torch.int32"),
    ("nan", lambda a, s: _with(a, a_q=_nan(a.a_q)), "non-finite"),
    ("inf-keys", lambda a, s: _with(a, a_k=_inf(a.a_k)), "a_k holds non-finite"),
    ("numpy", lambda a, s: _with(a, a_q=a.a_q.numpy()), "not a tensor"),
    ("not-activations", lambda a, s: {"client_id": 1, "a_q": a.a_q}, "not an Activations record"),
    ("id-not-int", lambda a, s: _with(a, client_id="1"), "is not an int"),
    ("duplicate-id", lambda a, s: [a, _with(a, a_q=a.a_q + 1)], "occurs 2 times"),
]


def _state(srv: Server) -> dict:
    return {
        "online": srv.online.state_dict(),
        "momentum": srv.momentum.state_dict(),
        "queue": srv.queue.state_dict(),
        "optimizer": srv.optimizer.state_dict(),
        "epoch": srv.epoch,
    }


@pytest.mark.parametrize("kind, make, phrase", BAD, ids=[b[0] for b in BAD])
def test_bad_client_is_dropped_and_nothing_else_changes(fresh: Server, kind: str, make, phrase: str, caplog: pytest.LogCaptureFixture) -> None:
    a0, a1, a2 = good(0, 4, 7), good(1, 3, 8), good(2, 2, 9)  # unequal batches
    bad = make(a1, fresh.spec)
    bad = bad if isinstance(bad, list) else [bad]
    with_bad, without = copy.deepcopy(fresh), copy.deepcopy(fresh)
    with caplog.at_level(logging.WARNING, logger="mona_sfl.server"):
        res = with_bad.step([a0, *bad, a2])
    ref = without.step([a0, a2])
    assert set(res.grads) == {0, 2}
    assert len(res.rejected) == 1 and phrase in next(iter(res.rejected.values())), res.rejected
    assert res.loss == ref.loss and res.rows == ref.rows
    for cid in (0, 2):
        assert torch.equal(res.grads[cid], ref.grads[cid])
    assert_same(_state(with_bad), _state(without), key_order=True)
    assert int(with_bad.queue.ptr) == int(without.queue.ptr)
    assert any("rejected the activations of client" in r.getMessage() and phrase in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind, make, phrase", BAD, ids=[b[0] for b in BAD])
def test_only_bad_clients_leave_the_server_untouched(fresh: Server, kind: str, make, phrase: str) -> None:
    bad = make(good(1, 3, 8), fresh.spec)
    srv = copy.deepcopy(fresh)
    before = copy.deepcopy(_state(srv))
    with pytest.raises(ActivationsRejected, match="no valid client activations") as e:
        srv.step(bad if isinstance(bad, list) else [bad])
    assert phrase in str(e.value)
    assert_same(_state(srv), before, key_order=True)


def test_empty_step_is_refused_before_any_change(fresh: Server) -> None:
    srv = copy.deepcopy(fresh)
    before = copy.deepcopy(_state(srv))
    with pytest.raises(ActivationsRejected, match="no client activations reached the server"):
        srv.step([])
    assert_same(_state(srv), before, key_order=True)


def test_spec_follows_the_config(cfg) -> None:
    spec = build.activation_spec(cfg)
    front, _ = build.build_models(cfg)
    out = front(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
    assert spec.shape == tuple(out.shape[1:]) and spec.dtype == torch.float32
    assert spec.max_rows == 2 * cfg.train.batch_size  # client-side symmetric doubling
    assert spec.max_bytes() == spec.max_rows * out[0].numel() * 4
    assert build.activation_spec(schema_config([*TINY, "algo.symmetric=none"])).max_rows == cfg.train.batch_size
    # the last batch of a data pass may be smaller: fewer rows are fine
    assert spec.check(good(0, 1, 1, spec.shape)) is None


class CorruptingRuntime(LocalRuntime):
    """The in-process runtime, but client 1's queries arrive with a NaN in global step ``at``."""

    def __init__(self, cfg, at: int, **kw: object) -> None:
        super().__init__(cfg, **kw)
        self.calls, self.at = 0, at

    def _corrupt(self, acts: dict[int, Activations]) -> dict[int, Activations]:
        self.calls += 1
        if self.calls == self.at and 1 in acts:
            acts[1] = _with(acts[1], a_q=_nan(acts[1].a_q))
        return acts

    def forward(self, ids):  # type: ignore[no-untyped-def]
        return self._corrupt(super().forward(ids))


def test_engine_drops_the_client_for_one_step_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = schema_config([*TINY, "train.max_steps=3", "eval.every=0", "eval.linear=false", "eval.knn_k=5"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.runtime = CorruptingRuntime(cfg, at=2, train=trainer.train_data, parts=trainer.parts, device=trainer.device)
    with caplog.at_level(logging.WARNING, logger="mona_sfl.server"):
        summary = trainer.run()
    assert summary["steps"] == 3
    clients = [r["clients"] for r in step_records(tmp_path / "run")]
    assert clients == [3, 2, 3]
    assert any("client 1" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- Flower: the reply is checked before decoding

flwr_app = pytest.importorskip("flwr.app")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _reply(spec: ActivationSpec, tweak: Callable[[dict], None] | None = None) -> tuple:
    """A train.step reply's "act" record for clients 0 and 1, client 1's arrays passed through ``tweak``."""
    from mona_sfl.runtime.flower.codec import tensor_to_array

    a0, a1 = good(0, 4, 7, spec.shape), good(1, 3, 8, spec.shape)
    entries = {"0.q": tensor_to_array(a0.a_q), "0.k": tensor_to_array(a0.a_k), "1.q": tensor_to_array(a1.a_q), "1.k": tensor_to_array(a1.a_k)}
    if tweak is not None:
        tweak(entries)
    rec = flwr_app.ArrayRecord()
    for k, v in entries.items():
        rec[k] = v
    return rec, a0, a1


def _arr(dtype: str, shape: tuple, data: bytes):
    return flwr_app.Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def _swap(key: str, make: Callable) -> Callable[[dict], None]:
    def tweak(entries: dict) -> None:
        entries[key] = make(entries[key])

    return tweak


def _drop(key: str) -> Callable[[dict], None]:
    return lambda entries: entries.pop(key)


FLOWER_BAD = [
    ("missing", _drop("1.k"), "1.k is missing"),
    ("declared-float64", _swap("1.q", lambda a: flwr_app.Array(a.numpy().astype(np.float64))), "declares dtype 'float64'"),
    ("declared-shape", _swap("1.q", lambda a: flwr_app.Array(a.numpy()[:, :1].copy())), "declares shape"),
    ("declared-rows", _swap("1.q", lambda a: flwr_app.Array(np.zeros((99, *a.shape[1:]), np.float32))), "rows, more than"),
    ("oversized-bytes", _swap("1.q", lambda a: _arr("float32", tuple(a.shape), _npy(np.zeros((50, *a.shape[1:]), np.float32)))), "oversized payload"),
    ("garbage-bytes", _swap("1.q", lambda a: _arr("float32", tuple(a.shape), b"\x93NUMPY garbage")), "cannot be decoded"),
    ("lying-header", _swap("1.q", lambda a: _arr("float32", tuple(a.shape), _npy(a.numpy().reshape(a.shape[0], -1)))), "decodes to"),
    ("big-endian", _swap("1.q", lambda a: _arr("float32", tuple(a.shape), _npy(a.numpy().astype(">f4")))), "decodes to"),
    ("other-stype", _swap("1.q", lambda a: flwr_app.Array(dtype="float32", shape=tuple(a.shape), stype="torch.raw", data=a.data)), "serialisation type"),
]


@pytest.mark.parametrize("kind, tweak, phrase", FLOWER_BAD, ids=[b[0] for b in FLOWER_BAD])
def test_flower_reply_is_checked_before_decoding(cfg, kind: str, tweak, phrase: str) -> None:
    from mona_sfl.runtime.flower.codec import decode_activations

    spec = build.activation_spec(cfg)
    rec, a0, _ = _reply(spec, tweak)
    got, bad = decode_activations(rec, [0, 1], spec)
    assert list(got) == [0] and list(bad) == [1] and phrase in bad[1], bad
    assert torch.equal(got[0].a_q, a0.a_q) and torch.equal(got[0].a_k, a0.a_k)


def test_flower_good_reply_round_trips_and_feeds_the_server(cfg, fresh: Server) -> None:
    from mona_sfl.runtime.flower.codec import decode_activations

    spec = build.activation_spec(cfg)
    rec, a0, a1 = _reply(spec)
    got, bad = decode_activations(rec, [0, 1], spec)
    assert not bad
    for a in (a0, a1):
        assert torch.equal(got[a.client_id].a_q, a.a_q) and torch.equal(got[a.client_id].a_k, a.a_k)
    s1, s2 = copy.deepcopy(fresh), copy.deepcopy(fresh)
    r1, r2 = s1.step([got[0], got[1]]), s2.step([a0, a1])
    assert r1.loss == r2.loss and not r1.rejected
    assert_same(_state(s1), _state(s2), key_order=True)
