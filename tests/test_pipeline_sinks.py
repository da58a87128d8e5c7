"""The sinks: row layout, atomic shards, resume (same path + size + mtime), settings checks, .npy output."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from effnet.errors import EffnetError
from effnet.pipeline import (Batcher, Decoder, EmbeddingColumns, JobSizedEngine, MemorySink, ParquetSink, Runner, Sources,
                             TopKColumns)
from effnet.pipeline.decode import recipe_for

from .test_pipeline_corpus import build_corpus

SETTINGS = {"task": "embed", "model": "fake"}


def fake_engine(images: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) -> (N, 6): per-channel mean and max, enough to tell images apart."""
    return torch.cat([images.mean(dim=(2, 3)), images.amax(dim=(2, 3))], dim=1).numpy()


class Interrupt:
    """An engine that raises KeyboardInterrupt on its `after`-th call, like Ctrl-C in the middle of a run."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return fake_engine(images)


@pytest.fixture
def corpus(tmp_path):
    return build_corpus(tmp_path / "corpus")


def run(sources, out, engine=fake_engine, settings=SETTINGS, dtype="float32", shard_rows=2, **options):
    sink = ParquetSink(out, EmbeddingColumns(6, dtype), settings, shard_rows=shard_rows, **options)
    decoder = Decoder(32, recipe_for("efficientnet_lite0", "efficientnet_lite"))
    return Runner(Sources(sources), decoder, Batcher(), engine, sink, batch_size=2, workers=2, progress=False)()


def test_rows_one_per_input_in_input_order(corpus, tmp_path):
    report = run([str(corpus["tiny.png"]), str(corpus["empty.jpg"]), str(corpus["chelsea.jpg"])], tmp_path / "o.parquet")
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.column_names == ["path", "width", "height", "embedding", "error", "size_bytes", "mtime_ns"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 6)
    assert table.column("path").to_pylist() == [str(corpus[n]) for n in ("tiny.png", "empty.jpg", "chelsea.jpg")]
    assert table.column("width").to_pylist() == [1, None, 451]
    assert table.column("error").to_pylist() == [None, "empty file (0 bytes)", None]
    assert table.column("embedding").null_count == 1
    assert report.summary.failed == 1 and report.processed == 3
    assert not (tmp_path / "o.parquet.parts").exists()


def test_interrupted_run_resumes_to_the_same_output(corpus, tmp_path):
    sources = [str(tmp_path / "corpus")]
    run(sources, tmp_path / "reference.parquet")
    out = tmp_path / "out.parquet"
    with pytest.raises(KeyboardInterrupt):
        run(sources, out, engine=Interrupt(after=4))
    shards = sorted((tmp_path / "out.parquet.parts").glob("part-*.parquet"))
    assert len(shards) == 3 and not out.exists()  # 3 whole batches of 2 reached disk; nothing else
    report = run(sources, out)
    assert report.resumed == 6 and report.processed == report.inputs - 6
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "reference.parquet"))
    assert not (tmp_path / "out.parquet.parts").exists()


def test_half_written_shard_is_ignored(corpus, tmp_path):
    out = tmp_path / "out.parquet"
    with pytest.raises(KeyboardInterrupt):
        run([str(corpus["chelsea.jpg"]), str(corpus["coffee.png"]), str(corpus["rocket.png"])], out,
            engine=Interrupt(after=2))
    (tmp_path / "out.parquet.parts" / "part-000001.parquet.tmp").write_bytes(b"PAR1 cut off")
    report = run([str(corpus["chelsea.jpg"]), str(corpus["coffee.png"]), str(corpus["rocket.png"])], out)
    assert (report.resumed, report.processed) == (2, 1)


def test_rerun_of_a_finished_run_does_nothing_and_new_or_changed_files_are_added(corpus, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.png", "rocket.png"):
        (folder / name).write_bytes(corpus[name].read_bytes())
    out = tmp_path / "out.parquet"
    run([str(folder)], out)
    assert run([str(folder)], out).processed == 0
    (folder / "astronaut.jpg").write_bytes(corpus["astronaut.jpg"].read_bytes())
    os.utime(folder / "rocket.png", ns=(1, 1))  # "changed": another mtime
    report = run([str(folder)], out)
    assert report.processed == 2 and report.resumed == 2
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == [str(folder / n) for n in ("astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.png")]
    assert table.column("mtime_ns").to_pylist()[3] == 1
    fresh = tmp_path / "fresh.parquet"
    run([str(folder)], fresh)
    assert table.equals(pq.read_table(fresh))


def test_job_sized_engine_is_chosen_for_what_is_left_and_not_at_all_when_nothing_is(corpus, tmp_path):
    """engine="auto" sizes its choice by the job: the runner tells it how many inputs remain after resuming."""
    sources = [str(corpus[name]) for name in ("chelsea.jpg", "coffee.png", "rocket.png")]
    out, asked = tmp_path / "out.parquet", []

    def choose(count):
        asked.append(count)
        return fake_engine

    run(sources[:2], out, engine=JobSizedEngine(choose))
    assert asked == [2]
    run(sources, out, engine=JobSizedEngine(choose))
    assert asked == [2, 1]  # two resumed, one to run
    assert run(sources, out, engine=JobSizedEngine(choose)).processed == 0
    assert asked == [2, 1]  # a finished job builds no engine


def test_other_settings_are_refused_not_mixed(corpus, tmp_path):
    out = tmp_path / "out.parquet"
    run([str(corpus["chelsea.jpg"])], out)
    with pytest.raises(EffnetError, match="other settings.*model: 'fake' there, 'other' now.*--overwrite"):
        run([str(corpus["chelsea.jpg"])], out, settings={"task": "embed", "model": "other"})
    run([str(corpus["chelsea.jpg"])], out, settings={"task": "embed", "model": "other"}, overwrite=True)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    with pytest.raises(EffnetError, match="not written by effnet"):
        run([str(corpus["chelsea.jpg"])], foreign)


def test_npy_output_with_sidecar_and_resume(corpus, tmp_path):
    sources = [str(corpus[n]) for n in ("chelsea.jpg", "text.jpg", "coffee.png")]
    out = tmp_path / "vectors.npy"
    run(sources, out, dtype="float16")
    matrix = np.load(out)
    side = pq.read_table(tmp_path / "vectors.parquet")
    assert matrix.shape == (3, 6) and matrix.dtype == np.float16
    assert np.isnan(matrix[1]).all() and not np.isnan(matrix[[0, 2]]).any()
    assert side.column("path").to_pylist() == sources and "embedding" not in side.column_names
    assert run(sources, out, dtype="float16").processed == 0  # resumes from OUT.npy + sidecar
    assert np.array_equal(np.load(out), matrix, equal_nan=True)


def test_float16_parquet(corpus, tmp_path):
    run([str(corpus["chelsea.jpg"])], tmp_path / "o.parquet", dtype="float16")
    assert pq.read_table(tmp_path / "o.parquet").schema.field("embedding").type == pa.list_(pa.float16(), 6)


def test_top_k_columns():
    columns = TopKColumns(2, 3, ["cat", "dog", "car"])
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]], np.float32)
    labels, indices, scores = columns(logits, np.array([True, False]))
    assert labels.to_pylist() == [["dog", "car"], None]
    assert indices.to_pylist()[0] == [1, 2]
    expected = np.exp([2.0, 1.0]) / np.exp([0.0, 2.0, 1.0]).sum()
    assert np.allclose(scores.to_pylist()[0], expected)
    assert TopKColumns(10, 3).k == 3
    with pytest.raises(EffnetError, match="no classifier"):
        TopKColumns(5, 0)


def test_memory_sink_orders_rows_like_the_inputs(corpus):
    sink = MemorySink(EmbeddingColumns(6), SETTINGS)
    decoder = Decoder(32)
    sources = [str(corpus[n]) for n in ("rocket.png", "empty.jpg", "chelsea.jpg")]
    report = Runner(Sources(sources), decoder, Batcher(), fake_engine, sink, batch_size=2, progress=False)()
    assert report.result.column("path").to_pylist() == sources
    assert set(report.stages) >= {"source", "decode", "batch", "engine", "sink", "merge"}
