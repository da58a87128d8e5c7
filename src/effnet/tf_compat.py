"""Every place where TensorFlow's arithmetic differs from PyTorch's defaults, in one module, with the reason.

- Padding: TF "SAME" pads `max((ceil(n/s) - 1) * s + k - n, 0)` pixels, the smaller half BEFORE. For stride 1
  and odd k that is the symmetric k//2 that PyTorch already does; for stride 2 it depends on whether the input
  size is even or odd, so it is computed per call (tensorflow/core/framework/kernel_shape_util.cc).
- Batch norm: TF/Keras use epsilon 1e-3 (PyTorch 1e-5) and momentum as the weight of the OLD moving value
  (0.99 for V1/Lite, 0.9 for V2 per automl `bn_momentum`); PyTorch's momentum is the weight of the NEW value.
- Input normalization: the hub modules take RGB in [0, 1]; each family normalizes inside, as its original does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPSILON = 1e-3  # tf.keras.layers.BatchNormalization / tpu / automl default


def torch_bn_momentum(tf_momentum: float) -> float:
    """TF keeps `momentum` of the old statistics; PyTorch keeps `1 - momentum`."""
    return 1.0 - tf_momentum


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis of length `size`."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF "SAME" padding for any input size (odd, non-square).

    Decided at build time (STYLE 12): stride 1 is static symmetric padding; only strided convs pad per call,
    because their padding depends on the parity of the input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False):
        static = stride == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2 if static else 0, groups=groups, bias=bias)
        self.dynamic_padding = not static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_padding:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def batch_norm(channels: int, tf_momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=torch_bn_momentum(tf_momentum))


ACTIVATIONS = {
    "silu": nn.SiLU,  # tf.nn.swish / keras "swish": x * sigmoid(x)
    "relu6": nn.ReLU6,  # Lite: bounded for int8 quantization
}

# Per-channel affine maps from [0, 1] RGB to what each family's network was trained on: y = x * scale + offset.
# - imagenet_mean_std: V1 (tpu MEAN_RGB/STDDEV_RGB on 0-255, Model Garden `normalize_images`, keras.applications
#   after the tensorflow/tensorflow#49930 sqrt fix) and V2-B0..B3 (keras V2 Normalization(mean, std**2)):
#   (255x - 255 mean) / (255 std) = (x - mean) / std.
# - minus_one_to_one_128: V2-S/M/L/XL, automl preprocessing.py `(x - 128) / 128` on 0-255 and keras
#   `Rescaling(1/128, offset=-1)`. (timm's 0.5/0.5 is (x - 127.5)/127.5: 0.4% off; we do not.)
# - lite_127_128: Lite, tpu lite `MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3`.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet_mean_std": (tuple(1.0 / s for s in IMAGENET_STD), tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))),
    "minus_one_to_one_128": ((255.0 / 128.0,) * 3, (-1.0,) * 3),
    "lite_127_128": ((255.0 / 128.0,) * 3, (-127.0 / 128.0,) * 3),
    "none": ((1.0,) * 3, (0.0,) * 3),  # for modules whose graph already normalizes, or custom pipelines
}


class InputNormalization(nn.Module):
    """Maps hub-contract input (float RGB in [0, 1], NCHW) to the network's input range."""

    def __init__(self, kind: str):
        super().__init__()
        scale, offset = NORMALIZATIONS[kind]
        self.kind = kind
        # buffers, not parameters: fixed by the family, and not part of any checkpoint
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("offset", torch.tensor(offset).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset
