"""The main job (`effnet embed/classify ... --ray`) as a Ray Data pipeline, for collections that need many machines.

    driver:  Sources -> the inputs still to do (resume) -> blocks of inputs
    tasks:   Decoder on each input (CPU tasks, anywhere in the cluster)
    actors:  a pool of model actors (`map_batches` with a class), each builds its engine once; rows built by the
             local job's column builders (pipeline.sinks.batch_table), so the schema is the local job's
    tasks:   _FolderSink writes each block of rows as one Parquet file in the output folder

The stages are the local pipeline's (`pipeline.sources`, `pipeline.decode`, `pipeline.batch`, `pipeline.sinks`,
`effnet.engines`); only the movement between them is Ray's. Ray Data streams: inputs are decoded, run and
written while later ones are still being read, and its progress bars show each operator.

Output: a folder (local, shared, or an object-store URL such as `s3://bucket/out/`) of `part-<hash>.parquet`
files with the local job's columns and settings metadata, one row per input, errors as error rows. Rows are not in
input order (sort by `path`). A file is named after the keys of its rows, and written to a hidden temporary name
and renamed (local folders; an object-store PUT appears whole or not at all), so a write that Ray retries replaces
the same file and a killed write leaves nothing that counts.

Resume: the rule of the local job. An input whose (path, size, mtime) is in a file in the folder is done;
re-running the same command runs only the rest. Files from a run with other settings are refused.

Faults: decode and write tasks are retried up to TASK_RETRIES times; a model actor that dies is restarted up to
ACTOR_RESTARTS times and its in-flight batches retried up to ACTOR_TASK_RETRIES times. Objects lost with a node are
rebuilt by Ray from their lineage. A decode failure is never a fault: it is the input's error row.

Sizing: an actor pool plus read tasks that together want more CPUs than the cluster has waits forever (a known
Ray Data trap). `plan_for` sizes both from `ray.cluster_resources()` and the job prints the plan.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import posixpath
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import EffnetError

try:
    import ray
    from ray.data import ActorPoolStrategy, Datasink, TaskPoolStrategy
except ImportError:  # pragma: no cover - the optional extra
    raise EffnetError("--ray needs Ray Data: pip install 'effnet[ray]'") from None

from .pipeline.batch import Batch, to_tensor
from .pipeline.decode import Decoded, Decoder
from .pipeline.runner import Report
from .pipeline.sinks import METADATA_KEY, MemorySink, Summary, batch_table, keys_of, schema, summarize
from .pipeline.sources import Item, Sources, is_url

LOCAL = "local"  # `ray="local"` / `--ray` without an address: start a Ray instance on this machine
TASK_RETRIES = 3  # decode and write tasks (Ray's max_retries): a task lost with its worker or node is rerun
ACTOR_RESTARTS = 3  # model actors (max_restarts): an actor lost with its worker or node is rebuilt
ACTOR_TASK_RETRIES = 3  # batches in flight on an actor that died (max_task_retries)
INPUTS_PER_BLOCK = 64  # inputs per read block at most: small enough to spread a modest job over every CPU
# The object-store settings the driver's environment holds are given to the job's workers, so that
# `--ray` reads and writes the same buckets as the same command without it.
FORWARDED_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_DEFAULT_REGION", "AWS_REGION")


# --- Sizing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How the job uses the cluster: model actors and the CPUs (or GPUs) each holds; decode task CPUs."""

    cpus: float  # the cluster's CPUs (ray.cluster_resources)
    gpus: float
    nodes: int
    actors: int  # model actors (the pool's size)
    actor_cpus: float  # logical CPUs each actor holds (and its PyTorch threads, at least 1)
    actor_gpus: float  # 1 on GPU clusters, else 0
    decode_cpus: float  # logical CPUs per decode task

    @property
    def decode_slots(self) -> int:
        """Decode tasks that can run at once beside the actor pool (always at least one: never the hang)."""
        return max(1, int((self.cpus - self.actors * self.actor_cpus) / self.decode_cpus + 1e-9))

    def describe(self) -> str:
        device = f"{self.actor_gpus:g} GPU + {self.actor_cpus:g} CPU" if self.actor_gpus else f"{self.actor_cpus:g} CPU"
        return (f"ray: {self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs -> {self.actors} model "
                f"actor(s) x {device}; decode tasks {self.decode_cpus:g} CPU each, {self.decode_slots} at a time "
                f"(pool + tasks kept within the cluster's CPUs); retries: tasks {TASK_RETRIES}, "
                f"actor restarts {ACTOR_RESTARTS}, actor tasks {ACTOR_TASK_RETRIES}")


