"""engine="auto": build the candidates that can run here, time them on the model at the real input size, keep
the fastest, and say so (`engine.description`, `engine.selection`).

Candidates, in preference order (the order measured on CPUs so far, used to break ties and to skip timing
a candidate whose first call already takes twice the best time):
- CPU: openvino, onnxruntime, torch (eager, channels_last). torch-compile is never auto-picked: it takes
  minutes to compile on a small CPU and was slower than OpenVINO and ONNX Runtime on every model measured.
- CUDA: torch (channels_last, autocast, CUDA graphs), onnxruntime with its CUDA provider if installed.
Precision: "fp32", "bf16", "fp16", "int8" restrict the candidates to that precision. precision="auto" also
admits the reduced precisions this hardware runs natively (bf16 with AVX512-BF16/AMX, fp16/bf16 on CUDA, int8
when calibration images are given), but only when their error, measured against the fp32 PyTorch module on
the probe images, is at most `max_error`; the chosen engine states that error (`measured_error`).

Timing: each finalist's first full call, then TIMING_ROUNDS interleaved rounds; the fastest call counts.
The decision is cached in `$EFFNET_HOME/engines/auto.json`, keyed by the weights' fingerprint, signature,
size, batch, device, the candidates, max_error, the machine's CPU/GPU features, the runtime versions and
ENGINES_REVISION.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import torch

from . import artifacts
from .base import Engine, EngineUnavailableError, is_installed, machine, recommended_batch_size

DEFAULT_MAX_ERROR = 2e-2  # precision="auto": reduced precision only within 2% of the fp32 output's largest value
TIMED_SECONDS = 1.5  # per candidate, after its first call, in TIMING_ROUNDS interleaved rounds of >= 1 call
TIMING_ROUNDS = 3
ERROR_PROBE_IMAGES = 2
ENGINES_REVISION = 2  # bump when an engine's configuration changes its speed: cached decisions are re-measured
# Below this many images a job runs on eager torch unless a timed decision is cached. The selection (export,
# compile, timing) is paid once per model, size and batch: 4-66 s on 2 cores (benchmarks/engines.py). For B2
# @ 260 it took 6 s and the winner saves ~0.03 s an image over eager torch: even after ~200 images. Bigger
# models take longer to select but then save more per image on every later job, so one threshold serves.
MIN_IMAGES_TO_TIME = 200


def candidates(precision: str, device: str, calibration) -> list[tuple[str, str]]:
    """(engine, precision) pairs worth trying, in preference order."""
    hardware = machine()
    if device == "cuda":
        fp32 = [("torch", "fp32"), ("onnxruntime", "fp32")]
        reduced = [("torch", "fp16"), ("torch", "bf16")]
    else:
        fp32 = [("openvino", "fp32"), ("onnxruntime", "fp32"), ("torch", "fp32")]
        reduced = []
        if hardware.native_bf16:
            reduced += [("openvino", "bf16"), ("torch", "bf16")]
        if hardware.native_fp16:
            reduced += [("openvino", "fp16")]
    int8 = [("openvino", "int8"), ("onnxruntime", "int8")] if device == "cpu" else []
    if precision == "fp32":
        return fp32
    if precision == "auto":
        return reduced + (int8 if calibration is not None else []) + fp32
    if precision == "int8":
        return int8
    if device == "cuda":
        return [("torch", precision)]
    return [("openvino", precision), ("torch", precision)]  # torch on a CPU without native bf16 says "emulated"


def probe_images(count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Photo-like inputs without shipping photos: smooth random colour fields plus fine noise, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((count, 3, max(2, size[0] // 16), max(2, size[1] // 16)), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    noisy = smooth + 0.05 * torch.randn((count, 3, *size), generator=generator)
    return noisy.clamp(0, 1).numpy()


def select(model, build, *, precision: str, device: str, signature: str, input_size, batch_size,
           calibration, max_error: float | None, job_images: int | None = None) -> Engine:
    """The fastest engine among `candidates(...)`; `build(engine, precision)` makes one (see create_engine).

    job_images: how many images the caller is about to run. With no cached decision, a job smaller than
    MIN_IMAGES_TO_TIME runs on eager torch (no export, no compiling) instead of paying for the timing.
    """
    size = tuple(input_size) if input_size else (model.spec.native_size, model.spec.native_size)
    batch = batch_size or recommended_batch_size(size, device)
    max_error = DEFAULT_MAX_ERROR if max_error is None else max_error
    pairs = candidates(precision, device, calibration)
    model_fingerprint = artifacts.fingerprint(model)
    # Keyed by the candidates rather than the precision's name: where precision="auto" admits nothing beyond
    # fp32 (no native bf16, no calibration), it reuses fp32's timings instead of measuring the same engines again.
    key = "|".join([model_fingerprint[:16], signature, f"{size[0]}x{size[1]}", f"b{batch}", device,
                    ",".join(f"{e}:{p}" for e, p in pairs), f"max_error={max_error:g}", machine().key, _versions()])

    cached = artifacts.read_decision(key)
    if cached:
        try:
            engine = build(cached["engine"], cached["precision"], model_fingerprint)
        except EngineUnavailableError:
            cached = None  # a package went away since: measure again
        else:
            engine.measured_error = cached.get("error")
            engine.selection = f"picked from cached timings ({cached['measured']}, {cached['table']})"
            return engine

    eager = ("torch", "fp32" if precision == "auto" else precision)  # auto: no reduced precision untimed
    if job_images is not None and job_images < MIN_IMAGES_TO_TIME and eager in pairs:
        engine = build(*eager, model_fingerprint)
        engine.selection = (f"not timed: {job_images} image{'s' if job_images != 1 else ''} to run, fewer than the "
                            f"{MIN_IMAGES_TO_TIME} that timing and preparing the other engines pays off on")
        return engine

    probe = probe_images(batch, size)
    reference = _reference(model, signature, probe[:ERROR_PROBE_IMAGES])
    table, skipped, finalists = [], [], []  # finalists: [label, engine, error, fastest seconds per image]
    for engine_name, engine_precision in pairs:
        label = f"{engine_name} {engine_precision}"
        try:
            engine = build(engine_name, engine_precision, model_fingerprint)
        except EngineUnavailableError as error:
            skipped.append(f"{label}: {error}")
            continue
        quickest = min((f[3] for f in finalists), default=None)
        # Eager torch compiles nothing, so one image tells its speed: a slow candidate costs one image, not a
        # batch (B6 @ 528 eager on 2 cores: ~12 s an image). Engines that compile per shape are not pre-checked.
        if quickest is not None and batch > 1 and engine_name == "torch":
            started = time.perf_counter()
            engine(probe[:1])
            if time.perf_counter() - started > 2 * quickest * 1.5:  # x1.5: batch 1 is less efficient per image
                table.append(f"{label} <{1 / (time.perf_counter() - started):.1f} (1 image only)")
                continue
        started = time.perf_counter()
        output = engine(probe)  # the first full call: kernels picked, buffers allocated
        first = (time.perf_counter() - started) / batch
        error = _relative_error(output[:ERROR_PROBE_IMAGES], reference)
        if quickest is not None and first > 2 * quickest:
            table.append(f"{label} <{1 / first:.1f} (first call only)")  # already twice as slow as the best
            continue
        if engine_precision != "fp32" and not error <= max_error:
            skipped.append(f"{label}: error {error:.1e} > max_error {max_error:.0e}")
            continue
        finalists.append([label, engine, error, first])
    # Interleaved rounds, fastest call of each: load from other processes that comes and goes while timing
    # falls on every finalist instead of deciding the race (on a shared 2-core machine it moves rates by 20 %).
    for _ in range(TIMING_ROUNDS):
        for finalist in finalists:
            finalist[3] = min(finalist[3], _time_per_image(finalist[1], probe, TIMED_SECONDS / TIMING_ROUNDS))
    table += [f"{label} {1 / seconds:.1f}" for label, _, _, seconds in finalists]
    best = min(finalists, key=lambda f: f[3]) if finalists else None
    if best is None:
        raise EngineUnavailableError("no engine can run " + (f"precision={precision!r} " if precision != "auto" else "")
                                     + f"on {device} here:\n  " + "\n  ".join(skipped))
    _, engine, error, _ = best
    measured = f"measured {datetime.now(timezone.utc):%Y-%m-%d} at {size[0]}x{size[1]}, batch {batch}"
    table_text = "img/s: " + ", ".join(table) + (f"; not run: {'; '.join(skipped)}" if skipped else "")
    artifacts.write_decision(key, {"engine": engine.name, "precision": engine.precision, "error": error,
                                   "measured": measured, "table": table_text})
    engine.measured_error = error
    engine.selection = f"picked by timing ({measured}; {table_text})"
    return engine


def _reference(model, signature: str, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        tensor = torch.from_numpy(images)
        return (model.feature_vector(tensor) if signature == "features" else model(tensor)).float().numpy()


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    from ..export import relative_error
    return relative_error(ours, reference)


def _time_per_image(engine: Engine, probe: np.ndarray, seconds: float) -> float:
    """The fastest of the calls made in `seconds` (at least 1): other processes only ever slow a call down,
    so the minimum is the engine's own speed (what `timeit` reports, for the same reason)."""
    calls, started, fastest = 0, time.perf_counter(), float("inf")
    while calls < 1 or time.perf_counter() - started < seconds:
        call_started = time.perf_counter()
        engine(probe)
        fastest = min(fastest, time.perf_counter() - call_started)
        calls += 1
    return fastest / len(probe)


def _versions() -> str:
    import importlib.metadata as metadata
    from .. import __version__

    # The engines' own configuration counts too: timings of runs split another way are not this engine's.
    parts = [f"effnet{__version__}/engines{ENGINES_REVISION}", f"torch{torch.__version__}"]
    for package in ("onnxruntime", "openvino"):
        if is_installed(package):
            try:
                parts.append(f"{package}{metadata.version(package)}")
            except metadata.PackageNotFoundError:
                pass
    return ",".join(parts)
