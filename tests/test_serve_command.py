"""`effnet serve` end to end: a real server subprocess on 127.0.0.1 and real clients (tritonclient HTTP JSON and
binary in this process, tritonclient gRPC in a child process, TF Serving-style JSON over requests).

Parity tolerance, 1e-6 relative (max |diff| / max |ref|), on like-for-like arithmetic: the "exact" server runs
eager PyTorch on NCHW without BatchNorm folding (`--engine-option channels_last=false fold_batch_norm=false`), the
module's own arithmetic, and the reference is the module run here with the server's intra-op thread count on the
same batch. That matters: the module itself moves by 1.2e-6 (Lite0) between 1 and 2 threads and by 1.0e-6
between a batch of 1 and of 2 (reduction order), so the 32-client test, where the batcher decides who shares an
engine call, allows BATCHED_TOLERANCE = 1e-5. The folded, channels_last engine differs from the module by ~2e-6:
the engine's own error (test_engines.py), not the server's. The JPEG test compares with `effnet embed` run on the
same engine and thread count.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
import tritonclient.http as httpclient
from PIL import Image

import effnet
from effnet.engines import machine
from effnet.export import relative_error
from effnet.serve.command import split_cores
from tests.conditioning import condition
from tests.serving import grpc_infer, running_server

PHOTOS = sorted((Path(__file__).parents[1] / "examples" / "photos").glob("*.jpg"))
EXACT = ("--engine", "torch", "--engine-option", "channels_last=false", "--engine-option", "fold_batch_norm=false")
TOLERANCE = 1e-6
BATCHED_TOLERANCE = 1e-5
ENGINE_THREADS = split_cores(machine().cores, None, None)[1]  # what the server gives eager torch here
LITE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def lite():
    return effnet.load(LITE).eval()


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
    """A feature-vector module (B0 without classifier), conditioned weights, saved as an effnet module folder."""
    torch.manual_seed(0)
    model = effnet.create("efficientnet_b0", num_classes=0)
    condition(model, torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(1)))
    return effnet.save(model.eval(), tmp_path_factory.mktemp("features") / "b0_features")


@pytest.fixture(scope="module")
def server(features_dir):
    with running_server(*EXACT, LITE, f"features={features_dir}", "--max-batch-size", "16",
                        "--max-batch-delay-ms", "30", "--max-request-bytes", str(4 * 2**20)) as running:
        yield running


def pixels(count: int, height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, height, width, 3), dtype=np.float32)


def reference(model, images: np.ndarray, engine_threads: int = ENGINE_THREADS) -> dict[str, np.ndarray]:
    """The module's outputs for `images` (one batch), at the server's thread count."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(engine_threads)
    try:
        with torch.inference_mode():
            out = {"feature_vector": model.feature_vector(x).numpy()}
            if model.classifier is not None:
                out["logits"] = model(x).numpy()
    finally:
        torch.set_num_threads(threads)
    return out


def assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        error = relative_error(np.asarray(got[name], np.float32), want[name])
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def v1(server, model: str, body, **kwargs) -> requests.Response:
    return requests.post(f"{server.base}/v1/models/{model}:predict", json=body, timeout=120, **kwargs)


# -- parity over every protocol path ---------------------------------------------------------------------------

def test_v1_rows_and_columns_return_the_modules_outputs(server, lite):
    images = pixels(2)
    want = reference(lite, images)
    rows = v1(server, LITE, {"instances": images.tolist()})
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    assert_close({name: [p[name] for p in predictions] for name in want}, want)
    columns = v1(server, LITE, {"inputs": {"images": images.tolist()}})
    assert columns.status_code == 200, columns.text
    assert_close(columns.json()["outputs"], want)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_v2_http_returns_the_modules_outputs(server, lite, binary):
    images = pixels(3, seed=2)
    client = httpclient.InferenceServerClient(server.url)
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("feature_vector", "logits")]
    result = client.infer(LITE, [tensor], outputs=outputs)
    assert_close({n: result.as_numpy(n) for n in ("feature_vector", "logits")}, reference(lite, images))


