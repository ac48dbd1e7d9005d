"""Ray runtime: the client hosts are Ray actors, many clients per actor; the server stays in the driver.

This module is the Ray transport of the sharded runtime (:mod:`mona_sfl.runtime.sharded`,
which owns the host map, lost clients, state and the byte ledger).

Layout
    ``ray.num_actors`` actors (default: one per available CPU / ``ray.cpus_per_actor``, at most
    one per client). Every actor builds its own :class:`~mona_sfl.core.host.ClientHost` with
    :func:`mona_sfl.build.build_host` from the same config, so data, partitions and initial
    weights are those of the in-process runtime, bit for bit, and nothing but the config
    travels at start-up. Client compute runs with ``train.client_threads`` torch threads.

Requests
    One actor call per host, all issued at once, then one wait for all of them (``ray.get``
    with ``ray.step_timeout_s``). Activations, gradients and fronts travel as numpy arrays
    (stored once in the object store, read zero-copy by the driver); the merged fronts of a
    sync are put in the object store once and every actor reads the same object.

Faults
    A call that raises an actor/worker/node failure, or does not finish within
    ``ray.step_timeout_s`` (the actor is then killed), fails that host (the sharded runtime
    drops its clients for the rest of the epoch). At the next epoch a new actor is started
    holding the host's state from the last snapshot. Exceptions raised by the client code
    itself are bugs and propagate.

Cluster
    ``ray.address`` (or ``RAY_ADDRESS``) attaches to a running cluster; the ``mona_sfl``
    package is shipped to the actors with ``runtime_env={"py_modules": [...]}`` (set
    ``MONA_SFL_RAY_SHIP_CODE=0`` when every node has it installed). Every node needs the same
    Python packages (torch, torchvision, numpy) and, for real datasets, ``data.dir`` at the
    same path. Without an address a private local instance is started and stopped by
    :meth:`close`; its processes end with the driver also when it is killed
    (:mod:`mona_sfl.runtime.reaper`). A process that already called ``ray.init`` is reused as it is; with
    ``MONA_SFL_RAY_REUSE_ACTORS=1`` the actors are then kept warm by :meth:`close` for the next
    runtime of the same settings (an actor start imports torch and torchvision: several
    CPU-seconds), see :func:`drain_pool`.

Exactness
    Same seed, same config: per-step losses, sync metrics, final weights and client states
    equal the in-process runtime's bit for bit: client compute uses ``train.client_threads``
    torch threads in the actors as in the driver.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.exceptions as rex
import torch

import mona_sfl
from mona_sfl.build import build_host
from mona_sfl.config import Config, ConfigError, from_flat, to_flat
from mona_sfl.core.host import ClientHost
from mona_sfl.core.sync import GlobalFronts
from mona_sfl.runtime.reaper import Reaper
from mona_sfl.runtime.sharded import HostUnavailable, ShardedRuntime, Transport, serve
from mona_sfl.threads import cpus, set_threads

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


def _wire(obj: Any) -> Any:
    """Tensors -> numpy arrays (views of CPU tensors), recursively: what the hot requests carry."""
    if isinstance(obj, torch.Tensor):
        return _np(obj)
    if isinstance(obj, GlobalFronts):
        return GlobalFronts(_wire(obj.online), _wire(obj.momentum))
    if isinstance(obj, dict):
        return {k: _wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_wire(v) for v in obj)
    return obj


def _unwire(obj: Any) -> Any:
    """numpy arrays -> tensors over the same (possibly read-only, object-store) memory."""
    if isinstance(obj, np.ndarray):
        return _t(obj)
    if isinstance(obj, GlobalFronts):
        return GlobalFronts(_unwire(obj.online), _unwire(obj.momentum))
    if isinstance(obj, dict):
        return {k: _unwire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwire(v) for v in obj)
    return obj


#: Requests whose payloads travel as numpy (zero-copy reads); states travel as torch tensors
#: (an optimizer state must be writable where it lands).
_NUMPY_OPS = ("step", "fronts", "load")


def encode(op: str, obj: Any) -> Any:
    return _wire(obj) if op in _NUMPY_OPS else _to_cpu(obj)


def decode(op: str, obj: Any) -> Any:
    return _unwire(obj) if op in _NUMPY_OPS else obj


# --------------------------------------------------------------------------- the actor


_MAX_SPANS = 10_000  # step spans an actor keeps for the benchmark's overlap figure


class HostActor:
    """A Ray actor holding a :class:`ClientHost` (any number of clients)."""

    def __init__(self, flat_cfg: dict[str, Any], ids: list[int], device: str, state: dict | None = None) -> None:
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.host: ClientHost | None = None
        self.reset(flat_cfg, ids, device, state)

    def reset(self, flat_cfg: dict[str, Any], ids: list[int], device: str, state: dict | None = None) -> tuple[str, int]:
        """(Re)build the host from the config (at creation, or when a warm actor is reused); then hello."""
        self.host = None
        self._busy = [0.0, 0.0, 0]
        # the latest step spans only: an actor's memory stays flat however long the run
        self._spans: collections.deque[tuple[float, float]] = collections.deque(maxlen=_MAX_SPANS)
        cfg = from_flat(flat_cfg)
        set_threads(cfg.train.client_threads)
        self.host = build_host(cfg, list(ids), device=torch.device(device))
        if state is not None:
            self.host.load_state_dict(state)
        return self.hello()

    def release(self) -> None:
        """Drop the host (the actor waits in the warm pool)."""
        self.host = None

    def hello(self) -> tuple[str, int]:
        """(node id, pid): proves the actor is up, and where."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def call(self, op: str, args: Any) -> Any:
        """One request of the sharded runtime (:func:`mona_sfl.runtime.sharded.serve`)."""
        t0, c0, w0 = time.perf_counter(), time.process_time(), time.time()
        out = encode(op, serve(self.host, op, decode(op, args)))
        if op == "step":
            t1 = time.perf_counter()
            self._busy[0] += t1 - t0
            self._busy[1] += time.process_time() - c0
            self._busy[2] += 1
            self._spans.append((w0, w0 + (t1 - t0)))
        return out

    def busy(self) -> tuple[float, float, int]:
        """(wall s, CPU s, calls) spent computing in ``step`` requests (for the benchmark's cost breakdown)."""
        return self._busy[0], self._busy[1], int(self._busy[2])

    def spans(self) -> list[tuple[float, float]]:
        """(start, end) wall-clock time (``time.time``) of every ``step`` request, in order: whether actors overlap."""
        return list(self._spans)

    def debug_sleep(self, seconds: float) -> None:
        """For tests: make this actor a straggler."""
        time.sleep(seconds)


