"""Batch stage: decoded inputs -> one float32 tensor for the engine, plus the bookkeeping to put rows back.

The decode stage hands over uint8 (S, S, 3) arrays. Stacking them gives an NHWC uint8 buffer; `permute(0, 3, 1,
2)` views it as NCHW *in channels_last layout* without copying, and the one conversion to float32 in [0, 1]
keeps that layout, which is the layout the engine runs fastest in on CPU (oneDNN's native NHWC convolutions).
Failed inputs travel in the batch too (so every input keeps its place), but only the good ones are stacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .decode import Decoded
from .sources import Item


@dataclass
class Batch:
    """Up to `batch_size` inputs in order; `images` holds the decodable ones, `good` says which those are."""

    items: list[Item]
    decoded: list[Decoded]
    images: torch.Tensor | None  # (len(good), 3, S, S) float32 in [0, 1], channels_last; None if none decoded
    good: list[int]  # positions in `items` of the rows of `images`


class Batcher:
    """The batch stage: `Batcher()(pairs) -> Batch`."""

    def __call__(self, pairs: list[tuple[Item, Decoded]]) -> Batch:
        items = [item for item, _ in pairs]
        decoded = [result for _, result in pairs]
        good = [index for index, result in enumerate(decoded) if result.error is None]
        images = to_tensor([decoded[index].pixels for index in good]) if good else None
        return Batch(items, decoded, images, good)


def to_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    """N uint8 (S, S, 3) arrays -> (N, 3, S, S) float32 in [0, 1], channels_last (the model's input contract)."""
    stacked = torch.from_numpy(np.stack(pixels))  # (N, S, S, 3) uint8
    images = stacked.permute(0, 3, 1, 2).to(torch.float32)  # keeps the NHWC strides: channels_last
    return images.div_(255.0)