def plan_for(resources: dict, nodes: int = 1, actors: int | None = None) -> Plan:
    """Size the job from `ray.cluster_resources()`: the pool and at least one decode task always fit.

    GPUs: one actor per GPU (1 GPU + 1 CPU each), decoding on the other CPUs. CPUs only: half the CPUs run the
    model (one single-threaded actor per CPU), the other half decode, and at least one CPU always decodes. A
    cluster of fewer than 2 CPUs shares them in halves. `actors` overrides the pool's size (within those bounds).
    """
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if cpus <= 0:
        raise EffnetError("the Ray cluster has no CPUs to decode on: start nodes with `ray start --num-cpus N`")
    if gpus >= 1:
        count = actors or int(gpus)
        actor_cpus = 1.0 if cpus - count >= 1 else (cpus / 2) / count
        return Plan(cpus, gpus, nodes, count, actor_cpus, 1.0, min(1.0, cpus - count * actor_cpus))
    if cpus < 2:
        return Plan(cpus, gpus, nodes, 1, cpus / 2, 0.0, cpus / 2)
    count = actors or max(1, int(cpus // 2))
    count = min(count, int(cpus) - 1)  # one CPU stays free for decoding
    return Plan(cpus, gpus, nodes, count, 1.0, 0.0, 1.0)


# --- Object stores ------------------------------------------------------------------------------------------


def register_object_stores() -> None:
    """Let fsspec (which `pipeline.sources` lists and reads URLs with) reach s3:// through pyarrow's S3 client
    when s3fs is not installed. The endpoint comes from AWS_ENDPOINT_URL (S3-compatible servers), as in boto3."""
    import fsspec

    if importlib.util.find_spec("s3fs") is not None or "s3" in fsspec.registry:
        return
    from fsspec.implementations.arrow import ArrowFSWrapper

    class PyArrowS3(ArrowFSWrapper):
        protocol = ("s3", "s3a")
        cachable = False  # a new instance reads AWS_ENDPOINT_URL as it is now, not as when the first was made

        def __init__(self, **options):
            super().__init__(s3_filesystem(), **options)

    fsspec.register_implementation("s3", PyArrowS3, clobber=True)
    fsspec.register_implementation("s3a", PyArrowS3, clobber=True)


def s3_filesystem():
    """pyarrow's S3 client, pointed at AWS_ENDPOINT_URL when it is set (pyarrow itself does not read it)."""
    from urllib.parse import urlsplit

    from pyarrow.fs import S3FileSystem

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return S3FileSystem()
    parts = urlsplit(endpoint)
    return S3FileSystem(endpoint_override=parts.netloc or parts.path, scheme=parts.scheme or "https")


def output_filesystem(out: str):
    """(pyarrow filesystem, root path) of the output folder: a local path or an object-store URL."""
    from pyarrow.fs import FileSystem, LocalFileSystem

    if not is_url(out):
        return LocalFileSystem(), os.path.abspath(out)
    if out.split("://", 1)[0] in ("s3", "s3a"):
        return s3_filesystem(), out.split("://", 1)[1].rstrip("/")
    return FileSystem.from_uri(out.rstrip("/"))


# --- The stages as Ray sees them ----------------------------------------------------------------------------

WARNINGS = "_decoder_warnings"  # travels beside the rows from the decode tasks to the sink, which returns it

_INPUT_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                           ("error", pa.string())])


