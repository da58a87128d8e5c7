"""Hostile input, second round (issue 13): every case builds its own files and asserts the exact behaviour — the
error text names the file and what is wrong, the exit status, the rows present — for `effnet embed/classify`
and `effnet.load`. The first round's corpus is tests/test_pipeline_corpus.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import effnet
from effnet.cli import EXIT_SOME_FAILED, main
from effnet.errors import CheckpointFormatError, WeightsError
from effnet.pipeline import Decoder, Item, Sources
from effnet.pipeline.decode import decode_cost

from .test_pipeline_corpus import jpeg_bytes, photo

SRC = str(Path(__file__).resolve().parents[1] / "src")
as_root = os.geteuid() == 0  # root reads everything: permission cases cannot be built


def deny(monkeypatch, target: str, path: Path) -> None:
    """Make `target` (a function taking a path first) raise PermissionError for `path`, as it does for a user
    without permission; root (as CI runs) is allowed everything, so chmod alone cannot build the case."""
    if not as_root:
        return
    module, name = target.rsplit(".", 1)
    real = getattr(__import__(module), name)

    def denied(first, *args, **kwargs):
        if isinstance(first, (str, os.PathLike)) and Path(first) == path:
            raise PermissionError(13, "Permission denied", os.fspath(first))
        return real(first, *args, **kwargs)

    monkeypatch.setattr(f"{module}.{name}", denied)


def invoke(*arguments):
    return CliRunner().invoke(main, [str(a) for a in arguments], catch_exceptions=False)


def rows(path) -> dict[str, dict]:
    table = pq.read_table(path)
    return {row["path"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def good_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "chelsea.jpg"
    path.write_bytes(jpeg_bytes(photo("chelsea")))
    return path


# --- 1. options that make the job impossible: refused at once, with the memory needed -----------------------


def test_a_size_the_machine_cannot_run_is_refused_at_once_with_the_memory_it_needs(good_jpeg, tmp_path):
    start = time.monotonic()
    result = invoke("classify", good_jpeg, "-o", tmp_path / "o.parquet", "--size", 100000, "-q")
    assert time.monotonic() - start < 30  # the run grew for 158 s before the kernel killed it
    assert result.exit_code == 1
    assert "Error: --size 100000 with --batch-size 16 would need about" in result.output
    assert "GiB available" in result.output and "the largest --size that fits" in result.output
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.parquet.parts").exists()


def test_top_k_above_the_number_of_classes_is_refused(good_jpeg, tmp_path):
    result = invoke("classify", good_jpeg, "-o", tmp_path / "o.parquet", "-k", 1001, "-q")
    assert result.exit_code == 1
    assert "Error: --top-k 1001 is more than the 1000 classes of efficientnet_lite0" in result.output


# --- 2. memory per image is bounded ------------------------------------------------------------------------


def big_rgba_png(path: Path, side: int = 9400) -> Path:
    """A 9400x9400 RGBA PNG, just under Pillow's bomb limit: ~370 KB on disk, 353 MB decoded."""
    Image.new("RGBA", (side, side), (10, 200, 30, 128)).save(path)
    return path


def test_decode_cost_counts_the_conversion_buffers():
    image = Image.new("RGBA", (1000, 500))
    assert decode_cost(image) == 1000 * 500 * (4 + 4) + 4 * 500 * 0  # decoded RGBA + the RGB canvas
    assert decode_cost(Image.new("L", (1000, 500)), orientation=6) == 1000 * 500 * (1 + 8 + 4)


