"""Sink stage: engine outputs -> rows, one per input, written so that a crash loses nothing already computed.

Rows have the columns `path, width, height, <result>, error, size_bytes, mtime_ns`:
- `width`, `height`: the original image's, after EXIF orientation; null when it could not be decoded;
- `<result>` is `embedding` (fixed-size list of float32 or float16) for `effnet embed`, or `labels`, `indices`,
  `scores` (fixed-size lists of k: class names, logit indices and softmax probabilities, best first) for
  `effnet classify`; null on failure;
- `error`: null on success, else why the input failed ("file not found", "truncated image data ...");
- `size_bytes`, `mtime_ns`: the file as it was read; with `path` they are the resume key.

`ParquetSink` writes OUT through a folder `OUT.parts/`: every `shard_rows` rows, or when a time limit has passed
since the last shard, the buffer becomes one Parquet file. The time limit starts at `FIRST_SHARD_SECONDS` and
doubles with each shard up to `shard_seconds`, so a job killed early keeps its first seconds of work while a long
job still writes few, large shards (one small shard costs milliseconds). Each shard is written to a temporary
name and renamed (atomic on POSIX), so an interrupted run leaves only whole shards. On the next run with the
same OUT, the rows in OUT (if a previous run finished) and in OUT.parts/ are "done" and skipped; `finish` merges
them in input order into OUT (again temp + rename) and removes OUT.parts/. A run with no inputs writes nothing.
OUT's folder must be writable before the job starts, and OUT must end in .parquet or .npy. The merge streams row group by row group, so it never holds the whole output in memory.
Each file records the run's settings in its Parquet metadata (key b"effnet"); resuming with other settings is
refused rather than mixing two models' vectors in one file.

`-o OUT.npy` writes the matrix (N, dim) to OUT.npy, NaN rows for failures, and the other columns to the
sidecar OUT.parquet (row i describes row i of the matrix).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import EffnetError
from .batch import Batch
from .sources import Item

METADATA_KEY = b"effnet"
OUTPUT_SUFFIXES = (".parquet", ".npy")
FIRST_SHARD_SECONDS = 4.0
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
Key = tuple[str, "int | None", "int | None"]


# --- What a row holds ---------------------------------------------------------------------------------------


class EmbeddingColumns:
    """`embed`: one fixed-size list column `embedding` of `dim` floats."""

    def __init__(self, dim: int, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        self.dim, self.dtype = dim, dtype
        self.numpy_dtype, arrow_type = DTYPES[dtype]
        self.fields = [pa.field("embedding", pa.list_(arrow_type, dim))]

    def __call__(self, outputs: np.ndarray, valid: np.ndarray) -> list[pa.Array]:
        """outputs: (n, dim) for all n rows (junk where not `valid`); valid: (n,) bool."""
        values = pa.array(np.ascontiguousarray(outputs, dtype=self.numpy_dtype).reshape(-1))
        return [pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~valid))]


class TopKColumns:
    """`classify`: the k best classes per row as `labels`, `indices` and `scores` (softmax probabilities)."""

    def __init__(self, k: int, num_classes: int, labels: Sequence[str] | None = None):
        if num_classes < 1:
            raise EffnetError("this model has no classifier (0 classes): use `effnet embed` for feature vectors")
        self.k = max(1, min(k, num_classes))
        self.labels = np.asarray(labels, dtype=object) if labels is not None else None
        if self.labels is not None and len(self.labels) != num_classes:
            raise EffnetError(f"the model has {num_classes} classes but {len(self.labels)} labels")
        self.fields = [
            pa.field("labels", pa.list_(pa.string(), self.k)),
            pa.field("indices", pa.list_(pa.int32(), self.k)),
            pa.field("scores", pa.list_(pa.float32(), self.k)),
        ]

    def __call__(self, outputs: np.ndarray, valid: np.ndarray) -> list[pa.Array]:
        logits = outputs.astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)  # stable softmax
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        best = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.k]  # (n, k), best first
        scores = np.take_along_axis(probabilities, best, axis=1).astype(np.float32)
        mask = pa.array(~valid)
        names = self.labels[best].reshape(-1) if self.labels is not None else np.full(best.size, None, object)
        return [
            pa.FixedSizeListArray.from_arrays(pa.array(names, pa.string()), self.k, mask=mask),
            pa.FixedSizeListArray.from_arrays(pa.array(best.reshape(-1).astype(np.int32)), self.k, mask=mask),
            pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), self.k, mask=mask),
        ]


def schema(columns, settings: dict) -> pa.Schema:
    fields = [pa.field("path", pa.string()), pa.field("width", pa.int32()), pa.field("height", pa.int32())]
    fields += columns.fields
    fields += [pa.field("error", pa.string()), pa.field("size_bytes", pa.int64()), pa.field("mtime_ns", pa.int64())]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(settings, sort_keys=True).encode()})


def batch_table(batch: Batch, outputs: np.ndarray | None, columns, table_schema: pa.Schema) -> pa.Table:
    """The rows of one batch, in the batch's order; `outputs` has one row per good image (`batch.good`)."""
    n = len(batch.items)
    valid = np.zeros(n, dtype=bool)
    valid[batch.good] = True
    width = len(outputs[0]) if outputs is not None and len(outputs) else 1
    full = np.zeros((n, width), dtype=np.float32)
    if outputs is not None and len(batch.good):
        full[batch.good] = outputs
    if not valid.any():  # nothing decoded: the result columns are all null
        result = [pa.nulls(n, field.type) for field in columns.fields]
    else:
        result = columns(full, valid)
    arrays = [
        pa.array([item.path for item in batch.items], pa.string()),
        pa.array([d.width for d in batch.decoded], pa.int32()),
        pa.array([d.height for d in batch.decoded], pa.int32()),
        *result,
        pa.array([d.error for d in batch.decoded], pa.string()),
        pa.array([item.size for item in batch.items], pa.int64()),
        pa.array([item.mtime_ns for item in batch.items], pa.int64()),
    ]
    return pa.Table.from_arrays(arrays, schema=table_schema)


