"""The dynamic batcher, with a stand-in engine that records its calls: concurrent requests share calls, sizes are
not mixed, every request gets its own rows back, a full queue refuses at once, abandoned requests cost nothing."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from effnet.serve.batching import Batcher, QueueFull


class RecordingEngine:
    """Returns each image's mean as its "feature" (so rows can be checked), and records the batch sizes."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[int] = []
        self.gate = gate

    def __call__(self, images: np.ndarray):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(len(images))
        return images.mean(axis=(1, 2, 3))[:, None], None


def _images(count: int, value: float, size: int = 4) -> np.ndarray:
    return np.full((count, size, size, 3), value, np.float32)


def test_concurrent_requests_share_engine_calls_and_get_their_own_rows():
    engine = RecordingEngine()

    async def main():
        batcher = Batcher(engine, max_batch_images=8, max_delay=0.05, max_queue_images=100)
        results = await asyncio.gather(*(batcher.submit(_images(1 + i % 2, float(i))) for i in range(12)))
        batcher.close()
        return results

    results = asyncio.run(main())
    for i, (features, logits) in enumerate(results):
        assert features.shape == (1 + i % 2, 1) and np.all(features == i) and logits is None
    assert sum(engine.calls) == 18 and max(engine.calls) <= 8 and len(engine.calls) < 12


def test_images_of_another_size_wait_for_their_own_batch():
    engine = RecordingEngine()

    async def main():
        batcher = Batcher(engine, max_batch_images=8, max_delay=0.05, max_queue_images=100)
        small, large, small2 = await asyncio.gather(batcher.submit(_images(1, 1.0, 4)), batcher.submit(_images(1, 2.0, 6)),
                                                    batcher.submit(_images(1, 3.0, 4)))
        batcher.close()
        return small, large, small2

    small, large, small2 = asyncio.run(main())
    assert (small[0][0, 0], large[0][0, 0], small2[0][0, 0]) == (1.0, 2.0, 3.0)
    assert engine.calls == [2, 1]  # the two 4x4 requests together, then the 6x6 one


def test_a_full_queue_refuses_at_once_and_abandoned_requests_are_dropped():
    gate = threading.Event()
    engine = RecordingEngine(gate)

    async def main():
        batcher = Batcher(engine, max_batch_images=2, max_delay=0.0, max_queue_images=4)
        first = asyncio.ensure_future(batcher.submit(_images(2, 1.0)))  # taken by the engine, which waits on the gate
        await asyncio.sleep(0.1)
        queued = [asyncio.ensure_future(batcher.submit(_images(2, 2.0))) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="--max-queue-images"):
            await batcher.submit(_images(1, 3.0))
        queued[0].cancel()  # its caller gave up (timeout or disconnect)
        gate.set()
        await first
        await queued[1]
        batcher.close()

    asyncio.run(main())
    assert engine.calls == [2, 2]  # the cancelled request never reached the engine


def test_an_engine_error_fails_the_requests_of_that_batch_only():
    calls = []

    def engine(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("engine failed")
        return images.mean(axis=(1, 2, 3))[:, None], None

    async def main():
        batcher = Batcher(engine, max_batch_images=4, max_delay=0.02, max_queue_images=100)
        first = await asyncio.gather(batcher.submit(_images(1, 1.0)), batcher.submit(_images(1, 1.0)),
                                     return_exceptions=True)
        second = await batcher.submit(_images(1, 5.0))
        batcher.close()
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in first) and second[0][0, 0] == 5.0
