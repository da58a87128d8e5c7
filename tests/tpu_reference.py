"""A genuine TF1 hub module (tensorflow-hub 0.15, FORMAT_V3) of an EfficientNet in tensorflow/tpu variable names.

The tensorflow/tpu builder is not on PyPI, so the graph is written here with TF1 ops (tf.nn.conv2d "SAME",
depthwise_conv2d, batch_normalization eps 1e-3, swish, SE) under the tpu scopes and layer names; the module is
then created and exported by tensorflow_hub's own `create_module_spec` / `Module.export`, and read back by
`hub.Module` for the reference outputs. Input as the hub modules take it: [0, 1] RGB, normalized in-graph.
"""

from __future__ import annotations

import sys
import types

import numpy as np

from effnet.architectures import Architecture
from effnet.tf_compat import IMAGENET_MEAN, IMAGENET_STD

# Each family's preprocessing on 0-255 pixels, as the originals write it: (mean, std)
MEAN_STD_255 = {
    "imagenet_mean_std": ([m * 255 for m in IMAGENET_MEAN], [s * 255 for s in IMAGENET_STD]),  # tpu MEAN_RGB
    "lite_127_128": ([127.0] * 3, [128.0] * 3),  # tpu lite
    "minus_one_to_one_128": ([128.0] * 3, [128.0] * 3),  # automl preprocessing.py
}


def import_hub_015():
    """tensorflow-hub 0.15 imports tf.estimator helpers that TF 2.16+ no longer has; the module API needs neither."""
    if "tensorflow_hub.estimator" not in sys.modules:
        stub = types.ModuleType("tensorflow_hub.estimator")
        stub.LatestModuleExporter = stub.register_module_for_export = None
        sys.modules["tensorflow_hub.estimator"] = stub
    import tensorflow_hub as hub
    return hub


def efficientnet_tf1(images, arch: Architecture, scope: str, with_classifier: bool, num_classes: int = 1000):
    """(features, logits) for NHWC images in [0, 1]; variables created with tf.compat.v1.get_variable."""
    import tensorflow as tf
    tf1 = tf.compat.v1

    def variable(name, shape, initializer=None):
        return tf1.get_variable(name, shape, tf.float32, initializer or tf1.random_normal_initializer(0, 0.1))

    def conv(x, name, out_channels, kernel_size, stride, bias=False):
        with tf1.variable_scope(name):
            kernel = variable("kernel", [kernel_size, kernel_size, x.shape[-1], out_channels])
            y = tf.nn.conv2d(x, kernel, strides=stride, padding="SAME")
            return y + variable("bias", [out_channels], tf1.zeros_initializer()) if bias else y

    def depthwise(x, name, kernel_size, stride):
        with tf1.variable_scope(name):
            kernel = variable("depthwise_kernel", [kernel_size, kernel_size, x.shape[-1], 1])
            return tf.nn.depthwise_conv2d(x, kernel, [1, stride, stride, 1], "SAME")

    def batch_norm(x, name):
        channels = x.shape[-1]
        with tf1.variable_scope(name):
            gamma = variable("gamma", [channels], tf1.ones_initializer())
            beta = variable("beta", [channels], tf1.zeros_initializer())
            mean = variable("moving_mean", [channels], tf1.zeros_initializer())
            var = variable("moving_variance", [channels], tf1.ones_initializer())
            return tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-3)

    act = tf.nn.relu6 if arch.family.activation == "relu6" else tf.nn.swish
    mean, std = MEAN_STD_255[arch.family.normalization]
    x = (images * 255.0 - mean) / std
    with tf1.variable_scope(scope):
        with tf1.variable_scope("stem"):
            x = act(batch_norm(conv(x, "conv2d", arch.stem_channels, 3, 2), "tpu_batch_normalization"))
        flat = 0
        for stage in arch.stages:
            for block in stage:
                with tf1.variable_scope(f"blocks_{flat}"):
                    inputs, bn_index, conv_index = x, 0, 0

                    def next_bn():
                        nonlocal bn_index
                        bn_index += 1
                        return "tpu_batch_normalization" + ("" if bn_index == 1 else f"_{bn_index - 1}")

                    def next_conv():
                        nonlocal conv_index
                        conv_index += 1
                        return "conv2d" + ("" if conv_index == 1 else f"_{conv_index - 1}")

                    hidden = block.in_channels * block.expand_ratio
                    if block.block == "fused_mbconv":  # automl FusedMBConvBlock: k x k conv [+ 1 x 1 project]
                        width = hidden if block.expand_ratio != 1 else block.out_channels
                        x = act(batch_norm(conv(x, next_conv(), width, block.kernel_size, block.stride), next_bn()))
                        if block.expand_ratio != 1:
                            x = batch_norm(conv(x, next_conv(), block.out_channels, 1, 1), next_bn())
                        if block.stride == 1 and block.in_channels == block.out_channels:
                            x = x + inputs
                        flat += 1
                        continue
                    if block.expand_ratio != 1:
                        x = act(batch_norm(conv(x, next_conv(), hidden, 1, 1), next_bn()))
                    x = act(batch_norm(depthwise(x, "depthwise_conv2d", block.kernel_size, block.stride), next_bn()))
                    if block.se_ratio > 0:
                        with tf1.variable_scope("se"):
                            squeeze = max(1, int(block.in_channels * block.se_ratio))
                            s = tf.reduce_mean(x, [1, 2], keepdims=True)
                            s = conv(act(conv(s, "conv2d", squeeze, 1, 1, bias=True)), "conv2d_1", hidden, 1, 1, True)
                            x = x * tf.sigmoid(s)
                    x = batch_norm(conv(x, next_conv(), block.out_channels, 1, 1), next_bn())
                    if block.stride == 1 and block.in_channels == block.out_channels:
                        x = x + inputs
                flat += 1
        with tf1.variable_scope("head"):
            x = act(batch_norm(conv(x, "conv2d", arch.head_channels, 1, 1), "tpu_batch_normalization"))
            features = tf.reduce_mean(x, [1, 2])
            logits = None
            if with_classifier:
                with tf1.variable_scope("dense"):
                    kernel = variable("kernel", [arch.head_channels, num_classes])
                    logits = tf.matmul(features, kernel) + variable("bias", [num_classes], tf1.zeros_initializer())
    return features, logits