def keys_of(table: pa.Table) -> list[Key]:
    return list(zip(*(table.column(name).to_pylist() for name in ("path", "size_bytes", "mtime_ns"))))


@dataclass
class Summary:
    """What the finished output holds."""

    rows: int
    failed: int
    errors: dict[str, int]  # error message -> count, most common first


# --- In memory (the library verbs) --------------------------------------------------------------------------


class MemorySink:
    """Collects rows in memory; `finish(items)` returns them as one Arrow table in input order."""

    def __init__(self, columns, settings: dict):
        self.columns, self.schema = columns, schema(columns, settings)
        self.tables: list[pa.Table] = []

    def done(self) -> set[Key]:
        return set()

    def __call__(self, batch: Batch, outputs: np.ndarray | None) -> None:
        self.tables.append(batch_table(batch, outputs, self.columns, self.schema))

    def flush(self) -> None:
        pass

    def finish(self, items: list[Item]) -> tuple[pa.Table, Summary]:
        table = pa.concat_tables(self.tables) if self.tables else self.schema.empty_table()
        position = {key: row for row, key in enumerate(keys_of(table))}
        table = table.take(pa.array([position[item.key] for item in items], pa.int64()))
        return table, summarize(table.column("error").to_pylist())


def summarize(errors: list[str | None]) -> Summary:
    counts: dict[str, int] = {}
    for message in errors:
        if message is not None:
            counts[message] = counts.get(message, 0) + 1
    ordered = dict(sorted(counts.items(), key=lambda pair: -pair[1]))
    return Summary(len(errors), sum(counts.values()), ordered)


# --- On disk, resumable ------------------------------------------------------------------------------------


