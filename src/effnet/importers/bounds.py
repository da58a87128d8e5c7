"""How large a weights file of an EfficientNet can be, from the architecture tables: every importer checks a
tensor's declared shape (and the file's declared total) against these bounds before it reads any tensor data, so
a small hostile file that declares a huge tensor fails at once instead of allocating what it claims.

The bounds are loose on purpose (a few times the largest real tensor and file) but finite and computed, never
read from the file: the largest parameter is either the classifier (head width x `MAX_CLASSES`) or a backbone
convolution (per block: the fused expansion k x k x in x expanded, or expanded x max(in, out)).
"""

from __future__ import annotations

import functools
import math

from ..architectures import SCALING, architecture
from ..errors import CheckpointFormatError

MAX_CLASSES = 21843 + 1  # ImageNet-21k, the largest label set of any published EfficientNet, plus a background
MAX_ITEM_BYTES = 8  # float64, the widest dtype a checkpoint might store weights in


@functools.cache
def max_tensor_elements() -> int:
    """Elements of the largest parameter any architecture has (a classifier of `MAX_CLASSES` included)."""
    largest = 0
    for name in SCALING:
        arch = architecture(name)
        largest = max(largest, arch.head_channels * MAX_CLASSES, 3 * 3 * 3 * arch.stem_channels)
        for block in (block for stage in arch.stages for block in stage):
            expanded = block.in_channels * block.expand_ratio
            largest = max(largest, block.kernel_size**2 * block.in_channels * expanded,
                          expanded * max(block.in_channels, block.out_channels))
    return largest


@functools.cache
def max_total_elements() -> int:
    """An upper bound on the parameters of any architecture: every block's tensors at their bound, head, classifier."""
    largest = 0
    for name in SCALING:
        arch = architecture(name)
        total = 3 * 3 * 3 * arch.stem_channels + arch.head_channels * (MAX_CLASSES + 1)
        for block in (block for stage in arch.stages for block in stage):
            expanded = block.in_channels * block.expand_ratio
            total += (block.kernel_size**2 * block.in_channels * expanded + expanded * block.kernel_size**2
                      + 3 * expanded * max(block.in_channels, block.out_channels) + 8 * expanded)
        largest = max(largest, total)
    return largest


def max_file_bytes() -> int:
    return max_total_elements() * MAX_ITEM_BYTES


class ShapeCheck:
    """Accumulates declared tensors of one file: `check(name, shape, itemsize)` raises before the data is read."""

    def __init__(self, source: str):
        self.source, self.total = source, 0

    def check(self, name: str, shape, itemsize: int = 4) -> None:
        try:
            dims = [int(dim) for dim in shape]
        except (TypeError, ValueError):
            raise CheckpointFormatError(f"{self.source}: tensor {name!r} has no definite shape ({shape})") from None
        elements = math.prod(dims)
        if any(dim < 0 for dim in dims) or elements > max_tensor_elements():
            raise CheckpointFormatError(
                f"{self.source}: tensor {name!r} declares shape {dims} ({elements:,} elements), larger than any "
                f"EfficientNet parameter (at most {max_tensor_elements():,}); not EfficientNet weights")
        self.total += elements * max(1, itemsize)
        if self.total > max_file_bytes():
            raise CheckpointFormatError(
                f"{self.source}: its tensors declare more than {max_file_bytes() / 2**30:.1f} GiB, more than any "
                "EfficientNet's weights; not EfficientNet weights")


def check_file_size(path, size: int) -> None:
    if size > max_file_bytes():
        raise CheckpointFormatError(
            f"{path}: {size / 2**30:.1f} GiB is larger than any EfficientNet's weights "
            f"(at most {max_file_bytes() / 2**30:.1f} GiB); not an EfficientNet weights file")