def test_v2_grpc_returns_the_modules_outputs(server, lite, tmp_path):
    images = pixels(2, seed=3)
    got = grpc_infer(server.grpc_url, LITE, images, tmp=tmp_path)
    assert_close(got, reference(lite, images))


def test_a_feature_vector_module_returns_only_feature_vector(server, features_dir):
    model = effnet.load(features_dir).eval()
    images = pixels(2, 96, 96, seed=4)
    response = v1(server, "features", {"instances": images.tolist()})
    assert response.status_code == 200, response.text
    assert_close({"feature_vector": response.json()["predictions"]}, reference(model, images))
    metadata = requests.get(f"{server.base}/v2/models/features", timeout=10).json()
    assert [o["name"] for o in metadata["outputs"]] == ["feature_vector"]


def test_classification_extension_gives_tritons_strings(server, lite):
    images = pixels(2, seed=5)
    client = httpclient.InferenceServerClient(server.url)
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer(LITE, [tensor], outputs=[httpclient.InferRequestedOutput("logits", class_count=3)])
    strings = result.as_numpy("logits")
    assert strings.shape == (2, 3)
    logits = reference(lite, images)["logits"]
    for row, texts in zip(logits, strings):
        parsed = [t.decode().split(":", 2) for t in texts]
        assert [int(p[1]) for p in parsed] == list(np.argsort(-row)[:3])
        assert [p[2] for p in parsed] == [lite.labels[int(p[1])] for p in parsed]
        np.testing.assert_allclose([float(p[0]) for p in parsed], np.sort(row)[::-1][:3], rtol=1e-5)


# -- batching ------------------------------------------------------------------------------------------------

def _batch_counts(metrics_text: str, model: str) -> tuple[float, float]:
    """(engine calls, engine calls with exactly 1 image) from the effnet_batch_images histogram."""
    def value(pattern):
        match = re.search(pattern, metrics_text)
        return float(match.group(1)) if match else 0.0
    label = f'model="{model}"'
    total = value(r'effnet_batch_images_count\{' + label + r'\} ([0-9.e+]+)')
    ones = value(r'effnet_batch_images_bucket\{le="1.0",' + label + r'\} ([0-9.e+]+)')
    return total, ones


def test_32_concurrent_clients_each_get_their_answer_in_shared_batches(server, lite):
    images = pixels(32, seed=6)
    want = reference(lite, images)
    calls_before, ones_before = _batch_counts(server.metrics(), LITE)
    start = threading.Barrier(32)

    def one(index):
        start.wait(timeout=60)
        client = httpclient.InferenceServerClient(server.url, network_timeout=120)
        tensor = httpclient.InferInput("images", [1, *images.shape[1:]], "FP32")
        tensor.set_data_from_numpy(images[index:index + 1])
        return client.infer(LITE, [tensor]).as_numpy("feature_vector")

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32), timeout=180))
    for index, vector in enumerate(got):
        error = relative_error(vector, want["feature_vector"][index:index + 1])
        assert error <= BATCHED_TOLERANCE, f"client {index} got another image's answer or a wrong one ({error:.1e})"
    calls, ones = _batch_counts(server.metrics(), LITE)
    new_calls, new_ones = calls - calls_before, ones - ones_before
    assert new_calls < 32 and new_calls - new_ones >= 1, f"{new_calls} engine calls, {new_ones} of one image"


# -- bad input -----------------------------------------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A valid PNG start whose IHDR claims width x height, with a few bytes of pixel data: refused from the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def _jpeg(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def _v2(images) -> dict:
    return {"inputs": [images]}


