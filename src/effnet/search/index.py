"""`Index`: a faiss index over `effnet embed` vectors, kept in a folder with its row -> path map and provenance.

INDEX_DIR holds three files, written together and swapped in atomically:
- `index.faiss`: the faiss index (`faiss.write_index`; never pickle);
- `rows.parquet`: row i of the index -> path, width, height, size_bytes, mtime_ns, embeddings (the file it came from);
- `index.json`: `format_version`, the model, weights, size and preprocessing the vectors came from, the metric, the
  kind and its parameters, and the recall measured when they were chosen.

Kinds (`kind="auto"` picks one and says why):
- `exact`: `IndexFlatIP` / `IndexFlatL2`, every vector compared, nothing to build. Below `EXACT_BELOW` vectors a
  query costs at most about 0.1 s on 2 busy cores, and an HNSW graph (~40 s per 100k vectors there) would pay for
  its build only after hundreds of queries (benchmarks/search.py, docs/search.md).
- `hnsw`: `IndexHNSWFlat` (M=32 links per node, efConstruction 40: faiss's defaults). `efSearch` is the smallest
  of `EF_SEARCH` whose recall@10 against exact search reaches the target on a held-out sample of the collection
  (as autofaiss tunes its indexes; the sample is indexed after the tuning, under an `IndexIDMap` that keeps row
  numbers) and on near copies of it (see `_near_copies`). Keeps the full vectors plus the graph: chosen while that
  fits `memory_budget`.
- `ivf-pq`: faiss `IVF{nlist},PQ{dim/32}x8,Refine(SQfp16 or SQ8)`: nlist ~ sqrt(n) inverted lists of
  product-quantized codes (dim/32 bytes) pick candidates; compressed copies of the vectors re-rank `k_factor * k`
  of them: float16 (half of float32) while those fit `memory_budget`, else 8-bit scalar-quantized (a quarter),
  whose rounding reorders neighbours at nearly equal distances (recall@10 0.941 at best on the benchmark's
  clustered 100k, 0.95+ with float16). `nprobe` and `k_factor` are tuned like efSearch. For collections whose
  full vectors do not fit `memory_budget`.

Metric: `cosine` stores L2-normalized vectors and searches by inner product (score = cosine similarity, higher is
closer); `l2` stores them as they are (score = Euclidean distance, lower is closer).

Writes are atomic: everything is built in a temporary folder beside INDEX_DIR, which then replaces it (the old
one is renamed to `INDEX_DIR.previous` for the moment between two renames and removed after; `load` falls back to
it if a crash fell exactly there). An interrupted build or add leaves the previous index as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import EffnetError
from ..pipeline.sinks import METADATA_KEY, embedding_matrix

FORMAT_VERSION = 1
INDEX_FILE, ROWS_FILE, META_FILE = "index.faiss", "rows.parquet", "index.json"
KINDS = ("auto", "exact", "hnsw", "ivf-pq")
METRICS = ("cosine", "l2")
EXACT_BELOW = 50_000  # vectors; see the module docstring and docs/search.md (measured in benchmarks/search.py)
DEFAULT_RECALL = 0.95  # recall@10 against exact search that approximate kinds are tuned to reach
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes an index may take in memory before auto prefers compressed ivf-pq
HNSW_LINKS = 32  # faiss's HNSW M: memory 2*M*4 bytes per vector for the graph
HNSW_EF_CONSTRUCTION = 40  # faiss's default
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# ivf-pq: candidates re-ranked with the compressed copies, as a multiple of k. Re-ranking is cheap (512 x 10
# distances to float16 vectors: ~1 ms a query), and queries in a dense cluster, whose neighbours are at nearly
# equal distances, need many candidates.
K_FACTOR = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TUNING_QUERIES = 500  # the held-out sample: at most this many vectors of the collection
# Tuning also queries each held-out vector moved to this cosine similarity from itself: a near copy (an edited,
# re-encoded or cropped image) as far as the weakest copy pair of the small near-duplicate corpus at 224 px (0.80).
NEAR_COPY_COSINE = 0.8
TUNING_K = 10
ADD_CHUNK = 50_000  # rows normalized and added at a time (bounds the float copy made for normalizing)
MAX_META_BYTES = 1 << 20  # index.json is tiny; refuse a huge one instead of parsing it
ROW_COLUMNS = ("path", "width", "height", "size_bytes", "mtime_ns", "embeddings")
PROVENANCE_KEYS = ("model", "size", "resize")  # must agree between an index and any vectors added or searched


@dataclass
class Embeddings:
    """Vectors read from `effnet embed` Parquet files: the good rows only, with where each came from."""

    vectors: np.ndarray  # (n, dim) float32
    rows: pa.Table  # ROW_COLUMNS, one row per vector
    provenance: dict  # model, weights, size, resize, precision, dim
    skipped: int  # error rows (no vector), counted and left out


def read_embeddings(files: Sequence[str | os.PathLike]) -> Embeddings:
    """Read and check `effnet embed` outputs; every file must hold vectors of the same model and dimension."""
    if not files:
        raise EffnetError("no embeddings files given")
    vectors, rows, provenance, skipped = [], [], None, 0
    for file in map(str, files):
        table, settings = _read_embeddings_file(file)
        theirs = _provenance_of(settings, table, file)
        if provenance is None:
            provenance = theirs
        else:
            _check_same(provenance, theirs, f"{file}", "the first embeddings file")
        good = np.asarray(table.column("error").is_null(), dtype=bool) & np.asarray(
            table.column("embedding").is_valid(), dtype=bool)
        skipped += int((~good).sum())
        if not good.any():
            raise EffnetError(f"{file}: none of its {table.num_rows} rows has a vector (all failed); nothing to index")
        kept = table.filter(pa.array(good))
        vectors.append(embedding_matrix(kept, provenance["dim"], np.float32))
        rows.append(_rows_of(kept, file))
    return Embeddings(np.concatenate(vectors), pa.concat_tables(rows), provenance, skipped)


def _read_embeddings_file(file: str) -> tuple[pa.Table, dict]:
    if not os.path.isfile(file):
        raise EffnetError(f"{file}: no such file (expected the Parquet file `effnet embed -o` writes)")
    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise EffnetError(f"{file}: not a Parquet file ({error})") from None
    schema = parquet.schema_arrow
    if "embedding" not in schema.names or not pa.types.is_fixed_size_list(schema.field("embedding").type):
        raise EffnetError(f"{file}: has no `embedding` column of fixed-size vectors; write it with `effnet embed`")
    found = (schema.metadata or {}).get(METADATA_KEY)
    settings = json.loads(found) if found else {}
    if settings.get("task", "embed") != "embed":
        raise EffnetError(f"{file}: holds `{settings['task']}` results, not embeddings")
    table = parquet.read()
    if table.num_rows == 0:
        raise EffnetError(f"{file}: is empty (0 rows); nothing to index")
    return table, settings


def _provenance_of(settings: dict, table: pa.Table, file: str) -> dict:
    dim = table.schema.field("embedding").type.list_size
    if not settings.get("model"):
        raise EffnetError(f"{file}: has no effnet metadata (model, size, preprocessing); write it with `effnet embed`")
    return {"model": settings.get("model"), "weights": settings.get("weights"), "size": settings.get("size"),
            "resize": settings.get("resize"), "precision": settings.get("precision"), "dim": dim}


def _check_same(ours: dict, theirs: dict, what: str, against: str) -> None:
    differ = [key for key in (*PROVENANCE_KEYS, "dim") if ours.get(key) != theirs.get(key)]
    if differ:
        detail = ", ".join(f"{key} {theirs.get(key)!r} (vs {ours.get(key)!r})" for key in differ)
        raise EffnetError(f"{what}: vectors of another kind than {against}: {detail}. Embed it with the same model, "
                          "--size and --resize, or build a separate index")


def _rows_of(table: pa.Table, source: str) -> pa.Table:
    def column(name, kind):
        return table.column(name).cast(kind) if name in table.schema.names else pa.nulls(table.num_rows, kind)

    return pa.table({
        "path": column("path", pa.string()), "width": column("width", pa.int32()),
        "height": column("height", pa.int32()), "size_bytes": column("size_bytes", pa.int64()),
        "mtime_ns": column("mtime_ns", pa.int64()), "embeddings": pa.array([source] * table.num_rows, pa.string()),
    })


# --- The index ---------------------------------------------------------------------------------------------


class Index:
    """A faiss index, its rows (row -> path ...) and its metadata. Build, load, search, add."""

    def __init__(self, faiss_index, rows: pa.Table, meta: dict, directory: Path | None = None):
        self.faiss_index, self.rows, self.meta, self.directory = faiss_index, rows, meta, directory

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    # building
    @classmethod
    def build(cls, embeddings: Sequence[str | os.PathLike], directory: str | os.PathLike, *, kind: str = "auto",
              metric: str = "cosine", recall: float = DEFAULT_RECALL, memory_budget: int = DEFAULT_MEMORY_BUDGET,
              exact_below: int = EXACT_BELOW, overwrite: bool = False,
              log: Callable[[str], None] | None = None) -> "Index":
        """Index the vectors of `effnet embed` Parquet files into `directory` (error rows skipped and counted)."""
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise EffnetError(f"{directory} exists: pass --add to add vectors to it, or --overwrite to rebuild it")
        read = read_embeddings(embeddings)
        index = cls.from_vectors(read.vectors, read.rows, read.provenance, kind=kind, metric=metric, recall=recall,
                                 memory_budget=memory_budget, exact_below=exact_below, log=log)
        index.meta["skipped_error_rows"] = read.skipped
        index.save(directory)
        return index

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, rows: pa.Table | None = None, provenance: dict | None = None, *,
                     kind: str = "auto", metric: str = "cosine", recall: float = DEFAULT_RECALL,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET, exact_below: int = EXACT_BELOW,
                     log: Callable[[str], None] | None = None, seed: int = 0) -> "Index":
        """An in-memory index over `vectors` (n, dim); `vectors` may be a memmap (read ADD_CHUNK rows at a time)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
        count, dim = vectors.shape
        if count == 0:
            raise EffnetError("no vectors to index")
        import faiss

        started = time.perf_counter()
        chosen, why = _choose_kind(kind, count, dim, memory_budget, exact_below)
        rng = np.random.default_rng(seed)
        built, parameters = _new_faiss(chosen, count, dim, metric, memory_budget)
        if not built.is_trained:
            sample = np.sort(rng.choice(count, size=min(count, _training_size(chosen, parameters)), replace=False))
            with _faiss_threads(1 if chosen == "ivf-pq" else None):
                built.train(_prepared(vectors[sample], metric))
        tuning = None
        if chosen == "exact":
            _append(built, vectors, metric)
        else:
            # Tuning queries are held out: indexed after the tuning, so that no query is a node of the graph or an
            # entry of a list (a query that is in the index finds itself and its graph links far too easily).
            # The ids map keeps every row at its input position although the held-out rows are added last.
            built = faiss.IndexIDMap(built)
            held = np.zeros(count, dtype=bool)
            held[rng.choice(count, size=min(count // 2, TUNING_QUERIES), replace=False)] = True
            _append(built, vectors, metric, keep=~held)
            tuning = _tune(built, chosen, vectors, held, metric, recall, rng)
            parameters |= tuning.pop("parameters")
            _append(built, vectors, metric, keep=held)
        meta = {
            "format_version": FORMAT_VERSION, "kind": chosen, "metric": metric, "dim": dim,
            "parameters": parameters, "recall_target": recall if chosen != "exact" else None, "tuning": tuning,
            "build_seconds": round(time.perf_counter() - started, 3),
            **{key: (provenance or {}).get(key) for key in ("model", "weights", "size", "resize", "precision")},
        }
        meta["choice"] = _describe(meta, why)
        if log:
            log(meta["choice"])
        if rows is None:
            rows = pa.table({"path": pa.array([str(i) for i in range(count)], pa.string())})
        return cls(built, rows, meta)

    # storage
    def save(self, directory: str | os.PathLike) -> None:
        """Write to `directory` atomically (temporary folder beside it, then rename)."""
        import faiss

        directory = Path(directory).absolute()
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_temporaries(directory)
        temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            temporary.mkdir()
            faiss.write_index(self.faiss_index, str(temporary / INDEX_FILE))
            pq.write_table(self.rows, temporary / ROWS_FILE)
            self.meta["count"] = len(self)
            (temporary / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))
            _swap_in(temporary, directory)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        self.directory = directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Index":
        """Read INDEX_DIR; a folder written by a newer effnet (format_version) is refused, not misread."""
        import faiss

        directory = Path(directory)
        if not directory.exists() and _previous(directory).exists():
            directory = _previous(directory)  # a crash between the two renames of `_swap_in`
        meta_file = directory / META_FILE
        if not meta_file.is_file():
            raise EffnetError(f"{directory}: not an effnet index (no {META_FILE}); build one with `effnet index`")
        if meta_file.stat().st_size > MAX_META_BYTES:
            raise EffnetError(f"{meta_file}: too large to be an effnet index's metadata")
        try:
            meta = json.loads(meta_file.read_text())
            version = int(meta["format_version"])
        except (ValueError, KeyError, TypeError) as error:
            raise EffnetError(f"{meta_file}: unreadable index metadata ({error}); rebuild with `effnet index`") from None
        if version > FORMAT_VERSION:
            raise EffnetError(f"{directory}: index format version {version} was written by a newer effnet (this one "
                              f"reads up to {FORMAT_VERSION}); upgrade effnet or rebuild the index")
        for name in (INDEX_FILE, ROWS_FILE):
            if not (directory / name).is_file():
                raise EffnetError(f"{directory}: {name} is missing; rebuild the index with `effnet index`")
        built = faiss.read_index(str(directory / INDEX_FILE))
        rows = pq.read_table(directory / ROWS_FILE)
        if built.ntotal != rows.num_rows or built.d != meta["dim"]:
            raise EffnetError(f"{directory}: index ({built.ntotal} x {built.d}) and rows ({rows.num_rows}) disagree; "
                              "rebuild it")
        _apply_parameters(built, meta["kind"], meta["parameters"])
        return cls(built, rows, meta, directory)

    # adding
    def add(self, embeddings: Sequence[str | os.PathLike], log: Callable[[str], None] | None = None) -> int:
        """Add the vectors of more `effnet embed` files (paths already indexed are skipped); saves if on disk.

        The kind and its trained parts stay as they are; returns the number of vectors added.
        """
        read = read_embeddings(embeddings)
        _check_same(self._provenance(), read.provenance, ", ".join(map(str, embeddings)), "this index")
        known = set(self.rows.column("path").to_pylist())
        paths = read.rows.column("path").to_pylist()
        new = np.array([path not in known for path in paths], dtype=bool)
        if new.any():
            # a copy to add to: the loaded index stays untouched until the new folder is in place
            import faiss

            grown = faiss.clone_index(self.faiss_index)
            _apply_parameters(grown, self.meta["kind"], self.meta["parameters"])
            _append(grown, read.vectors[new], self.meta["metric"], first_id=len(self))
            rows = pa.concat_tables([self.rows, read.rows.filter(pa.array(new)).cast(self.rows.schema)])
            meta = dict(self.meta)
            meta["skipped_error_rows"] = meta.get("skipped_error_rows", 0) + read.skipped
            previous = (self.faiss_index, self.rows, self.meta)
            self.faiss_index, self.rows, self.meta = grown, rows, meta
            if self.directory is not None:
                try:
                    self.save(self.directory)
                except BaseException:
                    self.faiss_index, self.rows, self.meta = previous
                    raise
        if log:
            log(f"added {int(new.sum())} vectors ({int((~new).sum())} already indexed, {read.skipped} error rows "
                f"skipped); {len(self)} in all, {self.meta['kind']}")
        return int(new.sum())

    # searching
    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ids), each (n_queries, k), best first; id -1 and NaN score where fewer than k exist."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.meta["dim"]:
            raise EffnetError(f"query vectors have shape {queries.shape}; this index holds dimension {self.meta['dim']}")
        distances, ids = self.faiss_index.search(_prepared(queries, self.meta["metric"]), k)
        scores = distances.astype(np.float32)
        if self.meta["metric"] == "l2":
            scores = np.sqrt(np.maximum(scores, 0))  # faiss gives squared distances
        scores[ids < 0] = np.nan
        return scores, ids

    def search(self, queries: Sequence[str | os.PathLike] | str, k: int = 10, *, batch_size: int = 16,
               workers: int | None = None, progress: bool = False) -> pa.Table:
        """The k nearest rows of each query: image files/folders/globs/manifests, or `effnet embed` Parquet files.

        Images are embedded with the index's own model, size and preprocessing, through the embed pipeline; a
        query that fails to decode is an error naming it. Returns query, rank (1 = best), path, score.
        """
        queries = [queries] if isinstance(queries, (str, os.PathLike)) else list(queries)
        if not queries:
            raise EffnetError("no queries given")
        embedded = [q for q in map(str, queries) if _is_embeddings_file(q)]
        images = [q for q in map(str, queries) if q not in embedded]
        names, matrices = [], []
        if embedded:
            read = read_embeddings(embedded)
            _check_same(self._provenance(), read.provenance, ", ".join(embedded), "this index")
            names += read.rows.column("path").to_pylist()
            matrices.append(read.vectors)
        if images:
            table = self._embed(images, batch_size=batch_size, workers=workers, progress=progress)
            names += table.column("path").to_pylist()
            matrices.append(embedding_matrix(table, self.meta["dim"], np.float32))
        scores, ids = self.search_vectors(np.concatenate(matrices), min(k, len(self)))
        paths = np.asarray(self.rows.column("path").to_pylist(), dtype=object)
        found = ids >= 0
        count = ids.shape[1]
        return pa.table({
            "query": pa.array(np.repeat(np.asarray(names, dtype=object), count)[found.reshape(-1)], pa.string()),
            "rank": pa.array(np.tile(np.arange(1, count + 1, dtype=np.int32), len(names))[found.reshape(-1)]),
            "path": pa.array(paths[ids[found]], pa.string()),
            "score": pa.array(scores[found], pa.float32()),
        })

    def _embed(self, images: list[str], **options) -> pa.Table:
        from ..embed import _raise_failures, run

        report = run("embed", images, self._model(), size=self.meta["size"], resize=self.meta["resize"], **options)
        table = report.result
        if table.num_rows == 0:
            raise EffnetError(f"found no images in {' '.join(images)}")
        _raise_failures(table)  # names each query that failed to decode
        return table

    def _model(self):
        """The model the indexed vectors came from: its weights file if it is here, else its name."""
        from ..embed import _load_model

        weights, name = self.meta.get("weights"), self.meta.get("model")
        if not name:
            raise EffnetError(f"{self.directory}: the index does not record its model; search it with vectors "
                              "(an embeddings Parquet file) instead of images")
        if weights and os.path.exists(weights):
            try:
                network = _load_model(weights)
                if network.spec.name == name:
                    return network
            except EffnetError:
                pass
        return _load_model(name)

    def _provenance(self) -> dict:
        return {key: self.meta.get(key) for key in (*PROVENANCE_KEYS, "dim")}


def _is_embeddings_file(query: str) -> bool:
    """An `effnet embed` output (a Parquet with an `embedding` column), as opposed to an image or manifest."""
    if not query.lower().endswith(".parquet") or not os.path.isfile(query):
        return False
    try:
        return "embedding" in pq.read_schema(query).names
    except Exception:
        return False  # let the image pipeline report what is wrong with it


# --- Choosing, building and tuning the faiss index ----------------------------------------------------------


def _choose_kind(kind: str, count: int, dim: int, memory_budget: int, exact_below: int) -> tuple[str, str]:
    if kind != "auto":
        return kind, "as asked"
    if count < exact_below:
        return "exact", f"{count} vectors < {exact_below}: exact search is fast enough and never misses"
    hnsw_bytes = count * (4 * dim + 2 * HNSW_LINKS * 4)
    compressed_bytes = count * _ivf_pq_bytes_per_vector(dim, _refine_for(count, dim, memory_budget))
    if hnsw_bytes <= memory_budget:
        return "hnsw", (f"{count} vectors >= {exact_below}; full vectors + graph ({hnsw_bytes / 2**30:.1f} GiB) fit "
                        f"the memory budget ({memory_budget / 2**30:.1f} GiB)")
    return "ivf-pq", (f"{count} vectors; full vectors ({hnsw_bytes / 2**30:.1f} GiB with the HNSW graph) exceed the "
                      f"memory budget ({memory_budget / 2**30:.1f} GiB): compressed to {compressed_bytes / 2**30:.1f} GiB")


def _refine_for(count: int, dim: int, memory_budget: int) -> str:
    """The re-ranking copy of ivf-pq: float16 when it fits the budget, else 8-bit."""
    return "SQfp16" if count * _ivf_pq_bytes_per_vector(dim, "SQfp16") <= memory_budget else "SQ8"


def _ivf_pq_bytes_per_vector(dim: int, refine: str) -> int:
    return (2 * dim if refine == "SQfp16" else dim) + _pq_sub_vectors(dim) + 8  # re-ranking copy + PQ code + id


def _new_faiss(kind: str, count: int, dim: int, metric: str, memory_budget: int = DEFAULT_MEMORY_BUDGET):
    import faiss

    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "exact":
        return (faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)), {}
    if kind == "hnsw":
        built = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss_metric)
        built.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return built, {"M": HNSW_LINKS, "efConstruction": HNSW_EF_CONSTRUCTION}
    # ivf-pq: nlist ~ sqrt(n) (a power of two, at most n/39 so that k-means has its 39 points per centroid);
    # PQ codes find candidates, their float16 or 8-bit copies re-rank k * k_factor of them.
    nlist = int(2 ** round(math.log2(max(1.0, math.sqrt(count)))))
    nlist = max(1, min(nlist, count // 39 or 1, 65536))
    sub_vectors = _pq_sub_vectors(dim)
    refine = _refine_for(count, dim, memory_budget)
    built = faiss.index_factory(dim, f"IVF{nlist},PQ{sub_vectors}x8,Refine({refine})", faiss_metric)
    coarse = faiss.downcast_index(faiss.downcast_index(built).base_index)
    coarse.cp.seed = coarse.pq.cp.seed = 1234
    coarse.pq.cp.niter = 10  # PQ k-means: the codes only pick candidates (the copies re-rank), 10 rounds are plenty
    return built, {"nlist": nlist, "pq_m": sub_vectors, "pq_bits": 8, "refine": refine}


class _faiss_threads:
    """Run a block with `count` OpenMP threads (None: unchanged).

    PQ training is many small k-means (256 centroids of dim/m floats) whose per-iteration thread synchronisation
    costs more than the work: 10,000 x 1280 into 40 sub-quantizers trains in 2.5 s on one thread and 19 s on two
    busy cores.
    """

    def __init__(self, count: int | None):
        self.count = count

    def __enter__(self):
        import faiss

        self.before = faiss.omp_get_max_threads()
        if self.count:
            faiss.omp_set_num_threads(self.count)

    def __exit__(self, *exc):
        import faiss

        faiss.omp_set_num_threads(self.before)
        return False


def _pq_sub_vectors(dim: int) -> int:
    """The number of PQ sub-vectors: dim/32 (one byte each), a divisor of dim.

    PQ training time grows with the sub-vector count (52 s for 80 vs 24 s for 40 at dim 1280 on 2 busy cores);
    with re-ranking, a coarse code that only has to find candidates is enough.
    """
    target = max(1, dim // 32)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _training_size(kind: str, parameters: dict) -> int:
    # 39-256 points per centroid is faiss's k-means range; PQ needs 256 per code word: at least 2^bits * 39.
    return max(64 * parameters["nlist"], 256 * 39) if kind == "ivf-pq" else 0


def _prepared(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, contiguous, and for cosine L2-normalized (a copy: the caller's array is left alone)."""
    array = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if metric == "cosine":
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        array /= np.maximum(norms, 1e-12)  # a zero vector stays zero instead of NaN
    return array


def _apply_parameters(built, kind: str, parameters: dict) -> None:
    import faiss

    if kind == "hnsw" and "efSearch" in parameters:
        _core(built).hnsw.efSearch = int(parameters["efSearch"])
    elif kind == "ivf-pq":
        if "nprobe" in parameters:
            faiss.extract_index_ivf(built).nprobe = int(parameters["nprobe"])
        if "k_factor" in parameters:
            _core(built).k_factor = float(parameters["k_factor"])


def _append(built, vectors: np.ndarray, metric: str, keep: np.ndarray | None = None, first_id: int = 0) -> None:
    """Add `vectors` (the rows where `keep`) in chunks; into an ids map, with their row numbers from `first_id`."""
    import faiss

    with_ids = isinstance(faiss.downcast_index(built), faiss.IndexIDMap)
    for start in range(0, len(vectors), ADD_CHUNK):
        rows = np.arange(start, min(start + ADD_CHUNK, len(vectors)))
        if keep is not None:
            rows = rows[keep[rows]]
        if len(rows) == 0:
            continue
        chunk = _prepared(vectors[rows[0]:rows[-1] + 1][rows - rows[0]], metric)
        if with_ids:
            built.add_with_ids(chunk, (rows + first_id).astype(np.int64))
        else:
            built.add(chunk)


def _core(built):
    """The index under an ids map (HNSW, or IndexRefine over IVF-PQ)."""
    import faiss

    # a new name, not `built`: rebinding the argument can drop the last reference to the index (a segfault)
    outer = faiss.downcast_index(built)
    return faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexIDMap) else outer


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str,
                     chunk: int = ADD_CHUNK, excluded: np.ndarray | None = None) -> np.ndarray:
    """Ids of the exact k nearest rows of `vectors` for each query, computed chunk by chunk (bounded memory).

    excluded: a boolean mask of rows that are not candidates.
    """
    queries = _prepared(queries, metric)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = _prepared(vectors[start:start + chunk], metric)
        if metric == "cosine":
            scores = queries @ block.T
        else:  # larger is closer: minus the squared distance
            scores = -((queries**2).sum(1)[:, None] - 2 * queries @ block.T + (block**2).sum(1)[None, :])
        if excluded is not None:
            scores[:, excluded[start:start + len(block)]] = -np.inf
        block_ids = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, block_ids], axis=1)
        keep = min(k, scores.shape[1])
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_ids = np.take_along_axis(ids, top, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, exclude: np.ndarray | None = None, k: int = TUNING_K) -> float:
    """Mean share of the true k neighbours that were found (each query's own id, `exclude`, left out of both)."""
    hits = 0
    for row in range(len(truth)):
        own = int(exclude[row]) if exclude is not None else -2
        true = [i for i in truth[row] if i != own][:k]
        got = [i for i in found[row] if i != own and i >= 0][:k]
        hits += len(set(true) & set(got))
    return hits / (k * len(truth))


def _near_copies(queries: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each query turned by a random direction to cosine NEAR_COPY_COSINE from itself, its length kept.

    Why the tuning needs them: a held-out vector is a query like the collection's own vectors, and the graph
    links such vectors well; a query off the collection (a near copy of an indexed image, a photo of another kind)
    is not, and needs a wider search. On benchmarks/search.py's vectors (30,000 x 1280) the sample alone reached
    0.979 at efSearch 16, where the benchmark's queries (cosine 0.81 to a collection vector) got 0.831; they
    needed efSearch 64 (0.989), which is also what the near copies pick (0.970). At 60,000: 64 -> 128, the
    benchmark's queries 0.910 -> 0.977. A random direction in many dimensions is the hardest kind of copy for the
    graph, so the setting errs towards recall (up to ~2-4x the query time of the sample's setting).
    """
    direction = rng.standard_normal(queries.shape).astype(np.float32)
    lengths = np.linalg.norm(queries, axis=1, keepdims=True)
    unit = queries / np.maximum(lengths, 1e-12)
    direction -= (direction * unit).sum(axis=1, keepdims=True) * unit  # orthogonal to the query
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    sine = math.sqrt(1 - NEAR_COPY_COSINE**2)
    return (NEAR_COPY_COSINE * queries + sine * lengths * direction).astype(np.float32)


def _tune(built, kind: str, vectors: np.ndarray, held: np.ndarray, metric: str, target: float,
          rng: np.random.Generator) -> dict:
    """The cheapest search setting whose recall@10 against exact search reaches `target` on two query sets.

    The sample (`held`, up to TUNING_QUERIES vectors of the collection itself) is not in `built` yet; the truth is
    exact search over the same rows that are. The sets are the sample as it is and its near copies
    (`_near_copies`); a setting's recall is the lower of the two.
    """
    import faiss

    sample = np.flatnonzero(held)
    own = np.asarray(vectors[sample], dtype=np.float32)
    query_sets = []
    for queries in (own, _near_copies(own, rng)):
        query_sets.append((_prepared(queries, metric),
                           exact_neighbours(vectors, queries, TUNING_K, metric, excluded=held)))

    def measure(setting: dict) -> dict:
        _apply_parameters(built, kind, setting)
        recalls, started = [], time.perf_counter()
        for prepared, truth in query_sets:
            _, found = built.search(prepared, TUNING_K)
            recalls.append(round(recall_at_k(found, truth), 4))
        seconds = time.perf_counter() - started
        return setting | {"recall": min(recalls), "recall_sample": recalls[0], "recall_near_copies": recalls[1],
                          "ms_per_query": round(1e3 * seconds / (2 * len(sample)), 3)}

    tried = []
    if kind == "hnsw":  # the smallest efSearch that reaches the target
        for value in EF_SEARCH:
            tried.append(measure({"efSearch": value}))
            if tried[-1]["recall"] >= target:
                break
    else:  # the smallest nprobe that reaches it with the most re-ranking, then the least re-ranking that still does
        nlist = faiss.extract_index_ivf(built).nlist
        for value in [value for value in NPROBE if value < nlist] + [nlist]:
            tried.append(measure({"nprobe": value, "k_factor": K_FACTOR[-1]}))
            if tried[-1]["recall"] >= target:
                break
        if tried[-1]["recall"] >= target:
            for factor in reversed(K_FACTOR[:-1]):
                attempt = measure({"nprobe": tried[-1]["nprobe"], "k_factor": factor})
                if attempt["recall"] < target:
                    break
                tried.append(attempt)
    best = tried[-1]
    if best["recall"] < target:
        best = max(tried, key=lambda row: row["recall"])
        print(f"warning: {kind} reaches recall@10 {best['recall']:.3f} at best, below the target {target}; "
              "use --kind exact for exact results", file=sys.stderr)
    setting = {key: value for key, value in best.items()
               if key not in ("recall", "recall_sample", "recall_near_copies", "ms_per_query")}
    _apply_parameters(built, kind, setting)
    return {"parameters": setting, "sample_queries": len(sample), "near_copy_cosine": NEAR_COPY_COSINE,
            "k": TUNING_K, "recall": best["recall"], "tried": tried}


def _describe(meta: dict, why: str) -> str:
    parameters = ", ".join(f"{key}={value}" for key, value in meta["parameters"].items())
    text = f"index: {meta['kind']} ({meta['metric']}{', ' + parameters if parameters else ''}): {why}"
    if meta["tuning"]:
        text += (f"; recall@{meta['tuning']['k']} vs exact {meta['tuning']['recall']:.3f} on "
                 f"{meta['tuning']['sample_queries']} held-out queries and their near copies "
                 f"(target {meta['recall_target']})")
    return text


# --- Atomic replacement ----------------------------------------------------------------------------------


def _previous(directory: Path) -> Path:
    return directory.with_name(directory.name + ".previous")


def _swap_in(temporary: Path, directory: Path) -> None:
    """Put the finished `temporary` folder at `directory`: rename the old one aside, rename, remove the old."""
    previous = _previous(directory)
    if directory.exists():
        if directory.is_dir() and not (directory / META_FILE).exists() and any(directory.iterdir()):
            raise EffnetError(f"{directory} exists and is not an effnet index; choose another -o")
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(directory, previous)
    os.rename(temporary, directory)
    shutil.rmtree(previous, ignore_errors=True)


def _remove_abandoned_temporaries(directory: Path) -> None:
    """Temporary folders of writers that died (killed mid-build): their process is gone, so nothing will finish them."""
    for temporary in directory.parent.glob(f".{directory.name}.tmp-*"):
        try:
            os.kill(int(temporary.name.rsplit("-", 1)[1]), 0)
        except ValueError:
            continue  # not ours
        except ProcessLookupError:
            shutil.rmtree(temporary, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's
