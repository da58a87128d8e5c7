"""effnet.search.index: exact search against numpy, the auto kind choice, approximate recall, storage and bad input.

Vectors here are synthetic (seeded); the real-photo tests are in test_search_dedup.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from effnet.errors import EffnetError
from effnet.pipeline.sinks import EmbeddingColumns, schema
from effnet.search import Index
from effnet.search import index as index_module
from effnet.search.index import exact_neighbours, recall_at_k

SETTINGS = {"task": "embed", "dtype": "float32", "model": "efficientnet_lite0", "weights": None, "size": 224,
            "resize": "crop", "precision": "fp32"}


def clustered(count: int, dim: int, clusters: int = 100, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Gaussian clusters around random centres: the shape of real embeddings (groups of similar images)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 10_000):  # in chunks: no float64 temporaries of the whole set
        n = min(10_000, count - start)
        out[start:start + n] = centres[rng.integers(0, clusters, n)]
        out[start:start + n] += spread * rng.standard_normal((n, dim), dtype=np.float32)
    return out


def write_embeddings(path, vectors: np.ndarray, names=None, failed=(), **settings) -> str:
    """An `effnet embed`-shaped Parquet file (same schema and metadata); rows in `failed` are error rows."""
    dim = vectors.shape[1]
    columns = EmbeddingColumns(dim)
    valid = np.ones(len(vectors), dtype=bool)
    valid[list(failed)] = False
    names = names or [f"{os.path.basename(str(path))}-{i}.jpg" for i in range(len(vectors))]
    table = pa.Table.from_arrays(
        [pa.array(names), pa.array([64] * len(vectors), pa.int32()), pa.array([48] * len(vectors), pa.int32()),
         *columns(vectors, valid), pa.array([None if v else "truncated image" for v in valid], pa.string()),
         pa.array([1000] * len(vectors), pa.int64()), pa.array([0] * len(vectors), pa.int64())],
        schema=schema(columns, SETTINGS | settings),
    )
    pq.write_table(table, path)
    return str(path)


def test_exact_search_equals_numpy_brute_force():
    vectors = clustered(3000, 64, clusters=20)
    queries = clustered(50, 64, clusters=20, seed=1)
    index = Index.from_vectors(vectors, kind="exact")
    scores, ids = index.search_vectors(queries, k=10)
    normalized = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ normalized.T
    top = np.argsort(-expected, axis=1)[:, :10]
    assert (ids == top).mean() > 0.999  # float ties may swap a pair; the scores below must still agree
    np.testing.assert_allclose(scores, np.take_along_axis(expected, top, axis=1), rtol=0, atol=1e-5)
    assert (ids == exact_neighbours(vectors, queries, 10, "cosine")).mean() > 0.999


def test_l2_metric_scores_are_euclidean_distances():
    vectors = clustered(500, 16, clusters=5)
    scores, ids = Index.from_vectors(vectors, kind="exact", metric="l2").search_vectors(vectors[:3], k=2)
    assert list(ids[:, 0]) == [0, 1, 2] and np.allclose(scores[:, 0], 0, atol=1e-3)
    np.testing.assert_allclose(scores[:, 1], np.linalg.norm(vectors[ids[:, 1]] - vectors[:3], axis=1), rtol=1e-4)


def test_auto_picks_exact_then_hnsw_then_compressed_and_says_why():
    vectors = clustered(4000, 32, clusters=20)
    said = []
    small = Index.from_vectors(vectors, exact_below=5000, log=said.append)
    assert small.meta["kind"] == "exact" and "4000 vectors < 5000" in said[-1]
    large = Index.from_vectors(vectors, exact_below=1000, log=said.append)
    assert large.meta["kind"] == "hnsw" and "efSearch" in large.meta["parameters"]
    assert large.meta["tuning"]["recall"] >= 0.95 and "recall@10" in said[-1]
    tight = Index.from_vectors(vectors, exact_below=1000, memory_budget=100_000, log=said.append)
    assert tight.meta["kind"] == "ivf-pq" and {"nlist", "nprobe", "pq_m"} <= set(tight.meta["parameters"])
    assert "memory budget" in said[-1]


@pytest.mark.slow
def test_approximate_recall_at_10_against_exact_on_clustered_vectors():
    # 60,000 x 1280 float32 (293 MiB): the 500k x 1280 (2.4 GiB) takes ~10 min to build an HNSW graph on
    # 2 shared cores; benchmarks/search.py runs the larger sizes. Recall is measured on queries that are not in
    # the index (new draws from the same clusters), against exact search, k = 10.
    vectors = clustered(60_000, 1280, clusters=200)
    rng = np.random.default_rng(7)
    picked = vectors[rng.choice(len(vectors), 200, replace=False)]
    queries = picked + 0.1 * rng.standard_normal(picked.shape, dtype=np.float32)
    truth = exact_neighbours(vectors, queries, 10, "cosine")
    index = Index.from_vectors(vectors, kind="auto", exact_below=50_000)
    assert index.meta["kind"] == "hnsw"
    _, found = index.search_vectors(queries, 10)
    assert recall_at_k(found, truth) >= 0.95


def test_tuned_hnsw_reaches_its_target_on_queries_off_the_collection(tmp_path):
    # Queries that are not collection vectors: new draws from the clusters, and copies of collection vectors with
    # noise (cosine ~0.8 to them, as benchmarks/search.py's queries). Tuned on the held-out collection vectors alone,
    # efSearch came out at 16 here: fresh draws got 0.98, the copies only 0.86-0.89 (data seeds 0-3); the copies'
    # top 10 are decided by the noise, which the graph does not know. The index is saved and loaded first, so the
    # tuned efSearch must also survive storage.
    vectors = clustered(20_300, 256, clusters=200)
    vectors, fresh = vectors[:20_000], vectors[20_000:]
    Index.from_vectors(vectors, kind="hnsw").save(tmp_path / "idx")
    index = Index.load(tmp_path / "idx")
    rng = np.random.default_rng(7)
    picked = vectors[rng.choice(len(vectors), 300, replace=False)]
    picked /= np.linalg.norm(picked, axis=1, keepdims=True)
    copies = picked + 0.72 / np.sqrt(256) * rng.standard_normal(picked.shape, dtype=np.float32)  # noise norm 0.72
    for queries in (fresh, copies):
        _, found = index.search_vectors(queries, 10)
        # measured 0.992 and 0.970 (seeds 1-3: >= 0.989 and >= 0.966); the target is the default 0.95
        assert recall_at_k(found, exact_neighbours(vectors, queries, 10, "cosine")) >= 0.95
    assert index.meta["tuning"]["recall"] >= 0.95


def test_ivf_pq_reaches_its_recall_target():
    vectors = clustered(10_000, 64, clusters=50)
    index = Index.from_vectors(vectors, kind="ivf-pq", recall=0.9)
    queries = vectors[:100] + 0.05 * np.random.default_rng(3).standard_normal((100, 64), dtype=np.float32)
    _, found = index.search_vectors(queries, 10)
    # the tuned nprobe reached 0.9 on the held-out sample; fresh queries land within a few points of it
    assert recall_at_k(found, exact_neighbours(vectors, queries, 10, "cosine")) >= 0.85
    assert index.meta["tuning"]["recall"] >= 0.9


def test_ivf_pq_re_ranks_with_float16_copies_while_they_fit_the_memory_budget():
    # float16 copies: 2 * 64 + 2 (PQ code) + 8 (id) = 138 bytes a vector; 8-bit: 74. A 100-byte budget takes 8-bit.
    vectors = clustered(10_000, 64, clusters=50)
    roomy = Index.from_vectors(vectors, kind="ivf-pq")
    tight = Index.from_vectors(vectors, kind="ivf-pq", memory_budget=10_000 * 100)
    assert roomy.meta["parameters"]["refine"] == "SQfp16" and tight.meta["parameters"]["refine"] == "SQ8"
    assert len(faiss.serialize_index(roomy.faiss_index)) > 1.5 * len(faiss.serialize_index(tight.faiss_index))
    # 8-bit rounding reorders neighbours at nearly equal distances: its best recall is lower (measured 0.942 here;
    # float16 reaches the 0.95 target)
    assert roomy.meta["tuning"]["recall"] >= 0.95 and tight.meta["tuning"]["recall"] >= 0.9
    assert roomy.meta["tuning"]["recall"] >= tight.meta["tuning"]["recall"]


def test_build_save_load_search_from_embeddings_files(tmp_path):
    vectors = clustered(300, 32, clusters=10)
    first = write_embeddings(tmp_path / "a.parquet", vectors[:200], failed=[5, 6])
    index = Index.build([first], tmp_path / "idx")
    assert len(index) == 198 and index.meta["skipped_error_rows"] == 2
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["format_version"] == 1 and meta["model"] == "efficientnet_lite0" and meta["size"] == 224
    assert meta["resize"] == "crop" and meta["kind"] == "exact"
    loaded = Index.load(tmp_path / "idx")
    results = loaded.search([first], k=3)
    assert results.column_names == ["query", "rank", "path", "score"]
    table = results.to_pandas()
    best = table[table["rank"] == 1]
    assert (best["query"] == best["path"]).all() and len(best) == 198  # every vector finds itself first

    # add: new vectors are found; a file already indexed adds nothing
    second = write_embeddings(tmp_path / "b.parquet", vectors[200:])
    assert loaded.add([second]) == 100 and len(Index.load(tmp_path / "idx")) == 298
    assert loaded.add([first]) == 0
    again = Index.load(tmp_path / "idx").search([second], k=1).to_pandas()
    assert (again["query"] == again["path"]).all()


def test_bad_inputs_name_the_file_and_change_nothing(tmp_path):
    vectors = clustered(100, 32, clusters=4)
    good = write_embeddings(tmp_path / "good.parquet", vectors)
    index = Index.build([good], tmp_path / "idx")
    before = (tmp_path / "idx" / "index.faiss").read_bytes()
    other_dim = write_embeddings(tmp_path / "wide.parquet", clustered(10, 64))
    other_model = write_embeddings(tmp_path / "b3.parquet", vectors, model="efficientnet_b3", size=300)
    empty = write_embeddings(tmp_path / "empty.parquet", vectors[:0])
    all_failed = write_embeddings(tmp_path / "failed.parquet", vectors[:3], failed=[0, 1, 2])
    for bad, words in [(other_dim, "dim 64"), (other_model, "model 'efficientnet_b3'"), (empty, "empty"),
                       (all_failed, "all failed")]:
        with pytest.raises(EffnetError, match=os.path.basename(bad)) as caught:
            index.add([bad])
        assert words in str(caught.value)
    assert (tmp_path / "idx" / "index.faiss").read_bytes() == before and len(Index.load(tmp_path / "idx")) == 100
    with pytest.raises(EffnetError, match="exists: pass --add"):
        Index.build([good], tmp_path / "idx")

    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(EffnetError, match="format version 99 was written by a newer effnet"):
        Index.load(tmp_path / "idx")
    with pytest.raises(EffnetError, match="not an effnet index"):
        Index.load(tmp_path)


def test_an_exception_mid_build_leaves_the_previous_index(tmp_path, monkeypatch):
    vectors = clustered(200, 16, clusters=4)
    Index.build([write_embeddings(tmp_path / "a.parquet", vectors[:50])], tmp_path / "idx")
    everything = write_embeddings(tmp_path / "b.parquet", vectors)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(index_module.pq, "write_table", fail)  # after index.faiss is written, before the swap
    with pytest.raises(RuntimeError, match="injected"):
        Index.build([everything], tmp_path / "idx", overwrite=True)
    monkeypatch.undo()
    assert len(Index.load(tmp_path / "idx")) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "idx"]  # no temp left


def test_a_killed_index_process_leaves_the_previous_index(tmp_path):
    vectors = clustered(200, 16, clusters=4)
    Index.build([write_embeddings(tmp_path / "a.parquet", vectors[:50])], tmp_path / "idx")
    write_embeddings(tmp_path / "b.parquet", vectors)
    # The child dies by SIGKILL (no cleanup runs) while writing the new folder's rows file.
    child = textwrap.dedent(f"""
        import os, signal, sys
        from effnet.search import index
        index.pq.write_table = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        sys.argv = ["effnet", "index", {str(tmp_path / "b.parquet")!r}, "-o", {str(tmp_path / "idx")!r},
                    "--overwrite"]
        from effnet.cli import main
        main()
    """)
    finished = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert finished.returncode == -signal.SIGKILL
    assert len(Index.load(tmp_path / "idx")) == 50
    # the next build succeeds and clears the dead process's temporary folder
    Index.build([str(tmp_path / "b.parquet")], tmp_path / "idx", overwrite=True)
    assert len(Index.load(tmp_path / "idx")) == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "idx"]


def test_add_to_an_approximate_index_keeps_row_numbers(tmp_path):
    # hnsw indexes keep row numbers in an ids map (the tuning sample is added last); added rows continue them
    vectors = clustered(3000, 16, clusters=10)
    first = write_embeddings(tmp_path / "a.parquet", vectors[:2000])
    second = write_embeddings(tmp_path / "b.parquet", vectors[2000:])
    index = Index.build([first], tmp_path / "idx", kind="hnsw")
    assert Index.load(tmp_path / "idx").add([second]) == 1000
    results = Index.load(tmp_path / "idx").search([first, second], k=1).to_pandas()
    assert (results["query"] == results["path"]).mean() >= 0.99 and len(results) == 3000
    assert index.meta["tuning"]["recall"] >= 0.95
