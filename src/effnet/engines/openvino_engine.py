"""OpenVINO engine: the verified ONNX export, compiled by OpenVINO for each input shape it meets.

Why it is fast, and what effnet adds to OpenVINO's defaults (each measured in benchmarks/engines.py):
- Static shapes: the graph is reshaped to the exact (batch, 3, H, W) before compiling, so every kernel is
  chosen for the real sizes (a dynamic-shape compile picks generic kernels). One compile per shape, kept in
  memory (a few) and in OpenVINO's blob cache on disk (`$EFFNET_HOME/engines/openvino`), so a second run
  loads in a second or two instead of compiling.
- A batch of N runs as infer requests of `images_per_run` images (base.py: about 150k input pixels, so 2 at
  260 px and 1 at 480 px), all started together on S = min(C, requests) streams of C/S threads on C cores
  (OpenVINO's THROUGHPUT mode). Each core works through its own images with its activations in its cache, and
  no layer waits for the slower thread. On 2 cores, B2 @ 260, batch 8 as 2 streams was 1.07x as fast as
  OpenVINO's defaults on a quiet machine and 1.5x when other processes shared the cores; V2-M @ 480 as
  requests of 1 instead of 4 images, 3.01 vs 2.84 img/s. A batch that fits one request runs in LATENCY mode.
- A lone image (a server answering one client at a time) runs on its own batch-1 compile in LATENCY mode: every
  core on that one image, nothing padded. Through the batch's requests it would run padded to `images_per_run`
  on one stream, i.e. one core: on 2 cores, B2 @ 260 took 21 ms instead of 52 ms, Lite0 @ 224 5 ms instead of
  19-32 ms (the padded request of 3). A batch too small to give every stream a full request (fewer than
  streams x images per request, a server's batch at low concurrency) runs as lone images one after another,
  for the same reason: on 2 cores, Lite0 @ 224 2 images took 12.3 ms instead of 27.9, 3 18.1 instead of 27.0,
  4 18.7 instead of 23.1; B2 @ 260 2 images 52 instead of 76 ms, 3 81 instead of 100 (from 5 and 4 images on,
  the batch path was as fast or faster).
- `start` runs a lone image through OpenVINO's asynchronous call, on a second infer request of the same batch-1
  compile: a server's event loop starts it and is woken by OpenVINO's callback, so no thread of the server's
  is woken to run it and to answer back (two wake-ups of a sleeping thread, ~0.3 ms a request on 2 cores).
- Precision is explicit: INFERENCE_PRECISION_HINT is set to what was asked (OpenVINO's CPU default is bf16 on
  CPUs with AVX512-BF16/AMX, i.e. silently not fp32), and read back after compiling: a CPU that cannot run the
  request (bf16 without AVX512-BF16/AMX, where OpenVINO quietly runs f32) is an error, not a silent change.
- int8 runs the QDQ file of `int8.py`; the layers left in float run f32.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import OrderedDict

import numpy as np

from . import artifacts, int8
from .base import Engine, EngineUnavailableError, as_batch, images_per_run, machine, require

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
MAX_COMPILED_SHAPES = 8  # compiled models kept: four image sizes, each as batches and as a lone image


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
                 batch_size=None, calibration=None, streams: int | None = None, run_images: int | None = None,
                 model_fingerprint=None):
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
        self.run_images = run_images
        # (images per request, requests, height, width) -> (infer requests, images per request)
        self._compiled: OrderedDict[tuple[int, int, int, int], tuple[list, int]] = OrderedDict()
        self._started: dict[tuple[int, int], object] = {}  # (height, width) -> start()'s own infer request
        self._running: set[tuple[int, int]] = set()  # sizes whose start() call has not ended yet
        self.details = "static shapes, streams per core" + \
            (f", requests of {min(self.run_images_for(self.input_size), self.batch_size)} image(s)"
             if self.input_size else "") + ", a lone image on every core"

    def run_images_for(self, size: tuple[int, int]) -> int:
        return self.run_images or images_per_run(size)

    def streams_for(self, requests: int) -> int:
        """How many streams run a batch's infer requests in parallel (see the module docstring)."""
        return max(1, min(self.requested_streams or machine().cores, requests))

    def warm_up(self) -> None:
        super().warm_up()
        if self.input_size and self.batch_size > 1:
            self(np.zeros((1, 3, *self.input_size), np.float32))  # the lone image's own compile

    def _full_round(self, height: int, width: int) -> int:
        """Images that give every stream of the batch compile a full request: fewer run as lone images."""
        per_request = min(self.batch_size, self.run_images_for((height, width)))
        return self.streams_for(math.ceil(self.batch_size / per_request)) * per_request

    def _requests(self, height: int, width: int, lone: bool = False) -> tuple[list, int]:
        """(infer requests, images per request) for this image size, compiling it on first use. `lone`: for a
        one-image call, one request of one image (LATENCY mode, see the module docstring)."""
        if lone:
            per_request, requests = 1, 1
        else:
            per_request = min(self.batch_size, self.run_images_for((height, width)))
            requests = math.ceil(self.batch_size / per_request)
        key = (per_request, requests, height, width)  # batch_size 1: the batch compile is the lone one
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        streams = self.streams_for(requests)
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
        entry = ([compiled.create_infer_request() for _ in range(requests)], per_request)
        self._compiled[key] = entry
        while len(self._compiled) > MAX_COMPILED_SHAPES:
            (per_request, requests, height, width), _ = self._compiled.popitem(last=False)
            if per_request == requests == 1:  # start()'s request holds the same compile
                self._started.pop((height, width), None)
        return entry

    def start(self, images) -> concurrent.futures.Future | None:
        """A lone image on OpenVINO's own threads (its asynchronous call on the batch-1 compile, LATENCY mode): a
        future of `self(images)`. None for a batch, or while this size's previous call still runs (the caller
        then uses `self(images)`). OpenVINO calls back only on success; a failed call leaves its size marked
        running, so later calls of that size take the blocking path, which raises the error."""
        batch = as_batch(images, want="numpy")
        size = batch.shape[2], batch.shape[3]
        if len(batch) != 1 or size in self._running:
            return None
        request = self._started.get(size)
        if request is None:
            lone_requests, _ = self._requests(*size, lone=True)
            request = lone_requests[0].get_compiled_model().create_infer_request()
            request.set_callback(self._finished, None)
            self._started[size] = request
        future = concurrent.futures.Future()
        self._running.add(size)
        try:  # the batch travels with the call: OpenVINO reads it in place (share_inputs) until the call ends
            request.start_async({0: batch}, (future, request, size, batch), share_inputs=True)
        except BaseException:
            self._running.discard(size)
            raise
        return future

    def _finished(self, userdata) -> None:
        """OpenVINO's callback, on its own thread, when a `start` call has ended."""
        future, request, size, _ = userdata
        try:
            output, error = request.get_output_tensor(0).data.copy(), None  # the request reuses its buffer
        except Exception as caught:  # noqa: BLE001 - reported to the caller, not lost on OpenVINO's thread
            output, error = None, caught
        self._running.discard(size)  # before the caller hears of it: its next start() may follow at once
        if error is None:
            future.set_result(output)
        else:
            future.set_exception(error)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        if 1 < count < self._full_round(batch.shape[2], batch.shape[3]):
            return np.concatenate([self._run(batch[i:i + 1]) for i in range(count)])
        requests, per_request = self._requests(batch.shape[2], batch.shape[3], lone=count == 1)
        chunks = [batch[i:i + per_request] for i in range(0, count, per_request)]
        if len(chunks[-1]) < per_request:  # a short last chunk: padded to the compiled shape, not compiled again
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
