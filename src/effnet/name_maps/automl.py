"""google/automl EfficientNetV2 variable names -> effnet modules.

automl `effnetv2_model.py` uses the tpu naming pattern (scope `efficientnetv2-<size>/stem|blocks_<i>|head`,
`conv2d`/`conv2d_1`, `tpu_batch_normalization[_n]`, `depthwise_conv2d`, `se/conv2d[_1]`, `head/dense`), so the
table is the tpu one; this module only names the scope. The TF Hub V2 modules (`google/imagenet/efficientnet_v2_*`)
are `tf.saved_model.save` exports of that subclassed model: their checkpoint keys are `variables/<n>/...`, and the
names above come back from the object graph's `full_name`s.
"""

from __future__ import annotations

from ..architectures import Architecture
from . import UpstreamLayer, tpu


def layers(arch: Architecture, with_classifier: bool, scope: str | None = None) -> list[UpstreamLayer]:
    return tpu.layers(arch, with_classifier, scope)
