"""The library verbs over the batch pipeline: `embed` (feature vectors) and `classify` (top-k labels).

    >>> vectors = effnet.embed(["cat.jpg", "photos/"])               # (N, feature_dim) float32, input order
    >>> table = effnet.classify("photos/", top_k=5)                  # pyarrow.Table: path, labels, scores ...

Both expand their sources like the CLI (files, folders, globs, manifests, URLs; see `pipeline.sources`), decode
with the model family's eval preprocessing (see `pipeline.decode`) and run the model in batches. `run` is the one
function underneath both, and under `effnet embed` / `effnet classify`, which add a resumable file output.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
import torch

from .errors import EffnetError
from .pipeline import (
    Batcher,
    Decoder,
    EmbeddingColumns,
    JobSizedEngine,
    MemorySink,
    ParquetSink,
    Report,
    Runner,
    Sources,
    TopKColumns,
    recipe_for,
)
from .pipeline.decode import DEFAULT_DECODE_MEMORY
from .pipeline.sinks import embedding_matrix

DEFAULT_MODEL = "efficientnet_lite0"  # small, fast on CPU, and its trained weights ship as a pip package
TASKS = ("embed", "classify")
Sourceish = str | os.PathLike | Sequence[str | os.PathLike]


def _load_model(name: str) -> torch.nn.Module:
    """The one place a model name (or handle, or weights path) becomes a model with weights (CLI and verbs)."""
    import effnet

    return effnet.load(name)


def run(
    task: str,
    sources: Sourceish,
    model: str | torch.nn.Module = DEFAULT_MODEL,
    *,
    out: str | os.PathLike | None = None,
    size: int | None = None,
    resize: str = "crop",
    batch_size: int = 16,
    workers: int | None = None,
    executor: str = "thread",
    dtype: str = "float32",
    top_k: int = 5,
    path_column: str = "path",
    shard_rows: int = 1024,
    overwrite: bool = False,
    progress: bool = False,
    engine: str = "auto",
    precision: str = "fp32",
    device: str = "auto",
    ray: str | bool | None = None,
    max_pixels: int | None = None,
    decode_memory: int | None = DEFAULT_DECODE_MEMORY,
) -> Report:
    """Run the pipeline. With `out`, rows go to a resumable Parquet (or .npy) file; without, to `Report.result`.

    ray: run on Ray Data instead (`effnet.scale_out`): "local" or True for a Ray instance on this machine,
    "auto" or an address for an existing cluster; `out` is then a folder of Parquet files (or an s3:// URL).
    max_pixels: refuse images with more pixels (None: Pillow's MAX_IMAGE_PIXELS); decode_memory: bytes of decode
    working memory all workers share (see docs/limits.md). A size, batch size or worker count this machine cannot
    run is refused before anything runs (`effnet.limits`).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    network = _load_model(model) if isinstance(model, str) else model
    spec = network.spec
    size = size or spec.native_size
    if not ray:
        from .architectures import architecture
        from .limits import check_job_fits

        decode_workers = (os.cpu_count() or 1) if workers is None else workers
        check_job_fits(getattr(network, "architecture", None) or architecture(spec.name), size, batch_size,
                       decode_workers)
    if task == "classify" and top_k > spec.num_classes >= 1:
        raise EffnetError(f"--top-k {top_k} is more than the {spec.num_classes} classes of {spec.name}")
    decoder = Decoder(size, recipe_for(spec.name, spec.family), resize, max_pixels=max_pixels,
                      decode_memory=decode_memory)
    if task == "embed":
        columns = EmbeddingColumns(spec.feature_dim, dtype)
        settings = {"task": task, "dtype": dtype}
    else:
        columns = TopKColumns(top_k, spec.num_classes, getattr(network, "labels", None))
        settings = {"task": task, "top_k": columns.k}
    settings |= {"model": spec.name, "weights": getattr(spec, "source", None), "size": size, "resize": resize,
                 "precision": precision}
    if ray:  # the same stages on a Ray cluster
        from . import scale_out

        return scale_out.run(task, sources, network, decoder=decoder, columns=columns, settings=settings,
                             signature="features" if task == "embed" else "logits", out=out, ray_address=ray,
                             path_column=path_column, batch_size=batch_size, engine=engine, precision=precision,
                             device=device, overwrite=overwrite, progress=progress)
    if out is None:
        sink = MemorySink(columns, settings)
    else:
        sink = ParquetSink(out, columns, settings, shard_rows=shard_rows, overwrite=overwrite)
    signature = "features" if task == "embed" else "logits"

    def engine_for_job(images: int):
        from .engines import create_engine

        chosen = create_engine(network, engine, precision, resolve_device(device), input_size=(size, size),
                               signature=signature, job_images=images if engine == "auto" else None)
        if progress:
            print(f"engine: {chosen.description}", file=sys.stderr)
        return chosen

    runner = Runner(
        Sources(sources, path_column),
        decoder,
        Batcher(),
        JobSizedEngine(engine_for_job),
        sink,
        batch_size=batch_size,
        workers=workers,
        executor=executor,
        progress=progress,
    )
    return runner()


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" where PyTorch sees a GPU, else "cpu"; "cpu"/"cuda" as given (the engine checks cuda)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def embed(
    sources: Sourceish,
    model: str | torch.nn.Module = DEFAULT_MODEL,
    *,
    size: int | None = None,
    resize: str = "crop",
    batch_size: int = 16,
    workers: int | None = None,
    errors: str = "raise",
    as_table: bool = False,
    progress: bool = False,
    engine: str = "auto",
    precision: str = "fp32",
    device: str = "auto",
    ray: str | bool | None = None,
    max_pixels: int | None = None,
    decode_memory: int | None = DEFAULT_DECODE_MEMORY,
):
    """Feature vectors of images: (N, feature_dim) float32, one row per input in input order.

    sources: a path, folder, glob, manifest or URL, or a list of them. model: a name (default
    efficientnet_lite0) or a loaded EfficientNet. errors: "raise" (an EffnetError naming the inputs that
    failed, after the run) or "keep" (their rows are NaN; with as_table, null with `error` set). as_table:
    return the Arrow table the CLI writes (path, width, height, embedding, error ...) instead of the array.
    engine, precision: see `effnet.engines.create_engine`; "auto" runs a small job on eager torch and times the
    installed engines for a large one (once, then cached). device: "auto" (a CUDA GPU where PyTorch sees one),
    "cpu" or "cuda"; decoding always runs on the host's cores. ray: run on Ray Data ("local", or a cluster's
    address; see `run`), the same rows. max_pixels, decode_memory: the decode limits of `run` (docs/limits.md).
    """
    if errors not in ("raise", "keep"):
        raise ValueError(f"errors must be 'raise' or 'keep', not {errors!r}")
    report = run(
        "embed", sources, model, size=size, resize=resize, batch_size=batch_size, workers=workers, progress=progress,
        engine=engine, precision=precision, device=device, ray=ray, max_pixels=max_pixels, decode_memory=decode_memory,
    )
    table = report.result
    if errors == "raise":
        _raise_failures(table)
    if as_table:
        return table
    return embedding_matrix(table, table.schema.field("embedding").type.list_size, np.float32)


def classify(
    sources: Sourceish,
    model: str | torch.nn.Module = DEFAULT_MODEL,
    *,
    top_k: int = 5,
    size: int | None = None,
    resize: str = "crop",
    batch_size: int = 16,
    workers: int | None = None,
    errors: str = "raise",
    progress: bool = False,
    engine: str = "auto",
    precision: str = "fp32",
    device: str = "auto",
    ray: str | bool | None = None,
    max_pixels: int | None = None,
    decode_memory: int | None = DEFAULT_DECODE_MEMORY,
):
    """The top-k classes of images as an Arrow table: path, width, height, labels, indices, scores, error ...

    One row per input, in input order; `scores` are softmax probabilities, best first. errors: "raise" or
    "keep" (failed inputs keep their row, with `error` set and null results). ray, max_pixels, decode_memory: as
    for `embed`.
    """
    if errors not in ("raise", "keep"):
        raise ValueError(f"errors must be 'raise' or 'keep', not {errors!r}")
    report = run(
        "classify",
        sources,
        model,
        top_k=top_k,
        size=size,
        resize=resize,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        engine=engine,
        precision=precision,
        device=device,
        ray=ray,
        max_pixels=max_pixels,
        decode_memory=decode_memory,
    )
    if errors == "raise":
        _raise_failures(report.result)
    return report.result


def _raise_failures(table) -> None:
    failed = [(p, e) for p, e in zip(table.column("path").to_pylist(), table.column("error").to_pylist()) if e]
    if failed:
        shown = "; ".join(f"{path}: {error}" for path, error in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise EffnetError(
            f"{len(failed)} of {table.num_rows} inputs could not be read: {shown}{more}. "
            "Pass errors='keep' to get their rows anyway (NaN vectors, null labels, `error` set)."
        )
