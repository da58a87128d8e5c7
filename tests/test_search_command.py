"""effnet.search.command: `effnet index`, `effnet search`, `effnet dedup` through click, exit codes and messages."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner

from effnet.cli import main
from effnet.search import DEFAULT_SIZE, DEFAULT_THRESHOLD
from effnet.search import command, index
from tests.test_search_index import clustered, write_embeddings


def test_choices_repeated_for_a_fast_help_agree_with_the_library():
    assert command.KINDS == index.KINDS and command.METRICS == index.METRICS
    assert f"default: {DEFAULT_THRESHOLD}" in dedup_help() and f"default: {DEFAULT_SIZE}" in dedup_help()
    # --help does not import faiss (effnet itself imports torch anyway)
    code = "import sys; from effnet.cli import main; sys.argv=['effnet','index','--help']\ntry: main()\n" \
           "except SystemExit: pass\nassert 'faiss' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def dedup_help() -> str:
    return CliRunner().invoke(main, ["dedup", "--help"]).output.replace("\n", " ").replace("  ", " ")


def test_index_add_search_dedup_commands(tmp_path):
    vectors = clustered(120, 32, clusters=6)
    vectors[60] = vectors[0] * 1.01  # a near-duplicate pair (cosine 1.0)
    first = write_embeddings(tmp_path / "a.parquet", vectors[:100], failed=[3])
    second = write_embeddings(tmp_path / "b.parquet", vectors[100:])
    runner = CliRunner()
    built = runner.invoke(main, ["index", first, "-o", str(tmp_path / "idx")])
    assert built.exit_code == 0, built.output
    assert "index: exact (cosine)" in built.output and "indexed 99 vectors" in built.output
    assert "1 error rows skipped" in built.output
    again = runner.invoke(main, ["index", first, "-o", str(tmp_path / "idx")])
    assert again.exit_code == 1 and "--add" in again.output
    added = runner.invoke(main, ["index", second, "-o", str(tmp_path / "idx"), "--add"])
    assert added.exit_code == 0 and "added 20 vectors" in added.output, added.output

    out = tmp_path / "results.parquet"
    searched = runner.invoke(main, ["search", str(tmp_path / "idx"), second, "-k", "3", "-o", str(out)])
    assert searched.exit_code == 0, searched.output
    results = pq.read_table(out)
    assert results.column_names == ["query", "rank", "path", "score"] and results.num_rows == 60
    printed = runner.invoke(main, ["search", str(tmp_path / "idx"), second, "-k", "1"])
    assert printed.output.splitlines()[0] == "query\trank\tpath\tscore" and len(printed.output.splitlines()) == 21

    groups_file = tmp_path / "groups.parquet"
    grouped = runner.invoke(main, ["dedup", first, "-o", str(groups_file), "--threshold", "0.999"])
    assert grouped.exit_code == 0, grouped.output
    groups = pq.read_table(groups_file).to_pandas()
    assert set(groups["path"]) == {"a.parquet-0.jpg", "a.parquet-60.jpg"} and groups["keep"].sum() == 1


def test_errors_name_the_file(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["search", str(tmp_path / "nowhere"), "x.jpg"])
    assert missing.exit_code == 1 and "nowhere" in missing.output and "not an effnet index" in missing.output
    wide = write_embeddings(tmp_path / "wide.parquet", clustered(10, 64))
    narrow = write_embeddings(tmp_path / "narrow.parquet", clustered(10, 32))
    assert runner.invoke(main, ["index", narrow, "-o", str(tmp_path / "idx")]).exit_code == 0
    wrong = runner.invoke(main, ["search", str(tmp_path / "idx"), wide])
    assert wrong.exit_code == 1 and "wide.parquet" in wrong.output and "dim 64" in wrong.output
    empty = write_embeddings(tmp_path / "empty.parquet", np.zeros((0, 32), np.float32))
    nothing = runner.invoke(main, ["index", empty, "-o", str(tmp_path / "idx2")])
    assert nothing.exit_code == 1 and "empty.parquet: is empty" in nothing.output
    assert not (tmp_path / "idx2").exists()