def test_an_image_over_the_decode_budget_is_an_error_row_naming_the_option(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGBA", (3000, 2000), (1, 2, 3, 255)).save(path)
    result = Decoder(64, decode_memory=16 << 20)(Item(str(path), path.stat().st_size))
    assert result.pixels is None
    assert result.error.startswith("image needs about 46 MiB to decode, over the decode-memory budget of 16 MiB")
    assert "--decode-memory" in result.error
    assert Decoder(64, decode_memory=64 << 20)(Item(str(path), path.stat().st_size)).error is None


def test_the_pixel_limit_error_names_the_cli_option(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (200, 100)).save(path)
    result = invoke("embed", path, "-o", tmp_path / "o.parquet", "--max-pixels", 10000, "-q")
    assert result.exit_code == EXIT_SOME_FAILED
    error = rows(tmp_path / "o.parquet")[str(path)]["error"]
    assert "200x100 = 20,000 pixels is over the limit of 10,000" in error and "--max-pixels" in error
    assert "MAX_IMAGE_PIXELS" not in error


def test_decode_budget_admits_large_images_one_at_a_time():
    from effnet.pipeline.decode import DecodeBudget
    import threading

    budget, peak, inside, lock = DecodeBudget(100), [0], [0], threading.Lock()

    def work(cost):
        with budget.admit(cost):
            with lock:
                inside[0] += cost
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= cost

    threads = [threading.Thread(target=work, args=(cost,)) for cost in (70, 70, 20, 20, 70)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= 100 and budget.used == 0


PEAK_RSS_OF_CHILD = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""
PEAK_RSS_BOUND = 2 << 30  # docs/limits.md: runtime + Lite0 (~0.4 GB) + --decode-memory (1 GiB) + activations


@pytest.mark.slow
def test_four_9400_squared_pngs_stay_under_the_stated_peak_memory(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    first = big_rgba_png(folder / "b1.png")
    assert first.stat().st_size < 1_000_000
    for index in (2, 3, 4):
        (folder / f"b{index}.png").write_bytes(first.read_bytes())
    # The CLI is started by a small Python process that reports its child's peak RSS (os.wait4). Measured from
    # here, the number would be polluted twice: getrusage(RUSAGE_CHILDREN) is the largest of every child this
    # process ever reaped, and a child's ru_maxrss starts at its parent's resident size when it forks and execs
    # (the kernel keeps the old memory's high-water mark), which is over 2 GiB for pytest after the TF tests.
    cli = [sys.executable, "-m", "effnet", "classify", str(folder), "-o", str(tmp_path / "o.parquet"), "-q"]
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_CHILD, *cli], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}, timeout=600)
    assert run.returncode == 0, run.stderr
    peak = int(run.stdout.split()[-1]) * 1024  # Linux reports KiB
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak / 2**30:.2f} GiB"
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.num_rows == 4 and table.column("error").null_count == 4


# --- 3. effnet.load checks shapes before it reads --------------------------------------------------------------


def test_an_h5_declaring_a_huge_dataset_fails_before_reading_it(tmp_path):
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"stem_conv"]
        group = f.create_group("stem_conv")
        group.attrs["weight_names"] = [b"stem_conv/kernel:0"]
        group.create_dataset("stem_conv/kernel:0", shape=(32768, 32768), dtype="f4", chunks=(1024, 1024),
                             compression="gzip", fillvalue=0)
    assert path.stat().st_size < 20_000
    start = time.monotonic()
    with pytest.raises(CheckpointFormatError) as caught:
        effnet.load(path)
    assert time.monotonic() - start < 5  # the file took 33 s and 4.4 GB
    assert str(caught.value) == (
        f"{path}: tensor 'stem_conv/kernel' declares shape [32768, 32768] (1,073,741,824 elements), larger than "
        "any EfficientNet parameter (at most 55,920,640); not EfficientNet weights")


def test_a_pth_whose_zip_member_unpacks_past_the_bound_fails_before_torch_load(tmp_path, monkeypatch):
    import zipfile

    from effnet.importers import bounds

    monkeypatch.setattr(bounds, "max_file_bytes", lambda: 32 << 20)  # the real bound (7.4 GiB) is slow to deflate
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(64 << 20))  # 64 MiB of zeros: 64 KB deflated
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointFormatError, match=r"bomb.pth: 0.1 GiB is larger than any EfficientNet's weights"):
        effnet.load(path)