class ParquetSink:
    """Writes OUT (.parquet, or .npy + sidecar .parquet) through atomic shards in OUT.parts/ (see module doc)."""

    def __init__(
        self,
        out: str | os.PathLike,
        columns,
        settings: dict,
        shard_rows: int = 1024,
        shard_seconds: float = 60.0,
        overwrite: bool = False,
    ):
        self.out = Path(out)
        if self.out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise EffnetError(f"-o {self.out}: effnet writes Parquet; name the output OUT.parquet (or OUT.npy for "
                              "embeddings as a matrix)")
        self.as_npy = self.out.suffix.lower() == ".npy"
        if self.as_npy and not isinstance(columns, EmbeddingColumns):
            raise EffnetError(f"{self.out}: .npy output holds embeddings only; write classifications to .parquet")
        self.sidecar = self.out.with_suffix(".parquet") if self.as_npy else None
        self.parts = Path(str(self.out) + ".parts")
        self.columns, self.settings = columns, settings
        self.schema = schema(columns, settings)
        self.shard_rows, self.shard_seconds = shard_rows, shard_seconds
        self.buffer: list[pa.Table] = []
        self.buffered_rows = 0
        self.last_write = time.monotonic()
        self.flush_seconds = min(FIRST_SHARD_SECONDS, shard_seconds)  # doubles per shard, up to shard_seconds
        _check_writable(self.out, self.parts)
        if overwrite:
            for path in (self.out, self.sidecar):
                if path is not None and path.exists():
                    path.unlink()
            shutil.rmtree(self.parts, ignore_errors=True)
        if self.parts.exists():
            for stale in self.parts.glob("*.tmp"):  # a write that was cut off: never renamed, never counted
                stale.unlink()
        self._index: dict[Key, tuple[int, int]] | None = None
        self._units: list[_Unit] = []
        self._next_shard: int | None = None

    # the runner's side
    def done(self) -> set[Key]:
        """Keys of the inputs already in OUT or OUT.parts/ (checks that they come from the same settings)."""
        self._units = self._existing_units()
        self._index = {}
        for number, unit in enumerate(self._units):
            for row, key in enumerate(unit.keys()):
                self._index.setdefault(key, (number, row))
        return set(self._index)

    def __call__(self, batch: Batch, outputs: np.ndarray | None) -> None:
        table = batch_table(batch, outputs, self.columns, self.schema)
        self.buffer.append(table)
        self.buffered_rows += table.num_rows
        if self.buffered_rows >= self.shard_rows or time.monotonic() - self.last_write >= self.flush_seconds:
            self.flush()
            self.flush_seconds = min(2 * self.flush_seconds, self.shard_seconds)

    def flush(self) -> None:
        """Write the buffered rows as one shard (temp file + rename)."""
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer)
        self.parts.mkdir(parents=True, exist_ok=True)
        if self._next_shard is None:  # continue the numbering of an interrupted run
            numbers = [int(p.stem.split("-")[1]) for p in self.parts.glob("part-*.parquet")]
            self._next_shard = max(numbers, default=-1) + 1
        final = self.parts / f"part-{self._next_shard:06d}.parquet"
        self._next_shard += 1
        temporary = final.with_name(final.name + ".tmp")
        pq.write_table(table, temporary, row_group_size=max(1, table.num_rows))
        os.replace(temporary, final)
        self.buffer, self.buffered_rows, self.last_write = [], 0, time.monotonic()

    def finish(self, items: list[Item]) -> tuple[None, Summary]:
        """Merge OUT and OUT.parts/ into OUT in the order of `items`; remove OUT.parts/."""
        if not items:  # nothing to write: leave no empty OUT behind (the caller reports "found no images")
            if self.parts.exists() and not any(self.parts.iterdir()):
                self.parts.rmdir()
            return None, summarize([])
        self.flush()
        self.done()  # re-index: now includes this run's shards
        missing = [item.path for item in items if item.key not in self._index]
        if missing:
            raise EffnetError(f"internal error: {len(missing)} inputs have no row (first: {missing[0]})")
        locations = [self._index[item.key] for item in items]
        summary = self._write(locations)
        shutil.rmtree(self.parts, ignore_errors=True)
        return None, summary

    # reading what exists
    def _existing_units(self) -> list["_Unit"]:
        units: list[_Unit] = []
        if self.parts.exists():
            for path in sorted(self.parts.glob("part-*.parquet")):
                units += _units_of(path, self._check)
        if not self.as_npy:
            if self.out.exists():
                units += _units_of(self.out, self._check)
        elif self.out.exists() and self.sidecar.exists():
            units += _units_of(self.sidecar, self._check, npy=self.out)
        elif self.out.exists() or self.sidecar.exists():
            lone = self.out if self.out.exists() else self.sidecar
            raise EffnetError(f"{lone} exists without its partner file; pass --overwrite to replace it")
        return units

    def _check(self, path: Path, file_schema: pa.Schema) -> None:
        found = (file_schema.metadata or {}).get(METADATA_KEY)
        if found is None:
            raise EffnetError(f"{path} exists and was not written by effnet; pass --overwrite to replace it")
        theirs = json.loads(found)
        if theirs != self.settings:
            differ = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
            detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ)
            raise EffnetError(
                f"{path} holds results of a run with other settings ({detail}); "
                "pass --overwrite to start over, or write to another -o"
            )

    # writing the merged output
    def _write(self, locations: list[tuple[int, int]]) -> Summary:
        cache: OrderedDict[int, pa.Table] = OrderedDict()

        def table_of(number: int) -> pa.Table:
            if number in cache:
                cache.move_to_end(number)
            else:
                cache[number] = self._units[number].read()
                if len(cache) > 8:  # inputs are processed in order, so units are mostly read once, in turn
                    cache.popitem(last=False)
            return cache[number]

        errors: list[str | None] = []
        step = max(self.shard_rows, 1024)
        chunks = (_gather(locations[s : s + step], table_of) for s in range(0, len(locations), step))
        if self.as_npy:
            self._write_npy(chunks, len(locations), errors)
        else:
            temporary = self.out.with_name(self.out.name + ".tmp")
            with pq.ParquetWriter(temporary, self.schema) as writer:
                for chunk in chunks:
                    errors += chunk.column("error").to_pylist()
                    writer.write_table(chunk.cast(self.schema), row_group_size=max(1, chunk.num_rows))
            os.replace(temporary, self.out)
        return summarize(errors)

    def _write_npy(self, chunks: Iterator[pa.Table], rows: int, errors: list) -> None:
        dim, dtype = self.columns.dim, self.columns.numpy_dtype
        temporary = self.out.with_name(self.out.name + ".tmp")
        side_temporary = self.sidecar.with_name(self.sidecar.name + ".tmp")
        side_schema = self.schema.remove(self.schema.get_field_index("embedding"))
        matrix = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=(rows, dim))
        start = 0
        with pq.ParquetWriter(side_temporary, side_schema) as writer:
            for chunk in chunks:
                matrix[start : start + chunk.num_rows] = embedding_matrix(chunk, dim, dtype)
                start += chunk.num_rows
                errors += chunk.column("error").to_pylist()
                writer.write_table(chunk.drop_columns(["embedding"]), row_group_size=max(1, chunk.num_rows))
        matrix.flush()
        del matrix
        os.replace(temporary, self.out)
        os.replace(side_temporary, self.sidecar)


