"""The EfficientNet family as data: one table of stages per family, one scaling table, the rounding rules.

Facts follow the TensorFlow originals:
- V1 B0-B7: tensorflow/tpu `models/official/efficientnet/efficientnet_builder.py` (`efficientnet_params`,
  `_DEFAULT_BLOCKS_ARGS`) and keras `applications/efficientnet.py` (`DEFAULT_BLOCKS_ARGS`).
- Lite0-4: tensorflow/tpu `efficientnet/lite/efficientnet_lite_builder.py` (no SE, ReLU6, fixed stem/head).
- V2: google/automl `efficientnetv2/effnetv2_configs.py` (`v2_base_block`, `v2_s_block` ... `v2_xl_block`,
  `efficientnetv2_params`) and keras `applications/efficientnet_v2.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One row of a paper table: `repeats` blocks of one kind; only the first block strides and changes width."""

    block: str  # "mbconv" | "fused_mbconv"
    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    se_ratio: float  # squeeze width = in_channels * se_ratio (of the block's INPUT, as tpu/automl/keras)


@dataclass(frozen=True)
class Family:
    """What differs between V1, Lite and V2, each field with its reason."""

    name: str
    stages: tuple[Stage, ...]
    activation: str  # "silu" (swish) or "relu6"
    normalization: str  # a key of tf_compat.NORMALIZATIONS
    bn_momentum: float  # TF convention: moving = momentum * moving + (1 - momentum) * batch
    head_channels: int = 1280  # before width scaling
    scale_stem_and_head: bool = True  # Lite fixes them: "Don't scale stem and head" (tpu lite builder)
    scale_first_and_last_repeats: bool = True  # Lite keeps the first and last stages' repeats unscaled
    round_up_if_below_90_percent: bool = True  # V1's "make sure rounding does not go down by more than 10%"
    drop_path_rate: float = 0.2  # stochastic depth at the last block; linear in the block index (tpu/automl)
    # The stem's output width; V1 fixes 32, V2 takes the first stage's input width (automl/keras V2).
    stem_channels: int | None = 32


@dataclass(frozen=True)
class Scaling:
    """A family member: compound scaling coefficients and the resolution it was trained/evaluated at."""

    family: str
    width: float
    depth: float
    native_size: int
    dropout: float  # before the classifier, training only


# --- EfficientNet V1 (B0 base, paper table 1) -------------------------------------------------------
V1_STAGES = (
    Stage("mbconv", repeats=1, kernel_size=3, stride=1, expand_ratio=1, in_channels=32, out_channels=16, se_ratio=0.25),
    Stage("mbconv", repeats=2, kernel_size=3, stride=2, expand_ratio=6, in_channels=16, out_channels=24, se_ratio=0.25),
    Stage("mbconv", repeats=2, kernel_size=5, stride=2, expand_ratio=6, in_channels=24, out_channels=40, se_ratio=0.25),
    Stage("mbconv", repeats=3, kernel_size=3, stride=2, expand_ratio=6, in_channels=40, out_channels=80, se_ratio=0.25),
    Stage("mbconv", repeats=3, kernel_size=5, stride=1, expand_ratio=6, in_channels=80, out_channels=112, se_ratio=0.25),
    Stage("mbconv", repeats=4, kernel_size=5, stride=2, expand_ratio=6, in_channels=112, out_channels=192, se_ratio=0.25),
    Stage("mbconv", repeats=1, kernel_size=3, stride=1, expand_ratio=6, in_channels=192, out_channels=320, se_ratio=0.25),
)

# Lite = V1 stages without squeeze-excite (removed for mobile accelerators and quantization).
LITE_STAGES = tuple(
    Stage(s.block, s.repeats, s.kernel_size, s.stride, s.expand_ratio, s.in_channels, s.out_channels, se_ratio=0.0)
    for s in V1_STAGES
)