def test_safetensors_shapes_are_checked_from_the_header(tmp_path):
    from safetensors.torch import save_file

    folder = effnet.save(effnet.create("efficientnet_lite0", num_classes=3), tmp_path / "m")
    import torch

    state = {k: v.contiguous() for k, v in effnet.create("efficientnet_lite0", 3).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    key = next(iter(state))
    state[key] = torch.zeros(7, 7)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=rf"model.safetensors: '{key}' has shape \[7, 7\], the architecture has"):
        effnet.load(folder)


def test_a_missing_weights_file_says_no_such_file():
    with pytest.raises(WeightsError, match=r"^missing/x.h5: no such file or folder$"):
        effnet.load("missing/x.h5")


# --- 4. corrupt JPEGs are error rows, never confident labels ----------------------------------------------------


def cut_with_end_marker(data: bytes, fraction: float = 1 / 3) -> bytes:
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def header_claims(data: bytes, width: int, height: int) -> bytes:
    start = data.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), then height, width
    return data[:start] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[start + 4:]


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpegs_with_a_new_end_marker_are_error_rows(tmp_path, progressive):
    pixels = photo("chelsea")
    data = jpeg_bytes(pixels, progressive=progressive)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(cut_with_end_marker(data))
    for size in (224, 32):  # 32: the draft (DCT-scaled) path
        result = Decoder(size)(Item(str(cut), cut.stat().st_size))
        assert result.pixels is None and result.width is None, (size, result.error)
        assert result.error.startswith("truncated"), result.error


def test_a_jpeg_whose_header_claims_9000_squared_is_an_error_row(tmp_path):
    small = np.asarray(Image.fromarray(photo("chelsea")).resize((320, 240)))
    path = tmp_path / "lie.jpg"
    path.write_bytes(header_claims(jpeg_bytes(small), 9000, 9000))
    result = invoke("classify", path, "-o", tmp_path / "o.parquet", "-q")
    assert result.exit_code == EXIT_SOME_FAILED
    row = rows(tmp_path / "o.parquet")[str(path)]
    assert row["labels"] is None and row["width"] is None
    assert row["error"].startswith("truncated or corrupt JPEG: its header says 9000x9000, which needs at least")


def test_good_jpegs_ending_in_exact_grey_still_decode(tmp_path):
    grey = np.full((240, 320, 3), 128, np.uint8)
    grey[:100] = photo("chelsea")[:100, :320]
    for progressive in (False, True):
        path = tmp_path / f"grey{progressive}.jpg"
        path.write_bytes(jpeg_bytes(grey, quality=95, progressive=progressive))
        assert np.asarray(Image.open(path))[-1, -1].tolist() == [128, 128, 128]
        for size in (224, 32):
            assert Decoder(size)(Item(str(path), path.stat().st_size)).error is None


# --- 5. one Error: line, not a traceback ---------------------------------------------------------------------


@pytest.mark.parametrize("name, content, expected", [
    ("m.parquet", b"PAR1 this is not parquet", "is not a readable Parquet file"),
    ("m.txt", "photo-\xe9.jpg\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 6)"),
    ("m.csv", b"path\n" + b"x" * (2 << 20) + b"\n", "is not a readable manifest: field larger than field limit"),
])
def test_unreadable_manifests_are_one_error_line(tmp_path, name, content, expected):
    manifest = tmp_path / name
    manifest.write_bytes(content)
    result = invoke("embed", manifest, "-o", tmp_path / "o.parquet", "-q")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: manifest {manifest} {expected}"), result.output