BAD_REQUESTS = [  # (id, path, body as bytes or JSON, expected status, words the message must contain)
    ("malformed-json", f"v1/models/{LITE}:predict", b'{"instances": [', 400, ["Unrecognized request format"]),
    ("neither-key", f"v1/models/{LITE}:predict", {"images": []}, 400, ['"instances"', '"inputs"']),
    ("empty-batch", f"v1/models/{LITE}:predict", {"instances": []}, 400, ["instances", "empty"]),
    ("wrong-rank", f"v1/models/{LITE}:predict", {"instances": [[0.5, 0.5, 0.5]]}, 400, ["instances[0]", "H x W x 3"]),
    ("wrong-channels", f"v1/models/{LITE}:predict", {"instances": [[[[0.1, 0.2]]]]}, 400, ["instances[0]", "[1, 1, 2]"]),
    ("strings-as-pixels", f"v1/models/{LITE}:predict", {"instances": [[[["a", "b", "c"]]]]}, 400, ["instances[0]"]),
    ("out-of-range", f"v1/models/{LITE}:predict", {"instances": [[[[255.0, 0, 0]]]]}, 400, ["instances[0]", "[0, 1]", "255"]),
    ("bad-base64", f"v1/models/{LITE}:predict", {"instances": [{"b64": "###"}]}, 400, ["instances[0]", "base64"]),
    ("truncated-jpeg", f"v1/models/{LITE}:predict", {"instances": [_b64(_jpeg()[:200])]}, 400, ["instances[0]", "decode"]),
    ("text-as-image", f"v1/models/{LITE}:predict", {"instances": [_b64(b"hello, I am not an image\n")]}, 400,
     ["instances[0]", "not an image"]),
    ("png-bomb-header", f"v1/models/{LITE}:predict", {"instances": [_b64(_png_header(30000, 30000))]}, 400,
     ["instances[0]", "too large", "900000000 pixels"]),
    ("v2-wrong-dtype", f"v2/models/{LITE}/infer",
     _v2({"name": "images", "shape": [1, 2, 2, 3], "datatype": "INT32", "data": [0] * 12}), 400, ["images", "INT32"]),
    ("v2-wrong-shape", f"v2/models/{LITE}/infer",
     _v2({"name": "images", "shape": [1, 2, 2, 4], "datatype": "FP32", "data": [0.0] * 16}), 400, ["images", "[1, 2, 2, 4]"]),
    ("v2-wrong-rank", f"v2/models/{LITE}/infer",
     _v2({"name": "images", "shape": [2, 2, 3], "datatype": "FP32", "data": [0.0] * 12}), 400, ["images", "[N, H, W, 3]"]),
    ("v2-data-count", f"v2/models/{LITE}/infer",
     _v2({"name": "images", "shape": [1, 2, 2, 3], "datatype": "FP32", "data": [0.0] * 5}), 400, ["images"]),
    ("v2-nan", f"v2/models/{LITE}/infer",
     _v2({"name": "images", "shape": [1, 1, 1, 3], "datatype": "FP32", "data": [0.1, "NaN", 0.2]}), 400, ["images"]),
    ("v2-empty", f"v2/models/{LITE}/infer",
     _v2({"name": "images", "shape": [0, 2, 2, 3], "datatype": "FP32", "data": []}), 400, ["images", "empty"]),
    ("v2-wrong-name", f"v2/models/{LITE}/infer",
     _v2({"name": "pixels", "shape": [1, 1, 1, 3], "datatype": "FP32", "data": [0.1] * 3}), 400, ['"images"', "pixels"]),
    ("v2-text-bytes", f"v2/models/{LITE}/infer",
     _v2({"name": "images", "shape": [1], "datatype": "BYTES", "data": ["just text"]}), 400, ["images[0]", "not an image"]),
    ("v2-unknown-output", f"v2/models/{LITE}/infer",
     {**_v2({"name": "images", "shape": [1, 1, 1, 3], "datatype": "FP32", "data": [0.1] * 3}),
      "outputs": [{"name": "probabilities"}]}, 400, ["probabilities", "feature_vector"]),
    ("unknown-model-v1", "v1/models/nope:predict", {"instances": [[[[0.1, 0.1, 0.1]]]]}, 404, ["nope"]),
    ("unknown-model-v2", "v2/models/nope/infer",
     _v2({"name": "images", "shape": [1, 1, 1, 3], "datatype": "FP32", "data": [0.1] * 3}), 404, ["nope"]),
]