# --- EfficientNetV2 (automl effnetv2_configs.py) ----------------------------------------------------
V2_BASE_STAGES = (  # B0-B3, scaled like V1
    Stage("fused_mbconv", repeats=1, kernel_size=3, stride=1, expand_ratio=1, in_channels=32, out_channels=16, se_ratio=0.0),
    Stage("fused_mbconv", repeats=2, kernel_size=3, stride=2, expand_ratio=4, in_channels=16, out_channels=32, se_ratio=0.0),
    Stage("fused_mbconv", repeats=2, kernel_size=3, stride=2, expand_ratio=4, in_channels=32, out_channels=48, se_ratio=0.0),
    Stage("mbconv", repeats=3, kernel_size=3, stride=2, expand_ratio=4, in_channels=48, out_channels=96, se_ratio=0.25),
    Stage("mbconv", repeats=5, kernel_size=3, stride=1, expand_ratio=6, in_channels=96, out_channels=112, se_ratio=0.25),
    Stage("mbconv", repeats=8, kernel_size=3, stride=2, expand_ratio=6, in_channels=112, out_channels=192, se_ratio=0.25),
)
V2_S_STAGES = (
    Stage("fused_mbconv", repeats=2, kernel_size=3, stride=1, expand_ratio=1, in_channels=24, out_channels=24, se_ratio=0.0),
    Stage("fused_mbconv", repeats=4, kernel_size=3, stride=2, expand_ratio=4, in_channels=24, out_channels=48, se_ratio=0.0),
    Stage("fused_mbconv", repeats=4, kernel_size=3, stride=2, expand_ratio=4, in_channels=48, out_channels=64, se_ratio=0.0),
    Stage("mbconv", repeats=6, kernel_size=3, stride=2, expand_ratio=4, in_channels=64, out_channels=128, se_ratio=0.25),
    Stage("mbconv", repeats=9, kernel_size=3, stride=1, expand_ratio=6, in_channels=128, out_channels=160, se_ratio=0.25),
    Stage("mbconv", repeats=15, kernel_size=3, stride=2, expand_ratio=6, in_channels=160, out_channels=256, se_ratio=0.25),
)
V2_M_STAGES = (
    Stage("fused_mbconv", repeats=3, kernel_size=3, stride=1, expand_ratio=1, in_channels=24, out_channels=24, se_ratio=0.0),
    Stage("fused_mbconv", repeats=5, kernel_size=3, stride=2, expand_ratio=4, in_channels=24, out_channels=48, se_ratio=0.0),
    Stage("fused_mbconv", repeats=5, kernel_size=3, stride=2, expand_ratio=4, in_channels=48, out_channels=80, se_ratio=0.0),
    Stage("mbconv", repeats=7, kernel_size=3, stride=2, expand_ratio=4, in_channels=80, out_channels=160, se_ratio=0.25),
    Stage("mbconv", repeats=14, kernel_size=3, stride=1, expand_ratio=6, in_channels=160, out_channels=176, se_ratio=0.25),
    Stage("mbconv", repeats=18, kernel_size=3, stride=2, expand_ratio=6, in_channels=176, out_channels=304, se_ratio=0.25),
    Stage("mbconv", repeats=5, kernel_size=3, stride=1, expand_ratio=6, in_channels=304, out_channels=512, se_ratio=0.25),
)
V2_L_STAGES = (
    Stage("fused_mbconv", repeats=4, kernel_size=3, stride=1, expand_ratio=1, in_channels=32, out_channels=32, se_ratio=0.0),
    Stage("fused_mbconv", repeats=7, kernel_size=3, stride=2, expand_ratio=4, in_channels=32, out_channels=64, se_ratio=0.0),
    Stage("fused_mbconv", repeats=7, kernel_size=3, stride=2, expand_ratio=4, in_channels=64, out_channels=96, se_ratio=0.0),
    Stage("mbconv", repeats=10, kernel_size=3, stride=2, expand_ratio=4, in_channels=96, out_channels=192, se_ratio=0.25),
    Stage("mbconv", repeats=19, kernel_size=3, stride=1, expand_ratio=6, in_channels=192, out_channels=224, se_ratio=0.25),
    Stage("mbconv", repeats=25, kernel_size=3, stride=2, expand_ratio=6, in_channels=224, out_channels=384, se_ratio=0.25),
    Stage("mbconv", repeats=7, kernel_size=3, stride=1, expand_ratio=6, in_channels=384, out_channels=640, se_ratio=0.25),
)
V2_XL_STAGES = (
    Stage("fused_mbconv", repeats=4, kernel_size=3, stride=1, expand_ratio=1, in_channels=32, out_channels=32, se_ratio=0.0),
    Stage("fused_mbconv", repeats=8, kernel_size=3, stride=2, expand_ratio=4, in_channels=32, out_channels=64, se_ratio=0.0),
    Stage("fused_mbconv", repeats=8, kernel_size=3, stride=2, expand_ratio=4, in_channels=64, out_channels=96, se_ratio=0.0),
    Stage("mbconv", repeats=16, kernel_size=3, stride=2, expand_ratio=4, in_channels=96, out_channels=192, se_ratio=0.25),
    Stage("mbconv", repeats=24, kernel_size=3, stride=1, expand_ratio=6, in_channels=192, out_channels=256, se_ratio=0.25),
    Stage("mbconv", repeats=32, kernel_size=3, stride=2, expand_ratio=6, in_channels=256, out_channels=512, se_ratio=0.25),
    Stage("mbconv", repeats=8, kernel_size=3, stride=1, expand_ratio=6, in_channels=512, out_channels=640, se_ratio=0.25),
)