_RemoteActor = ray.remote(HostActor)

# Warm actors kept by close() for the next RayRuntime of this driver, when the Ray connection
# outlives the runtime (a caller's ray.init) and MONA_SFL_RAY_REUSE_ACTORS=1. An actor costs a
# process start (importing torch and torchvision: several CPU-seconds); reusing one only costs
# rebuilding its ClientHost. Idle pooled actors keep their CPU/GPU reservation.
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
    node_id: str = ""
    pid: int = 0


class RayTransport(Transport):
    """Requests as Ray actor calls; one :class:`HostActor` per host."""

    kind = "actor"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.step_timeout_s = float(cfg.ray.step_timeout_s)
        self.start_timeout_s = max(self.step_timeout_s, _MIN_START_TIMEOUT_S)
        self.started_ray = False
        self._reaper: Reaper | None = None
        self._closed = False
        self._slots: list[_Slot] = []
        self._connect()
        self._flat = to_flat(cfg)
        self._device = "cuda" if cfg.ray.gpus_per_actor > 0 else "cpu"
        self._opts = self._actor_options()
        self._reuse = _reuse_enabled() and not self.started_ray
        if self._reuse:  # warm actors of other settings or sessions: free their resources first
            key = self._pool_key()
            for k in [k for k in _POOL if k != key]:
                for h in _POOL.pop(k):
                    try:
                        ray.kill(h, no_restart=True)
                    except Exception:
                        pass

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
                ray.init(address="local", num_cpus=cpus(), include_dashboard=False, **common)
                self._reaper = Reaper()  # its processes end with this one, also after a SIGKILL
                self._reaper.record()
        self.started_ray = True

    def _actor_options(self) -> dict[str, Any]:
        r = self.cfg.ray
        return {
            "num_cpus": r.cpus_per_actor,
            "num_gpus": r.gpus_per_actor,
            "max_restarts": 0,  # restarts are ours: a new actor gets the host's state from the snapshot
            "max_task_retries": 0,
            "scheduling_strategy": "SPREAD",  # clients over as many nodes as possible
        }

    def num_actors(self) -> int:
        """``ray.num_actors``, or one per CPU the cluster has free (at most one per client)."""
        r, n_clients = self.cfg.ray, self.cfg.fed.num_clients
        if r.num_actors > 0:
            return min(r.num_actors, n_clients)
        res = ray.available_resources()
        warm = len(_POOL.get(self._pool_key(), [])) if self._reuse else 0  # their reservations are ours
        n_cpus = res.get("CPU", 1) + warm * r.cpus_per_actor
        n = int(n_cpus // r.cpus_per_actor) if r.cpus_per_actor > 0 else int(n_cpus)
        if r.gpus_per_actor > 0:
            n = min(n, int((res.get("GPU", 0) + warm * r.gpus_per_actor) // r.gpus_per_actor))
        return max(1, min(n, n_clients))

    def _pool_key(self) -> tuple:
        r = self.cfg.ray
        job = ray.get_runtime_context().get_job_id()
        return (job, r.cpus_per_actor, r.gpus_per_actor, self.cfg.train.client_threads, self._device, repr(self._opts.get("runtime_env")))

    def start(self, hosts: list[list[int]]) -> None:
        """Start (or take from the warm pool) one actor per host and wait until all are up."""
        warm = _POOL.get(self._pool_key(), []) if self._reuse else []
        self._slots = [_Slot(i, ids) for i, ids in enumerate(hosts)]
        refs: dict[int, Any] = {}
        reused: set[int] = set()
        for s in self._slots:
            if warm:
                s.handle = warm.pop()
                refs[s.index] = s.handle.reset.remote(self._flat, s.ids, self._device, None)
                reused.add(s.index)
            else:
                s.handle = self._spawn(s, None)
                refs[s.index] = s.handle.hello.remote()
        for attempt in range(2):
            ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.start_timeout_s)
            if pending:
                raise ConfigError(
                    f"ray runtime: {len(pending)} of {len(refs)} client actors did not start within {self.start_timeout_s:g}s "
                    f"(each asks num_cpus={self.cfg.ray.cpus_per_actor:g}, num_gpus={self.cfg.ray.gpus_per_actor:g}; the "
                    f"cluster has {ray.cluster_resources()}): lower ray.num_actors or ray.cpus_per_actor, or add nodes"
                )
            retry: dict[int, Any] = {}
            for i, ref in refs.items():
                s = self._slots[i]
                try:
                    s.node_id, s.pid = ray.get(ref)
                except _FAULTS as e:
                    if i not in reused or attempt:
                        raise RuntimeError(f"ray runtime: client actor {i} failed to start: {e}") from None
                    reused.discard(i)  # a warm actor that died meanwhile: start a new one
                    s.handle = self._spawn(s, None)
                    retry[i] = s.handle.hello.remote()
            if not retry:
                break
            refs = retry
        if self._reaper is not None:
            self._reaper.record()  # the actors' worker processes
        log.info(
            "ray runtime: %d clients in %d actors on %d node(s) (%d client threads/actor, %s)",
            self.cfg.fed.num_clients, len(self._slots), len(set(self.actor_nodes)), self.cfg.train.client_threads, self._device,
        )

    def _spawn(self, slot: _Slot, state_ref: Any) -> Any:
        return _RemoteActor.options(**self._opts).remote(self._flat, slot.ids, self._device, state_ref)

    # ------------------------------------------------------------------ requests
    def call(self, op: str, args: dict[int, Any], what: str) -> tuple[dict[int, Any], dict[int, str]]:
        if op == "load":  # once into the object store; every actor reads the same object
            ref = ray.put(encode(op, next(iter(args.values()))))
            calls = {h: self._slots[h].handle.call.remote(op, ref) for h in args}
        else:
            calls = {h: self._slots[h].handle.call.remote(op, encode(op, a)) for h, a in args.items()}
        results, failures = self._gather(calls, what)
        return {h: decode(op, r) for h, r in results.items()}, failures

    def _gather(self, calls: dict[int, Any], what: str, timeout: float | None = None) -> tuple[dict[int, Any], dict[int, str]]:
        """Wait for one call per actor; (results, failure reasons) by actor."""
        if not calls:
            return {}, {}
        timeout = self.step_timeout_s if timeout is None else timeout
        refs = list(calls.values())
        deadline = time.monotonic() + timeout
        try:  # the common case: one blocking get for all actors
            return dict(zip(calls, ray.get(refs, timeout=timeout))), {}
        except (rex.GetTimeoutError, *_FAULTS):
            pass  # find out which ones below (a failure can end the get before the others finish)
        # fetch_local=False: "finished" is what counts, not "already copied to this node"
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()), fetch_local=False)
        done = set(ready)
        out: dict[int, Any] = {}
        failures: dict[int, str] = {}
        for i, ref in calls.items():
            if ref not in done:
                failures[i] = f"(node {self._slots[i].node_id[:12]}, pid {self._slots[i].pid}) did not finish {what} within {timeout:g}s (ray.step_timeout_s)"
                continue
            try:
                out[i] = ray.get(ref)
            except _FAULTS as e:
                failures[i] = f"(node {self._slots[i].node_id[:12]}, pid {self._slots[i].pid}) died in {what} ({type(e).__name__})"
        return out, failures

    def actor_spans(self) -> list[list[tuple[float, float]]]:
        res, _ = self._gather({s.index: s.handle.spans.remote() for s in self._slots}, "spans")
        return [v for _, v in sorted(res.items())]

    def discard(self, host: int) -> None:
        try:
            ray.kill(self._slots[host].handle, no_restart=True)
        except Exception:  # already gone
            pass

    def revive(self, host: int, state: dict[str, Any]) -> str:
        s = self._slots[host]
        s.handle = self._spawn(s, ray.put(_to_cpu(state)))
        res, failures = self._gather({host: s.handle.hello.remote()}, "restart", timeout=self.start_timeout_s)
        if failures:
            raise HostUnavailable(failures[host])
        s.node_id, s.pid = res[host]
        return f" on node {s.node_id[:12]} (pid {s.pid})"

    # ------------------------------------------------------------------ introspection
    @property
    def actor_nodes(self) -> list[str]:
        return [s.node_id for s in self._slots]

    def actor_busy(self) -> list[tuple[float, float, int]]:
        res, _ = self._gather({s.index: s.handle.busy.remote() for s in self._slots}, "busy")
        return [v for _, v in sorted(res.items())]

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop the actors (or keep them warm, see ``MONA_SFL_RAY_REUSE_ACTORS``); stop Ray if we started it."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop()
        finally:
            if self._reaper is not None:
                self._reaper.close()

    def _stop(self) -> None:
        if not ray.is_initialized():
            return
        key = self._pool_key() if getattr(self, "_reuse", False) else None
        for s in self._slots:
            if s.handle is None:
                continue
            if key is not None:
                s.handle.release.remote()
                _POOL.setdefault(key, []).append(s.handle)
                continue
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:
                pass
        if self.started_ray:
            ray.shutdown()