def _post(server, path: str, body, session=requests):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return session.post(f"{server.base}/{path}", data=data, headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("path, body, status, words", [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_naming_the_field(server, path, body, status, words):
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert server.ready()


def test_v2_nan_pixels_are_refused(server):
    images = pixels(1, 4, 4)
    images[0, 1, 2, 0] = np.nan
    client = httpclient.InferenceServerClient(server.url)
    tensor = httpclient.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)  # binary: NaN survives the wire, unlike in JSON
    with pytest.raises(Exception, match=r"images\[0\].*NaN"):
        client.infer(LITE, [tensor])


def test_an_oversized_body_gets_413_and_the_server_stays_ready(server):
    body = b'{"instances": [' + b"0," * (3 * 2**20) + b"0]}"  # 6 MB > the 4 MB limit
    response = _post(server, f"v1/models/{LITE}:predict", body)
    assert response.status_code == 413 and "--max-request-bytes" in response.text

    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(6):
            yield b" " * 2**20
    streamed = requests.post(f"{server.base}/v1/models/{LITE}:predict", data=chunks(), timeout=60)
    assert streamed.status_code == 413
    assert server.ready()


def test_rss_stays_flat_over_2000_bad_requests(server):
    cycle = [r for r in BAD_REQUESTS if r[3] != 404]
    session = requests.Session()

    def hammer(count: int, deadline: float) -> int:
        sent = 0
        while sent < count and time.monotonic() < deadline:
            _, path, body, status, _ = cycle[sent % len(cycle)]
            assert _post(server, path, body, session).status_code == status
            sent += 1
        return sent

    hammer(200, time.monotonic() + 60)  # warm-up: allocator pools, caches, lazily created metrics
    before = server.rss_bytes()
    sent = hammer(2000, time.monotonic() + 150)
    after = server.rss_bytes()
    assert sent >= 1000, f"only {sent} requests in 150 s"
    assert after - before <= 50 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MB over {sent} bad requests"
    assert server.ready()


def test_metrics_count_responses_by_code_and_time_decode_and_engine(server):
    _post(server, f"v1/models/{LITE}:predict", {"instances": [_b64(_jpeg())]})
    text = server.metrics()
    assert re.search(r'effnet_responses_total\{code="200",model="efficientnet_lite0",protocol="v1"\} [1-9]', text)
    assert re.search(r'effnet_responses_total\{code="400",model="efficientnet_lite0",protocol="v\d"\} [1-9]', text)
    assert re.search(r'effnet_decode_seconds_count\{model="efficientnet_lite0"\} [1-9]', text)
    assert re.search(r'effnet_engine_seconds_count\{model="efficientnet_lite0"\} [1-9]', text)
    assert 'effnet_queue_images{model="efficientnet_lite0"}' in text
    assert "request_predict_seconds" in text  # the SDK's own histograms are still there


# -- a server on the default engine: JPEGs against effnet embed, back-pressure, SIGTERM ------------------------

@pytest.fixture(scope="module")
def small_queue_server():
    with running_server("--engine", "torch", "--max-batch-size", "4", "--max-queue-images", "8",
                        "--max-batch-delay-ms", "5", "--log-requests") as running:
        yield running


def test_requests_are_logged_only_with_log_requests(server, small_queue_server):
    for running in (server, small_queue_server):
        _post(running, f"v1/models/{LITE}:predict", {"instances": [_b64(_jpeg())]})
    time.sleep(0.5)  # the log is written by the server process
    quiet, logged = server.log.read_text(errors="replace"), small_queue_server.log.read_text(errors="replace")
    access = re.compile(rf'uvicorn.access .*"POST /v1/models/{LITE}%3Apredict HTTP/1.1" 200')  # uvicorn quotes ':'
    timing = re.compile(rf"kserve.trace kserve.io.v1.models.{LITE}:predict: ")
    assert access.search(logged) and timing.search(logged)
    assert not access.search(quiet) and not timing.search(quiet)  # the default: no line per request


def test_an_encoded_jpeg_gives_the_vector_effnet_embed_writes(small_queue_server, tmp_path):
    out = tmp_path / "embed.parquet"
    subprocess.run([sys.executable, "-m", "effnet", "embed", *map(str, PHOTOS), "-o", str(out), "--engine", "torch",
                    "--threads", str(ENGINE_THREADS), "--batch-size", str(len(PHOTOS)), "-q"], check=True, timeout=300)
    table = pq.read_table(out).to_pydict()
    written = {Path(p).name: np.asarray(v, np.float32) for p, v in zip(table["path"], table["embedding"])}
    encoded = [path.read_bytes() for path in PHOTOS]
    want = np.stack([written[path.name] for path in PHOTOS])

    rows = v1(small_queue_server, LITE, {"instances": [_b64(data) for data in encoded]})
    assert rows.status_code == 200, rows.text
    assert relative_error(np.array([p["feature_vector"] for p in rows.json()["predictions"]]), want) <= TOLERANCE

    client = httpclient.InferenceServerClient(small_queue_server.url)
    tensor = httpclient.InferInput("images", [len(encoded)], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_))
    assert relative_error(client.infer(LITE, [tensor]).as_numpy("feature_vector"), want) <= TOLERANCE

    got = grpc_infer(small_queue_server.grpc_url, LITE, np.array(encoded, dtype=np.object_), tmp=tmp_path)
    assert relative_error(got["feature_vector"], want) <= TOLERANCE


def test_the_readme_curl_classifies_a_bundled_photo(small_queue_server):
    """V2 JSON with a base64 BYTES element and the classification extension: what the README's curl sends."""
    body = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode((PHOTOS[0].parent / "chelsea.jpg").read_bytes()).decode()]}],
            "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}
    response = requests.post(f"{small_queue_server.base}/v2/models/{LITE}/infer", data=json.dumps(body),
                             headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)  # curl -d
    assert response.status_code == 200, response.text
    labels = [text.split(":", 2)[2] for text in response.json()["outputs"][0]["data"]]
    assert len(labels) == 3 and all("cat" in label or label == "tabby" for label in labels), labels  # Chelsea is a cat


