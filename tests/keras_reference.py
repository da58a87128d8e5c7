"""Build keras.applications references with conditioned random weights, and write them to real Keras files.

Flow of a parity case:
1. build the Keras model (seeded random init), save its weights, load them through effnet's Keras import;
2. condition the weights in effnet (tests/conditioning.py) and write them back into the Keras model by
   effnet's own name table, inverted; set Keras's Normalization layer to mean/std (variance = std**2);
3. save the Keras weights in the format under test, load that file with `effnet.load`, compare outputs.
V1 references are built with a STATIC input shape per size: keras V1 pads strided convs with a ZeroPadding
computed from the static shape, and with `None` it pads as if every size were even (not TF SAME).
"""

from __future__ import annotations

import numpy as np
import torch

from effnet import name_maps
from effnet.name_maps import keras as keras_names
from effnet.tf_compat import IMAGENET_MEAN, IMAGENET_STD

from .conditioning import condition

KERAS_BUILDERS = {  # effnet name -> keras.applications constructor name
    **{f"efficientnet_b{i}": f"EfficientNetB{i}" for i in range(8)},
    **{f"efficientnetv2_b{i}": f"EfficientNetV2B{i}" for i in range(4)},
    "efficientnetv2_s": "EfficientNetV2S", "efficientnetv2_m": "EfficientNetV2M", "efficientnetv2_l": "EfficientNetV2L",
}


def keras_module(flavour: str):
    """"keras3" (Keras 3, what tensorflow ships) or "tf_keras" (Keras 2, for genuine Keras 2 .h5 files)."""
    if flavour == "tf_keras":
        import tf_keras
        return tf_keras
    import keras
    return keras


def build_keras(name: str, height: int, width: int, flavour: str = "keras3", seed: int = 0):
    keras = keras_module(flavour)
    keras.utils.set_random_seed(seed)
    kwargs = {"weights": None, "input_shape": (height, width, 3), "classifier_activation": None}
    if name.startswith("efficientnetv2"):
        kwargs["include_preprocessing"] = True
    return getattr(keras.applications, KERAS_BUILDERS[name])(**kwargs)


def set_keras_normalization(model, name: str) -> None:
    """Keras's Normalization state as (x - mean) / std (variance = std**2; V2-S/M/L use Rescaling instead)."""
    for layer in model.layers:
        # (keras V2-B* builds it from constants mean / std**2 already: no state to set)
        if layer.name.startswith("normalization") and layer.get_weights():
            mean = np.array(IMAGENET_MEAN, np.float32)
            variance = np.square(np.array(IMAGENET_STD, np.float32))
            count = [w for w in layer.get_weights()[2:]]
            layer.set_weights([mean, variance, *count])
            if hasattr(layer, "finalize_state"):  # Keras 3 computes the used mean/variance from the state here
                layer.finalize_state()


def write_into_keras(model, state: dict[str, torch.Tensor], table) -> None:
    arrays = name_maps.from_state_dict(state, table)
    for layer in table:
        variables = [arrays[f"{layer.name}/{v}"] for v, _, _ in name_maps.KINDS[layer.kind]]
        model.get_layer(layer.name).set_weights(variables)


def save_keras(model, path, flavour: str) -> None:
    """`.weights.h5` (Keras 3 native), `.h5` via tf_keras save_weights (Keras 2), or `.h5` via Keras 3 model.save."""
    path = str(path)
    if path.endswith(".weights.h5") or flavour == "tf_keras":
        model.save_weights(path)
    else:
        model.save(path)  # Keras 3 writes the legacy whole-model h5 (`model_weights` group)


def keras_outputs(model, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(feature vectors, logits) of a Keras EfficientNet on [0, 1] NCHW images (Keras takes 0-255 NHWC)."""
    keras = type(model).__module__.split(".")[0]
    module = __import__(keras)
    features_model = module.Model(model.inputs, [model.get_layer("avg_pool").output, model.output])
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255.0).astype(np.float32)
    features, logits = features_model.predict(pixels, verbose=0, batch_size=len(pixels))
    return np.asarray(features), np.asarray(logits)


def conditioned_reference(name: str, height: int, width: int, calibration: torch.Tensor, tmp_path,
                          flavour: str = "keras3", file_name: str = "reference.weights.h5"):
    """A Keras model with conditioned weights, saved to `tmp_path/file_name`; returns (keras_model, path)."""
    import effnet
    model = build_keras(name, height, width, flavour)
    raw_path = tmp_path / ("raw.h5" if flavour == "tf_keras" else "raw.weights.h5")
    save_keras(model, raw_path, flavour)
    ours = effnet.load(raw_path, architecture_name=name)  # the import path, on Keras's own random init
    condition(ours, calibration)
    write_into_keras(model, ours.state_dict(), keras_names.layers(ours.architecture, with_classifier=True))
    set_keras_normalization(model, name)
    path = tmp_path / file_name
    save_keras(model, path, flavour)
    return model, path
