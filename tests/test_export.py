"""effnet.export.to_onnx: dynamic batch and size, TF SAME padding correct at sizes other than the traced one,
verification on export, metadata.

Tolerances: the file must match the PyTorch module within 1e-5 relative (max|a-b|/max|b|) at every size;
measured 3e-7 - 1.9e-6 (Lite0 real weights, conditioned V2-B0), so the margin is >= 5x.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import effnet
from effnet.export import ExportError, relative_error, to_onnx

from .conditioning import condition
from .conftest import photo_batch

FP32_BOUND = 1e-5


def run_file(path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


@pytest.fixture(scope="module")
def lite0_export(lite0, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "lite0.onnx"
    return lite0, to_onnx(lite0, path, signature="logits")  # traced at 224x224, even at every stride


def test_export_report_and_dims(lite0_export):
    model, report = lite0_export
    assert report.dynamic_batch and report.dynamic_size and report.traced_size == (224, 224)
    assert report.max_relative_error <= FP32_BOUND
    shapes = [shape for shape, _ in report.checked]
    assert shapes[0] == (2, 3, 224, 224) and any(n == 1 and h % 2 and w % 2 and h != w for n, _, h, w in shapes)
    graph = onnx.load(report.path).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert not any(node.op_type == "Pad" for node in graph.node)
    strided = [n for n in graph.node if n.op_type == "Conv"
               and max(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "strides")[0] > 1]
    assert len(strided) == 5 and all(
        any(a.name == "auto_pad" and a.s == b"SAME_UPPER" for a in n.attribute) for n in strided)


@pytest.mark.parametrize("height, width, batch", [(224, 224, 4), (227, 199, 4), (161, 97, 1), (300, 256, 3)])
def test_export_made_at_even_size_is_exact_at_other_sizes(lite0_export, height, width, batch):
    """The real Lite0 weights on the real photos, at odd and non-square sizes the graph was not traced at."""
    model, report = lite0_export
    images = photo_batch(height, width)[:batch]
    with torch.inference_mode():
        reference = model(images).numpy()
    ours = run_file(report.path, images)
    assert relative_error(ours, reference) <= FP32_BOUND
    assert (ours.argmax(1) == reference.argmax(1)).all()


def test_metadata_carries_spec_signature_and_labels(lite0_export):
    model, report = lite0_export
    meta = {p.key: p.value for p in onnx.load(report.path).metadata_props}
    assert json.loads(meta["effnet.spec"])["name"] == "efficientnet_lite0"
    assert meta["effnet.signature"] == "logits"
    assert meta["effnet.labels"].splitlines() == model.labels


def test_v2_features_export_conditioned(tmp_path):
    """Fused blocks, SE and the V2 normalization; the features signature; a static-size export beside it."""
    calibration = photo_batch(192)
    model = condition(effnet.create("efficientnetv2_b0"), calibration)
    report = to_onnx(model, tmp_path / "v2.onnx", signature="features", input_size=(192, 192))
    assert report.max_relative_error <= FP32_BOUND
    for images in (calibration, photo_batch(225, 161)[:3]):
        with torch.inference_mode():
            reference = model.feature_vector(images).numpy()
        ours = run_file(report.path, images)
        assert ours.shape == (len(images), model.spec.feature_dim)
        assert relative_error(ours, reference) <= FP32_BOUND


def test_static_export_takes_only_its_size(lite0, tmp_path):
    report = to_onnx(lite0, tmp_path / "static.onnx", dynamic_batch=False, dynamic_size=False,
                     input_size=(224, 224), signature="features")
    assert not report.dynamic_size and [s for s, _ in report.checked] == [(1, 3, 224, 224)]
    dims = [d.dim_value for d in onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 224, 224]
    with pytest.raises(Exception):
        run_file(report.path, photo_batch(225)[:1])


def test_export_refuses_a_mismatch_and_keeps_nothing(lite0, tmp_path, monkeypatch):
    import effnet.export as export

    monkeypatch.setattr(export, "_compare_with_torch", lambda *args: 3e-3)  # as if the graph were wrong
    with pytest.raises(ExportError, match="does not match"):
        to_onnx(lite0, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_logits_of_a_features_only_module_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="signature='features'"):
        to_onnx(effnet.create("efficientnet_b0", num_classes=0), tmp_path / "x.onnx", signature="logits")
