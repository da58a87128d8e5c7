"""What we add to the SDK's FastAPI app. The V2 body reader is tested against the SDK's own parser, showing the
gap it fills: the SDK turns a binary BYTES tensor into UTF-8 strings and fails on a JPEG. (413, 503, 504 and the
response counts are tested on a real server in test_serve_command.py.)"""

from __future__ import annotations

import struct

import orjson
import pytest
from kserve.protocol.infer_type import InferRequest

from effnet.serve.app import read_v2_request
from effnet.serve.inputs import BadInput

JPEG_START = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01"  # not valid UTF-8


def _binary_body(blobs: list[bytes]) -> tuple[bytes, int]:
    raw = b"".join(struct.pack("<I", len(blob)) + blob for blob in blobs)  # the extension's BYTES layout
    header = orjson.dumps({"inputs": [{"name": "images", "shape": [len(blobs)], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "logits", "parameters": {"classification": 2}}]})
    return header + raw, len(header)


def test_the_sdk_cannot_read_a_binary_bytes_tensor_of_jpegs():
    body, length = _binary_body([JPEG_START])
    with pytest.raises(Exception, match="UTF-8"):
        InferRequest.from_bytes(body, length, "m")


def test_read_v2_request_keeps_binary_bytes_raw():
    body, length = _binary_body([JPEG_START, b"\x89PNG\r\n"])
    request = read_v2_request(body, length, "m")
    assert list(request.inputs[0].as_numpy()) == [JPEG_START, b"\x89PNG\r\n"]
    assert request.request_outputs[0].name == "logits" and request.request_outputs[0].parameters == {"classification": 2}


def test_read_v2_request_reads_plain_json():
    body = orjson.dumps({"id": "7", "inputs": [{"name": "images", "shape": [1, 1, 1, 3], "datatype": "FP32",
                                                "data": [0.0, 0.5, 1.0]}]})
    request = read_v2_request(body, None, "m")
    assert request.id == "7" and request.inputs[0].as_numpy().tolist() == [[[[0.0, 0.5, 1.0]]]]


@pytest.mark.parametrize("body, length, words", [
    (b"{", None, ["not valid JSON"]),
    (b"[]", None, ['"inputs"']),
    (b'{"inputs": [{"name": "images"}]}', None, ["inputs[0]", "datatype"]),
    (b'{"inputs": [{"name": "images", "shape": [-1], "datatype": "BYTES", "data": []}]}', None, ["shape"]),
    (b'{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES"}]}', None, ["images", "binary_data_size"]),
    (b'{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 99}}]}',
     None, ["images", "past the end"]),
    (b'{"inputs": []}', 500, ["does not fit"]),
    (b'{"inputs": [], "outputs": [3]}', None, ['"outputs"']),
])
def test_read_v2_request_refusals(body, length, words):
    with pytest.raises(BadInput) as caught:
        read_v2_request(body, length, "m")
    for word in words:
        assert word in str(caught.value)


def _app_with(error: Exception):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from effnet.serve.app import install

    app = FastAPI()
    install(app, 1000, ["m"], dataplane=None, repository_extension=None)

    @app.post("/v1/models/m:predict")
    async def predict():
        raise error

    return TestClient(app)


def test_full_queue_is_503_with_retry_after_and_timeout_is_504_and_both_are_counted():
    from effnet.serve.batching import QueueFull
    from effnet.serve.metrics import RESPONSES
    from effnet.serve.model import RequestTimeout

    before = RESPONSES.labels("m", "v1", "503")._value.get()
    full = _app_with(QueueFull("the queue holds 9 images")).post("/v1/models/m:predict")
    assert full.status_code == 503 and full.headers["retry-after"] == "1" and "9 images" in full.json()["error"]
    assert RESPONSES.labels("m", "v1", "503")._value.get() == before + 1
    slow = _app_with(RequestTimeout("no result within 0.1 s")).post("/v1/models/m:predict")
    assert slow.status_code == 504 and "0.1 s" in slow.json()["error"]


def test_body_limit_from_content_length():
    response = _app_with(RuntimeError("not reached")).post("/v1/models/m:predict", content=b"x" * 2000)
    assert response.status_code == 413 and "2,000 bytes" in response.json()["error"]


@pytest.mark.parametrize("header_length", [0, 1, 2, 3, 250, 251])
def test_read_body_puts_the_binary_tensors_on_a_64_byte_boundary(header_length):
    # numpy reads a misaligned float32 tensor slower (read_body's docstring); the content must not change
    import numpy as np
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from effnet.serve.app import read_body

    async def echo(request):
        body = await read_body(request, header_length)
        tensors = np.frombuffer(body, np.uint8)[header_length:]
        return JSONResponse({"aligned": tensors.ctypes.data % 64 == 0, "body": bytes(body).hex()})

    content = bytes(range(256)) * 1200  # several chunks in most transports
    answer = TestClient(Starlette(routes=[Route("/", echo, methods=["POST"])])).post("/", content=content).json()
    assert answer["aligned"] and bytes.fromhex(answer["body"]) == content
