"""`effnet.load(dir)` on real TensorFlow artifacts, compared with TensorFlow's own outputs.

- TF2 SavedModel with Model Garden names (the `tensorflow/efficientnet/b*` hub family, B6 here), built with the
  real `official.legacy.image_classification.efficientnet` code from tf-models-official and exported as its
  `tfhub_export.py` does (`image_input * 255.0`, feature vector = `top_pool`).
- TF2 SavedModel exported from a keras.applications EfficientNetV2 (Keras names).
- Bound: max|effnet - tf| / max|tf| <= 1e-5 (same reasoning as test_parity_keras.py), identical top-1.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import effnet
from effnet.architectures import architecture
from effnet.name_maps import keras as keras_names

from .conditioning import relative_error, self_error
from .conftest import photo_batch, random_batch
from .keras_reference import build_keras
from .tf_reference import condition_tf_variables, model_garden_module, nhwc, nhwc_255

TOLERANCE = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("signature", ["feature-vector", "classification"])
def test_model_garden_savedmodel_b6(signature, tmp_path):
    import tensorflow as tf
    height, width = 263, 231  # odd and non-square: Model Garden pads "same", dynamic and exact
    images = torch.cat([photo_batch(height, width), random_batch(2, height, width)])
    module = model_garden_module("efficientnet_b6", images, signature)
    module.save(str(tmp_path / signature), include_optimizer=False)  # a TF2 SavedModel, as on TF Hub
    reference = tf.saved_model.load(str(tmp_path / signature))(nhwc(images), training=False).numpy()

    ours = effnet.load(tmp_path / signature)
    assert ours.spec.name == "efficientnet_b6" and ours.spec.extra["name_scheme"] == "model_garden"
    with torch.no_grad():
        if signature == "feature-vector":
            output = ours(images).numpy()
            assert output.shape == (6, 2304)
        else:  # the hub module ends in softmax; effnet gives the logits before it
            output = torch.softmax(ours(images), dim=1).numpy()
            assert ours.spec.extra["hub_output"] == "probabilities"
            np.testing.assert_array_equal(output.argmax(1), reference.argmax(1))
    assert self_error(ours, images) <= 2e-6
    assert relative_error(output, reference) <= TOLERANCE


def test_keras_savedmodel_v2(tmp_path):
    import tensorflow as tf
    height, width = 225, 191
    images = torch.cat([photo_batch(height, width), random_batch(2, height, width)])
    keras_model = build_keras("efficientnetv2_b0", height, width)
    table = keras_names.layers(architecture("efficientnetv2_b0"), with_classifier=True)
    condition_tf_variables(keras_model.weights, table, "efficientnetv2_b0", 1000, images)
    tf.saved_model.save(keras_model, str(tmp_path / "saved"))
    reference = keras_model(nhwc_255(images), training=False).numpy()

    ours = effnet.load(tmp_path / "saved")
    assert ours.spec.name == "efficientnetv2_b0" and ours.spec.extra["name_scheme"] == "keras"
    with torch.no_grad():
        logits = ours(images).numpy()
    assert relative_error(logits, reference) <= TOLERANCE
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))


def test_loading_never_imports_tensorflow(tmp_path):
    """Read a real SavedModel in a fresh interpreter: tensorflow must not be imported."""
    import tensorflow as tf
    keras_model = build_keras("efficientnet_b0", 64, 64)
    tf.saved_model.save(keras_model, str(tmp_path / "saved"))
    code = (
        "import sys, effnet; m = effnet.load(sys.argv[1]); "
        "assert m.spec.name == 'efficientnet_b0', m.spec; "
        "bad = [n for n in sys.modules if n.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')]; "
        "assert not bad, bad; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "saved")], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_unmapped_variables_are_named(tmp_path):
    import tensorflow as tf
    keras_model = build_keras("efficientnet_b0", 64, 64)
    extra = tf.Variable(np.zeros(3, np.float32), name="my_extra_layer/kernel")
    checkpoint = tf.train.Checkpoint(model=keras_model, extra=extra)
    prefix = checkpoint.write(str(tmp_path / "ckpt"))
    with pytest.raises(effnet.WeightsError, match="my_extra_layer/kernel"):
        effnet.load(prefix, architecture_name="efficientnet_b0")
