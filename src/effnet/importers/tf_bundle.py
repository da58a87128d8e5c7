"""Read TensorFlow checkpoints (the "tensor bundle" format) with numpy alone: no TensorFlow, no protobuf.

A bundle is `<prefix>.index`, a LevelDB-style table that maps each checkpoint key to a BundleEntryProto (dtype,
shape, shard, offset, size, masked CRC32C), plus the raw tensor bytes in `<prefix>.data-0000K-of-0000N`.
A SavedModel keeps one at `<dir>/variables/variables`. The layout followed here is leveldb's
`doc/table_format.md` (footer, blocks, prefix-compressed keys) and TensorFlow's
`core/util/tensor_bundle/tensor_bundle.cc` (header entry, entries, string tensors, CRCs); the code is our own.

Every length, offset and shape is checked against the file sizes before anything is read or allocated, so a
corrupt or hostile file raises `CheckpointFormatError` naming the file (and the tensor), never anything else.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from ..errors import CheckpointFormatError

__all__ = ["read_bundle", "read_variables", "list_bundle", "list_variables", "resolve_prefix", "OBJECT_GRAPH_KEY"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"  # TF2 object-based checkpoints keep their object graph here
_FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_SIZE = 5  # compression-type byte + masked CRC32C
_CRC_MASK_DELTA = 0xA282EAD8
_MAX_SHARDS = 99999  # data file names print the shard count with %05d
_MAX_RANK = 254  # TensorShape's limit
_FORMAT_VERSION = 1  # kTensorBundleVersion: a bundle whose min_consumer exceeds it is newer than this reader

# DataType enum value -> (name, numpy dtype of the stored little-endian bytes; None = not a plain array)
_DTYPES: dict[int, tuple[str, str | None]] = {
    1: ("float32", "<f4"), 2: ("float64", "<f8"), 3: ("int32", "<i4"), 4: ("uint8", "|u1"), 5: ("int16", "<i2"),
    6: ("int8", "|i1"), 7: ("string", None), 8: ("complex64", "<c8"), 9: ("int64", "<i8"), 10: ("bool", "|b1"),
    14: ("bfloat16", "<u2"), 17: ("uint16", "<u2"), 18: ("complex128", "<c16"), 19: ("float16", "<f2"),
    20: ("resource", None), 21: ("variant", None), 22: ("uint32", "<u4"), 23: ("uint64", "<u8"),
}


class _Malformed(Exception):
    """What is wrong with some bytes; the caller adds which file (and tensor) they came from."""


# --- protobuf / varint decoding -------------------------------------------------------------------------------

def _varint(buf, pos: int, end: int, max_bytes: int = 10) -> tuple[int, int]:
    value = 0
    for index in range(max_bytes):
        if pos >= end:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return value, pos
    raise _Malformed(f"varint longer than {max_bytes} bytes")


def _fields(buf) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, value): ints for varint/fixed fields, bytes otherwise."""
    fields, pos, end = [], 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed("protobuf field number 0")
        if wire_type == 0:
            value, pos = _varint(buf, pos, end)
        elif wire_type in (1, 2, 5):  # fixed64, length-delimited, fixed32
            width, pos = _varint(buf, pos, end) if wire_type == 2 else (8 if wire_type == 1 else 4, pos)
            if width > end - pos:
                raise _Malformed("protobuf field runs past the end of its message")
            value = bytes(buf[pos:pos + width])
            value = value if wire_type == 2 else int.from_bytes(value, "little")
            pos += width
        else:
            raise _Malformed(f"unsupported protobuf wire type {wire_type}")
        fields.append((number, value))
    return fields


def _as_int(value, what: str, signed: bool = False) -> int:
    if not isinstance(value, int):
        raise _Malformed(f"{what} is not an integer field")
    value &= (1 << 64) - 1
    return value - (1 << 64) if signed and value >= 1 << 63 else value


