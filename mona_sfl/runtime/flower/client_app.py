"""The Flower ClientApp: message handlers that translate records into client-host requests.

Message types (all replies carry ``ConfigRecord "meta"`` with the node's partition id):

==================  =================================================  ==========================================
type                content                                            reply
==================  =================================================  ==========================================
``query.meta``      ``cfg``: {}                                        ``meta``: partition-id, num-partitions, pid,
                                                                       compute_s (every reply)
``train.step``      ``cfg``: epoch, live, fwd, nodes; ``grad``         ``act``: ``"<cid>.q"``, ``"<cid>.k"``
                    (``"<cid>"`` -> dL/da_q of the previous step)
``query.fronts``    ``cfg``: epoch, live, ids, nodes                   ``o.<cid>`` / ``m.<cid>`` ArrayRecords
``train.sync``      ``cfg``: epoch, live, nodes; ``online``
                    [, ``momentum``] ArrayRecords                      ``meta`` only
``query.state``     ``cfg``: epoch, live, nodes                        ``state`` ArrayRecord + ``state.tree``
``train.load``      ``cfg``: nodes; ``state`` + ``state.tree``         ``meta`` only
``query.echo``      ``payload`` ArrayRecord                            ``echo``: the same ArrayRecord
==================  =================================================  ==========================================

Every payload is an ArrayRecord / ConfigRecord: nothing is pickled.

Every handler decodes its records, hands the request to the node's host
(``serve_message``: rebuild from ``context.state``, :func:`mona_sfl.runtime.sharded.serve`, save)
and encodes the reply. Deployed with Flower's default isolation every message runs in a fresh
``flwr-clientapp`` process (``mona-sfl deploy-local`` keeps one process per SuperNode up instead:
:mod:`mona_sfl.runtime.flower.clientapp_worker`), so this module imports torch (and the models,
which import torchvision) only in the handlers that compute: ``query.meta`` and ``query.echo``
cost a Python start and ``import flwr``, nothing more.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from mona_sfl.config import Config
from mona_sfl.runtime.flower.run_config import config_from_run_config

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


def _partition(context: Context) -> tuple[int, int]:
    nc = context.node_config
    if PARTITION_ID not in nc:
        raise RuntimeError(
            "this SuperNode has no 'partition-id' in its node config: start it with "
            "--node-config 'partition-id=I num-partitions=N'"
        )
    return int(nc[PARTITION_ID]), int(nc.get(NUM_PARTITIONS, -1))  # type: ignore[arg-type]


def _meta(context: Context) -> ConfigRecord:
    pid, nparts = _partition(context)
    return ConfigRecord({PARTITION_ID: pid, NUM_PARTITIONS: nparts, "pid": os.getpid()})


def _ints(values: Any) -> list[int]:
    return [int(v) for v in (values or [])]


def make_client_app(flat_config: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``flat_config`` (``to_flat`` keys) stands in for an empty ``run_config``.

    ``flwr run`` hands the config to every node in ``context.run_config``; the in-process
    ``run_simulation`` API has no run config, so ``train_with_flower`` bakes it in here.
    """
    app = ClientApp()
    cache: dict[str, Config] = {}
    busy: dict[str, float] = {}  # seconds the last serve_message of this process took (reported in "meta")

    def config(context: Context) -> Config:
        rc = dict(context.run_config) if context.run_config else dict(flat_config or {})
        key = repr(sorted(rc.items()))
        if key not in cache:
            cache.clear()
            cache[key] = config_from_run_config(rc)
        return cache[key]

    def serve_message(msg: Message, context: Context, op: str, args: Any, *, fresh: bool = False) -> Any:
        """Rebuild the host from context.state, follow the epoch, serve ``op``, save the state."""
        from mona_sfl.runtime.flower.node import load_host, save_host  # torch, torchvision: only where needed
        from mona_sfl.runtime.sharded import serve
        from mona_sfl.threads import set_threads

        t0 = time.perf_counter()
        cfg = config(context)
        set_threads(cfg.train.client_threads)
        pid, _ = _partition(context)
        c = msg.content.config_records["cfg"]
        nodes = int(c["nodes"])  # type: ignore[arg-type]
        host = load_host(cfg, pid, nodes, None if fresh else context.state)
        if not fresh:
            host.follow(int(c["epoch"]), _ints(c.get("live")))  # type: ignore[arg-type]
        out = serve(host, op, args)
        save_host(host, pid, nodes, context.state)
        busy["compute_s"] = time.perf_counter() - t0
        return out

    def reply(msg: Message, context: Context, **records: Any) -> Message:
        meta = _meta(context)
        meta["compute_s"] = busy.pop("compute_s", 0.0)  # rebuild, serve and save: the node's own work
        return Message(RecordDict({**records, "meta": meta}), reply_to=msg)

    @app.query("meta")
    def meta(msg: Message, context: Context) -> Message:
        return reply(msg, context)

    @app.query("echo")
    def echo(msg: Message, context: Context) -> Message:
        """Send the ``payload`` ArrayRecord back (``FlowerRuntime.probe``: large-message check)."""
        return reply(msg, context, echo=msg.content.array_records["payload"])

    @app.train("step")
    def step(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import array_to_tensor, tensor_to_array

        grads = {}
        if "grad" in msg.content.array_records:
            grads = {int(k): array_to_tensor(a) for k, a in msg.content.array_records["grad"].items()}
        fwd = _ints(msg.content.config_records["cfg"].get("fwd"))
        acts = serve_message(msg, context, "step", (grads, fwd))
        act = ArrayRecord()
        for cid, (q, k) in acts.items():
            act[f"{cid}.q"] = tensor_to_array(q)
            act[f"{cid}.k"] = tensor_to_array(k)
        return reply(msg, context, act=act)

    @app.query("fronts")
    def fronts(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import state_dict_to_record

        got = serve_message(msg, context, "fronts", _ints(msg.content.config_records["cfg"].get("ids")))
        records: dict[str, Any] = {}
        for cid, (online, momentum) in got.items():
            records[f"o.{cid}"] = state_dict_to_record(online)
            records[f"m.{cid}"] = state_dict_to_record(momentum)
        return reply(msg, context, **records)

    @app.train("sync")
    def sync(msg: Message, context: Context) -> Message:
        from mona_sfl.core.sync import GlobalFronts
        from mona_sfl.runtime.flower.codec import record_to_state_dict

        recs = msg.content.array_records
        loaded = GlobalFronts(
            record_to_state_dict(recs["online"]), record_to_state_dict(recs["momentum"]) if "momentum" in recs else None
        )
        serve_message(msg, context, "load", loaded)
        return reply(msg, context)

    @app.query("state")
    def state(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import tree_to_records

        arrays, tree = tree_to_records(serve_message(msg, context, "state", None))
        return reply(msg, context, **{"state": arrays, "state.tree": tree})

    @app.train("load")
    def load(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import records_to_tree

        st = records_to_tree(msg.content.array_records["state"], msg.content.config_records["state.tree"])
        serve_message(msg, context, "load_state", st, fresh=True)  # whatever the node held before is replaced
        return reply(msg, context)

    return app


# The ClientApp that `flwr run` and `flower-supernode` load ([tool.flwr.app.components]).
app = make_client_app()

__all__ = ["app", "make_client_app"]
