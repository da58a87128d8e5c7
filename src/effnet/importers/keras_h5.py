"""Read Keras EfficientNet weights files into effnet state dicts.

Three layouts exist in users' hands (keras `src/legacy/saving/legacy_h5_format.py`, `src/saving/saving_lib.py`):
- Keras 2 `save_weights("x.h5")` and the published keras-applications files: root attr `layer_names`, a group per
  layer with attr `weight_names` (`block1a_dwconv/depthwise_kernel:0`), datasets at `<layer>/<weight_name>`.
  Long attrs may be chunked as `layer_names0`, `layer_names1`, ...
- The same inside a whole-model `model.save("x.h5")`: under the group `model_weights`.
- Keras 3 `save_weights("x.weights.h5")`: `layers/<class_name>_<n>/vars/<i>`, layers named by class and counter
  in creation order, variables by position; the layer names are recovered from effnet's own Keras table.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import CheckpointFormatError
from ..name_maps import KINDS, UpstreamLayer
from .bounds import ShapeCheck


def _attr_strings(group: h5py.Group, name: str) -> list[str]:
    if name in group.attrs:
        values = list(group.attrs[name])
    else:  # chunked attributes: name0, name1, ...
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values += list(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _legacy_arrays(root: h5py.Group, shapes: ShapeCheck) -> dict[str, np.ndarray]:
    """Keras 2 / legacy layout -> {"layer/variable": array} (`:0` suffixes dropped)."""
    datasets = {}
    for layer in _attr_strings(root, "layer_names"):
        group = root[layer]
        for weight_name in _attr_strings(group, "weight_names"):
            variable = weight_name.split("/")[-1].split(":")[0]
            datasets[f"{layer}/{variable}"] = group[weight_name]
    return _read_all(datasets, shapes)


def _keras3_arrays(root: h5py.Group, shapes: ShapeCheck) -> dict[str, np.ndarray]:
    """Keras 3 layout -> {"layers/<object>/vars/<i>": array}; names are resolved per architecture later."""
    datasets = {}
    for key, group in root["layers"].items():
        for index, dataset in group.get("vars", {}).items():
            datasets[f"layers/{key}/vars/{index}"] = dataset
    return _read_all(datasets, shapes)


def _read_all(datasets: dict, shapes: ShapeCheck) -> dict[str, np.ndarray]:
    """Check every declared shape first (the file's total included), then read."""
    for name, dataset in datasets.items():
        if not isinstance(dataset, h5py.Dataset):
            raise CheckpointFormatError(f"{shapes.source}: {name!r} is a group, not a weights array")
        shapes.check(name, dataset.shape, dataset.dtype.itemsize)
    return {name: np.asarray(dataset) for name, dataset in datasets.items()}


def read_h5(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a Keras weights file, keyed "layer/variable" (legacy) or "layers/<object>/vars/<i>" (Keras 3)."""
    path = Path(path)
    shapes = ShapeCheck(str(path))
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs or "layer_names0" in f.attrs:
                return _legacy_arrays(f, shapes)
            if "model_weights" in f:
                return _legacy_arrays(f["model_weights"], shapes)
            if "layers" in f:
                return _keras3_arrays(f, shapes)
    except (OSError, KeyError, ValueError) as error:
        raise CheckpointFormatError(f"{path}: not a readable Keras HDF5 weights file ({error})") from error
    raise CheckpointFormatError(
        f"{path}: an HDF5 file but not Keras weights (no `layer_names`, `model_weights` or `layers` inside)")


def name_arrays(raw: dict[str, np.ndarray], table: list[UpstreamLayer]) -> dict[str, np.ndarray]:
    """Give every array its Keras "layer/variable" name, as `table` (effnet's Keras layer list) expects."""
    from ..name_maps.keras import keras3_object_names
    if any(name.startswith("layers/") for name in raw):
        by_object = {}
        for layer_name, object_name in keras3_object_names(table).items():
            by_object[object_name] = layer_name
        kinds = {layer.name: layer.kind for layer in table}
        named = {}
        for key, value in raw.items():
            _, object_name, _, index = key.split("/")
            layer_name = by_object.get(object_name)
            variables = KINDS[kinds[layer_name]] if layer_name else []
            if layer_name is not None and int(index) < len(variables):
                named[f"{layer_name}/{variables[int(index)][0]}"] = value
            else:
                named[key] = value  # reported as unexpected
        return named
    # Keras 3 calls a depthwise kernel `kernel`, Keras 2 `depthwise_kernel`: one name for the table
    depthwise = {layer.name for layer in table if layer.kind == "depthwise"}
    return {
        (f"{name.rsplit('/', 1)[0]}/depthwise_kernel"
         if name.endswith("/kernel") and name.rsplit("/", 1)[0] in depthwise else name): value
        for name, value in raw.items()
    }


def is_preprocessing_variable(name: str) -> bool:
    """Keras's in-graph Normalization layer state: effnet applies the family normalization itself."""
    parts = name.split("/")
    layer = parts[1] if parts[0] == "layers" else parts[0]
    return layer.startswith("normalization")
