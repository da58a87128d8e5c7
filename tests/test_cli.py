"""The `effnet` command: embed / classify / models / info, exit statuses, and kill-and-resume in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from effnet.cli import EXIT_INTERRUPTED, EXIT_SOME_FAILED, main

from .test_pipeline_corpus import BAD, GOOD, build_corpus, photo

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    build_corpus(folder)
    return folder


def invoke(*arguments):
    return CliRunner().invoke(main, [str(a) for a in arguments], catch_exceptions=False)


def test_embed_a_folder_with_bad_files_writes_every_row_and_exits_3(corpus, tmp_path):
    out = tmp_path / "out.parquet"
    result = invoke("embed", corpus, "-o", out, "--size", 96, "-q")
    assert result.exit_code == EXIT_SOME_FAILED
    assert f"{len(BAD)} failed" in result.output
    table = pq.read_table(out)
    assert table.num_rows == len(GOOD) + len(BAD)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    errors = dict(zip((Path(p).name for p in table.column("path").to_pylist()), table.column("error").to_pylist()))
    assert all(word in errors[name] for name, word in BAD.items())


def test_all_good_exits_0_with_a_summary(corpus, tmp_path):
    result = invoke("embed", corpus / "chelsea.jpg", corpus / "coffee.png", "-o", tmp_path / "o.parquet", "--size", 96)
    assert result.exit_code == 0
    assert "embedded 2 of 2 inputs" in result.output and "time by stage" in result.output


def test_classify_top_k(corpus, tmp_path):
    out = tmp_path / "labels.parquet"
    assert invoke("classify", corpus / "chelsea.jpg", corpus / "coffee.png", "-k", 3, "-o", out, "-q").exit_code == 0
    table = pq.read_table(out)
    assert table.column_names[:6] == ["path", "width", "height", "labels", "indices", "scores"]
    assert "espresso" in table.column("labels").to_pylist()[1]
    assert len(table.column("scores").to_pylist()[0]) == 3


def test_npy_output_and_float16(corpus, tmp_path):
    arguments = [corpus / "chelsea.jpg", corpus / "empty.jpg", "--size", 96, "-q"]
    assert invoke("embed", *arguments, "-o", tmp_path / "v.npy").exit_code == EXIT_SOME_FAILED
    matrix = np.load(tmp_path / "v.npy")
    assert matrix.shape == (2, 1280) and np.isnan(matrix[1]).all()
    assert pq.read_table(tmp_path / "v.parquet").column("error").to_pylist()[1] == "empty file (0 bytes)"
    invoke("embed", *arguments, "-o", tmp_path / "h.parquet", "--dtype", "float16")
    assert pq.read_table(tmp_path / "h.parquet").schema.field("embedding").type.value_type == pa.float16()


def test_changed_settings_are_refused_with_the_fix(corpus, tmp_path):
    out = tmp_path / "o.parquet"
    invoke("embed", corpus / "chelsea.jpg", "-o", out, "--size", 96, "-q")
    result = invoke("embed", corpus / "chelsea.jpg", "-o", out, "--size", 128, "-q")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert invoke("embed", corpus / "chelsea.jpg", "-o", out, "--size", 128, "-q", "--overwrite").exit_code == 0


def test_unknown_model_is_an_error_not_a_traceback(corpus, tmp_path):
    result = invoke("embed", corpus / "chelsea.jpg", "-o", tmp_path / "o.parquet", "-m", "efficientnet_b99")
    assert result.exit_code == 1 and "Error:" in result.output


def test_models_lists_the_catalogue():
    result = invoke("models")
    assert result.exit_code == 0
    handles = result.output.splitlines()
    assert len(handles) > 50 and any("efficientnet" in h for h in handles)
    record = json.loads(invoke("models", "--json").output.splitlines()[0])
    assert record["handle"] == handles[0]


def test_info_prints_the_spec_as_json():
    result = invoke("info", "efficientnet_lite0")
    assert result.exit_code == 0
    spec = json.loads(result.output)
    assert spec["name"] == "efficientnet_lite0" and spec["native_size"] == 224 and spec["feature_dim"] == 1280
    assert spec["preprocessing"]["resample"] == "bilinear" and spec["preprocessing"]["crop_padding"] == 32
    v2 = json.loads(invoke("info", "efficientnetv2_m").output)  # an architecture without shipped weights
    assert v2["native_size"] == 480 and v2["preprocessing"] == {
        "resize": "stretch", "crop_padding": None, "resample": "bilinear",
        "input": "RGB in [0, 1], NCHW; normalization inside the model"}
    handle = invoke("models").output.splitlines()[0]
    assert json.loads(invoke("info", handle).output)["handle"] == handle


def test_no_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("embed", tmp_path / "empty", "-o", tmp_path / "o.parquet", "-q")
    assert result.exit_code == 1 and "found no images" in result.output


def test_help():
    assert "embed" in invoke("--help").output
    assert "--resize" in invoke("embed", "--help").output


# --- kill and resume: a real process, a real signal ----------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 small JPEGs cut from the sample photos."""
    folder = tmp_path_factory.mktemp("photos")
    for index in range(24):
        image = photo(("chelsea", "coffee", "astronaut", "rocket")[index % 4])
        y, x = 7 * index % 60, 11 * index % 100
        Image.fromarray(image[y : y + 240, x : x + 320]).save(folder / f"img{index:02d}.jpg", quality=90)
    return folder


