"""List the `Const` nodes of a SavedModel's graphs (`saved_model.pb`), decoded by hand: no TensorFlow, no protobuf.

Preprocessing in a hub module (`x*255`, `-mean`, `/std`) is graph ops with constant inputs, not variables, so
this is how effnet reads it. Walks `meta_graphs[0].graph_def`: its nodes, then every function of its library.
Message layouts: tensorflow/core/protobuf/saved_model.proto, meta_graph.proto, framework/graph.proto,
function.proto, node_def.proto, attr_value.proto, tensor.proto.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointFormatError
from .tf_bundle import _DTYPES, _as_bytes, _as_int, _as_text, _fields, _Malformed, _varint

__all__ = ["GraphConstant", "graph_constants"]

# TensorProto's repeated value field per dtype: (field number, byte width when fixed-width; 0 for varints)
_VALUE_FIELDS = {
    "float32": (5, 4), "float64": (6, 8), "int32": (7, 0), "int16": (7, 0), "int8": (7, 0), "uint8": (7, 0),
    "uint16": (7, 0), "int64": (10, 0), "bool": (11, 0), "float16": (13, 0), "bfloat16": (13, 0),
    "uint32": (16, 0), "uint64": (17, 0),
}
_UINT64_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class GraphConstant:
    function: str | None  # the library function holding the node; None for the top-level graph
    name: str  # the node name, e.g. "mul/y"
    dtype: str  # e.g. "float32", "string"
    shape: tuple[int, ...]
    values: np.ndarray | None  # decoded for numeric tensors of at most `max_elements` elements


def _first(fields: list, number: int, default=None):
    return next((value for field, value in fields if field == number), default)


def _repeated_values(fields: list, dtype: str, elements: int) -> np.ndarray:
    """The `*_val` fields, packed or not, as their raw bits in uint64; TF repeats the last to fill the shape."""
    number, width = _VALUE_FIELDS[dtype]
    bits: list[int] = []
    for field, value in fields:
        if field != number:
            continue
        if isinstance(value, int):
            bits.append(value & _UINT64_MASK)
        elif width:
            if len(value) % width:
                raise _Malformed(f"packed {dtype} values of {len(value)} bytes")
            bits.extend(int.from_bytes(value[i:i + width], "little") for i in range(0, len(value), width))
        else:
            pos = 0
            while pos < len(value):  # _varint always advances or raises
                item, pos = _varint(value, pos, len(value))
                bits.append(item & _UINT64_MASK)
        if len(bits) > elements:
            raise _Malformed(f"more than {elements} values for {elements} elements")
    bits += bits[-1:] * (elements - len(bits))
    return np.array(bits or [0] * elements, dtype=np.uint64)


def _tensor(proto: bytes, max_elements: int) -> tuple[str, tuple[int, ...], np.ndarray | None]:
    fields = _fields(proto)
    dtype_number = _as_int(_first(fields, 1, 0), "dtype")
    dtype, storage = _DTYPES.get(dtype_number, (f"dtype_{dtype_number}", None))
    shape = tuple(_as_int(_first(_fields(_as_bytes(dim, "dim")), 1, 0), "dim size", signed=True)
                  for number, dim in _fields(_as_bytes(_first(fields, 2, b""), "shape")) if number == 2)
    if any(dim < 0 for dim in shape) or len(shape) > 254:
        raise _Malformed(f"invalid shape {list(shape)}")
    elements = math.prod(shape)  # a Python int: no overflow, nothing allocated
    if dtype not in _VALUE_FIELDS or elements > max_elements:
        return dtype, shape, None
    content = _as_bytes(_first(fields, 4, b""), "tensor_content")
    if content:  # raw little-endian bytes, as in a bundle
        if len(content) != elements * np.dtype(storage).itemsize:
            raise _Malformed(f"tensor_content of {len(content)} bytes for {elements} {dtype}")
        values = np.frombuffer(content, storage)
        bits16 = values if dtype == "bfloat16" else None
    else:
        bits = _repeated_values(fields, dtype, elements)
        bits16 = bits.astype(np.uint16) if dtype in ("float16", "bfloat16") else None  # half_val: 16-bit patterns
        if dtype == "float32":
            values = bits.astype(np.uint32).view(np.float32)
        elif dtype == "float64":
            values = bits.view(np.float64)
        elif dtype == "float16":
            values = bits16.view(np.float16)
        else:
            values = bits.view(np.int64)
    if dtype == "bfloat16":
        values = (bits16.astype(np.uint32) << 16).view(np.float32)
    elif dtype == "bool":
        values = values != 0
    else:  # varints hold negative ints as 64-bit two's complement: the cast wraps them back
        values = values.astype(np.dtype(storage).newbyteorder("="))
    return dtype, shape, values.reshape(shape)


def _const_node(function: str | None, node: bytes, max_elements: int) -> GraphConstant | None:
    fields = _fields(_as_bytes(node, "node"))
    if _as_text(_first(fields, 2, b""), "op") != "Const":
        return None
    name = _as_text(_first(fields, 1, b""), "node name")
    for number, entry in fields:  # attr: map<string, AttrValue> entries {key=1, value=2}
        entry_fields = _fields(_as_bytes(entry, "attr")) if number == 5 else []
        if entry_fields and _as_text(_first(entry_fields, 1, b""), "attr name") == "value":
            tensor = _first(_fields(_as_bytes(_first(entry_fields, 2, b""), "attr value")), 8)
            if tensor is not None:
                return GraphConstant(function, name, *_tensor(_as_bytes(tensor, "tensor"), max_elements))
    raise _Malformed(f"Const node {name!r} has no value")


def graph_constants(saved_model: str | os.PathLike, *, max_elements: int = 64) -> list[GraphConstant]:
    """Every Const node of the first meta graph: top-level graph first, then each library function's.

    `saved_model` is a SavedModel directory or its `saved_model.pb`. Values are decoded for numeric constants
    of at most `max_elements` elements (bfloat16 as float32); others have `values=None`.
    """
    path = Path(saved_model)
    path = path / "saved_model.pb" if path.is_dir() else path
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointFormatError(f"{path}: cannot read the SavedModel ({error})") from None
    try:
        meta_graph = _first(_fields(data), 2)  # SavedModel.meta_graphs
        if meta_graph is None:
            raise _Malformed("no meta graph")
        graph = _fields(_as_bytes(_first(_fields(_as_bytes(meta_graph, "meta graph")), 2, b""), "graph_def"))
        constants = [_const_node(None, node, max_elements) for number, node in graph if number == 1]
        for number, library in graph:
            for function_number, function in _fields(_as_bytes(library, "library")) if number == 2 else []:
                if function_number != 1:
                    continue
                function_fields = _fields(_as_bytes(function, "function"))
                signature = _fields(_as_bytes(_first(function_fields, 1, b""), "signature"))
                function_name = _as_text(_first(signature, 1, b""), "function name")
                constants += [_const_node(function_name, node, max_elements)
                              for node_number, node in function_fields if node_number == 3]
    except _Malformed as error:
        raise CheckpointFormatError(f"{path}: {error}") from None
    return [constant for constant in constants if constant is not None]


# Constant patterns of each family's in-graph preprocessing (on 0-255 or on [0, 1] pixels) -> tf_compat name.
_NORMALIZATION_SIGNS = {
    "imagenet_mean_std": [(123.675, 116.28, 103.53), (0.485, 0.456, 0.406)],  # tpu / Model Garden MEAN_RGB
    "lite_127_128": [(127.0, 127.0, 127.0), (127.0,)],  # tpu lite MEAN_RGB = 127 (then / 128)
    "minus_one_to_one_128": [(128.0, 128.0, 128.0), (128.0,)],  # automl (x - 128) / 128
}


def recognize_normalization(saved_model: str | os.PathLike) -> str | None:
    """Which family normalization a module's graph applies, judged by its constants; None if none is recognized.

    Checked in table order: mean/std first (its graphs may also hold a 128 elsewhere), then Lite's 127, then 128.
    """
    constants = [c.values.ravel() for c in graph_constants(saved_model)
                 if c.values is not None and c.values.dtype.kind == "f" and 1 <= c.values.size <= 3]
    for name, signs in _NORMALIZATION_SIGNS.items():
        for sign in signs:
            if any(v.size == len(sign) and np.allclose(v, sign, rtol=1e-4) for v in constants):
                return name
    return None
