"""tensorflow/tpu EfficientNet (V1) and EfficientNet-Lite variable names -> effnet modules.

The TF1 hub modules `google/efficientnet/b*` and the Lite modules hold these names (tpu
`efficientnet_model.py`, `efficientnet_builder.py`): scope `<model_name>/stem|blocks_<i>|head`, legacy
`tf.layers` names numbered per scope in order of first call (`conv2d`, `conv2d_1`, `tpu_batch_normalization_2`).
Blocks are numbered flat (`blocks_0` ... `blocks_22` for B2).
"""

from __future__ import annotations

from ..architectures import Architecture
from . import UpstreamLayer

# (upstream layer inside the block, kind, effnet module inside the block), for each kind of block
MBCONV = [
    ("conv2d", "conv", "expand.conv"),
    ("tpu_batch_normalization", "bn", "expand.bn"),
    ("depthwise_conv2d", "depthwise", "depthwise.conv"),
    ("tpu_batch_normalization_1", "bn", "depthwise.bn"),
    ("se/conv2d", "conv_bias", "se.reduce"),
    ("se/conv2d_1", "conv_bias", "se.expand"),
    ("conv2d_1", "conv", "project.conv"),
    ("tpu_batch_normalization_2", "bn", "project.bn"),
]
MBCONV_NO_EXPANSION = [  # expand_ratio 1: the numbering starts at the depthwise conv
    ("depthwise_conv2d", "depthwise", "depthwise.conv"),
    ("tpu_batch_normalization", "bn", "depthwise.bn"),
    ("se/conv2d", "conv_bias", "se.reduce"),
    ("se/conv2d_1", "conv_bias", "se.expand"),
    ("conv2d", "conv", "project.conv"),
    ("tpu_batch_normalization_1", "bn", "project.bn"),
]
FUSED = [  # automl V2 FusedMBConvBlock with expansion: k x k conv, then 1 x 1 project
    ("conv2d", "conv", "expand.conv"),
    ("tpu_batch_normalization", "bn", "expand.bn"),
    ("conv2d_1", "conv", "project.conv"),
    ("tpu_batch_normalization_1", "bn", "project.bn"),
]
FUSED_NO_EXPANSION = [
    ("conv2d", "conv", "expand.conv"),
    ("tpu_batch_normalization", "bn", "expand.bn"),
]
STEM = [("stem/conv2d", "conv", "stem.conv"), ("stem/tpu_batch_normalization", "bn", "stem.bn")]
HEAD = [("head/conv2d", "conv", "head.conv"), ("head/tpu_batch_normalization", "bn", "head.bn")]
CLASSIFIER = [("head/dense", "dense", "classifier")]

BLOCK_TABLES = {  # (block kind, has expansion) -> table
    ("mbconv", True): MBCONV, ("mbconv", False): MBCONV_NO_EXPANSION,
    ("fused_mbconv", True): FUSED, ("fused_mbconv", False): FUSED_NO_EXPANSION,
}


def model_scope(arch: Architecture) -> str:
    """`efficientnet_b2` -> `efficientnet-b2`, `efficientnetv2_m` -> `efficientnetv2-m` (the upstream model_name)."""
    return arch.name.replace("_", "-")


def layers(arch: Architecture, with_classifier: bool, scope: str | None = None) -> list[UpstreamLayer]:
    scope = scope if scope is not None else model_scope(arch)
    out = [UpstreamLayer(f"{scope}/{name}", kind, target) for name, kind, target in STEM]
    flat = 0
    for stage, blocks in enumerate(arch.stages):
        for repeat, config in enumerate(blocks):
            table = BLOCK_TABLES[(config.block, config.expand_ratio != 1)]
            out += [UpstreamLayer(f"{scope}/blocks_{flat}/{name}", kind, f"stages.{stage}.{repeat}.{target}")
                    for name, kind, target in table if not (target.startswith("se.") and config.se_ratio == 0)]
            flat += 1
    out += [UpstreamLayer(f"{scope}/{name}", kind, target) for name, kind, target in HEAD]
    if with_classifier:
        out += [UpstreamLayer(f"{scope}/{name}", kind, target) for name, kind, target in CLASSIFIER]
    return out
