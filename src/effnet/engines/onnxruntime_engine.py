"""ONNX Runtime engine: the verified dynamic-size ONNX export, run by ONNX Runtime's CPU (or CUDA) provider.

fp32 and int8 (QDQ, see `int8.py`). One session takes every batch and size (the export's height and width are
symbolic; fixing them was measured no faster).

Threads, as for OpenVINO's streams: a batch is split into S = min(cores, batch) parts run concurrently on the
same session from S Python threads (ONNX Runtime releases the GIL; `run` is thread-safe), each with cores/S
intra-op threads, and each part goes through its images in runs of `images_per_run` (base.py: about 150k input
pixels, so 2 images at 260 px, 1 at 480 px). Every core works through its own few images with its activations
in its cache and no per-operator barrier between threads. Measured on 2 cores, batch 8, against one run of 8 on
2 threads: B2 @ 260 52.3 vs 45.6 img/s, V2-M @ 480 3.08 vs 2.79, B6 @ 528 2.54 vs 1.93 (see images_per_run).

A lone image (a server answering one client at a time) would get one worker, i.e. one core's threads. It runs on
a second session of the same file with every core's threads instead, made by `warm_up` (as OpenVINO's lone image
runs on its own compile; the cost is a second copy of the weights in memory). On 2 cores, one image at a time
after a 2 ms pause: Lite0 @ 224 2.33 vs 4.24 ms, B2 @ 260 7.9 vs 13.7 ms.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import artifacts, int8
from .base import Engine, EngineUnavailableError, images_per_run, machine, require


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
                 run_images: int | None = None, model_fingerprint=None):
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
        self.cores = threads or machine().cores
        self.streams = max(1, min(streams or self.cores, self.batch_size)) if device == "cpu" else 1  # one GPU stream
        self.path = path
        self.providers = providers
        threads_per_worker = max(1, self.cores // self.streams)
        self.session = self._session(threads_per_worker)
        self._lone_session = None  # several workers: a lone image's own session on every core (warm_up)
        self.run_images = run_images or (images_per_run(self.input_size) if device == "cpu" else self.batch_size)
        self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="effnet-ort") if self.streams > 1 else None
        self.details = (f"{self.streams} parallel workers x {threads_per_worker} threads"
                        if self.streams > 1 else f"{threads_per_worker} threads") + \
            f", runs of {min(self.run_images, self.batch_size)} image(s), {providers[0]}" + \
            (", a lone image on every core" if self.streams > 1 else "")

    def _session(self, threads: int):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return ort.InferenceSession(str(self.path), options, providers=self.providers)

    def warm_up(self) -> None:
        super().warm_up()
        if self._pool is not None and self.input_size:
            self._lone_session = self._session(self.cores)
            self._run(np.zeros((1, 3, *self.input_size), np.float32))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 1 and self._lone_session is not None:
            return self._lone_session.run(None, {"images": batch})[0]
        if self._pool is None or len(batch) == 1:
            return self._runs(batch)
        per_worker = math.ceil(len(batch) / self.streams)
        parts = [batch[i:i + per_worker] for i in range(0, len(batch), per_worker)]
        return np.concatenate(list(self._pool.map(self._runs, parts)))

    def _runs(self, part: np.ndarray) -> np.ndarray:
        """One worker's images, in runs of `run_images`."""
        step = self.run_images
        outputs = [self.session.run(None, {"images": part[i:i + step]})[0] for i in range(0, len(part), step)]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