class RayRuntime(ShardedRuntime):
    """The sharded runtime over Ray actors."""

    name = "ray"

    def __init__(self, cfg: Config, **_unused: object) -> None:  # train/parts/device: built per actor
        transport = RayTransport(cfg)
        try:
            n = transport.num_actors()
        except BaseException:
            transport.close()
            raise
        super().__init__(cfg, transport, n)

    @property
    def num_actors(self) -> int:
        return self.num_hosts

    @property
    def actor_nodes(self) -> list[str]:
        """Node id of each actor (as last started)."""
        return self.transport.actor_nodes  # type: ignore[attr-defined]

    def client_nodes(self) -> dict[int, str]:
        nodes = self.actor_nodes
        return {c: nodes[h] for c, h in self.host_of.items()}

    def actor_busy(self) -> list[tuple[float, float, int]]:
        """Per actor: (wall s, CPU s, calls) spent computing in step requests, for cost breakdowns."""
        return self.transport.actor_busy()  # type: ignore[attr-defined]

    def actor_spans(self) -> list[list[tuple[float, float]]]:
        """Per actor: (start, end) wall-clock times of its step requests (see :func:`concurrency`)."""
        return self.transport.actor_spans()  # type: ignore[attr-defined]

    def actor_handle(self, index: int) -> Any:
        return self.transport._slots[index].handle  # type: ignore[attr-defined]

    def actor_clients(self, index: int) -> list[int]:
        return list(self.hosts[index])


__all__ = ["RayRuntime", "RayTransport", "HostActor", "drain_pool", "check_address"]
