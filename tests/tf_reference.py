"""Real TensorFlow artifacts for the loader tests: Model Garden SavedModels, Keras SavedModels, TF1 hub modules.

Every artifact gets conditioned weights (tests/conditioning.py): the TF variables are mapped into effnet by the
scheme's own name table, conditioned there, and assigned back by variable name, so TF then computes with
exactly the weights effnet will later read from the files TF writes.
"""

from __future__ import annotations

import numpy as np
import torch

import effnet
from effnet import name_maps
from effnet.architectures import architecture
from effnet.name_maps import model_garden

from .conditioning import condition


def variable_name(variable) -> str:
    """The name a checkpoint records: Keras 3's `path` (its `name` is only the last part), else TF's name."""
    return getattr(variable, "path", None) or variable.name.split(":")[0]


def condition_tf_variables(variables, table, name: str, num_classes: int, calibration: torch.Tensor) -> None:
    """Conditioned weights into TF variables named as `table` says (in place)."""
    model = effnet.model.EfficientNet(architecture(name), num_classes=num_classes)
    depthwise = {layer.name for layer in table if layer.kind == "depthwise"}

    def table_name(variable) -> str:  # Keras 3 calls a depthwise kernel `kernel`, the tables `depthwise_kernel`
        layer, _, _ = variable_name(variable).rpartition("/")
        return f"{layer}/depthwise_kernel" if layer in depthwise else variable_name(variable)

    arrays = {table_name(v): np.asarray(v.numpy()) for v in variables}
    model.load_state_dict(name_maps.to_state_dict(
        arrays, table, model, source="tf variables", ignore=lambda n: n not in name_maps.expected_variables(table)))
    condition(model, calibration)
    conditioned = name_maps.from_state_dict(model.state_dict(), table)
    for variable in variables:
        key = table_name(variable)
        if key in conditioned:
            variable.assign(conditioned[key])


def nhwc_255(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).numpy() * 255.0).astype(np.float32)


def nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy().astype(np.float32)


def model_garden_module(name: str, calibration: torch.Tensor, signature: str):
    """A Model Garden EfficientNet as the hub exporter builds it, with conditioned weights."""
    import tensorflow as tf
    import tf_keras
    from official.legacy.image_classification.efficientnet import efficientnet_model
    config = dict(efficientnet_model.MODEL_CONFIGS)[name.replace("_", "-")]
    image_input = tf_keras.layers.Input(shape=(None, None, 3), name="image_input", dtype=tf.float32)
    outputs = efficientnet_model.efficientnet(image_input * 255.0, config)  # tfhub_export.export_tfhub
    classification = tf_keras.Model(image_input, outputs)
    table = model_garden.layers(architecture(name), with_classifier=True)
    condition_tf_variables(classification.weights, table, name, 1000, calibration)
    if signature == "feature-vector":
        return tf_keras.Model(image_input, classification.get_layer(name="top_pool").get_output_at(0))
    return classification
