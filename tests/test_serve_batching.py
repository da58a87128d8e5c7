"""The dynamic batcher, with a stand-in engine that records its calls: concurrent requests share calls, sizes are
not mixed, every request gets its own rows back, a full queue refuses at once, abandoned requests cost nothing.
With the default `max_delay` (0) a lone request on an idle engine runs at once, and batches form from the requests
that arrive while the engine runs; a `max_delay` holds a short batch for company (opt-in). How a call is made:
inline on the event loop (idle batcher, `inline` allows), the engine's own asynchronous call (a stalled one fails
its batch only), else the engine thread; `LoneRequests` tells when requests come one at a time."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from effnet.serve.batching import Batcher, LoneRequests, QueueFull
from effnet.serve.model import ServeSettings

DEFAULT_DELAY = ServeSettings().max_delay  # what `effnet serve` runs with unless --max-batch-delay-ms is given
LOOP_TURNS = 10  # event-loop turns (no wall time passes to speak of) after which an idle engine has its request


class RecordingEngine:
    """Returns each image's mean as its "feature" (so rows can be checked), and records the batch sizes and the
    outputs each batch was asked for. With a gate, each call waits for it (the engine is busy until then)."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[int] = []
        self.wanted: list[frozenset] = []
        self.gate = gate

    def __call__(self, images: np.ndarray, wanted: frozenset):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(len(images))
        self.wanted.append(wanted)
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


def test_32_closed_loop_clients_form_batches_without_a_delay():
    """The default: no wait for company. Each client sends its next request when its last one is answered; the
    requests that arrive while the engine runs make the next batch."""
    engine = RecordingEngine()
    slow_engine = lambda images, wanted: (time.sleep(0.005), engine(images, wanted))[1]  # noqa: E731 - a busy engine

    async def client(batcher, index):
        rows = []
        for round_ in range(3):
            features, _ = await batcher.submit(_images(1, float(100 * round_ + index)))
            rows.append(float(features[0, 0]))
        return rows

    async def main():
        batcher = Batcher(slow_engine, max_batch_images=16, max_delay=DEFAULT_DELAY, max_queue_images=256)
        results = await asyncio.gather(*(client(batcher, index) for index in range(32)))
        batcher.close()
        return results

    results = asyncio.run(main())
    assert results == [[float(100 * r + i) for r in range(3)] for i in range(32)]  # every client its own rows
    assert sum(engine.calls) == 96 and max(engine.calls) == 16 and len(engine.calls) < 96 / 2, engine.calls


def test_a_lone_request_on_an_idle_engine_runs_at_once_and_later_ones_batch_behind_it():
    gate = threading.Event()
    engine = RecordingEngine(gate)

    async def main():
        batcher = Batcher(engine, max_batch_images=8, max_delay=DEFAULT_DELAY, max_queue_images=100)
        lone = asyncio.ensure_future(batcher.submit(_images(1, 1.0)))
        for _ in range(LOOP_TURNS):
            await asyncio.sleep(0)
        assert batcher.queued_images == 0  # already handed to the engine: it did not wait for company
        later = [asyncio.ensure_future(batcher.submit(_images(1, 2.0 + i))) for i in range(2)]  # engine busy
        await asyncio.sleep(0.05)
        gate.set()
        results = [await lone] + [await request for request in later]
        batcher.close()
        return results

    results = asyncio.run(main())
    assert engine.calls == [1, 2]  # the lone request alone, then the two that came while it ran
    assert [float(features[0, 0]) for features, _ in results] == [1.0, 2.0, 3.0]