def _input_table(items: list[Item]) -> pa.Table:
    return pa.Table.from_pydict({"path": [i.path for i in items], "size": [i.size for i in items],
                                 "mtime_ns": [i.mtime_ns for i in items], "error": [i.error for i in items]},
                                schema=_INPUT_SCHEMA)


def _decode_block(inputs: pa.Table, decoder: Decoder) -> pa.Table:
    """A Ray task: the decode stage on each input of a block -> its pixels (raw uint8 HWC bytes) or its error."""
    register_object_stores()
    items = [Item(*row) for row in zip(*(inputs.column(name).to_pylist() for name in _INPUT_SCHEMA.names))]
    results = [decoder(item) for item in items]
    return pa.Table.from_pydict({
        "path": [i.path for i in items], "size": [i.size for i in items], "mtime_ns": [i.mtime_ns for i in items],
        "width": pa.array([r.width for r in results], pa.int32()),
        "height": pa.array([r.height for r in results], pa.int32()),
        "error": pa.array([r.error for r in results], pa.string()),
        "pixels": pa.array([None if r.pixels is None else r.pixels.tobytes() for r in results], pa.binary()),
        WARNINGS: pa.array([list(getattr(r, "warnings", ())) for r in results], pa.list_(pa.string())),
    })


class _ModelActor:
    """A Ray actor: builds the engine once, then turns blocks of decoded inputs into the local job's rows."""

    def __init__(self, network, *, size: int, signature: str, engine: str, precision: str, device: str,
                 columns, settings: dict, threads: int, job_images: int):
        import torch

        from .engines import create_engine

        torch.set_num_threads(threads)  # what the plan gave this actor, not every core of the node
        self.size, self.columns, self.schema = size, columns, schema(columns, settings)
        self.engine = create_engine(network, engine, precision, device, input_size=(size, size),
                                    signature=signature, job_images=job_images if engine == "auto" else None)

    def __call__(self, block: pa.Table) -> pa.Table:
        paths, sizes, mtimes = (block.column(n).to_pylist() for n in ("path", "size", "mtime_ns"))
        widths, heights, errors = (block.column(n).to_pylist() for n in ("width", "height", "error"))
        pixels = block.column("pixels").to_pylist()
        items = [Item(p, s, m) for p, s, m in zip(paths, sizes, mtimes)]
        decoded = [Decoded(None, w, h, e) for w, h, e in zip(widths, heights, errors)]
        good = [i for i, error in enumerate(errors) if error is None]
        shape = (self.size, self.size, 3)
        images = to_tensor([np.frombuffer(pixels[i], np.uint8).reshape(shape) for i in good]) if good else None
        outputs = self.engine(images) if images is not None else None
        rows = batch_table(Batch(items, decoded, images, good), outputs, self.columns, self.schema)
        return rows.append_column(WARNINGS, block.column(WARNINGS))


# --- The output folder ---------------------------------------------------------------------------------------


