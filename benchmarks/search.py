"""Vector search and near-duplicate detection, each against its reference, side by side in one run.

    python benchmarks/search.py                          # 100k and 200k vectors of dim 1280, then dedup
    python benchmarks/search.py --sizes 100000 --skip-dedup

Part 1, search: synthetic clustered vectors (dim 1280, 1,000 Gaussian clusters, L2-normalized: the shape of image
embeddings), generated in chunks. For each size: effnet's `exact` (faiss flat), `hnsw` and `ivf-pq` indexes (their
search parameters tuned by `Index` to recall@10 >= 0.95, as `effnet index` does) against brute-force numpy
(`vectors @ queries.T` + argpartition) on the same vectors and queries. Columns: build seconds (training, adding
and tuning), index size (faiss's serialized bytes, what it holds in memory), one-query latency (median of 50,
ms), throughput (1,000 queries in one call, queries/s) and recall@10 against exact search on 500 fresh queries.

Part 2, dedup: the near-duplicate corpus of the tests (tests/near_duplicates.py, 40 files) with `effnet dedup`
(Lite0 embeddings, default threshold; the time includes loading the model, decoding and embedding every image)
against imagededup's PHash (`encode_images` + `find_duplicates`, its default max_distance_threshold=10) on the
same folder. Pairwise precision and recall against the truth, and time per image.

The machine is shared with other jobs; compare rows within one run.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers: the near-duplicate corpus

from effnet.search import Index, dedup  # noqa: E402
from effnet.search.index import exact_neighbours, recall_at_k  # noqa: E402
from tests import near_duplicates  # noqa: E402

DIM = 1280
CLUSTERS = 1000
SPREAD = 0.35  # within-cluster noise relative to the unit-variance centres (before normalizing)


def clustered(count: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((count, DIM), dtype=np.float32)
    for start in range(0, count, 20_000):  # chunks: no full-size float64 temporaries
        n = min(20_000, count - start)
        block = centres[rng.integers(0, len(centres), n)] + SPREAD * rng.standard_normal((n, DIM), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + n] = block
    return out


def numpy_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute force as one would write it: scores of the whole collection, the top k of each row."""
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 100):  # 100 queries x 200k scores = 80 MB at a time
        scores = queries[start:start + 100] @ vectors.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        ids[start:start + 100] = np.take_along_axis(top, order, axis=1)
    return ids


