"""What a batch job will need, checked before it starts: a size, batch size or worker count the machine cannot
run is refused at once with the memory it would take, instead of growing until the kernel kills it.

The estimate is the model's peak activation memory plus the pipeline's image buffers:

- activations: `ACTIVATION_FACTOR` x batch x (the widest tensor of one image) x 4 bytes. The widest tensor comes
  from the architecture table: the stem output, or a block's expanded input (in_channels x expand_ratio at its
  input resolution). The factor is measured: peak RSS growth of an eager-torch inference forward over that
  widest tensor was 3.5x (Lite0 @ 448), 3.0x (Lite0 @ 896), 3.2x (B0 @ 896), 2.3x (V2-S @ 896) and 3.0x (Lite0
  @ 448, batch 4), so 4 leaves a margin; other engines (ONNX Runtime, OpenVINO) plan memory similarly;
- the float32 input batch (batch x 3 x S x S x 4) and the decoded images waiting for it (the runner's window of
  max(2 x batch, 4 x workers) uint8 S x S x 3 arrays).

It is compared with the memory the machine has available now (Linux MemAvailable; total RAM elsewhere).
docs/limits.md lists every limit effnet enforces.
"""

from __future__ import annotations

import math
import os

from .architectures import Architecture
from .errors import EffnetError

ACTIVATION_FACTOR = 4  # peak activation bytes / widest activation tensor, measured 2.3-3.5 (module docstring)
MAX_WORKERS = 256  # decode workers: more threads than this only queue for the same cores and memory budget


def widest_activation(arch: Architecture, size: int) -> int:
    """Elements of the largest activation of one image at `size` x `size` (from the architecture table)."""
    resolution = math.ceil(size / 2)  # the stem strides by 2
    widest = arch.stem_channels * resolution**2
    for stage in arch.stages:
        for block in stage:
            widest = max(widest, block.in_channels * block.expand_ratio * resolution**2)
            resolution = math.ceil(resolution / block.stride)
    return widest


def job_bytes(arch: Architecture, size: int, batch_size: int, workers: int) -> int:
    """Estimated peak bytes of a job's model activations and image buffers (see the module docstring)."""
    activations = ACTIVATION_FACTOR * batch_size * widest_activation(arch, size) * 4
    batch = batch_size * 3 * size * size * 4
    window = max(2 * batch_size, 4 * workers) * size * size * 3
    return activations + batch + window


def available_memory() -> int:
    """Bytes this machine can give a new job now: MemAvailable on Linux, else the physical memory."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_job_fits(arch: Architecture, size: int, batch_size: int, workers: int,
                   available: int | None = None) -> None:
    """Raise EffnetError, naming the memory needed and what would fit, if the job cannot run on this machine."""
    if workers > MAX_WORKERS:
        raise EffnetError(f"--workers {workers} is more than {MAX_WORKERS} decode workers; use at most a few per "
                          f"core (this machine has {os.cpu_count()} cores)")
    available = available_memory() if available is None else available
    needed = job_bytes(arch, size, batch_size, workers)
    if needed <= available:
        return
    largest = _largest_size(arch, batch_size, workers, available)
    at_one = _largest_size(arch, 1, workers, available)
    hints = []
    if largest:
        hints.append(f"the largest --size that fits at --batch-size {batch_size} is {largest}")
    if batch_size > 1 and job_bytes(arch, size, 1, workers) <= available:
        fits = max(b for b in _powers_below(batch_size) if job_bytes(arch, size, b, workers) <= available)
        hints.append(f"--size {size} fits with --batch-size {fits}")
    elif batch_size > 1 and at_one and at_one != largest:
        hints.append(f"at --batch-size 1 the largest is {at_one}")
    raise EffnetError(
        f"--size {size} with --batch-size {batch_size} would need about {_gib(needed)} of memory for the model's "
        f"activations and image buffers ({arch.name}), but this machine has {_gib(available)} available"
        + (f"; {'; '.join(hints)}" if hints else "") + ". See docs/limits.md.")


def _largest_size(arch: Architecture, batch_size: int, workers: int, available: int) -> int:
    low, high = 0, 1 << 20  # job_bytes grows with size: bisect for the last size that fits
    while low < high:
        middle = (low + high + 1) // 2
        if job_bytes(arch, middle, batch_size, workers) <= available:
            low = middle
        else:
            high = middle - 1
    return low


def _powers_below(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _gib(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB"