def test_one_undecodable_image_fails_alone(small_queue_server):
    good = {"instances": [_b64(PHOTOS[0].read_bytes())]}
    bad = {"instances": [_b64(PHOTOS[0].read_bytes()[:5000])]}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda body: v1(small_queue_server, LITE, body), [good, bad, good, good]))
    assert [a.status_code for a in answers] == [200, 400, 200, 200]
    assert "instances[0]" in answers[1].text and "truncated" in answers[1].text


def test_a_full_queue_answers_503_with_retry_after(small_queue_server):
    images = pixels(4, 224, 224, seed=7).tolist()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: v1(small_queue_server, LITE, {"instances": images}), range(12)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["Retry-After"] == "1" and "--max-queue-images" in refused.text
    assert small_queue_server.ready()


def test_sigterm_drains_16_requests_in_flight():
    with running_server("--engine", "torch", "--max-batch-size", "2", "--max-batch-delay-ms", "1") as server:
        images = pixels(2, 224, 224, seed=8).tolist()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            pending = [pool.submit(v1, server, LITE, {"instances": images}) for _ in range(16)]
            deadline = time.monotonic() + 30
            while "effnet_queue_images" not in server.metrics() or _queued(server) < 8:
                assert time.monotonic() < deadline, "requests never queued up"
                time.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            answers = [future.result(timeout=120) for future in pending]
        assert [a.status_code for a in answers] == [200] * 16
        assert server.process.wait(60) == 0 or server.process.returncode in (0, -signal.SIGTERM)


def _queued(server) -> float:
    match = re.search(r'effnet_queue_images\{model="efficientnet_lite0"\} ([0-9.e+]+)', server.metrics())
    return float(match.group(1)) if match else 0.0
