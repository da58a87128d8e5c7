"""ONNX Runtime engine: the verified dynamic-size ONNX export, run by ONNX Runtime's CPU (or CUDA) provider.

fp32 and int8 (QDQ, see `int8.py`). One session takes every batch and size (the export's height and width are
symbolic; fixing them was measured no faster). Threads: one intra-op thread per usable core, no inter-op
parallelism (a single chain of layers has none to give).
"""

from __future__ import annotations

import numpy as np

from . import artifacts, int8
from .base import Engine, EngineUnavailableError, machine, require


def check_precision(precision: str, device: str) -> str | None:
    if precision in ("bf16", "fp16"):
        return (f"onnxruntime runs fp32 or int8 here, not {precision}; use engine='openvino' or 'torch' for "
                f"{precision}")
    if device == "cuda" and precision == "int8":
        return "onnxruntime int8 runs on CPU only in effnet"
    return None


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    accepts = "numpy"

    def __init__(self, model, *, precision="fp32", device="cpu", signature="logits", input_size=None,
                 batch_size=None, calibration=None, threads: int | None = None, model_fingerprint=None):
        super().__init__(model, precision=precision, device=device, signature=signature,
                         input_size=input_size, batch_size=batch_size)
        ort = require("onnxruntime")
        reason = check_precision(precision, device)
        if reason:
            raise EngineUnavailableError(reason)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailableError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu")
            providers = ["CUDAExecutionProvider"]
        path = artifacts.onnx_file(model, signature, model_fingerprint)
        if precision == "int8":
            path = int8.quantized_file(path, int8.check_calibration(calibration))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or machine().cores
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.details = f"{options.intra_op_num_threads} threads, {providers[0]}"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": batch})[0]
