"""Shared fixtures: real photos (scikit-image's samples), inputs at any size, one torch thread."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is a test-only reference; keep its logs quiet

PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


def photo(name: str) -> np.ndarray:
    """A real RGB uint8 photo that scikit-image ships."""
    import skimage.data
    return getattr(skimage.data, name)()


def photo_batch(height: int, width: int | None = None) -> torch.Tensor:
    """The four photos, center-cropped to the aspect ratio and resized (bicubic) to height x width, NCHW [0, 1]."""
    from PIL import Image
    width = width or height
    batch = []
    for name in PHOTO_NAMES:
        image = Image.fromarray(photo(name)).convert("RGB")
        w, h = image.size
        scale = min(w / width, h / height)
        cw, ch = int(width * scale), int(height * scale)
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
        batch.append(np.asarray(image, np.float32) / 255.0)
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def random_batch(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, height, width), generator=generator)


@pytest.fixture(scope="session")
def lite0():
    import effnet
    return effnet.load("efficientnet_lite0")


@pytest.fixture
def one_thread():
    """PyTorch on one intra-op thread for the test: on 2 shared cores OpenMP's barriers make 2 threads several
    times slower than 1 (see test_finetune.py). Modules opt in with `pytestmark = usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
