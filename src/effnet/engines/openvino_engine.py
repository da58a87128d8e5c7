"""OpenVINO engine: the verified ONNX export, compiled by OpenVINO for each input shape it meets.

Why it is fast, and what effnet adds to OpenVINO's defaults (each measured in benchmarks/engines.py):
- Static shapes: the graph is reshaped to the exact (batch, 3, H, W) before compiling, so every kernel is
  chosen for the real sizes (a dynamic-shape compile picks generic kernels). One compile per shape, kept in
  memory (a few) and in OpenVINO's blob cache on disk (`$EFFNET_HOME/engines/openvino`), so a second run
  loads in a second or two instead of compiling.
- A batch of N on C cores runs as S = min(C, N) streams, each a separate infer request over N/S images with
  C/S threads, started together (OpenVINO's THROUGHPUT mode). On 2 cores, B2 @ 260, batch 8 as 2 x 4 was 1.07x
  as fast as OpenVINO's defaults on a quiet machine and 1.5x when other processes shared the cores: each core
  works through its own images and no layer waits for the slower thread. Batch 1 runs as one LATENCY request.
- Precision is explicit: INFERENCE_PRECISION_HINT is set to what was asked (OpenVINO's CPU default is bf16 on
  CPUs with AVX512-BF16/AMX, i.e. silently not fp32), and read back after compiling: a CPU that cannot run the
  request (bf16 without AVX512-BF16/AMX, where OpenVINO quietly runs f32) is an error, not a silent change.
- int8 runs the QDQ file of `int8.py`; the layers left in float run f32.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from . import artifacts, int8
from .base import Engine, EngineUnavailableError, machine, require

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
MAX_COMPILED_SHAPES = 4


def check_precision(precision: str, device: str) -> str | None:
    """None when OpenVINO can run `precision` on `device` as far as the hardware flags tell, else why not."""
    if device != "cpu":  # OpenVINO's "GPU" is Intel graphics, not CUDA
        return "OpenVINO runs on the CPU here, not on NVIDIA GPUs; use engine='torch' for device='cuda'"
    if precision == "bf16" and not machine().native_bf16:
        return ("bf16 needs AVX512-BF16 or AMX on the CPU and this one has neither (OpenVINO would run f32); "
                "use precision='fp32'")
    if precision == "fp16" and not machine().native_fp16:
        return "fp16 on CPU needs AVX512-FP16/AMX-FP16 and this CPU has neither; use fp32 (or bf16 where native)"
    return None


class OpenVinoEngine(Engine):
    name = "openvino"
    accepts = "numpy"

    def __init__(self, model, *, precision="fp32", device="cpu", signature="logits", input_size=None,
                 batch_size=None, calibration=None, streams: int | None = None, model_fingerprint=None):
        super().__init__(model, precision=precision, device=device, signature=signature,
                         input_size=input_size, batch_size=batch_size)
        ov = require("openvino")
        reason = check_precision(precision, device)
        if reason:
            raise EngineUnavailableError(f"openvino: {reason}")
        path = artifacts.onnx_file(model, signature, model_fingerprint)
        if precision == "int8":
            path = int8.quantized_file(path, int8.check_calibration(calibration))
        self.path = path
        self.core = ov.Core()
        self.core.set_property({"CACHE_DIR": str(artifacts.openvino_cache_dir())})
        self.ov_device = "CPU"
        self.source = self.core.read_model(str(path))
        self.requested_streams = streams
        self._compiled: OrderedDict[tuple[int, int, int], tuple[list, int]] = OrderedDict()
        self.details = "static shapes, streams per core"

    def streams_for(self, batch: int) -> int:
        """How many parallel infer requests a batch is split into (see the module docstring)."""
        if self.requested_streams:
            return max(1, min(self.requested_streams, batch))
        return max(1, min(machine().cores, batch))

    def _requests(self, batch: int, height: int, width: int) -> tuple[list, int]:
        """(infer requests, images per request) for this shape, compiling it on first use."""
        key = (batch, height, width)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        streams = self.streams_for(batch)
        per_request = math.ceil(batch / streams)
        graph = self.source.clone()
        graph.reshape({graph.inputs[0].any_name: [per_request, 3, height, width]})
        config = {"INFERENCE_PRECISION_HINT": HINTS[self.precision]}
        if streams > 1:
            config |= {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)}
        else:
            config |= {"PERFORMANCE_HINT": "LATENCY"}
        compiled = self.core.compile_model(graph, self.ov_device, config)
        actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16", "f16"
        if actual != HINTS[self.precision]:
            raise EngineUnavailableError(f"openvino compiled {self.spec.name} for {actual}, not the requested "
                                         f"{self.precision}: this {self.ov_device} cannot run {self.precision}")
        entry = ([compiled.create_infer_request() for _ in range(streams)], per_request)
        self._compiled[key] = entry
        while len(self._compiled) > MAX_COMPILED_SHAPES:
            self._compiled.popitem(last=False)
        return entry

    def _run(self, batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        shape_batch = self.batch_size if count < self.batch_size and self.input_size else count
        if shape_batch != count:  # a short last chunk: pad to the compiled shape instead of compiling another
            batch = np.concatenate([batch, np.zeros((shape_batch - count, *batch.shape[1:]), batch.dtype)])
        requests, per_request = self._requests(shape_batch, batch.shape[2], batch.shape[3])
        chunks = [batch[i:i + per_request] for i in range(0, shape_batch, per_request)]
        if len(chunks[-1]) < per_request:
            chunks[-1] = np.concatenate([chunks[-1], np.zeros((per_request - len(chunks[-1]), *batch.shape[1:]),
                                                              batch.dtype)])
        used = requests[:len(chunks)]
        for request, chunk in zip(used, chunks):
            request.start_async({0: np.ascontiguousarray(chunk)}, share_inputs=True)
        outputs = []
        for request in used:
            request.wait()
            outputs.append(request.get_output_tensor(0).data.copy())  # the request reuses its buffer
        return np.concatenate(outputs)[:count]