def test_a_manifest_without_read_permission_is_one_error_line(tmp_path, monkeypatch):
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.jpg\n")
    manifest.chmod(0)
    deny(monkeypatch, "builtins.open", manifest)
    result = invoke("embed", manifest, "-o", tmp_path / "o.parquet", "-q")
    assert result.exit_code == 1
    assert result.output == f"Error: manifest {manifest}: permission denied (cannot read it)\n"


def test_output_in_a_read_only_folder_fails_before_the_model_runs(good_jpeg, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if as_root:  # root may write anyway: the check asks os.access, so ask it as a user would be answered
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == folder else real(path, mode))
    result = invoke("embed", good_jpeg, "-o", folder / "o.parquet", "-q")
    folder.chmod(0o755)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: -o {folder / 'o.parquet'}: cannot write in {folder}")


def test_output_that_exists_and_is_not_parquet_is_one_error_line(good_jpeg, tmp_path):
    out = tmp_path / "o.parquet"
    out.write_text("my notes, not parquet")
    result = invoke("embed", good_jpeg, "-o", out, "-q")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {out} exists and is not a Parquet file effnet can read")
    assert out.read_text() == "my notes, not parquet"  # untouched


def test_a_corrupt_shard_is_named_with_how_to_set_it_aside(good_jpeg, tmp_path):
    out = tmp_path / "o.parquet"
    parts = tmp_path / "o.parquet.parts"
    parts.mkdir()
    (parts / "part-000000.parquet").write_bytes(b"PAR1 cut off")
    result = invoke("embed", good_jpeg, "-o", out, "-q")
    assert result.exit_code == 1
    shard = parts / "part-000000.parquet"
    assert result.output.startswith(f"Error: {shard} is not a readable shard")
    assert f"mv '{shard}' '{shard}.corrupt'" in result.output
    os.rename(shard, f"{shard}.corrupt")
    assert invoke("embed", good_jpeg, "-o", out, "-q").exit_code == 0


# --- 6. nothing skipped silently ------------------------------------------------------------------------------


def test_an_unreadable_subfolder_is_an_error_row_and_named_directly_says_permission_denied(
        good_jpeg, tmp_path, monkeypatch):
    top = tmp_path / "photos"
    (top / "locked").mkdir(parents=True)
    (top / "a.jpg").write_bytes(good_jpeg.read_bytes())
    (top / "locked" / "b.jpg").write_bytes(good_jpeg.read_bytes())
    (top / "locked").chmod(0)
    deny(monkeypatch, "os.scandir", top / "locked")
    try:
        result = invoke("embed", top, "-o", tmp_path / "o.parquet", "-q")
        assert result.exit_code == EXIT_SOME_FAILED
        found = rows(tmp_path / "o.parquet")
        assert found[str(top / "locked")]["error"] == "cannot list this folder: permission denied"
        assert found[str(top / "a.jpg")]["error"] is None
        direct = invoke("embed", top / "locked", "-o", tmp_path / "d.parquet", "-q")
        assert direct.exit_code == EXIT_SOME_FAILED and "found no images" not in direct.output
        assert "cannot list this folder: permission denied" in direct.output
    finally:
        (top / "locked").chmod(0o755)


def test_files_the_walk_does_not_take_are_counted_in_the_summary(good_jpeg, tmp_path):
    top = tmp_path / "photos"
    top.mkdir()
    (top / "a.jpg").write_bytes(good_jpeg.read_bytes())
    for name in ("b.heic", "c.heic", "notes", ".hidden.jpg"):
        (top / name).write_bytes(b"x")
    result = invoke("embed", top, "-o", tmp_path / "o.parquet", "-q")
    assert result.exit_code == 0
    assert ("skipped 4 files: 1 hidden (name starts with .), 2 with extension .heic, 1 without extension "
            "(name them directly or in a manifest to read them anyway)" in result.output)
    sources = Sources([str(top)])
    assert [item.path for item in sources()] == [str(top / "a.jpg")]
    assert sources.skipped["with extension .heic"] == 2


