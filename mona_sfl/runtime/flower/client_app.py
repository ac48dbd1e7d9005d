"""The Flower ClientApp: message handlers that translate records into ``NodeClients`` calls.

Message types (all replies carry ``ConfigRecord "meta"`` with the node's partition id):

==================  =================================================  ==========================================
type                content                                            reply
==================  =================================================  ==========================================
``query.meta``      ``cfg``: {}                                        ``meta``: partition-id, num-partitions, pid
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

In deployment every message runs in a fresh ``flwr-clientapp`` process, so this module
imports torch (and the models, which import torchvision) only in the handlers that compute:
``query.meta`` and ``query.echo`` cost a Python start and ``import flwr``, nothing more.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from mona_sfl.config import Config
from mona_sfl.runtime.flower.run_config import config_from_run_config

if TYPE_CHECKING:
    from mona_sfl.runtime.flower.node import NodeClients

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

    def config(context: Context) -> Config:
        rc = dict(context.run_config) if context.run_config else dict(flat_config or {})
        key = repr(sorted(rc.items()))
        if key not in cache:
            cache.clear()
            cache[key] = config_from_run_config(rc)
        return cache[key]

    def node(msg: Message, context: Context, *, fresh: bool = False) -> NodeClients:
        from mona_sfl.runtime.flower.node import NodeClients  # torch, torchvision: only where needed

        pid, _ = _partition(context)
        nodes = int(msg.content["cfg"]["nodes"])  # type: ignore[arg-type]
        return NodeClients(config(context), pid, nodes, None if fresh else context.state)

    def align(n: NodeClients, c: ConfigRecord) -> None:
        n.align(int(c["epoch"]), _ints(c.get("live")))  # type: ignore[arg-type]

    @app.query("meta")
    def meta(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"meta": _meta(context)}), reply_to=msg)

    @app.query("echo")
    def echo(msg: Message, context: Context) -> Message:
        """Send the ``payload`` ArrayRecord back (``FlowerRuntime.probe``: large-message check)."""
        return Message(RecordDict({"echo": msg.content.array_records["payload"], "meta": _meta(context)}), reply_to=msg)

    @app.train("step")
    def step(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import array_to_tensor, tensor_to_array

        n = node(msg, context)
        c = msg.content.config_records["cfg"]
        align(n, c)
        grads = {}
        if "grad" in msg.content.array_records:
            grads = {int(k): array_to_tensor(a) for k, a in msg.content.array_records["grad"].items()}
        acts = n.step(grads, _ints(c.get("fwd")))
        n.save(context.state)
        act = ArrayRecord()
        for cid, a in acts.items():
            act[f"{cid}.q"] = tensor_to_array(a.a_q)
            act[f"{cid}.k"] = tensor_to_array(a.a_k)
        return Message(RecordDict({"act": act, "meta": _meta(context)}), reply_to=msg)

    @app.query("fronts")
    def fronts(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import state_dict_to_record

        n = node(msg, context)
        c = msg.content.config_records["cfg"]
        align(n, c)
        content = RecordDict({"meta": _meta(context)})
        for cid, (online, momentum) in n.fronts(_ints(c.get("ids"))).items():
            content[f"o.{cid}"] = state_dict_to_record(online)
            content[f"m.{cid}"] = state_dict_to_record(momentum)
        n.save(context.state)
        return Message(content, reply_to=msg)

    @app.train("sync")
    def sync(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import record_to_state_dict

        n = node(msg, context)
        align(n, msg.content.config_records["cfg"])
        recs = msg.content.array_records
        online = record_to_state_dict(recs["online"])
        momentum = record_to_state_dict(recs["momentum"]) if "momentum" in recs else None
        n.load_global(online, momentum)
        n.save(context.state)
        return Message(RecordDict({"meta": _meta(context)}), reply_to=msg)

    @app.query("state")
    def state(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import tree_to_records

        n = node(msg, context)
        align(n, msg.content.config_records["cfg"])
        n.save(context.state)
        arrays, tree = tree_to_records(n.state_dict())
        return Message(RecordDict({"state": arrays, "state.tree": tree, "meta": _meta(context)}), reply_to=msg)

    @app.train("load")
    def load(msg: Message, context: Context) -> Message:
        from mona_sfl.runtime.flower.codec import records_to_tree

        n = node(msg, context, fresh=True)  # whatever the node held before is replaced
        n.load_state_dict(records_to_tree(msg.content.array_records["state"], msg.content.config_records["state.tree"]))
        n.save(context.state)
        return Message(RecordDict({"meta": _meta(context)}), reply_to=msg)

    return app


# The ClientApp that `flwr run` and `flower-supernode` load ([tool.flwr.app.components]).
app = make_client_app()

__all__ = ["app", "make_client_app"]