def _as_bytes(value, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise _Malformed(f"{what} is not a length-delimited field")
    return value


def _as_text(value, what: str) -> str:
    try:
        return _as_bytes(value, what).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{what} is not UTF-8") from None


def _unmask(masked: int) -> int:
    rotated = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


# --- the LevelDB table in <prefix>.index ----------------------------------------------------------------------

def _read_block(table: bytes, offset: int, size: int, end: int, verify: bool) -> bytes:
    if offset + size + _BLOCK_TRAILER_SIZE > end:
        raise _Malformed(f"block at offset {offset} (size {size}) runs past the end of the table ({end} bytes)")
    stored = table[offset:offset + size + 1]  # contents + compression type, as the CRC covers them
    if verify and _unmask(int.from_bytes(table[offset + size + 1:offset + size + 5], "little")) != \
            google_crc32c.value(stored):
        raise _Malformed(f"CRC mismatch in the block at offset {offset}")
    if stored[-1] == 1:  # TF has written bundle tables uncompressed since 1.2
        raise _Malformed(f"block at offset {offset} is Snappy-compressed, which this reader does not support")
    if stored[-1] != 0:
        raise _Malformed(f"block at offset {offset} has unknown compression type {stored[-1]}")
    return stored[:-1]


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise _Malformed("block shorter than its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    if num_restarts > (len(block) - 4) // 4:
        raise _Malformed(f"block claims {num_restarts} restart points, more than fit in it")
    entries_end = len(block) - 4 - 4 * num_restarts
    entries, pos, key = [], 0, b""
    while pos < entries_end:  # every entry consumes at least 3 bytes, so this always ends
        shared, pos = _varint(block, pos, entries_end, 5)
        unshared, pos = _varint(block, pos, entries_end, 5)
        value_len, pos = _varint(block, pos, entries_end, 5)
        if shared > len(key) or unshared + value_len > entries_end - pos:
            raise _Malformed("block entry overruns its key or its block")
        key = key[:shared] + block[pos:pos + unshared]
        entries.append((key, block[pos + unshared:pos + unshared + value_len]))
        pos += unshared + value_len
    return entries


def _table_records(table: bytes, verify: bool) -> list[tuple[bytes, bytes]]:
    if len(table) < _FOOTER_SIZE:
        raise _Malformed(f"{len(table)} bytes is too short for a table footer")
    footer = table[-_FOOTER_SIZE:]
    if int.from_bytes(footer[40:], "little") != _TABLE_MAGIC:
        raise _Malformed("bad magic number: not a TensorFlow checkpoint index")
    pos = _varint(footer, _varint(footer, 0, 40)[1], 40)[1]  # skip the metaindex handle: TF leaves it empty
    index_offset, pos = _varint(footer, pos, 40)
    index_size, _ = _varint(footer, pos, 40)
    blocks_end = len(table) - _FOOTER_SIZE
    records: list[tuple[bytes, bytes]] = []
    next_block = 0
    for _separator, handle in _block_entries(_read_block(table, index_offset, index_size, blocks_end, verify)):
        offset, pos = _varint(handle, 0, len(handle))
        size, _ = _varint(handle, pos, len(handle))
        if offset < next_block:  # TF writes blocks in order; insisting on it keeps the work linear
            raise _Malformed(f"data block at offset {offset} overlaps or precedes the previous one")
        next_block = offset + size + _BLOCK_TRAILER_SIZE
        for key, value in _block_entries(_read_block(table, offset, size, blocks_end, verify)):
            if records and key <= records[-1][0]:
                raise _Malformed(f"keys out of order at {key!r}")
            records.append((key, value))
    return records


# --- bundle header and entries --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool

    @property
    def dtype_name(self) -> str:
        return _DTYPES.get(self.dtype, (f"dtype_{self.dtype}",))[0]


def _parse_entry(value: bytes) -> _Entry:
    dtype, shape, shard, offset, size, crc, sliced = 0, [], 0, 0, 0, None, False
    for number, field in _fields(value):
        if number == 1:
            dtype = _as_int(field, "dtype")
        elif number == 2:
            shape = []
            for dim_number, dim in _fields(_as_bytes(field, "shape")):
                if dim_number == 3 and _as_int(dim, "unknown_rank"):
                    raise _Malformed("shape of unknown rank")
                if dim_number == 2:
                    sizes = [_as_int(v, "dim size", signed=True) for n, v in _fields(_as_bytes(dim, "dim")) if n == 1]
                    shape.append(sizes[-1] if sizes else 0)
                    if shape[-1] < 0 or len(shape) > _MAX_RANK:
                        raise _Malformed(f"invalid shape {shape}")
        elif number == 3:
            shard = _as_int(field, "shard_id", signed=True)
        elif number == 4:
            offset = _as_int(field, "offset", signed=True)
        elif number == 5:
            size = _as_int(field, "size", signed=True)
        elif number == 6:
            crc = _as_int(field, "crc32c")
        elif number == 7:
            sliced = True
    return _Entry(dtype, tuple(shape), shard, offset, size, crc, sliced)


def resolve_prefix(path: str | os.PathLike) -> Path:
    """A checkpoint prefix from a prefix, its `.index` file, a SavedModel directory or its `variables` folder."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "variables" / "variables", path / "variables"):
            if Path(f"{candidate}.index").is_file():
                return candidate
        raise CheckpointFormatError(f"{path}: a directory without variables/variables.index: not a SavedModel")
    if path.suffix == ".index" and path.is_file():
        return path.with_suffix("")
    return path


class _Bundle:
    """An opened bundle: header and entries parsed and checked against the files; tensors read on demand."""

    def __init__(self, prefix: str | os.PathLike, verify: bool):
        self.prefix, self.verify = resolve_prefix(prefix), verify
        self.index_path = Path(f"{self.prefix}.index")
        try:
            table = self.index_path.read_bytes()
        except OSError as error:
            raise CheckpointFormatError(f"{self.index_path}: cannot read the checkpoint index ({error})") from None
        key = None
        try:
            records = _table_records(table, verify)
            if not records or records[0][0] != b"":
                raise _Malformed("no bundle header entry")
            self._parse_header(records[0][1])
            self.entries: dict[str, _Entry] = {}
            for raw_key, value in records[1:]:
                key = raw_key.decode("utf-8", "backslashreplace")
                if key in self.entries:  # two raw keys that decode alike
                    raise _Malformed("duplicate key")
                self.entries[key] = entry = _parse_entry(value)
                self._check_entry(entry)
        except _Malformed as error:
            where = f" (entry {key!r})" if key is not None else ""
            raise CheckpointFormatError(f"{self.index_path}{where}: {error}") from None

    def _parse_header(self, value: bytes) -> None:
        self.num_shards, self.big_endian = 0, False
        for number, field in _fields(value):
            if number == 1:
                self.num_shards = _as_int(field, "num_shards", signed=True)
            elif number == 2:
                endianness = _as_int(field, "endianness")
                if endianness > 1:
                    raise _Malformed(f"unknown endianness {endianness}")
                self.big_endian = endianness == 1
            elif number == 3:
                for version_number, version in _fields(_as_bytes(field, "version")):
                    if version_number == 2 and _as_int(version, "min_consumer", signed=True) > _FORMAT_VERSION:
                        raise _Malformed("bundle written in a newer format version than this reader knows")
        if not 1 <= self.num_shards <= _MAX_SHARDS:
            raise _Malformed(f"header claims {self.num_shards} data shards")
        self.shard_sizes: dict[int, int] = {}

    def shard_path(self, shard: int) -> Path:
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    def _check_entry(self, entry: _Entry) -> None:
        if entry.sliced:  # checked, and refused, when the tensor is read
            return
        if not 0 <= entry.shard < self.num_shards or entry.offset < 0 or entry.size < 0:
            raise _Malformed(f"shard {entry.shard}, offset {entry.offset}, size {entry.size} out of range")
        elements = math.prod(entry.shape)  # Python ints: a hostile shape cannot overflow, and nothing is allocated
        storage = _DTYPES.get(entry.dtype, ("", None))[1]
        if storage is not None and elements * np.dtype(storage).itemsize != entry.size:
            raise _Malformed(f"shape {list(entry.shape)} of {entry.dtype_name} does not match size {entry.size}")
        if entry.dtype == 7 and elements > entry.size:  # each string needs at least its 1-byte length
            raise _Malformed(f"{elements} strings cannot fit in {entry.size} bytes")
        if entry.shard not in self.shard_sizes:
            try:
                self.shard_sizes[entry.shard] = self.shard_path(entry.shard).stat().st_size
            except OSError:
                raise _Malformed(f"data file {self.shard_path(entry.shard).name} is missing") from None
        if entry.offset + entry.size > self.shard_sizes[entry.shard]:
            raise _Malformed(f"tensor bytes [{entry.offset}, {entry.offset + entry.size}) run past the end of "
                             f"{self.shard_path(entry.shard).name} ({self.shard_sizes[entry.shard]} bytes)")

    def read(self, key: str) -> np.ndarray:
        entry, path = self.entries[key], None
        try:
            if entry.sliced:
                raise _Malformed("a sliced (partitioned) variable, which this reader does not support")
            name, storage = _DTYPES.get(entry.dtype, (entry.dtype_name, None))
            if storage is None and entry.dtype != 7:
                raise _Malformed(f"unsupported dtype {name}")
            path = self.shard_path(entry.shard)
            with open(path, "rb") as file:
                file.seek(entry.offset)
                raw = np.fromfile(file, dtype=np.uint8, count=entry.size)
            if raw.size != entry.size:
                raise _Malformed("data file shorter than the index says")
            raw.flags.writeable = False  # google_crc32c takes read-only buffers only
            if self.verify and entry.dtype != 7 and _unmask(entry.crc32c or 0) != google_crc32c.value(raw):
                raise _Malformed("CRC32C mismatch: the tensor's bytes are corrupt")
            if entry.dtype == 7:
                return self._strings(raw.tobytes(), entry)
            raw.flags.writeable = True
            array = raw.view(np.dtype(storage).newbyteorder(">") if self.big_endian else storage)
            array = array.astype(array.dtype.newbyteorder("="), copy=False).reshape(entry.shape)
            if name == "bfloat16":  # the upper half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            elif name == "bool":  # any nonzero byte is True; numpy bools must be 0 or 1
                array = array.view(np.uint8) != 0
            return array
        except _Malformed as error:
            raise CheckpointFormatError(f"{path or self.index_path}: tensor {key!r}: {error}") from None
        except OSError as error:
            raise CheckpointFormatError(f"{path}: tensor {key!r}: cannot read ({error})") from None

    def _strings(self, raw: bytes, entry: _Entry) -> np.ndarray:
        """DT_STRING: a varint64 length per element, a masked CRC of the lengths, then the bytes."""
        lengths, length_bytes, pos = [], [], 0
        for _ in range(math.prod(entry.shape)):  # at most entry.size, checked on opening
            length, pos = _varint(raw, pos, len(raw))
            if length > len(raw):
                raise _Malformed(f"a string length of {length} in a tensor of {len(raw)} bytes")
            lengths.append(length)
            length_bytes.append(length.to_bytes(4 if length < 1 << 32 else 8, "little"))
        if pos + 4 + sum(lengths) != len(raw):
            raise _Malformed("string lengths do not add up to the tensor's size")
        lengths_crc = google_crc32c.value(b"".join(length_bytes))
        if self.verify:
            stored = raw[pos:pos + 4]
            expected = google_crc32c.extend(google_crc32c.extend(lengths_crc, stored), raw[pos + 4:])
            if _unmask(int.from_bytes(stored, "little")) != lengths_crc or _unmask(entry.crc32c or 0) != expected:
                raise _Malformed("CRC32C mismatch: the string tensor is corrupt")
        strings, pos = [], pos + 4
        for length in lengths:
            strings.append(raw[pos:pos + length])
            pos += length
        array = np.empty(len(strings), dtype=object)
        array[:] = strings
        return array.reshape(entry.shape)

    def variable_keys(self) -> dict[str, str]:
        """{variable name: checkpoint key} for the model's variables (see `read_variables`)."""
        if OBJECT_GRAPH_KEY not in self.entries:  # TF1 name-based: the keys are the names
            return {key: key for key, entry in self.entries.items() if _DTYPES.get(entry.dtype, ("", None))[1]}
        graph = self.read(OBJECT_GRAPH_KEY)
        try:
            if graph.shape != () or not isinstance(graph.item(), bytes):
                raise _Malformed("not a scalar string")
            return self._names_from_object_graph(graph.item())
        except _Malformed as error:
            raise CheckpointFormatError(f"{self.index_path}: {OBJECT_GRAPH_KEY}: {error}") from None

    def _names_from_object_graph(self, graph: bytes) -> dict[str, str]:
        children, variables, optimizers = [], [], set()
        for number, node_bytes in _fields(graph):  # TrackableObjectGraph.nodes
            if number != 1:
                continue
            edges, attributes = [], []
            for field, value in _fields(_as_bytes(node_bytes, "node")):
                if field == 1:  # ObjectReference{node_id=1, local_name=2}
                    reference = dict(_fields(_as_bytes(value, "child")))
                    edges.append((_as_int(reference.get(1, 0), "node_id"), _as_text(reference.get(2, b""), "name")))
                elif field == 2:  # SerializedTensor{name=1, full_name=2, checkpoint_key=3}
                    tensor = dict(_fields(_as_bytes(value, "attribute")))
                    attributes.append(tuple(_as_text(tensor.get(n, b""), "attribute") for n in (1, 2, 3)))
                elif field == 3:  # slot_variables: only optimizers have them
                    optimizers.add(len(children))
            children.append(edges)
            variables.append(attributes)
        if not children:
            return {}
        # Walk from the root without entering optimizers or the save counter, which drops slots and optimizer
        # state even when, as with Keras 3, the optimizer also holds references to the model's variables.
        skipped = optimizers | {child for child, name in children[0]
                                if name in ("optimizer", "save_counter")}
        seen, queue, names = {0}, deque([0]), {}
        while queue:
            node = queue.popleft()
            for name, full_name, key in variables[node]:
                if name != "VARIABLE_VALUE" or "/.OPTIMIZER_SLOT/" in key:
                    continue
                if key not in self.entries:
                    raise _Malformed(f"names key {key!r}, which the index lacks")
                variable = full_name or key
                if names.setdefault(variable, key) != key:
                    raise _Malformed(f"two variables are named {variable!r} ({names[variable]!r} and {key!r})")
            for child, _name in children[node]:
                if child >= len(children):
                    raise _Malformed(f"edge to node {child} of {len(children)}")
                if child not in seen and child not in skipped:
                    seen.add(child)
                    queue.append(child)
        return names


def read_bundle(prefix: str | os.PathLike, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint, keyed by checkpoint key (strings as object arrays of bytes).

    `prefix` is the path without `.index`, or a SavedModel directory. `verify` checks the CRC32C of every table
    block and tensor. bfloat16 comes back as float32.
    """
    bundle = _Bundle(prefix, verify)
    return {key: bundle.read(key) for key in bundle.entries}


def read_variables(prefix: str | os.PathLike, *, verify: bool = True) -> dict[str, np.ndarray]:
    """The model's variables keyed by their TensorFlow names.

    TF2 object-based checkpoints: the name the object graph records for each variable (`full_name`: the
    tf.Variable's name without `:0`, which is Keras 3's `variable.path`), e.g. `stem_conv/kernel` for the key
    `model/_operations/1/_kernel/.ATTRIBUTES/VARIABLE_VALUE`. The save counter, optimizer state (slots, and what
    hangs under the root's `optimizer`) and the object graph are left out; two variables with one name raise.
    TF1 name-based checkpoints: the keys as they are (string tensors left out).
    """
    from .bounds import ShapeCheck

    bundle = _Bundle(prefix, verify)
    keys = bundle.variable_keys()
    shapes = ShapeCheck(str(bundle.index_path))
    for name, key in keys.items():  # every declared shape against the architecture bounds, before any data
        entry = bundle.entries[key]
        shapes.check(name, entry.shape, np.dtype(_DTYPES.get(entry.dtype, ("", np.uint8))[1] or np.uint8).itemsize)
    return {name: bundle.read(key) for name, key in keys.items()}


def list_bundle(prefix: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{checkpoint key: (dtype name, shape)} of every entry, from the index alone."""
    return {key: (entry.dtype_name, entry.shape) for key, entry in _Bundle(prefix, True).entries.items()}


def list_variables(prefix: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype name, shape)} of the variables `read_variables` returns, without reading their data."""
    bundle = _Bundle(prefix, True)
    return {name: (bundle.entries[key].dtype_name, bundle.entries[key].shape)
            for name, key in bundle.variable_keys().items()}
