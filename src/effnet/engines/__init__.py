"""Engines: one interface over the ways to run an effnet model fast, used by the library, the CLI (`--engine`)
and the server.

    engine = effnet.engines.create_engine(model, engine="auto", precision="fp32", input_size=(260, 260))
    engine.description   # 'auto -> openvino fp32 on cpu (efficientnet_b2 logits, 260x260, batch 8, ...); picked by timing (...)'
    logits = engine(images)  # float32 NCHW RGB in [0, 1] (numpy or torch) -> numpy (N, classes)

| engine          | precisions                                  | devices   | needs                             | file                  |
|-----------------|---------------------------------------------|-----------|-----------------------------------|-----------------------|
| `torch`         | fp32; bf16 (AVX512-BF16/AMX CPUs, CUDA); fp16 (CUDA) | cpu, cuda | -                        | torch_engines.py      |
| `torch-compile` | as `torch`                                  | cpu, cuda | a C++ compiler on CPU             | torch_engines.py      |
| `onnxruntime`   | fp32, int8                                  | cpu, cuda | pip install 'effnet[onnxruntime]' | onnxruntime_engine.py |
| `openvino`      | fp32, int8; bf16/fp16 where the CPU has them | cpu      | pip install 'effnet[openvino]'    | openvino_engine.py    |
| `auto`          | the fastest of the above here, timed once   |           |                                   | auto.py               |

Precision is explicit and `engine.precision` is what actually runs: an engine that cannot run the requested
precision on this hardware raises EngineUnavailableError rather than quietly running another. int8 needs
`calibration=` images. Exports and compiled models are cached under `$EFFNET_HOME/engines` (artifacts.py).
"""

from __future__ import annotations

import importlib
import inspect

from .base import (DEVICES, PRECISIONS, SIGNATURES, Engine, EngineUnavailableError, is_installed, machine,
                   recommended_batch_size)

__all__ = ["create_engine", "available_engines", "Engine", "EngineUnavailableError", "ENGINES", "PRECISIONS", "SIGNATURES",
           "recommended_batch_size", "machine"]

# name -> ("module:Class", the optional package it needs). Looked up, never parsed (STYLE 22).
ENGINES: dict[str, tuple[str, str | None]] = {
    "torch": ("torch_engines:TorchEngine", None),
    "torch-compile": ("torch_engines:TorchCompileEngine", None),
    "onnxruntime": ("onnxruntime_engine:OnnxRuntimeEngine", "onnxruntime"),
    "openvino": ("openvino_engine:OpenVinoEngine", "openvino"),
}
CHOICES = ("auto", *ENGINES)  # what --engine accepts


def available_engines() -> list[str]:
    """The engines whose packages are installed (torch ones always)."""
    return [name for name, (_, package) in ENGINES.items() if package is None or is_installed(package)]


def create_engine(model, engine: str = "auto", precision: str = "fp32", device: str = "cpu", *,
                  input_size: tuple[int, int] | None = None, batch_size: int | None = None,
                  signature: str | None = None, calibration=None, max_error: float | None = None,
                  job_images: int | None = None, **options) -> Engine:
    """An engine that runs `model` (an effnet EfficientNet) on float32 NCHW batches in [0, 1].

    engine: "auto" (time the candidates, keep the fastest; see auto.py) or one of ENGINES.
    precision: "fp32" | "bf16" | "fp16" | "int8" | "auto" (auto admits a reduced precision only with its
        measured error, at most `max_error`, stated in `engine.measured_error` and the description).
    input_size: (H, W) to prepare and time for; None prepares for any size (auto then times the native size).
    batch_size: the largest chunk per call (default: `recommended_batch_size` for the machine).
    signature: "logits" | "features" (default: what the model's forward returns, `model.spec.output`).
    calibration: float32 (N, 3, H, W) images in [0, 1], needed for int8.
    job_images: with engine="auto", how many images the caller will run: a small job (auto.MIN_IMAGES_TO_TIME)
        with no cached decision runs eager torch rather than paying for the timing.
    options: engine-specific keywords (threads=, streams=, channels_last=, cuda_graphs=, mode=).
    """
    if engine not in CHOICES:
        raise ValueError(f"engine must be one of {CHOICES}, not {engine!r}")
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be one of {(*PRECISIONS, 'auto')}, not {precision!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    signature = signature or model.spec.output
    if model.spec.fixed_size and input_size is None:
        input_size = (model.spec.native_size, model.spec.native_size)

    def build(name: str, name_precision: str, model_fingerprint: str | None = None) -> Engine:
        module_name, package = ENGINES[name]
        if package is not None and not is_installed(package):
            raise EngineUnavailableError(f"{package} is not installed: pip install 'effnet[{package}]'")
        module, _, class_name = module_name.partition(":")
        engine_class = getattr(importlib.import_module(f".{module}", __name__), class_name)
        keywords = dict(precision=name_precision, device=device, signature=signature, input_size=input_size,
                        batch_size=batch_size, calibration=calibration, model_fingerprint=model_fingerprint,
                        **options)
        accepted = inspect.signature(engine_class.__init__).parameters
        if engine != "auto":  # an explicit engine gets every option, so a misspelt one is a TypeError
            unknown = set(options) - set(accepted)
            if unknown:
                raise TypeError(f"engine {name!r} takes no option(s) {sorted(unknown)}")
        built = engine_class(model, **{k: v for k, v in keywords.items() if k in accepted})
        built.warm_up()
        return built

    if engine == "auto":
        from .auto import select
        return select(model, build, precision=precision, device=device, signature=signature,
                      input_size=input_size, batch_size=batch_size, calibration=calibration, max_error=max_error,
                      job_images=job_images)
    if precision == "auto":
        raise ValueError("precision='auto' chooses among engines: use it with engine='auto'")
    return build(engine, precision)
