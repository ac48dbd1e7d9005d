"""Tensors, state dicts and nested states <-> Flower records, without pickle.

Every tensor travels as a :class:`flwr.app.Array` (``np.save(..., allow_pickle=False)``
bytes); the structure around the tensors (optimizer param groups, stream positions, ints,
floats, ``None``) travels as JSON text in a :class:`flwr.app.ConfigRecord`. Decoding never
executes code. Round trips are exact: same dtype, shape and bits (``bfloat16``, which numpy
lacks, travels as its raw 16-bit pattern and is tagged in ``Array.dtype``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from mona_sfl.core.client import Activations
from mona_sfl.core.server import ActivationSpec

StateDict = dict[str, torch.Tensor]

_BF16 = "torch.bfloat16"  # Array.dtype tag for bfloat16 tensors (data holds their int16 bits)
_TREE = "tree"  # ConfigRecord key of the JSON skeleton


def _c_order(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d array into a 1-d one
    return a if a.flags.c_contiguous else a.copy(order="C")


def tensor_to_array(t: torch.Tensor) -> Array:
    """One tensor as an Array (always a copy: detach, cpu, numpy, npy bytes)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        a = Array(t.contiguous().view(torch.int16).numpy())
        return Array(dtype=_BF16, shape=a.shape, stype=a.stype, data=a.data)
    return Array(_c_order(t.numpy()))


def array_to_tensor(a: Array) -> torch.Tensor:
    """The tensor an Array was made from (a fresh, writable CPU tensor)."""
    arr = a.numpy()
    if a.dtype == _BF16:
        return torch.from_numpy(_c_order(arr).copy()).view(torch.bfloat16)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def state_dict_to_record(sd: Mapping[str, torch.Tensor]) -> ArrayRecord:
    rec = ArrayRecord()
    for k, v in sd.items():
        rec[k] = tensor_to_array(v)
    return rec


def record_to_state_dict(rec: ArrayRecord) -> StateDict:
    return {k: array_to_tensor(a) for k, a in rec.items()}


def record_bytes(rec: ArrayRecord) -> int:
    """Serialised payload bytes of an ArrayRecord: the npy bytes of its arrays (128 B header each)."""
    return sum(len(a.data) for a in rec.values())