def effnet_command(folder, out, *extra):
    # 224 px, not less: the run must last long enough after its first shard for a signal to land midway.
    arguments = ["embed", folder, "-o", out, "--batch-size", 2, "--shard-rows", 2, "--workers", 1, "--size", 224, "-q"]
    return [sys.executable, "-m", "effnet.cli", *map(str, arguments), *extra]


def run_effnet(command, **kwargs):
    """effnet in a child process that reacts to Ctrl-C as in a terminal, however pytest was started: a shell runs
    background jobs (`cmd &`, nohup) with SIGINT ignored, children inherit that, and Python keeps it ignored."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler, unlike SIG_IGN, ends at exec
    try:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def uninterrupted(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "reference.parquet"
    process = run_effnet(effnet_command(photos, out))
    assert process.wait(timeout=120) == 0, process.stderr.read().decode()
    return pq.read_table(out)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_run_resumes_to_the_uninterrupted_output(photos, uninterrupted, tmp_path, sent):
    out = tmp_path / "out.parquet"
    parts = tmp_path / "out.parquet.parts"
    process = run_effnet(effnet_command(photos, out))
    deadline = time.monotonic() + 120
    while not any(parts.glob("part-*.parquet")):  # a shard exists: the run is midway
        assert process.poll() is None, "the run finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(sent)
    status = process.wait(timeout=60)
    assert status == (EXIT_INTERRUPTED if sent == signal.SIGINT else -signal.SIGKILL), process.stderr.read().decode()
    assert not out.exists()
    saved = sum(pq.ParquetFile(p).metadata.num_rows for p in parts.glob("part-*.parquet"))
    assert 2 <= saved < 24

    resumed = run_effnet(effnet_command(photos, out))
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
    assert pq.read_table(out).equals(uninterrupted)
    assert not parts.exists()


def test_engine_choice_gives_the_same_answers(tmp_path):
    """`--engine onnxruntime` (fp32) classifies the bundled photos as the default torch engine does."""
    photos_dir = Path(__file__).parents[1] / "examples" / "photos"
    default = invoke("classify", photos_dir, "-k", "3", "-o", tmp_path / "torch.parquet", "-q")
    onnx = invoke("classify", photos_dir, "-k", "3", "-o", tmp_path / "ort.parquet", "-q", "--engine", "onnxruntime")
    assert default.exit_code == 0 and onnx.exit_code == 0, onnx.output
    a, b = pq.read_table(tmp_path / "torch.parquet"), pq.read_table(tmp_path / "ort.parquet")
    assert a.column("indices").to_pylist() == b.column("indices").to_pylist()
    np.testing.assert_allclose(np.array(a.column("scores").to_pylist()), np.array(b.column("scores").to_pylist()),
                               rtol=1e-4, atol=1e-6)


def test_export_writes_a_verified_onnx_file(tmp_path):
    result = invoke("export", "efficientnet_lite0", "-o", tmp_path / "lite0.onnx", "--size", "96")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lite0.onnx").stat().st_size > 1_000_000
    assert "max rel. error" in result.output and "dynamic" in result.output
