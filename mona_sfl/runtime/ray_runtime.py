"""Ray runtime: clients live in Ray actors, many clients per actor; the server stays in the driver.

Layout
    ``ray.num_actors`` actors (default: one per available CPU / ``ray.cpus_per_actor``, at most
    one per client). Client ``c`` lives in actor ``c % num_actors`` for the whole run. Every
    actor builds its own :class:`~mona_sfl.core.client.ClientGroup` with
    :func:`mona_sfl.build.build_client_group` from the same config, so data, partitions and
    initial weights are those of the in-process runtime, bit for bit, and nothing but the
    config travels at start-up.

One step
    The driver issues one call per actor that hosts sampled clients, then waits for all of
    them at once (``ray.get`` with ``ray.step_timeout_s``). Activations come back as numpy arrays
    (stored once in the object store, read zero-copy by the driver); gradients go down as
    numpy arrays. ``backward_forward`` is one call per actor: the gradients of step t and
    the activations of step t+1.

Sync
    ``fronts`` gathers the pool clients' (online, momentum) state dicts as numpy arrays; the
    engine averages them in pool order (bit-identical to local). ``load_global`` puts the
    average in the object store once and hands the same reference to every actor.

Bytes (``self.bytes``, counted from the payloads really serialised)
    * ``up``: ``a_q.nbytes + a_k.nbytes`` of every activation returned by an actor.
    * ``down``: ``grad.nbytes`` of every gradient sent to an actor.
    * ``sync``: uploads: the online and momentum state dicts of every client whose fronts were
      gathered (the momentum front travels under MocoSFL too: the engine needs it for the
      divergence metrics). Downloads, as the protocol would count them (not the one copy per
      actor that Ray really moves): every participating client that is still alive at the
      sync downloads the average (online, plus momentum when ``algo.align_momentum``); a
      client that missed syncs (not sampled, or lost) downloads the latest average once when
      it is next sampled (``begin_epoch``). Initial weights are built from the seed on every
      node and are not counted.

Faults
    A call that raises an actor/worker/node failure, or does not finish within
    ``ray.step_timeout_s`` (the actor is then killed), drops *all* clients of that actor into
    ``self.lost`` for the rest of the epoch, with a warning in the log. At the next
    ``begin_epoch`` the actor is recreated and its clients are restored from the last snapshot
    (the last ``state_dict()``, i.e. the last checkpoint, or the start of the run), with the
    latest global fronts loaded when syncs happened since. Progress the lost clients made
    after that snapshot (optimizer momentum, MocoSFL personal momentum fronts, data-stream
    position) is lost. Exceptions raised by the client code itself are bugs and propagate.

Cluster
    ``ray.address`` (or ``RAY_ADDRESS``) attaches to a running cluster; the ``mona_sfl``
    package is shipped to the actors with ``runtime_env={"py_modules": [...]}`` (set
    ``MONA_SFL_RAY_SHIP_CODE=0`` when every node has it installed). Every node needs the same
    Python packages (torch, torchvision, numpy) and, for real datasets, ``data.dir`` at the
    same path. Without an address a private local instance is started and stopped by
    :meth:`close`. A process that already called ``ray.init`` is reused as it is; with
    ``MONA_SFL_RAY_REUSE_ACTORS=1`` the actors are then kept warm by :meth:`close` for the next
    runtime of the same settings (an actor start imports torch and torchvision: several
    CPU-seconds), see :func:`drain_pool`.

Exactness
    Same seed, same config: per-step losses, sync metrics, final weights and client states
    equal the in-process runtime's bit for bit, provided the client computations use the same
    number of torch threads in both (``ray.cpus_per_actor`` threads per actor versus the
    driver's): torch's CPU kernels split reductions by thread count, so e.g. 2-thread local
    clients and 1-thread actors differ in the last bits.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.exceptions as rex
import torch

import mona_sfl
from mona_sfl.build import build_client_group, build_models, client_hparams
from mona_sfl.config import Config, ConfigError, from_flat, to_flat
from mona_sfl.core.client import Activations, ClientGroup, StateDict
from mona_sfl.runtime.base import ClientRuntime

log = logging.getLogger("mona_sfl.runtime.ray")

# Failures of the machinery (process, node, object), as opposed to exceptions raised by our code.
_FAULTS: tuple[type[BaseException], ...] = (
    rex.RayActorError,  # ActorDiedError, ActorUnavailableError
    rex.WorkerCrashedError,
    rex.NodeDiedError,
    rex.LocalRayletDiedError,
    rex.ObjectLostError,  # OwnerDiedError, ObjectFetchTimedOutError, ...
    rex.OutOfMemoryError,
)
_MIN_START_TIMEOUT_S = 120.0  # starting an actor imports torch and builds its data: allow more than a step


# --------------------------------------------------------------------------- conversions


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a tensor (a copy only when it lives on a GPU)."""
    return t.detach().cpu().numpy()