def test_avif_is_taken_by_the_walk_when_pillow_reads_it(tmp_path):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    Image.fromarray(photo("chelsea")).save(tmp_path / "a.avif")
    assert [item.path for item in Sources([str(tmp_path)])()] == [str(tmp_path / "a.avif")]


# --- 7. the small ones ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.csv", "out"])
def test_an_output_that_is_not_parquet_or_npy_is_refused(good_jpeg, tmp_path, name):
    result = invoke("embed", good_jpeg, "-o", tmp_path / name, "-q")
    assert result.exit_code == 1 and "effnet writes Parquet; name the output OUT.parquet" in result.output
    assert not (tmp_path / name).exists()


def test_a_binary_path_column_gives_real_paths(good_jpeg, tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": pa.array([str(good_jpeg).encode()], pa.binary())}), manifest)
    assert [item.path for item in Sources([str(manifest)])()] == [str(good_jpeg)]


def test_a_failed_run_leaves_no_empty_output(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.txt").write_text("# nothing\n")
    for source in (tmp_path / "empty", tmp_path / "m.txt"):
        result = invoke("embed", source, "-o", tmp_path / "o.parquet", "-q")
        assert result.exit_code == 1 and "found no images" in result.output
        assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.parquet.parts").exists()


def test_an_empty_model_name_is_a_usage_error(good_jpeg, tmp_path):
    result = invoke("embed", good_jpeg, "-o", tmp_path / "o.parquet", "-m", "")
    assert result.exit_code == 2 and "-m/--model is empty" in result.output


def test_the_unknown_model_hint_names_the_command(good_jpeg, tmp_path):
    result = invoke("embed", good_jpeg, "-o", tmp_path / "o.parquet", "-m", "nosuchmodel")
    assert result.exit_code == 1 and "`effnet models` lists all of them" in result.output
    assert "list_modules()" not in result.output


def test_pillow_warnings_go_to_the_summary_not_the_progress_bar(tmp_path):
    path = tmp_path / "bad_exif.jpg"
    ifd_cut_short = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00"  # 5 entries, 4 bytes of one
    Image.fromarray(photo("chelsea")).save(path, exif=ifd_cut_short)
    for _ in range(2):  # every time, not only the first (Python shows a warning once per place by default)
        result = Decoder(32)(Item(str(path), path.stat().st_size))
        assert result.error is None
        assert result.warnings == ("UserWarning: Corrupt EXIF data.  Expecting to read 12 bytes but only got 4. ",)
    cli = invoke("embed", path, "-o", tmp_path / "o.parquet", "-q")
    assert cli.exit_code == 0
    assert cli.output == (f"1 decoder warnings: {path}: UserWarning: Corrupt EXIF data.  Expecting to read 12 bytes "
                          "but only got 4. \n")


# --- 8. the first shard comes within seconds -----------------------------------------------------------------


def test_the_first_shard_is_written_within_seconds_then_the_interval_grows(tmp_path, monkeypatch):
    from effnet.pipeline import Batcher, Decoded, EmbeddingColumns, ParquetSink
    from effnet.pipeline import sinks

    clock = [1000.0]
    monkeypatch.setattr(sinks.time, "monotonic", lambda: clock[0])
    sink = ParquetSink(tmp_path / "o.parquet", EmbeddingColumns(4), {"task": "embed"}, shard_rows=1024)
    sink.done()
    good = Decoded(np.zeros((8, 8, 3), np.uint8), 8, 8)
    written = []
    for second in range(40):
        clock[0] += 1
        batch = Batcher()([(Item(f"{second}.jpg", 1, 1), good)])
        sink(batch, np.zeros((1, 4), np.float32))
        written.append(len(list((tmp_path / "o.parquet.parts").glob("part-*.parquet"))))
    assert written[3] == 1 and written[2] == 0  # the first shard after 4 s (issue: 60 s or 1,024 rows)
    first_at = [written.index(n) + 1 for n in range(1, max(written) + 1)]
    assert first_at[:4] == [4, 12, 28, 40][: len(first_at[:4])]  # 4, 8, 16 s apart ... up to shard_seconds


# --- beyond the list: a hostile corpus of our own ---------------------------------------------------------------


def test_manifest_entries_with_nul_bytes_and_huge_lines_are_error_rows(good_jpeg, tmp_path):
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{good_jpeg}\nbad\x00name.jpg\n{'y' * 5000}.jpg\n{good_jpeg}\n")
    result = invoke("embed", manifest, "-o", tmp_path / "o.parquet", "-q")
    assert result.exit_code == EXIT_SOME_FAILED
    found = rows(tmp_path / "o.parquet")
    assert len(found) == 3  # the duplicate is one row
    assert found[str(tmp_path / "bad\x00name.jpg")]["error"] == "not a valid path (it contains a NUL byte)"
    assert found[str(tmp_path / ("y" * 5000 + ".jpg"))]["error"].startswith("cannot read: File name too long")


def test_a_folder_named_like_an_image_and_a_fifo_in_a_walk(good_jpeg, tmp_path):
    top = tmp_path / "photos"
    (top / "album.jpg").mkdir(parents=True)
    (top / "album.jpg" / "a.jpg").write_bytes(good_jpeg.read_bytes())
    os.mkfifo(top / "pipe.jpg")
    result = invoke("embed", top, "-o", tmp_path / "o.parquet", "-q")  # a FIFO opened for reading would block
    assert result.exit_code == EXIT_SOME_FAILED
    found = rows(tmp_path / "o.parquet")
    assert found[str(top / "album.jpg" / "a.jpg")]["error"] is None
    assert found[str(top / "pipe.jpg")]["error"] == "not a regular file"


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_out_of_range_exif_orientation_is_ignored(tmp_path, orientation):
    image = Image.fromarray(photo("chelsea"))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    image.save(path, exif=exif.tobytes())
    result = Decoder(64)(Item(str(path), path.stat().st_size))
    assert result.error is None and (result.width, result.height) == image.size


def test_zero_and_animated_frames(tmp_path):
    frames = [Image.new("RGB", (40, 30), color) for color in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:])
    for name in ("anim.gif", "anim.webp"):
        result = Decoder(16)(Item(str(tmp_path / name), 1))
        assert result.error is None and result.pixels[8, 8, 0] > 200  # the first (red) frame
    png = io.BytesIO()
    Image.new("RGB", (1, 1)).save(png, "PNG")
    data = bytearray(png.getvalue())
    data[16:20] = (0).to_bytes(4, "big")  # IHDR width 0 (CRC left wrong, as a hostile file would)
    (tmp_path / "zero.png").write_bytes(bytes(data))
    result = Decoder(16)(Item(str(tmp_path / "zero.png"), len(data)))
    assert result.pixels is None and result.error


def test_output_into_the_input_folder_is_not_read_back_as_input(good_jpeg, tmp_path):
    (tmp_path / "a.jpg").write_bytes(good_jpeg.read_bytes())
    for _ in range(2):  # the second run resumes; OUT and OUT.parts/ in the folder are not inputs
        result = invoke("embed", tmp_path, "-o", tmp_path / "o.parquet", "-q")
        assert result.exit_code == 0
        assert list(rows(tmp_path / "o.parquet")) == [str(tmp_path / "a.jpg")]


def test_a_symlinked_output_is_replaced_not_written_through(good_jpeg, tmp_path):
    target = tmp_path / "elsewhere.parquet"
    target.write_text("precious")
    (tmp_path / "o.parquet").symlink_to(target)
    result = invoke("embed", good_jpeg, "-o", tmp_path / "o.parquet", "-q")
    assert result.exit_code == 1 and "exists and is not a Parquet file" in result.output
    assert target.read_text() == "precious"
