"""Batch stage: decoded inputs -> one float32 tensor for the engine, plus the bookkeeping to put rows back.

The decode stage hands over uint8 (S, S, 3) arrays. Stacking them gives an NHWC uint8 buffer, converted to float32
in [0, 1] in one numpy pass; `permute(0, 3, 1, 2)` views that as NCHW *in channels_last layout* without copying,
which is the layout the engine runs fastest in on CPU (oneDNN's native NHWC convolutions). numpy, not torch, does
the conversion: the same IEEE division, bit for bit, but single-threaded, where torch's `.to` + `div_` opened two
OpenMP regions that fought the engine's and the decoders' threads (1.0 ms an image at 160 px inside a 2-core
`effnet dedup`, 0.04 ms for numpy).
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
    floats = np.divide(np.stack(pixels), np.float32(255), dtype=np.float32)  # (N, S, S, 3)
    return torch.from_numpy(floats).permute(0, 3, 1, 2)  # a view with NHWC strides: channels_last
