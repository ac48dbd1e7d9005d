"""In-process runtime: the reference semantics. One host in this process holds every client;
requests are direct calls (nothing is copied), client compute runs with ``train.client_threads``."""

from __future__ import annotations

from typing import Any

from mona_sfl import build
from mona_sfl.config import Config
from mona_sfl.core.host import ClientHost
from mona_sfl.runtime.sharded import ShardedRuntime, Transport, serve
from mona_sfl.threads import threads


class InProcessTransport(Transport):
    """Hosts in this process. A failure here is a bug, and propagates."""

    kind = "in-process host"

    def __init__(self, cfg: Config, **build_kwargs: Any) -> None:
        self.cfg = cfg
        self.build_kwargs = build_kwargs
        self.hosts: dict[int, ClientHost] = {}

    def start(self, hosts: list[list[int]]) -> None:
        self.hosts = {i: build.build_host(self.cfg, ids, **self.build_kwargs) for i, ids in enumerate(hosts)}

    def call(self, op: str, args: dict[int, Any], what: str) -> tuple[dict[int, Any], dict[int, str]]:
        with threads(self.cfg.train.client_threads):
            return {h: serve(self.hosts[h], op, a) for h, a in args.items()}, {}

    def revive(self, host: int, state: dict[str, Any]) -> str:  # pragma: no cover - in-process hosts do not fail
        self.hosts[host].load_state_dict(state)
        return ""


class LocalRuntime(ShardedRuntime):
    name = "local"

    def __init__(self, cfg: Config, **kwargs: Any) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k in ("train", "parts", "device")}
        super().__init__(cfg, InProcessTransport(cfg, **kwargs), num_hosts=1)

    @property
    def host(self) -> ClientHost:
        """The one host (tests and benchmarks look inside)."""
        return self.transport.hosts[0]  # type: ignore[attr-defined]


__all__ = ["InProcessTransport", "LocalRuntime"]
