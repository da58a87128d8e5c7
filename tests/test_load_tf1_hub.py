"""A TF1-format hub module with tensorflow/tpu naming (the `google/efficientnet/b2/classification/1` family).

Built, exported and read back by tensorflow-hub 0.15's own module API; effnet reads the folder with no
TensorFlow and must match `hub.Module`'s outputs within 1e-5 relative, identical top-1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effnet
from effnet import name_maps
from effnet.architectures import architecture
from effnet.name_maps import tpu

from .conditioning import condition, relative_error
from .conftest import photo_batch, random_batch
from .tf_reference import nhwc
from .tpu_reference import efficientnet_tf1, import_hub_015, module_arrays, write_checkpoint


@pytest.mark.slow
def test_tf1_hub_module_b2(tmp_path):
    import tensorflow as tf
    hub = import_hub_015()
    tf1 = tf.compat.v1
    name, size = "efficientnet_b2", 260
    arch = architecture(name)
    images = torch.cat([photo_batch(size), random_batch(2, size, size)])

    def module_fn():
        inputs = tf1.placeholder(tf.float32, [None, size, size, 3], name="images")
        features, logits = efficientnet_tf1(inputs, arch, "efficientnet-b2", with_classifier=True)
        hub.add_signature(inputs={"images": inputs}, outputs={"default": logits, "feature_vector": features})
        hub.add_signature("image_classification", inputs={"images": inputs}, outputs={"default": logits})

    spec = hub.create_module_spec(module_fn)
    export_dir = tmp_path / "b2_classification"
    with tf.Graph().as_default():
        module = hub.Module(spec)
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            # condition the module's weights in effnet (tpu table), write them back by name
            table = tpu.layers(arch, with_classifier=True)
            ours = effnet.model.EfficientNet(arch, 1000)
            ours.load_state_dict(name_maps.to_state_dict(module_arrays(module, session), table, ours, source="module"))
            condition(ours, images)
            conditioned = name_maps.from_state_dict(ours.state_dict(), table)
            for key, variable in module.variable_map.items():
                variable.load(conditioned[key], session)
            module.export(str(export_dir), session)
    assert (export_dir / "tfhub_module.pb").read_bytes() == b"\x08\x03"  # FORMAT_V3: a genuine TF1 hub module

    with tf.Graph().as_default():
        consumer = hub.Module(str(export_dir))
        placeholder = tf1.placeholder(tf.float32, [None, size, size, 3])
        outputs = consumer(placeholder, as_dict=True)
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            reference = session.run(outputs, {placeholder: nhwc(images)})

    loaded = effnet.load(export_dir)
    assert loaded.spec.name == name and loaded.spec.extra["name_scheme"] == "tpu"
    with torch.no_grad():
        logits = loaded(images).numpy()
        features = loaded.feature_vector(images).numpy()
    assert relative_error(logits, reference["default"]) <= 1e-5
    assert relative_error(features, reference["feature_vector"]) <= 1e-5
    np.testing.assert_array_equal(logits.argmax(1), reference["default"].argmax(1))
    assert loaded.spec.extra["normalization_source"] == "graph constants"


@pytest.mark.parametrize("name,scope,size,with_moving_averages", [
    ("efficientnetv2_b0", "efficientnetv2-b0", 193, True),  # automl training checkpoint: EMA copies, global_step
    ("efficientnet_lite0", "efficientnet-lite0", 224, False),  # tpu lite
])
def test_checkpoint_prefix(name, scope, size, with_moving_averages, tmp_path):
    """A name-based TF checkpoint (tensorflow/tpu or automl naming) loads from its prefix, matching TF."""
    arch = architecture(name)
    images = torch.cat([photo_batch(size), random_batch(2, size, size)])
    # conditioned weights, in upstream names
    table = tpu.layers(arch, with_classifier=True, scope=scope)
    ours = effnet.model.EfficientNet(arch, 1000)
    condition(ours, images)
    conditioned = name_maps.from_state_dict(ours.state_dict(), table)
    features, logits = write_checkpoint(arch, scope, conditioned, str(tmp_path / "model.ckpt"), size, nhwc(images),
                                        with_moving_averages)

    loaded = effnet.load(tmp_path / "model.ckpt")
    assert loaded.spec.name == name
    assert loaded.spec.extra["name_scheme"] == ("automl" if name.startswith("efficientnetv2") else "tpu")
    with torch.no_grad():
        assert relative_error(loaded(images).numpy(), logits) <= 1e-5
        assert relative_error(loaded.feature_vector(images).numpy(), features) <= 1e-5
