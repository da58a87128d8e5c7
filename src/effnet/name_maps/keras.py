"""keras.applications EfficientNet (V1) and EfficientNetV2 layer names -> effnet modules.

Follows keras `src/applications/efficientnet.py` (`block()`, `EfficientNet()`) and `efficientnet_v2.py`
(`MBConvBlock`, `FusedMBConvBlock`, `EfficientNetV2()`). Layers are listed in Keras's creation order, which is
also the order Keras 3 numbers them in `.weights.h5` files (`layers/batch_normalization_7/vars/0`).
Blocks are named `block{stage + 1}{letter of repeat}_`, e.g. `block2b_project_conv`.
"""

from __future__ import annotations

from ..architectures import Architecture
from . import UpstreamLayer

# (keras layer suffix, kind, effnet module inside the block); the block's own layers in creation order
V1_MBCONV = [
    ("expand_conv", "conv", "expand.conv"),
    ("expand_bn", "bn", "expand.bn"),
    ("dwconv", "depthwise", "depthwise.conv"),
    ("bn", "bn", "depthwise.bn"),
    ("se_reduce", "conv_bias", "se.reduce"),
    ("se_expand", "conv_bias", "se.expand"),
    ("project_conv", "conv", "project.conv"),
    ("project_bn", "bn", "project.bn"),
]
V2_MBCONV = [("dwconv2", kind, target) if suffix == "dwconv" else (suffix, kind, target)
             for suffix, kind, target in V1_MBCONV]
V2_FUSED = [
    ("expand_conv", "conv", "expand.conv"),  # k x k, strided
    ("expand_bn", "bn", "expand.bn"),
    ("project_conv", "conv", "project.conv"),  # 1 x 1
    ("project_bn", "bn", "project.bn"),
]
V2_FUSED_NO_EXPANSION = [  # expand_ratio 1: Keras calls the single k x k conv `project_conv`
    ("project_conv", "conv", "expand.conv"),
    ("project_bn", "bn", "expand.bn"),
]
STEM = [("stem_conv", "conv", "stem.conv"), ("stem_bn", "bn", "stem.bn")]
TOP = [("top_conv", "conv", "head.conv"), ("top_bn", "bn", "head.bn")]
CLASSIFIER = [("predictions", "dense", "classifier")]


def block_name(stage: int, repeat: int) -> str:
    return f"block{stage + 1}{chr(ord('a') + repeat)}_"


def _block_table(arch: Architecture, stage: int, repeat: int):
    config = arch.stages[stage][repeat]
    v2 = arch.family.name == "efficientnetv2"
    if config.block == "fused_mbconv":
        return V2_FUSED if config.expand_ratio != 1 else V2_FUSED_NO_EXPANSION
    table = V2_MBCONV if v2 else V1_MBCONV
    return [row for row in table
            if not (row[2].startswith("expand.") and config.expand_ratio == 1)
            and not (row[2].startswith("se.") and config.se_ratio == 0)]


def layers(arch: Architecture, with_classifier: bool) -> list[UpstreamLayer]:
    """Every weight-carrying Keras layer of `arch`, in Keras creation order."""
    out = [UpstreamLayer(name, kind, target) for name, kind, target in STEM]
    for stage, blocks in enumerate(arch.stages):
        for repeat in range(len(blocks)):
            prefix = block_name(stage, repeat)
            out += [UpstreamLayer(prefix + suffix, kind, f"stages.{stage}.{repeat}.{target}")
                    for suffix, kind, target in _block_table(arch, stage, repeat)]
    out += [UpstreamLayer(name, kind, target) for name, kind, target in TOP]
    if with_classifier:
        out += [UpstreamLayer(name, kind, target) for name, kind, target in CLASSIFIER]
    return out


# Keras 3 `.weights.h5` names layers by class, numbered in creation order; the kind gives the class.
KERAS_CLASS = {"conv": "conv2d", "conv_bias": "conv2d", "depthwise": "depthwise_conv2d",
               "bn": "batch_normalization", "dense": "dense"}


def keras3_object_names(table: list[UpstreamLayer]) -> dict[str, str]:
    """Keras layer name -> Keras 3 saving name (`conv2d_3`, `batch_normalization_12`, ...)."""
    counts: dict[str, int] = {}
    names = {}
    for layer in table:
        cls = KERAS_CLASS[layer.kind]
        n = counts.get(cls, 0)
        names[layer.name] = cls if n == 0 else f"{cls}_{n}"
        counts[cls] = n + 1
    return names