def test_a_batch_delay_holds_a_short_batch_for_company():
    """--max-batch-delay-ms, opt-in: a short batch waits (here up to 10 s) and leaves as soon as it is full."""
    engine = RecordingEngine()

    async def main():
        batcher = Batcher(engine, max_batch_images=2, max_delay=10.0, max_queue_images=100)
        first = asyncio.ensure_future(batcher.submit(_images(1, 1.0), {"feature_vector"}))
        for _ in range(LOOP_TURNS):
            await asyncio.sleep(0)
        assert batcher.queued_images == 1  # still waiting for a second image
        second = await batcher.submit(_images(1, 2.0), {"logits"})
        await first
        batcher.close()
        return second

    second = asyncio.run(main())
    assert float(second[0][0, 0]) == 2.0
    assert engine.calls == [2] and engine.wanted == [{"feature_vector", "logits"}]  # the outputs either one asked for


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

    def engine(images, wanted):
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


def test_lone_requests_count_a_streak_and_probe_every_sixteenth():
    lone = LoneRequests()
    alone = []
    for _ in range(40):  # one client: each request arrives after the last one left
        lone.arrived()
        alone.append(lone.alone)
        lone.left()
    assert [number for number, flag in enumerate(alone, 1) if not flag] == [1, 2, 3, 16, 32]
    lone.arrived()
    lone.arrived()  # a second request while one is in flight ends the streak
    assert not lone.alone and lone.streak == 0
    for _ in range(3):
        lone.left()  # one more left() than arrived(): never below zero
    assert lone.in_flight == 0


def test_run_inline_runs_on_the_event_loop_only_when_the_batcher_is_idle():
    gate, threads = threading.Event(), []

    def engine(images, wanted):
        threads.append(threading.get_ident())
        if len(images) == 2:
            gate.wait(10)  # the 2-image batch holds the engine thread until the test opens the gate
        return images.mean(axis=(1, 2, 3))[:, None], None

    async def main():
        batcher = Batcher(engine, inline=lambda images: len(images) == 1, max_batch_images=8, max_delay=0.0,
                          max_queue_images=100)
        loop_thread = threading.get_ident()
        features, _ = batcher.run_inline(_images(1, 0.5))
        assert features[0, 0] == 0.5 and threads == [loop_thread]
        assert batcher.run_inline(_images(2, 0.5)) is None  # `inline` says no
        busy = asyncio.ensure_future(batcher.submit(_images(2, 0.25)))
        for _ in range(LOOP_TURNS):
            await asyncio.sleep(0)
        assert not batcher.idle and batcher.run_inline(_images(1, 0.5)) is None  # the engine runs a batch
        gate.set()
        assert (await busy)[0][0, 0] == 0.25 and threads[-1] != loop_thread  # batches run on the engine thread
        assert batcher.idle and batcher.run_inline(_images(1, 0.75))[0][0, 0] == 0.75
        batcher.close()

    asyncio.run(main())


def test_the_engines_own_asynchronous_call_is_used_and_a_stalled_one_fails_its_batch_only():
    """run_async: an awaitable when the engine has its own call for the batch (here: images of value 0), None to
    use the engine thread (value 2); one that never ends (value 1) fails its requests after call_timeout."""
    calls = []

    def engine(images, wanted):
        calls.append("thread")
        return images.mean(axis=(1, 2, 3))[:, None], None

    async def main():
        loop = asyncio.get_running_loop()

        def run_async(images, wanted):
            value = images[0, 0, 0, 0]
            if value == 2:
                return None
            if value == 1:
                return loop.create_future()  # never set: an engine that does not call back

            async def finished():
                calls.append("async")
                return images.mean(axis=(1, 2, 3))[:, None], None
            return finished()

        batcher = Batcher(engine, run_async=run_async, call_timeout=0.2, max_batch_images=8, max_delay=0.0,
                          max_queue_images=100)
        assert (await batcher.submit(_images(1, 0.0)))[0][0, 0] == 0.0
        assert (await batcher.submit(_images(1, 2.0)))[0][0, 0] == 2.0
        with pytest.raises(TimeoutError, match="did not answer within 0.2 s"):
            await batcher.submit(_images(1, 1.0))
        assert (await batcher.submit(_images(1, 0.0)))[0][0, 0] == 0.0  # the batcher goes on
        batcher.close()

    asyncio.run(main())
    assert calls == ["async", "thread", "async"]
