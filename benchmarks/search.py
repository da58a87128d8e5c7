"""Vector search and near-duplicate detection, each against its reference, side by side in one run.

    python benchmarks/search.py                          # 100k and 1M vectors of dim 1280, then dedup
    python benchmarks/search.py --sizes 100000 --skip-dedup
    python benchmarks/search.py --skip-search --speed-sides 1024

Part 1, search: synthetic clustered vectors (dim 1280, 1,000 Gaussian clusters, L2-normalized: the shape of image
embeddings), generated in chunks. For each size: effnet's `exact` (faiss flat), `hnsw` (up to --max-hnsw vectors:
past the default memory budget auto does not pick it) and `ivf-pq` indexes (their search parameters tuned by
`Index` to recall@10 >= 0.95, as `effnet index` does) against brute-force numpy (`vectors @ queries.T` +
argpartition) on the same vectors and queries. Columns: build seconds (training, adding and tuning), index size
(faiss's serialized bytes, what it holds in memory), one-query latency (median of 50, ms), throughput (1,000
queries in one call, queries/s) and recall@10 against exact search on 500 fresh queries. 1M vectors need ~20 GiB
of memory at the peak (the exact stage) and ~15 minutes on 2 cores.

Part 2, dedup: `effnet dedup` at its defaults against imagededup's PHash (`encode_images` + `find_duplicates`, its
default max_distance_threshold=10), in this process, the same folders:
- accuracy on the two near-duplicate corpora of the tests (tests/near_duplicates.py): pairwise precision and
  recall against the truth;
- time per image of the whole job (effnet: model load, decoding, embedding, index and groups; PHash: hashing and
  its search) on speed corpora of --speed-images distinct photo-like JPEGs (random crops of the real photos, see
  `speed_corpus`) at each longer side of --speed-sides: thumbnails (320 px) to photo-library sizes (2048 px,
  3 MP). After a warm-up run of each (file cache, effnet's one-off engine choice, cached in $EFFNET_HOME), two
  alternated runs each; the faster counts.

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

from effnet.search import DEFAULT_SIZE, DEFAULT_THRESHOLD, Index, dedup  # noqa: E402
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


def search_rows(count: int, centres: np.ndarray, kinds: list[str], max_hnsw: int) -> list[tuple]:
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
        if kind == "hnsw" and count > max_hnsw:
            print(f"  hnsw: not built at {count:,} (over --max-hnsw {max_hnsw:,}: the full vectors plus the graph "
                  f"pass `effnet index`'s 4 GiB default memory budget, so auto picks ivf-pq there)", flush=True)
            continue
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


def speed_corpus(folder: Path, count: int, long_side: int, seed: int = 0) -> list[str]:
    """`count` distinct photo-sized JPEGs for timing: random crops (70-95 % of each side) of the wide corpus's real
    photos, scaled so the longer side is `long_side`, with sensor-like noise (uniform in +-3 grey levels, sd 2;
    upscaled photos are otherwise smoother than a camera's, and cheaper to decode), quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [near_duplicates.photo(name, 1024) for name in near_duplicates.WIDE]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        image = photos[number % len(photos)]
        width, height = (round(side * rng.uniform(0.70, 0.95)) for side in image.size)
        left, top = int(rng.integers(0, image.width - width + 1)), int(rng.integers(0, image.height - height + 1))
        crop = image.crop((left, top, left + width, top + height))
        scale = long_side / max(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BILINEAR)
        pixels = np.asarray(crop, dtype=np.int16) + rng.integers(-3, 4, (crop.height, crop.width, 3), dtype=np.int16)
        path = folder / f"{number:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def phash_class():
    # imagededup imports torchvision at package import, for its CNN method only; torchvision is not installable
    # here (it pulls a CUDA torch). PHash never touches it, so stand-in modules satisfy those imports.
    from unittest import mock

    for name in ("torchvision", "torchvision.models", "torchvision.transforms", "torchvision.models.vision_transformer"):
        sys.modules.setdefault(name, mock.MagicMock(name=name))
    from imagededup.methods import PHash

    return PHash


def run_effnet(folder: str) -> tuple[float, set]:
    started = time.perf_counter()
    groups = dedup(folder, progress=False)
    seconds = time.perf_counter() - started
    return seconds, near_duplicates.pairs_of_groups(groups.column("path").to_pylist(),
                                                    groups.column("group").to_pylist())


def run_phash(folder: str) -> tuple[float, set]:
    hasher = phash_class()(verbose=False)
    started = time.perf_counter()
    encodings = hasher.encode_images(image_dir=folder)
    duplicates = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=10)
    seconds = time.perf_counter() - started
    return seconds, {frozenset((f"{folder}/{a}", f"{folder}/{b}")) for a, dups in duplicates.items() for b in dups}