def write_checkpoint(arch: Architecture, scope: str, conditioned: dict, prefix: str, size: int, images,
                     with_moving_averages: bool):
    """A name-based TF checkpoint as the tpu/automl trainers write it (optionally with EMA shadow copies and a
    global step, as in the published training .tgz files); returns TF's outputs (features, logits) on `images`."""
    import tensorflow as tf
    tf1 = tf.compat.v1
    with tf.Graph().as_default():
        placeholder = tf1.placeholder(tf.float32, [None, size, size, 3])
        features, logits = efficientnet_tf1(placeholder, arch, scope, with_classifier=True)
        model_variables = tf1.global_variables()
        # the EMA shadow copies hold the published weights; the raw ones differ
        averages = {v.op.name: tf1.get_variable(v.op.name + "/ExponentialMovingAverage", v.shape)
                    for v in model_variables} if with_moving_averages else {}
        global_step = tf1.train.get_or_create_global_step()
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            for variable in model_variables:
                name = variable.op.name
                if with_moving_averages:
                    averages[name].load(conditioned[name], session)
                    variable.load(conditioned[name] * 0.5, session)  # wrong on purpose: must not be used
                else:
                    variable.load(conditioned[name], session)
            saved = model_variables + list(averages.values()) + [global_step]
            tf1.train.Saver(saved).save(session, prefix, write_meta_graph=False)
            if with_moving_averages:  # TF's outputs with the EMA values, as the exporters restore them
                for variable in model_variables:
                    variable.load(conditioned[variable.op.name], session)
            return session.run([features, logits], {placeholder: images})


def module_arrays(module, session) -> dict[str, np.ndarray]:
    """The module's variables by their in-module names (`efficientnet-b2/stem/conv2d/kernel`)."""
    names = list(module.variable_map)
    values = session.run([module.variable_map[n] for n in names])
    return dict(zip(names, values))