class OutputFolder:
    """The job's output: a folder of Parquet files, local or in an object store, and what it already holds."""

    def __init__(self, out: str, table_schema: pa.Schema, settings: dict):
        self.out, self.schema, self.settings = out, table_schema, settings
        self.filesystem, self.root = output_filesystem(out)

    def files(self) -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        selector = FileSelector(self.root, allow_not_found=True, recursive=False)
        return sorted(info.path for info in self.filesystem.get_file_info(selector)
                      if info.type == FileType.File and posixpath.basename(info.path).startswith("part-"))

    def prepare(self, overwrite: bool) -> None:
        """Create the folder; drop cut-off temporaries (and everything, with overwrite)."""
        from pyarrow.fs import FileSelector, FileType

        if self.out.lower().endswith(".npy"):
            raise EffnetError(f"-o {self.out}: .npy output is the local job's; with --ray, -o names a folder "
                              "(or s3://bucket/prefix/) of Parquet files")
        if self.filesystem.get_file_info(self.root).type == FileType.File:
            raise EffnetError(f"-o {self.out} is a file (the local job's output?); with --ray, -o names a folder "
                              "of Parquet files: pick another name")
        self.filesystem.create_dir(self.root, recursive=True)
        selector = FileSelector(self.root, allow_not_found=True, recursive=False)
        for info in self.filesystem.get_file_info(selector):
            name = posixpath.basename(info.path)
            stale = name.startswith(".part-") and name.endswith(".tmp")
            if info.type == FileType.File and (stale or (overwrite and name.startswith("part-"))):
                self.filesystem.delete_file(info.path)

    def keys(self) -> dict[tuple, list[str]]:
        """Key (path, size, mtime) -> the files holding a row for it; checks each file's settings."""
        found: dict[tuple, list[str]] = {}
        for path in self.files():
            table = self._read(path, ["path", "size_bytes", "mtime_ns"])
            for key in keys_of(table):
                found.setdefault(key, []).append(path)
        return found

    def drop_rows(self, extra: dict[tuple, list[str]]) -> None:
        """Remove the rows of `extra` (key -> files holding a surplus copy): each such file is rewritten without
        them (a new file, then the old one deleted, so a crash in between leaves copies, never a loss)."""
        by_file: dict[str, set] = {}
        for key, paths in extra.items():
            for path in paths:
                by_file.setdefault(path, set()).add(key)
        for path, keys in by_file.items():
            table = self._read(path, self.schema.names)
            keep = pa.array([key not in keys for key in keys_of(table)], pa.bool_())
            kept = table.filter(keep)
            if kept.num_rows:
                _FolderSink(self.filesystem, self.root, self.schema).write([kept], None)
            self.filesystem.delete_file(path)

    def errors(self) -> list[str | None]:
        return [e for path in self.files() for e in self._read(path, ["error"]).column("error").to_pylist()]

    def _read(self, path: str, columns: list[str]) -> pa.Table:
        with self.filesystem.open_input_file(path) as handle:
            file = pq.ParquetFile(handle)
            self._check(path, file.schema_arrow)
            return file.read(columns=columns)

    def _check(self, path: str, file_schema: pa.Schema) -> None:
        found = (file_schema.metadata or {}).get(METADATA_KEY)
        if found is None:
            raise EffnetError(f"{path} is in the output folder {self.out} but was not written by effnet; "
                              "move it away or pass --overwrite")
        theirs = json.loads(found)
        if theirs != self.settings:
            differ = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
            detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ)
            raise EffnetError(f"{path} holds results of a run with other settings ({detail}); "
                              "pass --overwrite to start over, or write to another -o")


class _FolderSink(Datasink):
    """Ray Data datasink: each block of rows -> one Parquet file named after its rows' keys (see module doc)."""

    def __init__(self, filesystem, root: str, table_schema: pa.Schema):
        self.filesystem, self.root, self.schema = filesystem, root, table_schema
        self.results: list[tuple[str, int, list]] = []  # set on the driver when the write completes

    def write(self, blocks, ctx) -> list[tuple[str, int, list]]:
        """-> (file, rows, decoder warnings as (path, message)) for each file written."""
        from pyarrow.fs import LocalFileSystem

        written = []
        for block in blocks:
            table = pa.table(block)
            warned = _warnings_of(table)
            table = table.select(self.schema.names).cast(self.schema)
            if table.num_rows == 0:
                continue
            digest = hashlib.sha256(json.dumps(keys_of(table)).encode()).hexdigest()[:24]
            final = posixpath.join(self.root, f"part-{digest}.parquet")
            if isinstance(self.filesystem, LocalFileSystem):  # a rename is atomic within a local folder
                temporary = posixpath.join(self.root, f".part-{digest}.{os.getpid()}.tmp")
                pq.write_table(table, temporary, filesystem=self.filesystem)
                self.filesystem.move(temporary, final)
            else:  # an object-store PUT is already all-or-nothing
                pq.write_table(table, final, filesystem=self.filesystem)
            written.append((final, table.num_rows, warned))
        return written

    def on_write_complete(self, write_result) -> None:  # on the driver
        self.results = [entry for returned in write_result.write_returns for entry in returned]

    def get_name(self) -> str:
        return "EffnetParquet"