def _gather(locations: list[tuple[int, int]], table_of) -> pa.Table:
    """The rows at `locations` (unit, row), in that order, taking runs from one unit at a time."""
    pieces, start = [], 0
    while start < len(locations):
        number = locations[start][0]
        end = start
        while end < len(locations) and locations[end][0] == number:
            end += 1
        rows = pa.array([row for _, row in locations[start:end]], pa.int64())
        pieces.append(table_of(number).take(rows).replace_schema_metadata(None))
        start = end
    return pa.concat_tables(pieces)


def embedding_matrix(table: pa.Table, dim: int, dtype) -> np.ndarray:
    """The `embedding` column as an (n, dim) array, NaN rows where it is null."""
    column = table.column("embedding").combine_chunks()
    valid = np.asarray(column.is_valid(), dtype=bool)
    # a fixed-size list's child holds dim slots for every row, null rows included
    values = np.asarray(column.values.slice(column.offset * dim, len(column) * dim)).reshape(-1, dim)
    matrix = np.full((table.num_rows, dim), np.nan, dtype=dtype)
    matrix[valid] = values[valid]
    return matrix


class _Unit:
    """One row group of a finished Parquet file (a shard, or the previous OUT), read lazily."""

    def __init__(self, path: Path, row_group: int, npy: Path | None = None, npy_start: int = 0):
        self.path, self.row_group, self.npy, self.npy_start = path, row_group, npy, npy_start

    def keys(self) -> list[Key]:
        table = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=["path", "size_bytes", "mtime_ns"])
        return keys_of(table)

    def read(self) -> pa.Table:
        table = pq.ParquetFile(self.path).read_row_group(self.row_group)
        if self.npy is None:
            return table
        # OUT.npy + sidecar: put the embedding column back, nulls where the row failed (NaN in the matrix)
        matrix = np.load(self.npy, mmap_mode="r")[self.npy_start : self.npy_start + table.num_rows]
        valid = np.asarray(table.column("error").is_null(), dtype=bool)
        arrow_type = pa.from_numpy_dtype(matrix.dtype)
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(matrix).reshape(-1), arrow_type), matrix.shape[1], mask=pa.array(~valid)
        )
        position = table.schema.get_field_index("error")
        return table.add_column(position, pa.field("embedding", embedding.type), embedding).select(
            ["path", "width", "height", "embedding", "error", "size_bytes", "mtime_ns"]
        )


def _check_writable(out: Path, parts: Path) -> None:
    """Fail before the job, not at its first shard: OUT's folder must exist (or be creatable) and be writable."""
    if out.is_dir():
        raise EffnetError(f"-o {out} is a folder; give a file name such as {out / 'out.parquet'}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK) or (
            parts.exists() and not os.access(parts, os.W_OK | os.X_OK)):
        raise EffnetError(f"-o {out}: cannot write in {folder if not parts.exists() else parts} (permission denied "
                          "or not a folder); choose another -o")


def _units_of(path: Path, check, npy: Path | None = None) -> list[_Unit]:
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        if path.parent.name.endswith(".parts"):
            raise EffnetError(
                f"{path} is not a readable shard ({error}); it is left from an interrupted run. Set it aside "
                f"(mv '{path}' '{path}.corrupt') and run again: its rows are recomputed") from None
        raise EffnetError(f"{path} exists and is not a Parquet file effnet can read ({error}); pass --overwrite to "
                          "replace it, or write to another -o") from None
    check(path, file.schema_arrow)
    units, start = [], 0
    for group in range(file.num_row_groups):
        units.append(_Unit(path, group, npy, start))
        start += file.metadata.row_group(group).num_rows
    return units
