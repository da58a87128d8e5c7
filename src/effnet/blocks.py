"""The building blocks, each one concept, each `forward` in paper order.

Follows tensorflow/tpu `efficientnet_model.py` (MBConvBlock), automl `effnetv2_model.py` (MBConvBlock,
FusedMBConvBlock) and keras `applications/efficientnet*.py`. Submodule names are the checkpoint contract
(`stages.3.2.expand.conv.weight`); upstream names are mapped in `effnet.name_maps`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .architectures import BlockConfig
from .tf_compat import ACTIVATIONS, Conv2dSame, batch_norm


class ConvBnAct(nn.Sequential):
    """Convolution (TF SAME, no bias), batch norm, optional activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, *,
                 activation: str | None, bn_momentum: float, groups: int = 1):
        layers = OrderedDict(
            conv=Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False),
            bn=batch_norm(out_channels, bn_momentum),
        )
        if activation is not None:
            layers["act"] = ACTIVATIONS[activation]()
        super().__init__(layers)  # named: stem.conv, stem.bn


class SqueezeExcite(nn.Module):
    """Channel attention: global mean -> 1x1 reduce -> act -> 1x1 expand -> sigmoid -> rescale."""

    def __init__(self, channels: int, squeeze_channels: int, activation: str):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1, bias=True)
        self.act = ACTIVATIONS[activation]()
        self.expand = nn.Conv2d(squeeze_channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        scale = self.expand(self.act(self.reduce(scale)))
        return x * torch.sigmoid(scale)


class DropPath(nn.Module):
    """Stochastic depth ("drop connect" in tpu/keras): drops the whole residual branch per sample, training only."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


def squeeze_channels(config: BlockConfig) -> int:
    """SE width from the block's INPUT channels, as tpu, automl and keras compute it."""
    return max(1, int(config.in_channels * config.se_ratio))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> k x k depthwise -> squeeze-excite -> 1x1 project (+ residual)."""

    def __init__(self, config: BlockConfig, activation: str, bn_momentum: float):
        super().__init__()
        hidden = config.in_channels * config.expand_ratio
        self.expand = (
            ConvBnAct(config.in_channels, hidden, 1, 1, activation=activation, bn_momentum=bn_momentum)
            if config.expand_ratio != 1 else None
        )
        self.depthwise = ConvBnAct(hidden, hidden, config.kernel_size, config.stride,
                                   activation=activation, bn_momentum=bn_momentum, groups=hidden)
        self.se = SqueezeExcite(hidden, squeeze_channels(config), activation) if config.se_ratio > 0 else None
        self.project = ConvBnAct(hidden, config.out_channels, 1, 1, activation=None, bn_momentum=bn_momentum)
        self.has_residual = config.stride == 1 and config.in_channels == config.out_channels
        self.drop_path = DropPath(config.drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.depthwise(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        if self.has_residual:
            out = self.drop_path(out) + x
        return out


class FusedMBConv(nn.Module):
    """EfficientNetV2's fused block: k x k expand conv (replacing 1x1 + depthwise) -> 1x1 project (+ residual).

    With expand_ratio 1 the k x k conv goes straight to the output width, with activation, and there is no
    project conv (automl FusedMBConvBlock; keras names it `project_conv` with `project_activation`).
    """

    def __init__(self, config: BlockConfig, activation: str, bn_momentum: float):
        super().__init__()
        if config.se_ratio > 0:  # no V2 table uses SE in fused blocks; refuse rather than silently ignore
            raise ValueError("FusedMBConv with squeeze-excite is not part of any EfficientNetV2 table")
        hidden = config.in_channels * config.expand_ratio if config.expand_ratio != 1 else config.out_channels
        self.expand = ConvBnAct(config.in_channels, hidden, config.kernel_size, config.stride,
                                activation=activation, bn_momentum=bn_momentum)
        self.project = (
            ConvBnAct(hidden, config.out_channels, 1, 1, activation=None, bn_momentum=bn_momentum)
            if config.expand_ratio != 1 else None
        )
        self.has_residual = config.stride == 1 and config.in_channels == config.out_channels
        self.drop_path = DropPath(config.drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x)
        if self.project is not None:
            out = self.project(out)
        if self.has_residual:
            out = self.drop_path(out) + x
        return out


BLOCKS = {"mbconv": MBConv, "fused_mbconv": FusedMBConv}
