"""The source stage: files, folders, globs, manifests and URLs -> each input once, in a stable order."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from effnet.errors import EffnetError
from effnet.pipeline.sources import Sources


@pytest.fixture
def tree(tmp_path):
    for relative in ["b.jpg", "a.png", "sub/c.webp", "sub/deeper/d.tiff", "notes.md", ".hidden.jpg", ".cache/e.jpg"]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 3)
    return tmp_path


def paths(arguments, **options):
    return [item.path for item in Sources(arguments, **options)()]


def test_folder_is_walked_recursively_in_sorted_order_skipping_hidden_and_non_images(tree):
    found = paths([str(tree)])
    assert [os.path.relpath(p, tree) for p in found] == ["a.png", "b.jpg", "sub/c.webp", "sub/deeper/d.tiff"]


def test_items_carry_size_and_mtime(tree):
    (item,) = Sources([str(tree / "a.png")])()
    assert item.size == 3 and item.mtime_ns == (tree / "a.png").stat().st_mtime_ns and item.error is None


def test_explicit_file_is_taken_whatever_its_extension(tree):
    assert paths([str(tree / "notes.md")]) == [str(tree / "notes.md")]


def test_glob(tree):
    found = paths([str(tree / "**" / "*.jpg"), str(tree / "sub" / "*")])
    assert [os.path.relpath(p, tree) for p in found] == ["b.jpg", "sub/c.webp", "sub/deeper/d.tiff"]


def test_missing_inputs_become_items_with_an_error(tree):
    items = list(Sources([str(tree / "nope.jpg"), str(tree / "*.gif")])())
    assert [item.error for item in items] == ["file not found", "no file matches this pattern"]


def test_duplicates_are_kept_once_first_spelling_wins(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert paths(["a.png", "./a.png", str(tree / "a.png"), "."]) == ["a.png", "./b.jpg", "./sub/c.webp",
                                                                       "./sub/deeper/d.tiff"]


def test_text_manifest_relative_to_its_folder(tree):
    manifest = tree / "sub" / "list.txt"
    manifest.write_text("# comment\n\nc.webp\n../a.png\n/absent.jpg\n")
    items = list(Sources([str(manifest)])())
    assert [os.path.normpath(item.path) for item in items] == [
        str(tree / "sub" / "c.webp"), str(tree / "a.png"), "/absent.jpg"]
    assert items[2].error == "file not found"


def test_csv_and_parquet_manifests_with_a_path_column(tree):
    csv = tree / "list.csv"
    csv.write_text("label,file\ncat,a.png\ndog,b.jpg\n")
    assert paths([str(csv)], path_column="file") == [str(tree / "a.png"), str(tree / "b.jpg")]
    parquet = tree / "list.parquet"
    pq.write_table(pa.table({"path": [str(tree / "b.jpg"), "a.png"]}), parquet)
    assert paths([str(parquet)]) == [str(tree / "b.jpg"), str(tree / "a.png")]
    with pytest.raises(EffnetError, match="no column 'path'.*--path-column"):
        paths([str(csv)])


def test_urls_through_fsspec(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    memory.pipe("/photos/x.jpg", b"abc")
    memory.pipe("/photos/sub/y.png", b"abcd")
    memory.pipe("/photos/readme.txt", b"-")
    items = list(Sources(["memory://photos"])())
    assert [item.path for item in items] == ["memory:///photos/sub/y.png", "memory:///photos/x.jpg"]
    assert [item.size for item in items] == [4, 3]
    memory.pipe("/lists/l.txt", b"../photos/x.jpg\n")
    assert [item.path for item in Sources(["memory://lists/l.txt"])()] == ["memory:///photos/x.jpg"]
    assert Sources(["memory://photos/missing.jpg"])().__next__().error == "file not found"


def test_urls_without_fsspec_give_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_fsspec(name, *args, **kwargs):
        if name == "fsspec":
            raise ImportError("No module named 'fsspec'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_fsspec)
    with pytest.raises(EffnetError, match="pip install fsspec"):
        list(Sources(["s3://bucket/photos"])())