def dedup_rows(speed_count: int, speed_sides: list[int]) -> tuple[list[tuple], list[tuple]]:
    """(accuracy rows: corpus, contender, precision, recall; speed rows: side, images, effnet ms, PHash ms)."""
    accuracy, speed = [], []
    with tempfile.TemporaryDirectory() as folder:
        for corpus, originals, distractors in (("small (40 files)", near_duplicates.ORIGINALS,
                                                near_duplicates.DISTRACTORS),
                                               ("wide (147 files)", near_duplicates.WIDE, ())):
            images = Path(folder) / corpus.split()[0]
            true = near_duplicates.true_pairs(near_duplicates.write(images, originals, distractors))
            for name, contender in (("effnet dedup", run_effnet), ("imagededup PHash", run_phash)):
                accuracy.append((corpus, name, *near_duplicates.precision_recall(contender(str(images))[1], true)))
        for side in speed_sides:
            images = Path(folder) / f"speed{side}"
            started = time.perf_counter()
            paths = speed_corpus(images, speed_count, side)
            print(f"  speed corpus: {len(paths)} JPEGs, longer side {side} px, written in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            # warm-up: the file cache, effnet's one-off engine timing (cached in $EFFNET_HOME), PHash's pool
            run_effnet(str(images)), run_phash(str(images))
            times = {"effnet": [], "phash": []}
            for _ in range(2):  # alternated, best of two: load from other jobs falls on both
                times["effnet"].append(run_effnet(str(images))[0])
                times["phash"].append(run_phash(str(images))[0])
            speed.append((side, len(paths), min(times["effnet"]) / len(paths) * 1e3,
                          min(times["phash"]) / len(paths) * 1e3))
    return accuracy, speed


def print_search_table(rows: list[tuple]) -> None:
    print(f"\nSearch, dim {DIM}, k=10 (recall against exact search on 500 queries; peak RSS "
          f"{peak_gib():.2f} GiB)")
    print(f"{'vectors':>9} {'contender':<18} {'build s':>8} {'size MiB':>9} {'1-query ms':>11} {'queries/s':>10} "
          f"{'recall@10':>9}  parameters")
    for count, name, build, size, latency, throughput, recall, parameters in rows:
        print(f"{count:>9,} {name:<18} {build:>8.1f} {size / 2**20:>9.0f} {latency:>11.2f} {throughput:>10.0f} "
              f"{recall:>9.3f}  {parameters}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes")
    parser.add_argument("--kinds", default="exact,hnsw,ivf-pq", help="comma-separated effnet index kinds")
    parser.add_argument("--max-hnsw", type=int, default=200_000,
                        help="largest collection to build HNSW for (auto stops choosing it past 4 GiB)")
    parser.add_argument("--skip-dedup", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--speed-images", type=int, default=1000, help="images per dedup speed corpus")
    parser.add_argument("--speed-sides", default="320,1024,2048",
                        help="longer sides (px) of the dedup speed corpora")
    options = parser.parse_args()
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, DIM)).astype(np.float32)

    rows = []
    for count in map(int, options.sizes.split(",")) if not options.skip_search else ():
        rows += search_rows(count, centres, options.kinds.split(","), options.max_hnsw)
    if rows:
        print_search_table(rows)
    if not options.skip_dedup:
        accuracy, speed = dedup_rows(options.speed_images, [int(side) for side in options.speed_sides.split(",")])
        print(f"\nNear-duplicates (tests/near_duplicates.py), pairwise against the truth; effnet dedup at its defaults "
              f"(Lite0, {DEFAULT_SIZE} px, cosine {DEFAULT_THRESHOLD}), PHash max_distance_threshold=10")
        print(f"{'corpus':<18} {'contender':<18} {'precision':>9} {'recall':>7}")
        for corpus, name, precision, recall in accuracy:
            print(f"{corpus:<18} {name:<18} {precision:>9.3f} {recall:>7.3f}")
        print("\nTime per image, whole job (effnet: model load, decode, embedding, index, groups; PHash: "
              "encode_images + find_duplicates), best of 2 alternated runs after a warm-up")
        print(f"{'longer side':>11} {'images':>7} {'effnet ms':>10} {'PHash ms':>9} {'PHash / effnet':>15}")
        for side, count, effnet_ms, phash_ms in speed:
            print(f"{side:>11} {count:>7} {effnet_ms:>10.2f} {phash_ms:>9.2f} {phash_ms / effnet_ms:>14.2f}x")


if __name__ == "__main__":
    main()
