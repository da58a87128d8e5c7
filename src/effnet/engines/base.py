"""What every engine shares: the `Engine` contract, input checks, the machine's capabilities, optional imports.

An engine is built for one model, one signature ("logits" | "features"), one precision and one device, and is
called on float32 NCHW RGB batches in [0, 1] (the models' own input contract). It returns a numpy array with
one row per image. Batches larger than `engine.batch_size` are run in chunks of that size.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import EffnetError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
SIGNATURES = ("logits", "features")
DEVICES = ("cpu", "cuda")

# pip extra that provides each optional package (pyproject [project.optional-dependencies])
EXTRAS = {"onnxruntime": "onnxruntime", "openvino": "openvino", "onnx": "onnx", "onnxscript": "onnx"}


class EngineUnavailableError(EffnetError):
    """An engine, precision or device that cannot run here; the message says why and what to install or pick."""


def require(package: str):
    """Import an optional package, or raise EngineUnavailableError naming the pip command."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise EngineUnavailableError(
            f"{package} is not installed: pip install 'effnet[{EXTRAS.get(package, package)}]'") from error


def is_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True)
class Machine:
    """The CPU/GPU features that decide which precisions run natively (and so fast) here."""

    cores: int  # CPUs this process may use (affinity), the thread count every CPU engine uses
    cpu: str  # model name, for cache keys and reports
    native_bf16: bool  # AVX512_BF16 or AMX-BF16: bf16 matmul/conv in hardware (else emulated, ~10x slower)
    native_fp16: bool  # AVX512_FP16 or AMX-FP16
    vnni: bool  # AVX512_VNNI / AVX_VNNI: int8 dot products in hardware
    cuda: bool

    @property
    def key(self) -> str:
        """Identifies the hardware in cache keys: a decision measured on one machine is not reused on another."""
        flags = "".join(f for f, on in (("b", self.native_bf16), ("h", self.native_fp16), ("v", self.vnni)) if on)
        return f"{self.cpu}|{self.cores}c|{flags or '-'}|{'cuda' if self.cuda else 'nocuda'}"


@functools.cache
def machine() -> Machine:
    flags, name = _cpu_flags()
    return Machine(
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        cpu=name,
        native_bf16=bool(flags & {"avx512_bf16", "amx_bf16"}),
        native_fp16=bool(flags & {"avx512_fp16", "amx_fp16"}),
        vnni=bool(flags & {"avx512_vnni", "avx_vnni"}),
        cuda=torch.cuda.is_available(),
    )


