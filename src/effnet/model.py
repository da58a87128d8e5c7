"""The EfficientNet module: normalization -> stem -> stages -> head -> pool -> dropout -> classifier.

One class serves V1, Lite and V2; the family differences are data (`architectures.py`). The API names the hub
signatures: `forward` gives logits (or the pooled features when the model has no classifier), `feature_vector`
the pooled features, `forward_features` the spatial map before pooling, `endpoints` the multi-scale features at
strides 2/4/8/16/32. The model knows nothing about files or URLs (see `effnet.loading`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .architectures import Architecture, architecture
from .blocks import BLOCKS, ConvBnAct
from .tf_compat import InputNormalization


@dataclass(frozen=True)
class ModelSpec:
    """What a user needs to know to feed the model and read its output."""

    name: str  # architecture name, e.g. "efficientnet_b2"
    family: str  # "efficientnet" | "efficientnet_lite" | "efficientnetv2"
    native_size: int  # the resolution the weights were evaluated at; any size works
    fixed_size: bool  # whether the hub module this came from fixed the input size
    feature_dim: int
    num_classes: int  # 0: a feature-vector module without classifier
    normalization: str  # inside the model; input is always RGB in [0, 1]
    output: str = "logits"  # what forward() returns: "logits" | "features"
    labels: str | None = None  # which label list the classes follow ("imagenet1k", "imagenet21k", ...)
    source: str | None = None  # the handle or file the weights came from
    extra: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


@dataclass(frozen=True)
class FeatureInfo:
    """One multi-scale endpoint: where it is taken, its width and its stride relative to the input."""

    stage: int
    channels: int
    reduction: int


class EfficientNet(nn.Module):
    def __init__(self, arch: Architecture, num_classes: int = 1000):
        super().__init__()
        family = arch.family
        act, momentum = family.activation, family.bn_momentum
        self.architecture = arch
        self.normalize = InputNormalization(family.normalization)
        self.stem = ConvBnAct(3, arch.stem_channels, 3, 2, activation=act, bn_momentum=momentum)
        self.stages = nn.ModuleList(
            nn.Sequential(*(BLOCKS[config.block](config, act, momentum) for config in stage))
            for stage in arch.stages
        )
        last_channels = arch.stages[-1][-1].out_channels
        self.head = ConvBnAct(last_channels, arch.head_channels, 1, 1, activation=act, bn_momentum=momentum)
        self.dropout = nn.Dropout(arch.scaling.dropout)
        self.classifier = nn.Linear(arch.head_channels, num_classes) if num_classes > 0 else None
        self.num_features = arch.head_channels
        self.feature_info = _feature_info(arch)
        self.spec = ModelSpec(
            name=arch.name,
            family=family.name,
            native_size=arch.scaling.native_size,
            fixed_size=False,
            feature_dim=arch.head_channels,
            num_classes=num_classes,
            normalization=family.normalization,
            output="logits" if num_classes > 0 else "features",
            labels="imagenet1k" if num_classes == 1000 else None,
        )
        self.labels: list[str] | None = None

    def with_spec(self, **changes) -> "EfficientNet":
        """Record where the weights came from and what they mean (the spec is immutable data)."""
        self.spec = replace(self.spec, **changes)
        return self

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, head_channels, ceil(H/32), ceil(W/32)) before pooling."""
        x = self.stem(self.normalize(images))
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Spatial features -> pooled feature vector (pre_logits) or logits."""
        pooled = features.mean(dim=(2, 3))  # GlobalAveragePooling2D
        if pre_logits or self.classifier is None:
            return pooled
        return self.classifier(self.dropout(pooled))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def feature_vector(self, images: torch.Tensor) -> torch.Tensor:
        """The hub's image feature vector: (N, feature_dim)."""
        return self.forward_head(self.forward_features(images), pre_logits=True)

    def endpoints(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Multi-scale features for detection/segmentation: {reduction: (N, C, H/r, W/r)} for r in 2..32."""
        wanted = {info.stage: info.reduction for info in self.feature_info}
        out = {}
        x = self.stem(self.normalize(images))
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in wanted:
                out[wanted[index]] = x
        return out


def _feature_info(arch: Architecture) -> list[FeatureInfo]:
    """The last stage at each reduction (the stem has stride 2)."""
    reduction, last_at = 2, {}
    for index, stage in enumerate(arch.stages):
        reduction *= stage[0].stride
        last_at[reduction] = FeatureInfo(stage=index, channels=stage[-1].out_channels, reduction=reduction)
    return [last_at[r] for r in sorted(last_at)]


def build(name: str, num_classes: int = 1000) -> EfficientNet:
    """An EfficientNet with PyTorch's default initialization (see `effnet.create` for weights)."""
    return EfficientNet(architecture(name), num_classes=num_classes)