def _t(a: np.ndarray) -> torch.Tensor:
    """A tensor over a (possibly read-only, object-store backed) numpy array, no copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(a)


def _sd_np(sd: StateDict) -> dict[str, np.ndarray]:
    return {k: _np(v) for k, v in sd.items()}


def _sd_t(sd: dict[str, np.ndarray]) -> StateDict:
    return {k: _t(v) for k, v in sd.items()}


def _nbytes(sd: dict[str, np.ndarray] | None) -> int:
    return 0 if sd is None else sum(int(v.nbytes) for v in sd.values())


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_HOWTO = (
    "; start one with `ray start --head --port=6379` (and `ray start --address=HEAD:6379` on the other nodes), "
    "or leave ray.address empty (and RAY_ADDRESS unset) for a private local instance"
)


def check_address(addr: str, where: str = "ray.address") -> None:
    """Fail fast (ConfigError) when a ``HOST:PORT`` cluster address does not accept connections."""
    if addr in ("auto", "local") or "://" in addr:
        return
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{where}={addr!r} is not a Ray address: use HOST:PORT (e.g. 10.0.0.1:6379) or auto{_HOWTO}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"{where}={addr}: no Ray cluster answers there ({e}){_HOWTO}") from None


GlobalFronts = tuple[dict[str, np.ndarray], "dict[str, np.ndarray] | None"]


def restore_group(group: ClientGroup, snapshot: dict | None, global_fronts: GlobalFronts | None) -> None:
    """Load a group snapshot, then the latest global fronts (when syncs happened since)."""
    if snapshot is not None:
        group.load_state_dict(snapshot)
    if global_fronts is not None:
        online, momentum = global_fronts
        group.load_global(_sd_t(online), None if momentum is None else _sd_t(momentum))


class _StoredStream:
    """Stands in for a client's data stream on the driver: it only keeps the stream's state."""

    def __init__(self) -> None:
        self.state: Any = None

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


# --------------------------------------------------------------------------- the actor


class ClientActor:
    """A Ray actor hosting a :class:`ClientGroup` (any number of clients)."""

    def __init__(
        self,
        flat_cfg: dict[str, Any],
        ids: list[int],
        threads: int,
        device: str,
        snapshot: dict | None = None,
        global_fronts: GlobalFronts | None = None,
    ) -> None:
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.group: ClientGroup | None = None
        self.reset(flat_cfg, ids, threads, device, snapshot, global_fronts)

    def reset(
        self,
        flat_cfg: dict[str, Any],
        ids: list[int],
        threads: int,
        device: str,
        snapshot: dict | None = None,
        global_fronts: GlobalFronts | None = None,
    ) -> tuple[str, int, dict | None]:
        """(Re)build the group from the config (at creation, or when a warm actor is reused); then hello."""
        self.group = None
        self._busy = [0.0, 0.0, 0]
        torch.set_num_threads(max(1, int(threads)))
        cfg = from_flat(flat_cfg)
        self.group = build_client_group(cfg, list(ids), device=torch.device(device))
        restore_group(self.group, snapshot, global_fronts)
        return self.hello(True)

    def release(self) -> None:
        """Drop the group (the actor waits in the warm pool)."""
        self.group = None

    def hello(self, with_state: bool) -> tuple[str, int, dict | None]:
        """(node id, pid, group state or None): proves the actor is up, and where."""
        node = ray.get_runtime_context().get_node_id()
        return node, os.getpid(), (self.state_dict() if with_state else None)

    def begin_epoch(self, epoch: int, ids: list[int]) -> None:
        self.group.begin_epoch(epoch, ids)

    def step(self, grads: dict[int, np.ndarray], ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Backward of the given gradients (if any), then forward of ``ids`` (if any)."""
        t0, c0 = time.perf_counter(), time.process_time()
        if grads:
            self.group.backward({cid: _t(g) for cid, g in grads.items()})
        out = {}
        if ids:
            acts = self.group.forward(ids)
            out = {cid: (_np(a.a_q), _np(a.a_k)) for cid, a in acts.items()}
        self._busy[0] += time.perf_counter() - t0
        self._busy[1] += time.process_time() - c0
        self._busy[2] += 1
        return out

    def busy(self) -> tuple[float, float, int]:
        """(wall s, CPU s, calls) spent computing in ``step`` (for the benchmark's cost breakdown)."""
        return self._busy[0], self._busy[1], int(self._busy[2])

    def fronts(self, ids: list[int]) -> dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        return {cid: (_sd_np(o), _sd_np(m)) for cid, (o, m) in self.group.fronts(ids).items()}

    def load_global(self, payload: GlobalFronts) -> None:
        restore_group(self.group, None, payload)

    def end_epoch(self) -> None:
        self.group.end_epoch()

    def state_dict(self) -> dict:
        return _to_cpu(self.group.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.group.load_state_dict(state)

    def debug_sleep(self, seconds: float) -> None:
        """For tests: make this actor a straggler."""
        time.sleep(seconds)


_RemoteActor = ray.remote(ClientActor)

# Warm actors kept by close() for the next RayRuntime of this driver, when the Ray connection
# outlives the runtime (a caller's ray.init) and MONA_SFL_RAY_REUSE_ACTORS=1. An actor costs a
# process start (importing torch and torchvision: several CPU-seconds); reusing one only costs
# rebuilding its ClientGroup. Idle pooled actors keep their CPU/GPU reservation.
_POOL: dict[tuple, list[Any]] = {}


def _reuse_enabled() -> bool:
    return os.environ.get("MONA_SFL_RAY_REUSE_ACTORS", "0") == "1"


def drain_pool() -> None:
    """Kill the warm actors kept for reuse (``MONA_SFL_RAY_REUSE_ACTORS=1``)."""
    while _POOL:
        _, handles = _POOL.popitem()
        for h in handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # stale handle of a previous Ray session
                pass


# --------------------------------------------------------------------------- the driver side


@dataclass
class _Slot:
    index: int
    ids: list[int]
    handle: Any = None
    dead: bool = True
    node_id: str = ""
    pid: int = 0
    deaths: int = 0
    id_set: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.id_set = set(self.ids)


class RayRuntime(ClientRuntime):
    name = "ray"

    def __init__(self, cfg: Config, **kwargs: object) -> None:  # train/parts/device: unused (built per actor)
        super().__init__()
        self.cfg = cfg
        self.step_timeout_s = float(cfg.ray.step_timeout_s)
        self.start_timeout_s = max(self.step_timeout_s, _MIN_START_TIMEOUT_S)
        self._started_ray = False
        self._closed = False
        self._connect()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _connect(self) -> None:
        addr = self.cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
        if ray.is_initialized():
            log.info("ray runtime: reusing this process's Ray connection")
            return
        common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO tip
            if addr:
                if os.environ.get("MONA_SFL_RAY_SHIP_CODE", "1") != "0":
                    # ship this checkout of the package to every node (uploaded once per job)
                    common["runtime_env"] = {"py_modules": [os.path.dirname(os.path.abspath(mona_sfl.__file__))]}
                where = "ray.address" if self.cfg.ray.address else "RAY_ADDRESS"
                check_address(addr, where)  # ray.init itself retries an unreachable address for minutes
                try:
                    ray.init(address=addr, **common)
                except ConnectionError as e:
                    raise ConfigError(f"{where}={addr}: cannot connect to a Ray cluster ({e}){_HOWTO}") from None
            else:
                ray.init(address="local", num_cpus=_cpus(), include_dashboard=False, **common)
        self._started_ray = True

    def _actor_options(self) -> dict[str, Any]:
        r = self.cfg.ray
        opts: dict[str, Any] = {
            "num_cpus": r.cpus_per_actor,
            "num_gpus": r.gpus_per_actor,
            "max_restarts": 0,  # restarts are ours: a new actor is restored from the snapshot
            "max_task_retries": 0,
            "scheduling_strategy": "SPREAD",  # clients over as many nodes as possible
        }
        return opts

    def _num_actors(self) -> int:
        r, n_clients = self.cfg.ray, self.cfg.fed.num_clients
        if r.num_actors > 0:
            return min(r.num_actors, n_clients)
        res = ray.available_resources()
        warm = len(_POOL.get(self._pool_key(), [])) if self._reuse else 0  # their reservations are ours
        cpus = res.get("CPU", 1) + warm * r.cpus_per_actor
        n = int(cpus // r.cpus_per_actor) if r.cpus_per_actor > 0 else int(cpus)
        if r.gpus_per_actor > 0:
            n = min(n, int((res.get("GPU", 0) + warm * r.gpus_per_actor) // r.gpus_per_actor))
        return max(1, min(n, n_clients))

    def _setup(self) -> None:
        cfg = self.cfg
        self._flat = to_flat(cfg)
        self._threads = max(1, int(cfg.ray.cpus_per_actor))
        self._device = "cuda" if cfg.ray.gpus_per_actor > 0 else "cpu"
        self._opts = self._actor_options()
        self._reuse = _reuse_enabled() and not self._started_ray
        if self._reuse:  # warm actors of other settings or sessions: free their resources first
            key = self._pool_key()
            for k in [k for k in _POOL if k != key]:
                for h in _POOL.pop(k):
                    try:
                        ray.kill(h, no_restart=True)
                    except Exception:
                        pass
        n = self._num_actors()
        self._slots = [_Slot(i, [c for c in range(cfg.fed.num_clients) if c % n == i]) for i in range(n)]
        self._slot_of = {c: s.index for s in self._slots for c in s.ids}
        # Driver-side shadow of a group (template weights + hyperparameters), for dead actors.
        self._template, _ = build_models(cfg)
        self._hp = client_hparams(cfg)

        self._epoch = 0
        self._pool: list[int] = []
        self._in_epoch = False
        # Syncs and what each client holds, for the protocol's download count.
        self._syncs = 0
        self._seen: dict[int, int] = {c: 0 for c in range(cfg.fed.num_clients)}
        self._global: GlobalFronts | None = None  # latest averaged fronts (momentum None: MocoSFL)
        self._global_ref: Any = None
        self._global_nbytes = 0
        self._snapshot: dict | None = None
        self._snapshot_ref: Any = None
        self._snapshot_syncs = 0

        self._start_all()
        log.info(
            "ray runtime: %d clients in %d actors on %d node(s) (%s threads/actor, %s)",
            cfg.fed.num_clients, n, len(set(self.actor_nodes)), self._threads, self._device,
        )

    def _pool_key(self) -> tuple:
        r = self.cfg.ray
        job = ray.get_runtime_context().get_job_id()
        return (job, r.cpus_per_actor, r.gpus_per_actor, self._threads, self._device, repr(self._opts.get("runtime_env")))

    def _start_all(self) -> None:
        """Start (or take from the warm pool) one actor per slot and gather the initial state."""
        warm = _POOL.get(self._pool_key(), []) if self._reuse else []
        reused: dict[int, Any] = {}
        for s in self._slots:
            if warm:
                s.handle = warm.pop()
                reused[s.index] = s.handle.reset.remote(self._flat, s.ids, self._threads, self._device, None, None)
            else:
                s.handle = self._spawn(s, None, None)
        parts: dict[int, dict] = {}
        for attempt in range(2):
            todo = [s for s in self._slots if s.index not in parts]
            refs = {s.index: reused.get(s.index) or s.handle.hello.remote(True) for s in todo}
            ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.start_timeout_s)
            if pending:
                raise ConfigError(
                    f"ray runtime: {len(pending)} of {len(refs)} client actors did not start within {self.start_timeout_s:g}s "
                    f"(each asks num_cpus={self.cfg.ray.cpus_per_actor:g}, num_gpus={self.cfg.ray.gpus_per_actor:g}; the "
                    f"cluster has {ray.cluster_resources()}): lower ray.num_actors or ray.cpus_per_actor, or add nodes"
                )
            for i, ref in refs.items():
                s = self._slots[i]
                try:
                    s.node_id, s.pid, parts[i] = ray.get(ref)
                    s.dead = False
                except _FAULTS as e:
                    if i not in reused or attempt:
                        raise RuntimeError(f"ray runtime: client actor {i} failed to start: {e}") from None
                    reused.pop(i)  # a warm actor that died meanwhile: start a new one
                    s.handle = self._spawn(s, None, None)
            if len(parts) == len(self._slots):
                break
        self._set_snapshot(self._merge([parts[s.index] for s in self._slots]))

    def _spawn(self, slot: _Slot, snapshot_ref: Any, global_ref: Any) -> Any:
        return _RemoteActor.options(**self._opts).remote(
            self._flat, slot.ids, self._threads, self._device, snapshot_ref, global_ref
        )

    # ------------------------------------------------------------------ introspection
    @property
    def num_actors(self) -> int:
        return len(self._slots)

    @property
    def actor_nodes(self) -> list[str]:
        """Node id of each actor (as last started)."""
        return [s.node_id for s in self._slots]

    def client_nodes(self) -> dict[int, str]:
        return {c: s.node_id for s in self._slots for c in s.ids}

    def actor_busy(self) -> list[tuple[float, float, int]]:
        """Per actor: (wall s, CPU s, calls) spent computing in step calls, for cost breakdowns."""
        refs = {s.index: s.handle.busy.remote() for s in self._slots if not s.dead}
        return [v for _, v in sorted(self._gather(refs, "busy").items())]

    def actor_handle(self, index: int) -> Any:
        return self._slots[index].handle

    def actor_clients(self, index: int) -> list[int]:
        return list(self._slots[index].ids)

    # ------------------------------------------------------------------ faults
    def _fail(self, slot: _Slot, reason: str) -> None:
        if slot.dead:
            return
        slot.dead = True
        slot.deaths += 1
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # already gone
            pass
        in_pool = [c for c in self._pool if c in slot.id_set] if self._in_epoch else []
        self.lost.update(slot.ids)
        log.warning(
            "ray runtime: actor %d (node %s, pid %d) %s: its clients %s are lost for the rest of epoch %d; "
            "it is recreated at the next epoch from the last snapshot",
            slot.index, slot.node_id[:12], slot.pid, reason, in_pool or slot.ids, self._epoch,
        )

    def _gather(self, calls: dict[int, Any], what: str, timeout: float | None = None) -> dict[int, Any]:
        """Wait for one call per actor; failed or late actors are dropped (``_fail``)."""
        if not calls:
            return {}
        timeout = self.step_timeout_s if timeout is None else timeout
        refs = list(calls.values())
        deadline = time.monotonic() + timeout
        try:  # the common case: one blocking get for all actors
            return dict(zip(calls, ray.get(refs, timeout=timeout)))
        except (rex.GetTimeoutError, *_FAULTS):
            pass  # find out which ones below (a failure can end the get before the others finish)
        # fetch_local=False: "finished" is what counts, not "already copied to this node"
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()), fetch_local=False)
        done = set(ready)
        out: dict[int, Any] = {}
        for i, ref in calls.items():
            if ref not in done:
                self._fail(self._slots[i], f"did not finish {what} within {timeout:g}s (ray.step_timeout_s)")
                continue
            try:
                out[i] = ray.get(ref)
            except _FAULTS as e:
                self._fail(self._slots[i], f"died in {what} ({type(e).__name__})")
        return out

    def _by_slot(self, ids: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for c in ids:
            s = self._slots[self._slot_of[c]]
            if c in self.lost or s.dead:
                continue
            out.setdefault(s.index, []).append(c)
        return out

    def _revive(self) -> None:
        """Recreate dead actors, restored from the snapshot and the latest global fronts."""
        dead = [s for s in self._slots if s.dead]
        if not dead:
            return
        snap_ref = self._snapshot_object_ref()
        glob_ref = self._global_ref if self._syncs > self._snapshot_syncs else None
        for s in dead:
            s.handle = self._spawn(s, snap_ref, glob_ref)
        calls = {s.index: s.handle.hello.remote(False) for s in dead}
        for s in dead:
            s.dead = False  # so that _gather can drop it again
        for i, (node, pid, _) in self._gather(calls, "restart", timeout=self.start_timeout_s).items():
            s = self._slots[i]
            s.node_id, s.pid = node, pid
            log.warning("ray runtime: actor %d recreated on node %s (pid %d); clients %s restored", i, node[:12], pid, s.ids)

    # ------------------------------------------------------------------ the interface
    def begin_epoch(self, epoch: int, ids: list[int]) -> None:
        self.lost.clear()
        self._revive()
        self._epoch, self._pool, self._in_epoch = epoch, list(ids), True
        for c in ids:  # clients that missed syncs fetch the latest average now
            if self._seen[c] < self._syncs:
                self.bytes["sync"] += self._global_nbytes
                self._seen[c] = self._syncs
        mine = self._by_slot(ids)
        calls = {s.index: s.handle.begin_epoch.remote(epoch, mine.get(s.index, [])) for s in self._slots if not s.dead}
        self._gather(calls, "begin_epoch")

    def _step(self, grads: dict[int, torch.Tensor], ids: list[int], what: str) -> dict[int, Activations]:
        g_by: dict[int, dict[int, np.ndarray]] = {}
        for c, g in grads.items():
            s = self._slots[self._slot_of[c]]
            if c in self.lost or s.dead:
                continue
            g_by.setdefault(s.index, {})[c] = _np(g)
        f_by = self._by_slot(ids)
        calls = {}
        for i in sorted(set(g_by) | set(f_by)):
            gi = g_by.get(i, {})
            self.bytes["down"] += sum(int(a.nbytes) for a in gi.values())
            calls[i] = self._slots[i].handle.step.remote(gi, f_by.get(i, []))
        res = self._gather(calls, what)
        out: dict[int, Activations] = {}
        for r in res.values():
            for c, (q, k) in r.items():
                self.bytes["up"] += int(q.nbytes) + int(k.nbytes)
                out[c] = Activations(c, _t(q), _t(k))
        return {c: out[c] for c in ids if c in out}

    def forward(self, ids: list[int]) -> dict[int, Activations]:
        return self._step({}, ids, "forward")

    def backward(self, grads: dict[int, torch.Tensor]) -> None:
        self._step(grads, [], "backward")

    def backward_forward(self, grads: dict[int, torch.Tensor], ids: list[int]) -> dict[int, Activations]:
        return self._step(grads, ids, "backward_forward")

    def fronts(self, ids: list[int]) -> dict[int, tuple[StateDict, StateDict]]:
        by = self._by_slot(ids)
        res = self._gather({i: self._slots[i].handle.fronts.remote(cs) for i, cs in by.items()}, "fronts")
        got: dict[int, tuple[StateDict, StateDict]] = {}
        for r in res.values():
            for c, (o, m) in r.items():
                self.bytes["sync"] += _nbytes(o) + _nbytes(m)
                got[c] = (_sd_t(o), _sd_t(m))
        if ids and not got:
            from mona_sfl.engine import AllClientsLost

            raise AllClientsLost("ray runtime: every client was lost while gathering fronts for a sync")
        return {c: got[c] for c in ids if c in got}

    def load_global(self, online: StateDict, momentum: StateDict | None) -> None:
        payload: GlobalFronts = (
            _sd_np(online),
            None if momentum is None else _sd_np(momentum),
        )
        self._global = payload
        self._global_ref = ray.put(payload)  # once; every actor reads the same object
        self._global_nbytes = _nbytes(payload[0]) + _nbytes(payload[1])
        self._syncs += 1
        calls = {s.index: s.handle.load_global.remote(self._global_ref) for s in self._slots if not s.dead}
        self._gather(calls, "load_global")
        for c in self._pool if self._in_epoch else []:
            if c not in self.lost:
                self.bytes["sync"] += self._global_nbytes
                self._seen[c] = self._syncs

    def end_epoch(self) -> None:
        self._gather({s.index: s.handle.end_epoch.remote() for s in self._slots if not s.dead}, "end_epoch")
        self._in_epoch = False

    # ------------------------------------------------------------------ state
    def _snapshot_object_ref(self) -> Any:
        if self._snapshot_ref is None:
            self._snapshot_ref = ray.put(self._snapshot)
        return self._snapshot_ref

    def _set_snapshot(self, state: dict) -> None:
        self._snapshot = state
        self._snapshot_ref = None
        self._snapshot_syncs = self._syncs

    def _shadow_state(self, slot: _Slot) -> dict:
        """A dead actor's group state: its last snapshot plus the syncs it missed."""
        group = ClientGroup(copy.deepcopy(self._template), self._hp, {c: _StoredStream() for c in slot.ids})
        restore_group(group, self._snapshot, self._global if self._syncs > self._snapshot_syncs else None)
        return _to_cpu(group.state_dict())

    def _merge(self, parts: list[dict]) -> dict:
        """One ClientGroup-format state for all clients (what the local runtime would save)."""
        records: dict[str, Any] = {}
        streams: dict[str, Any] = {}
        live: set[int] = set()
        for p in parts:
            records.update(p["records"])
            streams.update(p["streams"])
            live.update(int(c) for c in p["live"])
        if self._in_epoch:
            live |= set(self._pool)  # clients of a dead actor stay live (resume continues the epoch)
        order = [c for c in self._pool if c in live] + sorted(live - set(self._pool))
        return {
            "epoch": parts[0]["epoch"],
            "live": order,
            "global_online": parts[0]["global_online"],
            "global_momentum": parts[0]["global_momentum"],
            "records": {k: records[k] for k in sorted(records, key=int)},
            "streams": {k: streams[k] for k in sorted(streams, key=int)},
            "ray": {"syncs": self._syncs, "seen": {str(c): v for c, v in self._seen.items()}},
        }

    def state_dict(self) -> dict:
        res = self._gather({s.index: s.handle.state_dict.remote() for s in self._slots if not s.dead}, "state_dict")
        parts = [res[s.index] if s.index in res else self._shadow_state(s) for s in self._slots]
        state = self._merge(parts)
        self._set_snapshot(state)
        return state

    def load_state_dict(self, state: dict) -> None:
        extra = state.get("ray", {})
        self._syncs = int(extra.get("syncs", 0))
        seen = extra.get("seen", {})
        self._seen = {c: int(seen.get(str(c), self._syncs)) for c in range(self.cfg.fed.num_clients)}
        g = (
            {k: _np(v) for k, v in state["global_online"].items()},
            {k: _np(v) for k, v in state["global_momentum"].items()} if self.cfg.algo.align_momentum else None,
        )
        self._global, self._global_ref = g, ray.put(g)
        self._global_nbytes = _nbytes(g[0]) + _nbytes(g[1])
        self._epoch = int(state["epoch"])
        self._pool = [int(c) for c in state["live"]]
        self._in_epoch = bool(self._pool)
        self._set_snapshot(state)
        ref = self._snapshot_object_ref()
        self._gather({s.index: s.handle.load_state_dict.remote(ref) for s in self._slots if not s.dead}, "load_state_dict")

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop the actors (or keep them warm, see ``MONA_SFL_RAY_REUSE_ACTORS``); stop Ray if we started it."""
        if self._closed:
            return
        self._closed = True
        if not ray.is_initialized():
            return
        key = self._pool_key() if getattr(self, "_reuse", False) else None
        for s in getattr(self, "_slots", []):
            if s.handle is None:
                continue
            if key is not None and not s.dead:
                s.handle.release.remote()
                _POOL.setdefault(key, []).append(s.handle)
                continue
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:
                pass
        if self._started_ray:
            ray.shutdown()


__all__ = ["RayRuntime", "ClientActor", "restore_group", "drain_pool", "check_address"]
