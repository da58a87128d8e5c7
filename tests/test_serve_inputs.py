"""Request parsing: every way a request can be wrong is refused with BadInput (400) naming the field, and the
accepted forms give the pixels or bytes that were sent."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

from effnet.serve.inputs import BadInput, _checked_range, parse_v1, parse_v2


def _image(height=2, width=3, value=0.5):
    return np.full((height, width, 3), value, np.float32)


def test_bad_input_is_the_sdks_invalid_input():
    assert issubclass(BadInput, InvalidInput)  # the SDK answers it with 400 / gRPC INVALID_ARGUMENT


def test_v1_row_column_named_and_b64_forms():
    image = _image()
    rows = parse_v1({"instances": [image.tolist(), {"images": image.tolist()}]}, 8)
    assert rows.protocol == "v1-rows" and [i.name for i in rows.images] == ["instances[0]", "instances[1].images"]
    np.testing.assert_array_equal(rows.images[1].pixels, image)
    columns = parse_v1({"inputs": {"images": [image.tolist()]}}, 8)
    assert columns.protocol == "v1-columns" and columns.images[0].pixels.shape == (2, 3, 3)
    encoded = parse_v1({"instances": [{"b64": base64.b64encode(b"\xff\xd8jpeg").decode()}]}, 8)
    assert encoded.images[0].encoded == b"\xff\xd8jpeg" and encoded.images[0].pixels is None
    single = parse_v1({"inputs": {"b64": base64.b64encode(b"x").decode()}}, 8)
    assert single.images[0].encoded == b"x"


@pytest.mark.parametrize("body, words", [
    ([1, 2], ["JSON object"]),
    ({"instances": [], "inputs": []}, ["exactly one"]),
    ({"instances": {"pixels": []}}, ["unknown input", "pixels"]),
    ({"instances": "abc"}, ["list of images"]),
    ({"instances": [_image().tolist()] * 3}, ["3 images", "limit of 2"]),
    ({"instances": [[[0.1, 0.2, 0.3], [0.1]]]}, ["instances[0]"]),
    ({"instances": [{"b64": "abc", "extra": 1}]}, ["instances[0]", "b64"]),
    ({"instances": [{"b64": 5}]}, ["instances[0]", "b64"]),
    ({"instances": [_image(value=-0.5).tolist()]}, ["instances[0]", "[0, 1]", "-0.5"]),
    ({"instances": [np.zeros((1, 5000, 3)).tolist()]}, ["instances[0]", "1x5000", "4096"]),
])
def test_v1_refusals_name_the_field(body, words):
    with pytest.raises(BadInput) as caught:
        parse_v1(body, 2)
    for word in words:
        assert word in str(caught.value)


def _request(tensor: InferInput, outputs=None, parameters=None) -> InferRequest:
    return InferRequest("m", [tensor], parameters=parameters, request_outputs=outputs)


def test_v2_fp32_bytes_and_classification():
    images = np.random.default_rng(0).random((2, 4, 5, 3), dtype=np.float32)
    tensor = InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=False)
    parsed = parse_v2(_request(tensor, [RequestedOutput("logits", {"classification": 3})]), 8)
    np.testing.assert_array_equal(np.stack([i.pixels for i in parsed.images]), images)
    assert parsed.classification == 3 and parsed.outputs == ["logits"]
    encoded = InferInput("images", [2], "BYTES")
    encoded.set_data_from_numpy(np.array([b"\xff\x00", b"\x89PNG"], dtype=np.object_), binary_data=True)
    parsed = parse_v2(_request(encoded, parameters={"classification": 2}), 8)
    assert [i.encoded for i in parsed.images] == [b"\xff\x00", b"\x89PNG"] and parsed.classification == 2


@pytest.mark.parametrize("name, shape, datatype, data, words", [
    ("pixels", [1, 1, 1, 3], "FP32", [0.1] * 3, ['"images"', "pixels"]),
    ("images", [1, 1, 1, 3], "FP64", [0.1] * 3, ["FP64"]),
    ("images", [1, 1, 3], "FP32", [0.1] * 3, ["[N, H, W, 3]", "[1, 1, 3]"]),
    ("images", [0, 1, 1, 3], "FP32", [], ["empty"]),
    ("images", [1, 1, 1, 3], "FP32", [0.1, float("nan"), 0.1], ["images[0]", "NaN"]),
    ("images", [1, 1, 1, 3], "FP32", [0.1, 2.0, 0.1], ["images[0]", "[0, 1]"]),
    ("images", [1, 1, 1, 3], "FP32", [0.1] * 4, ["images"]),
    ("images", [2, 1], "BYTES", ["a", "b"], ["[N]", "[2, 1]"]),
])
def test_v2_refusals_name_the_field(name, shape, datatype, data, words):
    tensor = InferInput(name, shape, datatype, data=data)
    with pytest.raises(BadInput) as caught:
        parse_v2(_request(tensor), 8)
    for word in words:
        assert word in str(caught.value)


def test_v2_classification_must_be_a_positive_integer():
    tensor = InferInput("images", [1, 1, 1, 3], "FP32", data=[0.1] * 3)
    with pytest.raises(BadInput, match="classification"):
        parse_v2(_request(tensor, parameters={"classification": "three"}), 8)


def test_v1_raw_bytes_bodies_are_json_and_v2_json_bytes_may_be_base64():
    assert parse_v1(b'{"instances": [{"b64": "eA=="}]}', 8).images[0].encoded == b"x"  # curl -d sends form type
    with pytest.raises(BadInput, match="not valid JSON"):
        parse_v1(b"instances=1", 8)
    tensor = InferInput("images", [1], "BYTES", data=[base64.b64encode(b"\xff\xd8").decode()],
                        parameters={"content_type": "base64"})
    assert parse_v2(_request(tensor), 8).images[0].encoded == b"\xff\xd8"
    tensor = InferInput("images", [1], "BYTES", data=["%%%"], parameters={"content_type": "base64"})
    with pytest.raises(BadInput, match=r"images\[0\].*base64"):
        parse_v2(_request(tensor), 8)


@pytest.mark.parametrize("value, accepted", [
    (0.0, True), (-0.0, True), (1.0, True), (np.nextafter(np.float32(1), np.float32(2)), False),
    (1e-45, True), (np.nextafter(np.float32(0), np.float32(-1)), False), (-1.0, False), (255.0, False),
    (float("inf"), False), (float("-inf"), False), (float("nan"), False), (-float("nan"), False),
])
def test_the_one_pass_range_check_accepts_exactly_0_to_1(value, accepted):
    # the fast path reads bit patterns: every special value must land on the side min()/max() put it
    image = np.full((3, 4, 3), 0.5, np.float32)
    image[1, 2, 0] = value
    if accepted:
        assert _checked_range(image, "images[0]") is image
    else:
        with pytest.raises(BadInput, match=r"images\[0\]"):
            _checked_range(image, "images[0]")