def timed(call, repeat: int = 1) -> float:
    best = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        best.append(time.perf_counter() - started)
    return float(np.median(best))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def search_rows(count: int, centres: np.ndarray, kinds: list[str]) -> list[tuple]:
    import faiss

    started = time.perf_counter()
    vectors = clustered(count, seed=count, centres=centres)
    print(f"\n{count:,} x {DIM} vectors ({vectors.nbytes / 2**30:.2f} GiB) generated in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    rng = np.random.default_rng(1)
    picked = vectors[rng.choice(count, 1000, replace=False)]
    queries = picked + 0.02 * rng.standard_normal(picked.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = exact_neighbours(vectors, queries[:500], 10, "cosine")
    rows = []

    single = [timed(lambda i=i: numpy_search(vectors, queries[i:i + 1], 10)) for i in range(50)]
    batch = timed(lambda: numpy_search(vectors, queries, 10))
    found = numpy_search(vectors, queries[:500], 10)
    rows.append((count, "numpy brute force", 0.0, vectors.nbytes, np.median(single) * 1e3, len(queries) / batch,
                 recall_at_k(found, truth), ""))
    for kind in kinds:
        started = time.perf_counter()
        index = Index.from_vectors(vectors, kind=kind)
        build = time.perf_counter() - started
        size = len(faiss.serialize_index(index.faiss_index))
        single = [timed(lambda i=i: index.search_vectors(queries[i:i + 1], 10)) for i in range(50)]
        batch = timed(lambda: index.search_vectors(queries, 10))
        _, found = index.search_vectors(queries[:500], 10)
        parameters = ", ".join(f"{k}={v}" for k, v in index.meta["parameters"].items())
        rows.append((count, f"effnet {kind}", build, size, np.median(single) * 1e3, len(queries) / batch,
                     recall_at_k(found, truth), parameters))
        print(f"  {kind}: built in {build:.1f} s; peak RSS so far {peak_gib():.2f} GiB", flush=True)
        del index
        gc.collect()
    del vectors
    gc.collect()
    return rows


def dedup_rows() -> list[tuple]:
    # imagededup imports torchvision at package import, for its CNN method only; torchvision is not installable
    # here (it pulls a CUDA torch). PHash never touches it, so stand-in modules satisfy those imports.
    from unittest import mock

    for name in ("torchvision", "torchvision.models", "torchvision.transforms", "torchvision.models.vision_transformer"):
        sys.modules.setdefault(name, mock.MagicMock(name=name))
    from imagededup.methods import PHash

    with tempfile.TemporaryDirectory() as folder:
        truth = near_duplicates.write(Path(folder) / "images")
        true = near_duplicates.true_pairs(truth)
        images = len(truth)
        dedup(str(Path(folder) / "images"), progress=False)  # warm-up: file cache, torch's first-call set-up

        started = time.perf_counter()
        groups = dedup(str(Path(folder) / "images"), progress=False)
        effnet_seconds = time.perf_counter() - started
        found = near_duplicates.pairs_of_groups(groups.column("path").to_pylist(), groups.column("group").to_pylist())
        effnet_pr = near_duplicates.precision_recall(found, true)

        hasher = PHash(verbose=False)
        hasher.encode_images(image_dir=str(Path(folder) / "images"))  # warm-up, as above
        started = time.perf_counter()
        encodings = hasher.encode_images(image_dir=str(Path(folder) / "images"))
        duplicates = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=10)
        phash_seconds = time.perf_counter() - started
        root = str(Path(folder) / "images")
        phash_pairs = {frozenset((f"{root}/{a}", f"{root}/{b}")) for a, dups in duplicates.items() for b in dups}
        phash_pr = near_duplicates.precision_recall(phash_pairs, true)
    return [("effnet dedup (Lite0, threshold 0.75, embedding included)", *effnet_pr, effnet_seconds / images * 1e3),
            ("imagededup PHash (max_distance_threshold=10)", *phash_pr, phash_seconds / images * 1e3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,200000", help="comma-separated collection sizes")
    parser.add_argument("--kinds", default="exact,hnsw,ivf-pq", help="comma-separated effnet index kinds")
    parser.add_argument("--skip-dedup", action="store_true")
    options = parser.parse_args()
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, DIM)).astype(np.float32)

    rows = []
    for count in map(int, options.sizes.split(",")):
        rows += search_rows(count, centres, options.kinds.split(","))
    print(f"\nSearch, dim {DIM}, k=10 (recall against exact search on 500 queries; peak RSS "
          f"{peak_gib():.2f} GiB)")
    print(f"{'vectors':>9} {'contender':<18} {'build s':>8} {'size MiB':>9} {'1-query ms':>11} {'queries/s':>10} "
          f"{'recall@10':>9}  parameters")
    for count, name, build, size, latency, throughput, recall, parameters in rows:
        print(f"{count:>9,} {name:<18} {build:>8.1f} {size / 2**20:>9.0f} {latency:>11.2f} {throughput:>10.0f} "
              f"{recall:>9.3f}  {parameters}")
    if not options.skip_dedup:
        print("\nNear-duplicates: tests/near_duplicates.py corpus (40 files: 5 originals x 7, 5 distractors)")
        print(f"{'contender':<58} {'precision':>9} {'recall':>7} {'ms/image':>9}")
        for name, precision, recall, per_image in dedup_rows():
            print(f"{name:<58} {precision:>9.3f} {recall:>7.3f} {per_image:>9.1f}")


if __name__ == "__main__":
    main()
