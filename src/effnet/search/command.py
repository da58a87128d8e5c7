"""The click commands `effnet index`, `effnet search` and `effnet dedup`, over `effnet.search`.

    effnet index EMBEDDINGS.parquet... -o INDEX_DIR [--kind auto|exact|hnsw|ivf-pq] [--metric cosine|l2] [--add]
    effnet search INDEX_DIR QUERY... [-k 10] [-o results.parquet]
    effnet dedup SRC|EMBEDDINGS.parquet... -o groups.parquet [--threshold T]

Registered in effnet/cli.py, one line each. Exit status: 0 done; 1 an error (named file, what to do); 2 bad usage.
Outputs are written to a temporary name and renamed, so an interrupted command leaves no half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

# Repeated from index.py / dedup.py so that --help does not import faiss (test_search_command checks they agree).
KINDS = ("auto", "exact", "hnsw", "ivf-pq")
METRICS = ("cosine", "l2")
SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _echo(message: str) -> None:
    click.echo(message, err=True)


def _write_parquet(table, output: str) -> None:
    import pyarrow.parquet as pq

    temporary = Path(output).with_name(Path(output).name + ".tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, output)


@click.command("index", context_settings=SETTINGS)
@click.argument("embeddings", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="INDEX_DIR.")
@click.option("--kind", type=click.Choice(KINDS), default="auto", show_default=True,
              help="auto: exact below 50,000 vectors, else HNSW (or IVF-PQ past --memory-budget), tuned for --recall.")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True)
@click.option("--recall", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="recall@10 against exact search that approximate kinds are tuned to reach.")
@click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="GiB the index may take in memory; auto compresses (ivf-pq) past it.")
@click.option("--add", is_flag=True, help="Add these files' vectors to the existing INDEX_DIR (same model).")
@click.option("--overwrite", is_flag=True, help="Rebuild an existing INDEX_DIR from these files.")
def index_command(embeddings, output, kind, metric, recall, memory_budget, add, overwrite) -> None:
    """Index the vectors of `effnet embed` Parquet files (error rows are skipped and counted)."""
    from ..cli import _errors_as_exit
    from .index import Index

    if add and overwrite:
        raise click.UsageError("--add and --overwrite exclude each other")
    with _errors_as_exit():
        if add:
            index = Index.load(output)
            index.add(list(embeddings), log=_echo)
        else:
            index = Index.build(list(embeddings), output, kind=kind, metric=metric, recall=recall,
                                memory_budget=int(memory_budget * 2**30), overwrite=overwrite, log=_echo)
            skipped = index.meta.get("skipped_error_rows", 0)
            _echo(f"indexed {len(index)} vectors -> {output}"
                  + (f" ({skipped} error rows skipped: they have no vector)" if skipped else ""))


@click.command("search", context_settings=SETTINGS)
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="results.parquet (query, rank, path, score) [default: print TSV to stdout].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def search_command(index_dir, queries, k, output, batch_size, quiet) -> None:
    """The K most similar indexed images of each QUERY (images, folders, manifests, or an embeddings Parquet).

    Images are embedded with the index's own model, size and preprocessing. Score: cosine similarity (higher is
    closer) or, for an l2 index, Euclidean distance (lower is closer).
    """
    from ..cli import _errors_as_exit
    from .index import Index

    with _errors_as_exit():
        index = Index.load(index_dir)
        results = index.search(list(queries), k=k, batch_size=batch_size, progress=not quiet)
    if output:
        _write_parquet(results, output)
        _echo(f"{results.num_rows} results -> {output}")
    else:
        click.echo("query\trank\tpath\tscore")
        for row in results.to_pylist():
            click.echo(f"{row['query']}\t{row['rank']}\t{row['path']}\t{row['score']:.4f}")


@click.command("dedup", context_settings=SETTINGS)
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="groups.parquet: group, path, keep, similarity, width, height, size_bytes, error.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Cosine similarity at or above which two images are near-duplicates [default: 0.7, measured: "
                   "see docs/search.md].")
@click.option("-m", "--model", default=None, help="Model for image SOURCES [default: efficientnet_lite0].")
@click.option("--size", type=click.IntRange(min=32), default=None,
              help="Input size images are embedded at [default: 160, measured: see docs/search.md].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def dedup_command(sources, output, threshold, model, size, batch_size, quiet) -> None:
    """Groups of near-duplicate images in SOURCES (images/folders/manifests, or embeddings Parquet files)."""
    import pyarrow.compute as pc

    from ..cli import _errors_as_exit
    from .dedup import DEFAULT_SIZE, DEFAULT_THRESHOLD, dedup

    with _errors_as_exit():
        groups = dedup(list(sources), DEFAULT_THRESHOLD if threshold is None else threshold, model=model,
                       size=size or DEFAULT_SIZE, batch_size=batch_size, progress=not quiet)
    _write_parquet(groups, output)
    grouped = groups.filter(pc.is_valid(groups.column("group")))
    count = len(set(grouped.column("group").to_pylist()))
    removable = grouped.num_rows - count
    failed = groups.num_rows - grouped.num_rows
    _echo(f"{count} groups of near-duplicates ({grouped.num_rows} files, {removable} removable keeping one per "
          f"group) -> {output}" + (f"; {failed} inputs failed, see the 'error' column" if failed else ""))
