"""The on-disk cache of exported and compiled models, so that a second run starts fast.

Layout under `$EFFNET_HOME/engines/` (default `~/.cache/effnet/engines/`):

    <arch>-<fingerprint16>/<signature>.onnx              dynamic-size ONNX export (effnet.export.to_onnx), verified
    <arch>-<fingerprint16>/<signature>-int8-<calib12>.onnx   its int8 QDQ quantization for one calibration set
    openvino/                                            OpenVINO's compiled-blob cache (CACHE_DIR), per shape+precision
    inductor/                                            torch.compile's FX graph cache (TORCHINDUCTOR_CACHE_DIR)
    auto.json                                            engine="auto" decisions: key -> chosen engine + measurements

The fingerprint hashes the spec and every weight (names, dtypes, shapes, bytes), so fine-tuned weights never
reuse another model's export. Files are written to a temporary name and renamed, so a crash leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..cache import effnet_home


def engines_dir() -> Path:
    return effnet_home() / "engines"


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the spec (minus where the weights came from) and of every tensor in the state dict."""
    digest = hashlib.sha256()
    spec = {k: v for k, v in model.spec.to_json().items() if k not in ("source", "extra")}
    digest.update(json.dumps(spec, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def array_fingerprint(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype}|{array.shape}".encode() + array.tobytes()).hexdigest()


def model_dir(model: torch.nn.Module, model_fingerprint: str | None = None) -> Path:
    return engines_dir() / f"{model.spec.name}-{(model_fingerprint or fingerprint(model))[:16]}"


def onnx_file(model: torch.nn.Module, signature: str, model_fingerprint: str | None = None) -> Path:
    """The verified dynamic-size ONNX export of `model` for `signature`, exported on the first request."""
    path = model_dir(model, model_fingerprint) / f"{signature}.onnx"
    if not path.exists():
        from ..export import to_onnx
        to_onnx(model, path, signature=signature)
    return path


def openvino_cache_dir() -> Path:
    path = engines_dir() / "openvino"
    path.mkdir(parents=True, exist_ok=True)
    return path


def inductor_cache_dir() -> Path:
    path = engines_dir() / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------ auto decisions
def _decisions_path() -> Path:
    return engines_dir() / "auto.json"


def read_decision(key: str) -> dict | None:
    try:
        return json.loads(_decisions_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def write_decision(key: str, decision: dict) -> None:
    path = _decisions_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        decisions = json.loads(path.read_text())
    except (OSError, ValueError):
        decisions = {}
    decisions[key] = decision
    atomic_write_text(path, json.dumps(decisions, indent=1, sort_keys=True))


def atomic_write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)
