"""int8 post-training quantization of an exported model, shared by the ONNX Runtime and OpenVINO engines.

ONNX Runtime's static quantizer writes a QDQ model (QuantizeLinear/DequantizeLinear pairs around each Conv and
Gemm), which both runtimes execute as int8 kernels: weights int8 per output channel (symmetric), activations
uint8 per tensor with ranges from the calibration images. Per-channel weights matter for EfficientNet: the
depthwise kernels' ranges differ widely between channels. On CPUs without VNNI the int8 kernels multiply
uint8 x int8 pairs with VPMADDUBSW, whose int16 sums saturate; weights then get 7 bits (`reduce_range`, as
ONNX Runtime's docs advise). Measured on the real Lite0 weights and 4 photos, this AVX2 machine: 8-bit weights
0.28 max relative error on the logits and 2 of 4 top-1 wrong; 7-bit weights 0.12 and 4 of 4 right. Calibration needs representative images (the model's own input: float RGB in [0, 1]); the
quantized file is cached per model and per calibration set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import array_fingerprint
from .base import EngineUnavailableError, machine, require

MIN_CALIBRATION_IMAGES = 4


def check_calibration(calibration) -> np.ndarray:
    if calibration is None:
        raise EngineUnavailableError(
            "precision='int8' needs calibration images: create_engine(..., calibration=images) with a float32 "
            f"(N, 3, H, W) batch in [0, 1] of at least {MIN_CALIBRATION_IMAGES} images like the ones you will run "
            "(a few hundred give the best ranges)")
    array = np.ascontiguousarray(np.asarray(calibration, dtype=np.float32))
    if array.ndim != 4 or array.shape[1] != 3 or len(array) < MIN_CALIBRATION_IMAGES:
        raise ValueError(f"calibration must be (N >= {MIN_CALIBRATION_IMAGES}, 3, H, W) float32, "
                         f"got {array.shape}")
    return array


def quantized_file(fp32_path: Path, calibration: np.ndarray) -> Path:
    """`<name>-int8[w7]-<calibration hash>.onnx` beside `fp32_path`, made on the first request."""
    reduce_range = not machine().vnni
    flavour = "int8w7" if reduce_range else "int8"
    target = fp32_path.with_name(f"{fp32_path.stem}-{flavour}-{array_fingerprint(calibration)[:12]}.onnx")
    if not target.exists():
        quantize(fp32_path, calibration, target, reduce_range=reduce_range)
    return target


def quantize(fp32_path: Path, calibration: np.ndarray, target: Path, *, reduce_range: bool, batch: int = 8) -> Path:
    require("onnxruntime")  # the quantizer ships with onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.chunks = iter([calibration[i:i + batch] for i in range(0, len(calibration), batch)])

        def get_next(self):
            chunk = next(self.chunks, None)
            return None if chunk is None else {"images": chunk}

    temporary = target.with_name(f".{target.name}.tmp")
    quantize_static(
        str(fp32_path), str(temporary), Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,  # see the module docstring
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    temporary.replace(target)
    return target
