"""Helpers shared by the test modules: the tiny run's config overrides, reading a run's
metrics and checkpoints, exact comparison of nested states, one torch thread, a server
step that crashes on purpose, and the processes a subprocess run started (Linux ``/proc``).

Test modules import the plain functions with ``from conftest import ...`` (pytest puts this
folder on ``sys.path``); ``one_thread`` is a fixture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mona_sfl.checkpoint import read_metrics

# The device of the tiny run and of the tests that compare split against unsplit gradients,
# batched against per-client clients and runtimes against each other: cpu, or cuda with
# MONA_SFL_TEST_DEVICE=cuda (bench/gpu_check.sh runs those tests on a GPU that way).
TEST_DEVICE = os.environ.get("MONA_SFL_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"MONA_SFL_TEST_DEVICE={TEST_DEVICE!r}: use cpu or cuda")

# The tiny run: seconds on one CPU thread. Modules change or drop entries with tiny_overrides.
TINY: dict[str, str] = {
    "device": TEST_DEVICE,
    "model.width": "0.125",
    "model.cut": "2",
    "algo.K": "64",
    "algo.dim": "16",
    "algo.hidden_dim": "32",
    "data.synthetic_size": "200",
    "data.synthetic_test_size": "0",  # a fifth of the training set, also under the default config's 10,000
    "fed.num_clients": "2",
    "fed.sync_every": "2",
    "train.epochs": "2",
    "train.steps_per_epoch": "3",
    "train.batch_size": "8",
    "eval.every": "0",
    "eval.linear": "false",
    "eval.knn_k": "10",
}


def tiny_overrides(*changes: str, drop: Iterable[str] = ()) -> list[str]:
    """The tiny run's ``key=value`` overrides; each of ``changes`` (``key=value``) replaces the
    entry of its key or is added, and the keys in ``drop`` are left out (their defaults apply)."""
    entries = dict(TINY)
    for key in drop:
        del entries[key]  # a KeyError: not a key of the tiny run
    for change in changes:
        key, _, value = change.partition("=")
        entries[key] = value
    return [f"{k}={v}" for k, v in entries.items()]


# ----------------------------------------------------------------------------- a run's files
def step_records(run: Path) -> list[dict[str, Any]]:
    """The per-step records of a run's metrics.jsonl."""
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in step_records(run)]


def load_checkpoint(run: Path, name: str = "checkpoint.pt") -> dict[str, Any]:
    return torch.load(run / name, map_location="cpu", weights_only=True)


def train(cfg: Any, out: Path, runtime: Any = None, **kw: Any) -> tuple[Any, dict[str, Any]]:
    """Train ``cfg`` into ``out`` without a progress bar; the runtime is closed afterwards."""
    from mona_sfl.engine import Trainer

    t = Trainer(cfg, out, progress=False, runtime=runtime, **kw)
    try:
        summary = t.run()
    finally:
        t.runtime.close()
    return t, summary


# ----------------------------------------------------------------------------- exact comparison
def assert_same(a: Any, b: Any, where: str = "", *, key_order: bool = False) -> None:
    """Exact equality of nested states: tensors bitwise, with the same dtype and shape; dicts
    with the same keys (and, with ``key_order``, in the same order); lists and tuples item by
    item; anything else with ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        assert not key_order or list(a) == list(b), f"{where}: key order {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}", key_order=key_order)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", key_order=key_order)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------- collection order
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that hold a test marked ``slow`` first, each module's tests in their order.

    The README's test command runs two workers, one module each at a time (``-n 2 --dist
    loadfile``): started first, the long integration modules share both workers instead of
    leaving one of them alone at the end while the other is idle."""
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)  # stable: the rest keeps its order


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: tiny tensors gain nothing from intra-op threads (and
    suffer on a busy machine), and bit-exact comparisons with single-threaded workers need it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- injected faults
class Crash(Exception):
    """The failure :func:`crash_in_server_step` injects."""


@contextlib.contextmanager
def crash_in_server_step(monkeypatch: pytest.MonkeyPatch, n: int) -> Iterator[None]:
    """The n-th ``Server.step`` call inside the block raises :class:`Crash`, which must end the
    block; the real ``Server.step`` is back afterwards."""
    from mona_sfl.core.server import Server

    original, calls = Server.step, {"n": 0}

    def crashing(self, acts):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"server crash in step call {n}")
        return original(self, acts)

    monkeypatch.setattr(Server, "step", crashing)
    try:
        with pytest.raises(Crash):
            yield
    finally:
        monkeypatch.setattr(Server, "step", original)


# ----------------------------------------------------------------------------- processes
def _stat(pid: int) -> tuple[int, str, int, str] | None:
    """(parent pid, state, session id, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), rest[0], int(rest[3]), rest[19]


def processes() -> dict[int, tuple[int, str, int, str]]:
    """Every live process: pid -> (parent pid, state, session id, start time); empty without /proc."""
    if not Path("/proc").is_dir():
        return {}
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None:
            out[int(d)] = st
    return out


def started_by(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live process below ``pid``, or in its session if it leads one."""
    procs = processes()
    kids: dict[int, list[int]] = {}
    for p, st in procs.items():
        kids.setdefault(st[0], []).append(p)
    found = {p for p, st in procs.items() if st[2] == pid and p != pid}
    todo = [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return [(p, procs[p][3]) for p in sorted(found)]


def still_running(procs: list[tuple[int, str]], grace_s: float = 30.0) -> list[int]:
    """Those of ``procs`` (pid, start time) still alive (same start time, not zombies) after up to ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p, start in procs if (st := _stat(p)) is not None and st[3] == start and st[1] != "Z"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def end_leftovers(procs: list[tuple[int, str]]) -> None:
    """SIGKILL those of ``procs`` that are still there (by pid, after checking the start time)."""
    for p in still_running(procs, grace_s=0):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


# The smallest real run: 40 synthetic images, 2 clients, 2 steps, no evaluation before the end
# (the bad-input and robustness tables).
SMALLEST_RUN = [
    "model.width=0.0625",
    "algo.K=16",
    "algo.dim=8",
    "algo.hidden_dim=8",
    "data.synthetic_size=40",
    "data.synthetic_test_size=0",
    "data.image_size=16",
    "fed.num_clients=2",
    "train.batch_size=4",
    "train.max_steps=2",
    "eval.every=0",
    "eval.linear=false",
    "eval.knn_k=5",
    "eval.batch_size=64",
]


def set_args(*overrides: str) -> list[str]:
    """``--set`` arguments for :data:`SMALLEST_RUN` plus ``overrides``."""
    out: list[str] = []
    for o in [*SMALLEST_RUN, *overrides]:
        out += ["--set", o]
    return out
