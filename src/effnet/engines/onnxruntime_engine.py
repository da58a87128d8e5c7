"""ONNX Runtime engine: the verified dynamic-size ONNX export, run by ONNX Runtime's CPU (or CUDA) provider.

fp32 and int8 (QDQ, see `int8.py`). One session takes every batch and size (the export's height and width are
symbolic; fixing them was measured no faster).

Threads, as for OpenVINO's streams: with batch_size 1 the session uses one intra-op thread per core. With a
larger batch_size, a batch is split into S = min(cores, batch) parts run concurrently on the same session from
S Python threads (ONNX Runtime releases the GIL; `run` is thread-safe), each part with cores/S intra-op
threads. Measured on 2 cores, B2 @ 260, batch 8, with other processes sharing the cores: 25.7 img/s against 14.5
for one run with 2 threads (best of 6); on a quiet machine they tie (benchmarks/engines.py). Each core works
through its own images with no per-operator barrier between the two threads.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

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
                 batch_size=None, calibration=None, threads: int | None = None, streams: int | None = None,
                 model_fingerprint=None):
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
        cores = threads or machine().cores
        self.streams = max(1, min(streams or cores, self.batch_size))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = max(1, cores // self.streams)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="effnet-ort") if self.streams > 1 else None
        self.details = (f"{self.streams} concurrent runs x {options.intra_op_num_threads} threads"
                        if self.streams > 1 else f"{options.intra_op_num_threads} threads") + f", {providers[0]}"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._pool is None or len(batch) == 1:
            return self.session.run(None, {"images": batch})[0]
        per_run = math.ceil(len(batch) / self.streams)
        parts = [batch[i:i + per_run] for i in range(0, len(batch), per_run)]
        futures = [self._pool.submit(self.session.run, None, {"images": part}) for part in parts]
        return np.concatenate([future.result()[0] for future in futures])