def _warnings_of(table: pa.Table) -> list[tuple[str, str]]:
    if WARNINGS not in table.column_names:
        return []
    paths, messages = table.column("path").to_pylist(), table.column(WARNINGS).to_pylist()
    return [(path, message) for path, found in zip(paths, messages) for message in found or ()]


# --- The job ---------------------------------------------------------------------------------------------------


def run(task: str, sources, network, *, decoder: Decoder, columns, settings: dict, signature: str,
        out: str | os.PathLike | None, ray_address: str | bool, path_column: str = "path", batch_size: int = 16,
        engine: str = "auto", precision: str = "fp32", device: str = "auto", overwrite: bool = False,
        progress: bool = False, actors: int | None = None) -> Report:
    """The main job on Ray Data (see the module docstring). Called by `effnet.embed.run(..., ray=...)`.

    ray_address: "local" or True (a Ray instance on this machine), "auto" or "host:port" / "ray://host:port" (an
    existing cluster; RAY_ADDRESS is read when "local" is given and it is set); a Ray this process is already
    connected to (`ray.init` before) is used as it is, and left running. device: "auto" runs the model on
    the cluster's GPUs when it has any, "cpu" never does. Without `out`, the rows come back in `Report.result`
    in input order (the library verbs), as from the local job.
    """
    start = time.perf_counter()
    stages: dict[str, float] = {}
    started_here = _connect(ray_address)
    stages["ray_start"] = time.perf_counter() - start  # starting or joining Ray
    try:
        register_object_stores()
        tick = time.perf_counter()
        source = Sources(sources, path_column)
        items = list(source())
        stages["source"] = time.perf_counter() - tick
        table_schema = schema(columns, settings)
        folder = None
        done: set = set()
        if out is not None:
            folder = OutputFolder(os.fspath(out), table_schema, settings)
            tick = time.perf_counter()
            folder.prepare(overwrite)
            done = set(folder.keys())
            stages["resume"] = time.perf_counter() - tick
        todo = [item for item in items if item.key not in done]
        resources = dict(ray.cluster_resources())
        if device == "cpu":
            resources.pop("GPU", None)
        elif device == "cuda" and resources.get("GPU", 0) < 1:
            raise EffnetError("device='cuda' but the Ray cluster has no GPUs: start GPU nodes with "
                              "`ray start --num-gpus N`, or use device='auto' or 'cpu'")
        plan = plan_for(resources, len([n for n in ray.nodes() if n["Alive"]]), actors)
        if progress:
            print(plan.describe(), file=sys.stderr)
        tick = time.perf_counter()
        written = _execute(todo, network, plan, decoder=decoder, columns=columns, settings=settings,
                           signature=signature, engine=engine, precision=precision, batch_size=batch_size,
                           folder=folder, progress=progress, uses_urls=_uses_urls(sources, out))
        stages["ray"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if folder is None:
            warned = [pair for table in written for pair in _warnings_of(table)]
            sink = MemorySink(columns, settings)
            sink.tables = [table.select(table_schema.names).cast(table_schema) for table in written]
            result, summary = sink.finish(items)
        else:
            warned = [pair for _, _, found in written for pair in found]
            result, summary = None, _verify(folder, items)
        stages["merge"] = time.perf_counter() - tick
    finally:
        if started_here:
            ray.shutdown()
    report = Report(len(items), len(items) - len(todo), len(todo), summary, time.perf_counter() - start, stages,
                    result)
    report.skipped = {reason: count for reason, count in getattr(source, "skipped", {}).items() if count}
    report.warnings = warned  # what the decoder warned about, as the local job reports it
    return report


def _connect(address) -> bool:
    """Connect to (or start) Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    if address in (True, LOCAL):
        address = os.environ.get("RAY_ADDRESS") or None  # None: a new local instance
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": _forwarded_environment()} if address else None)
    return True


def _forwarded_environment() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENVIRONMENT if name in os.environ}


def _uses_urls(sources, out) -> bool:
    arguments = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    return any(is_url(os.fspath(a)) for a in arguments) or (out is not None and is_url(os.fspath(out)))


def _execute(todo: list[Item], network, plan: Plan, *, decoder, columns, settings, signature, engine,
             precision, batch_size, folder: OutputFolder | None, progress: bool, uses_urls: bool) -> list:
    """Run the Ray Data pipeline over `todo`: what the sink wrote (file, rows, warnings), or without a folder the
    row tables (with the decoder warnings column)."""
    if not todo:
        return []
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    environment = _forwarded_environment() if uses_urls else {}
    task_options = {"runtime_env": {"env_vars": environment}} if environment else {}
    per_block = max(1, min(INPUTS_PER_BLOCK, -(-len(todo) // int(4 * plan.cpus))))
    blocks = [_input_table(todo[i:i + per_block]) for i in range(0, len(todo), per_block)]
    dataset = ray.data.from_arrow(blocks)
    with warnings.catch_warnings():  # Ray 2.60 names retries only in **ray_remote_args, which it calls deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = dataset.map_batches(
            _decode_block, fn_kwargs={"decoder": decoder}, batch_format="pyarrow", batch_size=None,
            compute=TaskPoolStrategy(size=plan.decode_slots), num_cpus=plan.decode_cpus, max_retries=TASK_RETRIES,
            **task_options)
        dataset = dataset.map_batches(
            _ModelActor, batch_format="pyarrow", batch_size=batch_size,
            # from one actor up: batches keep going to the live actors while lost ones restart elsewhere
            compute=ActorPoolStrategy(min_size=1, max_size=plan.actors, initial_size=plan.actors),
            num_cpus=plan.actor_cpus, num_gpus=plan.actor_gpus or None,
            max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_TASK_RETRIES,
            fn_constructor_kwargs=dict(network=network, size=decoder.size, signature=signature, engine=engine,
                                       precision=precision, device="cuda" if plan.actor_gpus else "cpu",
                                       columns=columns, settings=settings, threads=max(1, round(plan.actor_cpus)),
                                       job_images=len(todo)),
            **task_options)
    if folder is None:
        return [pa.table(block) for block in ray.get(dataset.to_arrow_refs())]
    sink = _FolderSink(folder.filesystem, folder.root, folder.schema)
    dataset.write_datasink(sink, ray_remote_args={"max_retries": TASK_RETRIES, **task_options})
    return sink.results


def _verify(folder: OutputFolder, items: list[Item]) -> Summary:
    """Every input has exactly one row in the folder; the summary of the whole output (resumed rows included)."""
    found = folder.keys()
    missing = [item.path for item in items if item.key not in found]
    if missing:
        raise EffnetError(f"internal error: {len(missing)} inputs have no row in {folder.out} (first: {missing[0]}); "
                          "run the same command again to compute them")
    twice = {key: paths for key, paths in found.items() if len(paths) > 1}
    if twice:  # only if Ray recomputed rows in other groupings than it first wrote them: keep the first copy
        folder.drop_rows({key: paths[1:] for key, paths in twice.items()})
    return summarize(folder.errors())