FAMILIES = {
    "efficientnet": Family("efficientnet", V1_STAGES, activation="silu", normalization="imagenet_mean_std", bn_momentum=0.99),
    "efficientnet_lite": Family(
        "efficientnet_lite", LITE_STAGES,
        activation="relu6",  # quantization-friendly: bounded range
        normalization="lite_127_128",
        bn_momentum=0.99,
        scale_stem_and_head=False,  # "Don't scale stem and head" (tpu lite builder)
        scale_first_and_last_repeats=False,  # tpu efficientnet_model.py: fix_head_stem keeps these repeats
    ),
    # V2-B0..B3 share V1's scaling and preprocessing ("same scaling and preprocessing as V1", automl README).
    "efficientnetv2_base": Family(
        "efficientnetv2", V2_BASE_STAGES, activation="silu", normalization="imagenet_mean_std", bn_momentum=0.9,
        round_up_if_below_90_percent=False, stem_channels=None,
    ),
    "efficientnetv2_s": Family("efficientnetv2", V2_S_STAGES, "silu", "minus_one_to_one_128", 0.9,
                               round_up_if_below_90_percent=False, stem_channels=None),
    "efficientnetv2_m": Family("efficientnetv2", V2_M_STAGES, "silu", "minus_one_to_one_128", 0.9,
                               round_up_if_below_90_percent=False, stem_channels=None),
    "efficientnetv2_l": Family("efficientnetv2", V2_L_STAGES, "silu", "minus_one_to_one_128", 0.9,
                               round_up_if_below_90_percent=False, stem_channels=None),
    "efficientnetv2_xl": Family("efficientnetv2", V2_XL_STAGES, "silu", "minus_one_to_one_128", 0.9,
                                round_up_if_below_90_percent=False, stem_channels=None),
}