# ----------------------------------------------------------------------------- nested trees
def tree_to_records(obj: Any) -> tuple[ArrayRecord, ConfigRecord]:
    """Any nest of dicts, lists, tuples, tensors, numpy arrays and JSON scalars.

    Tensors go to the ArrayRecord (keys ``"0"``, ``"1"``, ...); the skeleton, with
    ``{"$t": key}`` in their place, goes to ``ConfigRecord({"tree": json})``. Dicts whose keys
    are not all strings (optimizer states use int keys) become ``{"$d": [[k, v], ...]}``, and
    tuples ``{"$tuple": [...]}``, so the structure comes back unchanged.
    """
    arrays = ArrayRecord()

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(arrays))
            arrays[key] = tensor_to_array(x)
            return {"$t": key}
        if isinstance(x, np.ndarray):
            key = str(len(arrays))
            arrays[key] = Array(_c_order(x))
            return {"$n": key}
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: enc(v) for k, v in x.items()}
            for k in x:
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise TypeError(f"cannot encode a dict key of type {type(k).__name__}")
            return {"$d": [[k, enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"$tuple": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        raise TypeError(f"cannot encode a value of type {type(x).__name__}")

    skeleton = enc(obj)
    return arrays, ConfigRecord({_TREE: json.dumps(skeleton, allow_nan=True)})


def records_to_tree(arrays: ArrayRecord, config: ConfigRecord) -> Any:
    """Inverse of :func:`tree_to_records`."""

    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            if len(x) == 1:
                (k, v), = x.items()
                if k == "$t":
                    return array_to_tensor(arrays[v])
                if k == "$n":
                    return arrays[v].numpy()
                if k == "$d":
                    return {kk: dec(vv) for kk, vv in v}
                if k == "$tuple":
                    return tuple(dec(vv) for vv in v)
            return {k: dec(v) for k, v in x.items()}
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(json.loads(str(config[_TREE])))


def tree_bytes(arrays: ArrayRecord, config: ConfigRecord) -> int:
    return record_bytes(arrays) + len(str(config[_TREE]).encode())


# ----------------------------------------------------------------------------- client activations
#: Room for the npy header in front of an activation's bytes (ours are 128 B).
NPY_HEADER_MAX = 4096
_FLOATS = ("float16", "float32", "float64")


def decode_activation(a: object, name: str, spec: ActivationSpec) -> tuple[torch.Tensor | None, str | None]:
    """One activation Array from a client, checked before and after decoding: (tensor, None) or (None, why).

    Before decoding: it is an Array of serialisation type numpy, its declared dtype and shape are
    the spec's (rows, C, H, W) with 1..max_rows rows, and its bytes are within the bound the
    shape implies (plus an npy header). After: the npy content has the declared dtype and shape.
    """
    if not isinstance(a, Array):
        return None, f"{name} is missing from the reply" if a is None else f"{name} is a {type(a).__name__}, not an Array"
    if a.stype != "numpy.ndarray":
        return None, f"{name} has serialisation type {a.stype!r}, expected 'numpy.ndarray'"
    want = str(spec.dtype).removeprefix("torch.") if spec.dtype is not None else None
    if (want is not None and a.dtype != want) or (want is None and a.dtype not in _FLOATS):
        return None, f"{name} declares dtype {a.dtype!r}, expected {want or ' or '.join(_FLOATS)!r}"
    try:
        shape = tuple(int(d) for d in a.shape)
    except (TypeError, ValueError):
        return None, f"{name} declares a malformed shape {a.shape!r}"
    if len(shape) != 4 or min(shape) < 1 or (spec.shape is not None and shape[1:] != tuple(spec.shape)):
        expect = f"(rows, {', '.join(str(d) for d in spec.shape)})" if spec.shape is not None else "(rows, C, H, W)"
        return None, f"{name} declares shape {shape}, expected {expect}"
    if spec.max_rows is not None and shape[0] > spec.max_rows:
        return None, f"{name} declares {shape[0]} rows, more than the {spec.max_rows} a client sends"
    bound = spec.max_bytes(np.dtype(a.dtype).itemsize)
    size = len(a.data) if isinstance(a.data, (bytes, bytearray, memoryview)) else -1
    if size < 0:
        return None, f"{name} carries no byte payload"
    if bound is not None and size > bound + NPY_HEADER_MAX:
        return None, f"oversized payload: {name} has {size} bytes, more than the {bound + NPY_HEADER_MAX} bytes its shape allows"
    try:
        arr = a.numpy()
    except Exception as e:  # np.load raises many types for malformed npy bytes
        return None, f"{name} cannot be decoded as npy ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(a.dtype) or tuple(arr.shape) != shape:
        got = f"{getattr(arr, 'dtype', type(arr).__name__)} {tuple(getattr(arr, 'shape', ()))}"
        return None, f"{name} decodes to {got}, not the declared {a.dtype} {shape}"
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr), None


def decode_activations(act: ArrayRecord, ids: list[int], spec: ActivationSpec) -> tuple[dict[int, Activations], dict[int, str]]:
    """The activations of clients ``ids`` from a ``train.step`` reply (``"<cid>.q"``, ``"<cid>.k"``).

    Returns (accepted by client id, refused: client id -> why). A malformed entry never raises;
    finiteness and cross-client checks are the server's (:meth:`mona_sfl.core.server.Server.validate`).
    """
    good: dict[int, Activations] = {}
    bad: dict[int, str] = {}
    for cid in ids:
        tensors = []
        for part in ("q", "k"):
            key = f"{cid}.{part}"
            t, why = decode_activation(act.get(key) if hasattr(act, "get") else None, key, spec)
            if why is not None:
                bad[cid] = why
                break
            tensors.append(t)
        if cid not in bad:
            good[cid] = Activations(cid, tensors[0], tensors[1])
    return good, bad


__all__ = [
    "tensor_to_array",
    "array_to_tensor",
    "state_dict_to_record",
    "record_to_state_dict",
    "record_bytes",
    "tree_to_records",
    "records_to_tree",
    "tree_bytes",
    "decode_activation",
    "decode_activations",
]
