"""TF Model Garden EfficientNet (V1) layer names -> effnet modules.

The `tensorflow/efficientnet/b*` TF2 hub modules are Model Garden exports (tensorflow/models
`official/legacy/image_classification/efficientnet/efficientnet_model.py`, `tfhub_export.py`): `conv2d_block`
names its layers `<prefix>conv2d` / `<prefix>bn`; blocks are `stack_<stage>/block_<repeat>/` (both from 0).
"""

from __future__ import annotations

from ..architectures import Architecture
from . import UpstreamLayer

MBCONV = [
    ("expand_conv2d", "conv", "expand.conv"),
    ("expand_bn", "bn", "expand.bn"),
    ("depthwise_conv2d", "depthwise", "depthwise.conv"),
    ("depthwise_bn", "bn", "depthwise.bn"),
    ("se_reduce_conv2d", "conv_bias", "se.reduce"),
    ("se_expand_conv2d", "conv_bias", "se.expand"),
    ("project_conv2d", "conv", "project.conv"),
    ("project_bn", "bn", "project.bn"),
]
STEM = [("stem_conv2d", "conv", "stem.conv"), ("stem_bn", "bn", "stem.bn")]
TOP = [("top_conv2d", "conv", "head.conv"), ("top_bn", "bn", "head.bn")]
CLASSIFIER = [("logits", "dense", "classifier")]


def layers(arch: Architecture, with_classifier: bool) -> list[UpstreamLayer]:
    out = [UpstreamLayer(name, kind, target) for name, kind, target in STEM]
    for stage, blocks in enumerate(arch.stages):
        for repeat, config in enumerate(blocks):
            out += [UpstreamLayer(f"stack_{stage}/block_{repeat}/{name}", kind, f"stages.{stage}.{repeat}.{target}")
                    for name, kind, target in MBCONV
                    if not (target.startswith("expand.") and config.expand_ratio == 1)
                    and not (target.startswith("se.") and config.se_ratio == 0)]
    out += [UpstreamLayer(name, kind, target) for name, kind, target in TOP]
    if with_classifier:
        out += [UpstreamLayer(name, kind, target) for name, kind, target in CLASSIFIER]
    return out
