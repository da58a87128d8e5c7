"""Engine stage: a float32 NCHW batch in [0, 1] -> a numpy array of outputs, one row per image.

Any callable with that signature is an engine; the runner does not care what runs inside. `TorchEngine` runs
the PyTorch module eagerly under `torch.inference_mode`, on a private copy of the model with three inference-only
rewrites. Measured with benchmarks/embed_folder.py on the 2-core machine, engine alone, batch 16, img/s, two runs
(random weights; the machine was shared, load average 3-4, so the ratios are the point, not the rates):

    model                  NCHW (PyTorch default)   channels_last   channels_last + folded BN + in-place act
    efficientnet_b2@260        2.43 | 7.69          3.28 | 13.90          4.92 | 17.71
    efficientnetv2_m@480       0.85 | 0.34          1.15 | 0.50           1.57 | 0.68

(`torch.jit.freeze` + `optimize_for_inference` on the same channels_last model measured 9.7 img/s for B2 where
this eager engine gave 17.6: slower, so not used.)

- channels_last weights and input: oneDNN's depthwise and 1x1 convolutions are NHWC-native, so NCHW input
  is reordered around every layer;
- batch norm folded into the convolution before it (`fuse_conv_bn_eval`): one pass less over every activation.
  The folded weights are the same affine map rounded differently: outputs move by ~1e-6 relative;
- activations in place: every activation here follows a convolution whose output nothing else reads, so
  overwriting it saves an allocation and a pass over memory.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

OUTPUTS = ("features", "logits")
INPLACE_ACTIVATIONS = (nn.SiLU, nn.ReLU6, nn.ReLU, nn.Hardswish)


class TorchEngine:
    """`TorchEngine(model, output="features")(images) -> (N, feature_dim)`; `output="logits"` gives (N, classes)."""

    def __init__(
        self, model: nn.Module, output: str = "features", channels_last: bool = True, fold_batch_norm: bool = True
    ):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = copy.deepcopy(model).eval()  # the caller's model stays as it was
        if fold_batch_norm:
            fold_batch_norms(model)
        for module in model.modules():
            if isinstance(module, INPLACE_ACTIVATIONS):
                module.inplace = True
        self.model = model.to(memory_format=self.memory_format)
        self.output = output

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            images = images.contiguous(memory_format=self.memory_format)  # no copy when already in that layout
            if self.output == "features":
                result = self.model.feature_vector(images)
            else:
                result = self.model(images)
        return result.float().numpy()


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """In place: every Conv2d directly followed by a BatchNorm2d in a Sequential becomes one biased Conv2d."""
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for name, following in zip(names, names[1:]):
                conv, norm = module._modules[name], module._modules[following]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module._modules[name] = fuse_conv_bn_eval(conv, norm)  # keeps the conv's class (SAME padding)
                    module._modules[following] = nn.Identity()
    return model
