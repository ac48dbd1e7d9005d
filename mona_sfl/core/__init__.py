"""The algorithm: MoCo pieces, the client front, the client host, the server, the schedule, the sync.

This package face holds the algorithm's vocabulary and imports nothing heavy; the config
validates against it without importing torch.
"""

from __future__ import annotations

from mona_sfl.registry import Choices, Registry

#: ``algo.symmetric``: ``client`` ([x1; x2] / [x2; x1] doubling on the client, reference default),
#: ``original`` (MocoSFL's two-term loss), ``none``.
SYMMETRIC = Choices("algo.symmetric", ("client", "original", "none"))
#: ``fed.aggregation``: how the sampled clients' fronts are merged at a sync; each target is a
#: function of the config's ``fed`` section returning the aggregate (``mona_sfl.core.merge``).
AGGREGATIONS = Registry(
    "fed.aggregation",
    {"fedavg": "mona_sfl.core.merge:fedavg_aggregation", "axis": "mona_sfl.core.merge:axis_aggregation"},
)

#: ``train.precision``: the training forwards in float32 (``fp32``), or under bfloat16 autocast
#: with float32 weights, optimizer state and cut tensors (``bf16``, :mod:`mona_sfl.core.precision`).
PRECISIONS = Choices("train.precision", ("fp32", "bf16"))

__all__ = ["AGGREGATIONS", "PRECISIONS", "SYMMETRIC"]