# --- The scaling table: name -> (family table, width, depth, native resolution, dropout) ----------
SCALING = {
    "efficientnet_b0": Scaling("efficientnet", 1.0, 1.0, 224, 0.2),
    "efficientnet_b1": Scaling("efficientnet", 1.0, 1.1, 240, 0.2),
    "efficientnet_b2": Scaling("efficientnet", 1.1, 1.2, 260, 0.3),
    "efficientnet_b3": Scaling("efficientnet", 1.2, 1.4, 300, 0.3),
    "efficientnet_b4": Scaling("efficientnet", 1.4, 1.8, 380, 0.4),
    "efficientnet_b5": Scaling("efficientnet", 1.6, 2.2, 456, 0.4),
    "efficientnet_b6": Scaling("efficientnet", 1.8, 2.6, 528, 0.5),
    "efficientnet_b7": Scaling("efficientnet", 2.0, 3.1, 600, 0.5),
    "efficientnet_lite0": Scaling("efficientnet_lite", 1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": Scaling("efficientnet_lite", 1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": Scaling("efficientnet_lite", 1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": Scaling("efficientnet_lite", 1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": Scaling("efficientnet_lite", 1.4, 1.8, 300, 0.3),
    "efficientnetv2_b0": Scaling("efficientnetv2_base", 1.0, 1.0, 224, 0.2),
    "efficientnetv2_b1": Scaling("efficientnetv2_base", 1.0, 1.1, 240, 0.2),
    "efficientnetv2_b2": Scaling("efficientnetv2_base", 1.1, 1.2, 260, 0.3),
    "efficientnetv2_b3": Scaling("efficientnetv2_base", 1.2, 1.4, 300, 0.3),
    "efficientnetv2_s": Scaling("efficientnetv2_s", 1.0, 1.0, 384, 0.2),
    "efficientnetv2_m": Scaling("efficientnetv2_m", 1.0, 1.0, 480, 0.3),
    "efficientnetv2_l": Scaling("efficientnetv2_l", 1.0, 1.0, 480, 0.4),
    "efficientnetv2_xl": Scaling("efficientnetv2_xl", 1.0, 1.0, 512, 0.4),
}

DEPTH_DIVISOR = 8  # channel counts are multiples of 8 in every family


def round_filters(channels: int, width: float, round_up_if_below_90_percent: bool) -> int:
    """Scale a channel count by `width` and round to the nearest multiple of 8 (at least 8).

    V1 and Lite then add 8 if rounding lost more than 10% (tpu/keras `round_filters`); automl V2 does not.
    """
    scaled = channels * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if round_up_if_below_90_percent and rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's number of blocks by `depth`, rounding up (tpu/automl `round_repeats`)."""
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class BlockConfig:
    """One concrete block after scaling: what blocks.py builds."""

    block: str
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    se_ratio: float
    drop_path_rate: float


@dataclass(frozen=True)
class Architecture:
    """A fully scaled model: stem width, the blocks grouped by stage, head width and the family traits."""

    name: str
    family: Family
    scaling: Scaling
    stem_channels: int
    stages: tuple[tuple[BlockConfig, ...], ...]
    head_channels: int


def architecture(name: str) -> Architecture:
    """Scale the family table of `name` into concrete blocks (keras/tpu builder order and drop-path schedule)."""
    scaling = SCALING[name]
    family = FAMILIES[scaling.family]

    def filters(channels: int, is_stem_or_head: bool = False) -> int:
        if is_stem_or_head and not family.scale_stem_and_head:
            return channels
        return round_filters(channels, scaling.width, family.round_up_if_below_90_percent)

    last = len(family.stages) - 1
    stage_repeats = [
        s.repeats if (not family.scale_first_and_last_repeats and i in (0, last)) else round_repeats(s.repeats, scaling.depth)
        for i, s in enumerate(family.stages)
    ]
    total_blocks = sum(stage_repeats)
    stem = family.stem_channels if family.stem_channels is not None else family.stages[0].in_channels
    stem_channels = filters(stem, is_stem_or_head=True)
    stages, index, in_channels = [], 0, stem_channels
    for stage, repeats in zip(family.stages, stage_repeats):
        blocks = []
        for j in range(repeats):
            blocks.append(BlockConfig(
                block=stage.block,
                kernel_size=stage.kernel_size,
                stride=stage.stride if j == 0 else 1,
                expand_ratio=stage.expand_ratio,
                # the actual input width: Lite's fixed stem can differ from the scaled table value
                in_channels=in_channels,
                out_channels=filters(stage.out_channels),
                se_ratio=stage.se_ratio,
                # keras/tpu: drop_connect_rate * block_index / total_blocks
                drop_path_rate=family.drop_path_rate * index / total_blocks,
            ))
            index += 1
            in_channels = filters(stage.out_channels)
        stages.append(tuple(blocks))
    return Architecture(
        name=name,
        family=family,
        scaling=scaling,
        stem_channels=stem_channels,
        stages=tuple(stages),
        head_channels=filters(family.head_channels, is_stem_or_head=True),
    )


def list_architectures() -> list[str]:
    return list(SCALING)
