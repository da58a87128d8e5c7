"""Near-duplicate groups: images whose feature vectors are within a cosine threshold, joined into groups.

    dedup(SRC or embeddings Parquet) -> Arrow table: group, path, keep, similarity, width, height, size_bytes, error

Each vector's `NEIGHBOURS` nearest (an `Index`, exact or approximate as its auto choice says) above `threshold`
are linked; linked images form a group (connected components, so a group can be larger than NEIGHBOURS). In each
group the suggested file to keep is the largest resolution, then the largest file, then the first path.
`similarity` is each member's cosine similarity to that file. Images in no group are not listed; inputs that
failed to decode are, with `error` set and no group (every input is accounted for).

Images are embedded at DEFAULT_SIZE (centre crop), not the model's native size: near-duplicates share their
layout and colours, not fine detail, and the smaller input is both faster and, measured, better at telling copies
from other photos. DEFAULT_SIZE and DEFAULT_THRESHOLD are measured, not guessed: docs/search.md has the
precision/recall curves on the near-duplicate corpora of the tests (tests/near_duplicates.py) for each size, made
by benchmarks/dedup_curve.py.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pyarrow as pa

from ..errors import EffnetError
from .index import Index, _is_embeddings_file, read_embeddings

# Lite0 at 160 px groups the 21-photo wide corpus perfectly from cosine 0.50 to 0.80 (224 px: 0.60 to 0.70,
# 128 px: 0.65 to 0.75); 0.70 leaves room on both sides, more below for the hard negatives (burst shots, one scene
# from another angle) that real collections have and the corpus does not. See docs/search.md.
DEFAULT_SIZE = 160
DEFAULT_THRESHOLD = 0.70
NEIGHBOURS = 20  # neighbours looked at per image; larger groups still join through shared members


def groups_of(vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Group label of each row (-1: in no group) from the cosine similarity of its nearest neighbours."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count = len(vectors)
    if count < 2:
        return np.full(count, -1, dtype=np.int64)
    index = Index.from_vectors(vectors, metric="cosine")
    scores, ids = index.search_vectors(vectors, min(neighbours + 1, count))
    linked = (ids >= 0) & (scores >= threshold) & (ids != np.arange(count)[:, None])
    rows = np.repeat(np.arange(count), ids.shape[1])[linked.reshape(-1)]
    graph = coo_matrix((np.ones(len(rows)), (rows, ids[linked])), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    labels = labels.astype(np.int64)
    labels[sizes[labels] < 2] = -1
    # number the groups 0, 1, ... in order of their first member
    first = {}
    for label in labels[labels >= 0]:
        first.setdefault(int(label), len(first))
    return np.array([first.get(int(label), -1) for label in labels], dtype=np.int64)


def dedup(sources: str | os.PathLike | Sequence[str | os.PathLike], threshold: float = DEFAULT_THRESHOLD, *,
          model: str = None, size: int = DEFAULT_SIZE, neighbours: int = NEIGHBOURS, batch_size: int = 16,
          workers: int | None = None, progress: bool = False) -> pa.Table:
    """Near-duplicate groups among images (files, folders, manifests) or the vectors of `effnet embed` files.

    Images are embedded at `size` px (centre crop); an embeddings file keeps the size it was made at.
    """
    from ..embed import DEFAULT_MODEL, run
    from ..pipeline.sinks import embedding_matrix

    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise EffnetError("nothing to deduplicate: give a folder, files or an embeddings Parquet file")
    if not 0 < threshold <= 1:
        raise EffnetError(f"--threshold is a cosine similarity in (0, 1], not {threshold}")
    if all(_is_embeddings_file(str(source)) for source in sources):
        read = read_embeddings(sources)  # error rows were counted and dropped: they have no vector to compare
        table, vectors = read.rows, read.vectors
        errors = pa.nulls(table.num_rows, pa.string())
    else:
        report = run("embed", sources, model or DEFAULT_MODEL, size=size, batch_size=batch_size, workers=workers,
                     progress=progress)
        table = report.result
        if table.num_rows == 0:
            raise EffnetError(f"found no images in {' '.join(map(str, sources))}")
        vectors = embedding_matrix(table, table.schema.field("embedding").type.list_size, np.float32)
        errors = table.column("error")
    good = ~np.isnan(vectors).any(axis=1)
    labels = np.full(len(vectors), -1, dtype=np.int64)
    labels[good] = groups_of(vectors[good], threshold, neighbours)
    return _group_table(table, vectors, labels, errors)


def _group_table(table: pa.Table, vectors: np.ndarray, labels: np.ndarray, errors) -> pa.Table:
    width = np.asarray(table.column("width").fill_null(0), dtype=np.int64)
    height = np.asarray(table.column("height").fill_null(0), dtype=np.int64)
    size = np.asarray(table.column("size_bytes").fill_null(0), dtype=np.int64)
    normalized = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    keep = np.zeros(len(labels), dtype=bool)
    similarity = np.full(len(labels), np.nan, dtype=np.float32)
    for label in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == label)
        # largest resolution, then largest file, then the first path (np.lexsort: last key is the primary one)
        best = members[np.lexsort((members, -size[members], -(width * height)[members]))[0]]
        keep[best] = True
        similarity[members] = normalized[members] @ normalized[best]
    failed = np.asarray(pa.array(errors).is_valid(), dtype=bool) if len(errors) else np.zeros(0, bool)
    listed = np.flatnonzero((labels >= 0) | failed)
    order = listed[np.lexsort((listed, ~keep[listed], np.where(labels[listed] < 0, np.iinfo(np.int64).max,
                                                                 labels[listed])))]
    take = pa.array(order, pa.int64())
    return pa.table({
        "group": pa.array(labels[order], pa.int64(), mask=labels[order] < 0),
        "path": table.column("path").take(take),
        "keep": pa.array(keep[order]),
        "similarity": pa.array(similarity[order], pa.float32(), mask=np.isnan(similarity[order])),
        "width": table.column("width").take(take),
        "height": table.column("height").take(take),
        "size_bytes": table.column("size_bytes").take(take),
        "error": pa.array(errors).take(take) if len(errors) else pa.nulls(len(order), pa.string()),
    })