def _cpu_flags() -> tuple[set[str], str]:
    """Linux /proc/cpuinfo flags (what the kernel lets this VM use); empty elsewhere, which only means 'not native'."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set(), "unknown"
    flags, name = set(), "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "model name" and name == "unknown":
            name = value.strip()
    return flags, name


def recommended_batch_size(input_size: tuple[int, int] | None, device: str = "cpu") -> int:
    """Images per call: enough to keep every core busy, bounded by activation memory.

    CPU: 4 images per core (OpenVINO splits a batch across one stream per core; below ~4 images per stream the
    per-call overhead shows, measured in benchmarks/engines.py), at most ~2.5 megapixels per batch (B6 @ 528:
    8 images). CUDA: 64 images, at most ~40 megapixels.
    """
    height, width = input_size or (300, 300)
    if device == "cuda":
        return max(1, min(64, int(40e6 // (height * width))))
    return max(1, min(4 * machine().cores, int(2.5e6 // (height * width))))


RUN_PIXELS = 150_000  # input pixels per inference run on a CPU core; see images_per_run
TORCH_RUN_PIXELS = 500_000  # the same for eager PyTorch, whose every run uses all cores


def images_per_run(input_size: tuple[int, int] | None, pixels: int = RUN_PIXELS) -> int:
    """How many images one CPU inference run takes at a time: about `pixels` input pixels, at least 1.

    A batch is split over one worker per core (ONNX Runtime threads, OpenVINO streams), and each worker goes
    through its share in runs this small, so a run's activations stay in the core's cache. Measured on 2 cores
    (AMD EPYC, AVX2), batch 8, ONNX Runtime fp32, conditioned weights, img/s, best of 4:
        B2 @ 260    one run of 8: 45.6 / 44.8   2 workers x runs of 4: 46.2 / 45.2   of 2: 52.3 / 51.1   of 1: 45.0 / 43.9
        V2-M @ 480  one run of 8: 2.79          2 workers x runs of 4: 2.88          of 2: 3.01          of 1: 3.08
        B6 @ 528    one run of 8: 1.93          2 workers x runs of 4: 1.91          of 2: 2.39          of 1: 2.54
    OpenVINO, V2-M @ 480, requests of 4 / 2 / 1 images over 2 streams: 2.84 / 2.94 / 3.01.
    Eager PyTorch (one run uses every core) is best with larger runs, TORCH_RUN_PIXELS: runs of 8 / 2 / 1
    images gave B2 @ 260 24.7 / 23.6 / 21.6 and V2-M @ 480 1.90 / 2.42 / 2.26 img/s.
    """
    height, width = input_size or (300, 300)
    return max(1, round(pixels / (height * width)))


def as_batch(images, *, want: str) -> np.ndarray | torch.Tensor:
    """Check the input contract and return a contiguous float32 numpy array (want="numpy") or tensor ("torch")."""
    if isinstance(images, torch.Tensor):
        array = images
    elif isinstance(images, np.ndarray):
        array = images
    else:
        raise TypeError(f"an engine takes a numpy array or torch tensor, not {type(images).__name__}")
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(array.shape)}; "
                         "NHWC arrays need .transpose(0, 3, 1, 2)")
    dtype = array.dtype
    is_float = dtype.is_floating_point if isinstance(array, torch.Tensor) else np.issubdtype(dtype, np.floating)
    if not is_float:
        raise TypeError(f"images must be float RGB in [0, 1], got {dtype}; divide uint8 images by 255")
    if want == "numpy":
        if isinstance(array, torch.Tensor):
            array = array.detach().to("cpu", torch.float32).numpy()
        return np.ascontiguousarray(array, dtype=np.float32)
    if isinstance(array, np.ndarray):
        array = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return array.detach().to(torch.float32)


class Engine:
    """Runs one model: `engine(images) -> np.ndarray` (N, classes) for "logits" or (N, feature_dim) for "features".

    Attributes every engine has: `name` ("torch", "torch-compile", "onnxruntime", "openvino"), `precision`
    (what actually runs, never just what was asked for), `device`, `signature`, `input_size` ((H, W) it was
    prepared for, or None for any), `batch_size` (largest chunk per call), `description` (one line for logs and
    `--engine auto`), `measured_error` (max relative error against the fp32 PyTorch module when measured, else None).
    """

    name = "engine"
    accepts = "numpy"  # what `_run` wants: "numpy" or "torch"

    def __init__(self, model, *, precision: str, device: str, signature: str,
                 input_size: tuple[int, int] | None, batch_size: int | None):
        if signature not in SIGNATURES:
            raise ValueError(f"signature must be one of {SIGNATURES}, not {signature!r}")
        if signature == "logits" and getattr(model, "classifier", None) is None:
            raise ValueError(f"{model.spec.name} has no classifier; use signature='features'")
        self.spec = model.spec
        self.precision = precision
        self.device = device
        self.signature = signature
        self.input_size = tuple(input_size) if input_size else None
        self.batch_size = batch_size or recommended_batch_size(self.input_size, device)
        self.measured_error: float | None = None
        self.selection: str | None = None  # set by engine="auto": how this engine was chosen
        self.details = ""  # engine-specific configuration, for the description

    @property
    def description(self) -> str:
        size = f"{self.input_size[0]}x{self.input_size[1]}" if self.input_size else "any size"
        text = f"{self.name} {self.precision} on {self.device} ({self.spec.name} {self.signature}, {size}, " \
               f"batch {self.batch_size}{', ' + self.details if self.details else ''})"
        if self.measured_error is not None:
            text += f"; measured max rel. error {self.measured_error:.1e} vs fp32 PyTorch"
        if self.selection:
            text = f"auto -> {text}; {self.selection}"
        return text

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.description}>"

    def __call__(self, images) -> np.ndarray:
        batch = as_batch(images, want=self.accepts)
        if len(batch) <= self.batch_size:
            return self._run(batch)
        return np.concatenate([self._run(batch[i:i + self.batch_size]) for i in range(0, len(batch), self.batch_size)])

    def start(self, images) -> concurrent.futures.Future | None:
        """`self(images)` run by the engine's own threads while the caller goes on: a future of its result, or None
        when this engine has no such call for these images (the caller then runs `self(images)` on a thread of its
        own). For an event loop: it starts the call and is woken when it ends, with no thread of its own to hand
        over to and back (OpenVINO, one image: see OpenVinoEngine.start)."""
        return None

    def warm_up(self) -> None:
        """Prepare for `input_size` (compile, allocate) so the first real call is not the slow one."""
        if self.input_size:
            self(np.zeros((self.batch_size, 3, *self.input_size), np.float32))

    def _run(self, batch) -> np.ndarray:
        raise NotImplementedError
