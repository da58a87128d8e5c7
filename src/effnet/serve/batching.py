"""The dynamic batcher: concurrent requests for one model are merged into engine batches.

    batcher = Batcher(run, run_async=..., max_batch_images=16, max_delay=0.0, max_queue_images=256, metrics=...)
    outputs = await batcher.submit(images, wanted)  # (n, H, W, 3) float32 -> the rows of `run`'s outputs for them

`run(batch, wanted)` gets the union of the batch's requests' `wanted` (output names), so an output nobody in the
batch asked for is not computed. How a batch is run, cheapest first:
- `run_inline(images, wanted)`, called by the request itself before `submit`: on an idle batcher, when
  `inline(images)` is true, `run` right there on the event loop, which waits for it; no queue, no batch loop task.
  For a lone image while requests come one at a time (`LoneRequests`) and the call is short: then the loop has
  nothing else to do, and this is exactly the floor a client at concurrency 1 compares with (no thread woken,
  nothing handed over).
- `run_async(batch, wanted)` not None: an awaitable of the same outputs where the engine runs the batch on its
  own threads (OpenVINO, a lone image): the loop stays free and is woken when it ends.
- else `run` on the engine thread.
On 2 cores a Lite0 request at concurrency 1 took ~0.7 ms less inline than through OpenVINO's asynchronous call,
which took ~0.3 ms less than the engine thread (two servers side by side, benchmarks/serve.py's lone floor paired
with each round). Under load batches hold several images and the engine thread runs them back to back.

Requests wait in a queue. Whenever the engine is free, the batch loop takes the oldest request and the next
queued requests of the same image size, up to `max_batch_images` images, and hands them to `run` on the engine's
own thread at once: a lone request on an idle engine is not held back. Batches form from the requests that arrive
while the engine runs (under load the engine is always busy, so they fill up by themselves); meanwhile the event
loop keeps accepting and decoding the next requests (decoding happens before `submit`, in the decode pool, beside
the engine). This is Triton's dynamic batcher with its default `max_queue_delay` of 0.

`max_delay` (`--max-batch-delay-ms`, default 0) is an opt-in wait: with it, a batch that is not full leaves only
when it is full or `max_delay` after its first request arrived, even on an idle engine. That trades up to
`max_delay` of every lightly loaded request's latency for bigger batches when requests trickle in. The default
0 is chosen because a lone request then pays no wait at all (5 ms, the former default, would be half of a Lite0
request at concurrency 1 now, benchmarks/serve.py), while under load the busy engine fills the batches anyway: at
concurrency 32, Lite0 batches held 13.9 images on average against 14.1-14.8 with 5 ms, at the same throughput
within the noise (two servers side by side, rounds alternating).

Requests of another image size stay queued, in order, for a later batch. A request larger than the batch limit
runs alone (the engine splits it into chunks of its own batch size).

Back-pressure: a request that would take the queue over `max_queue_images` is refused at once (`QueueFull`,
answered 503 with Retry-After) instead of waiting behind work it cannot overtake. A request whose caller stopped
waiting (timeout, disconnect) is dropped from the queue before it costs an engine call.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
from kserve.errors import ServerNotReady


class QueueFull(ServerNotReady):
    """The model's queue is full: try again shortly (503 + Retry-After over REST). A `ServerNotReady` so that the
    SDK's gRPC interceptor answers UNAVAILABLE rather than INTERNAL."""

    def __init__(self, message: str):
        super().__init__(message)
        self.reason = message  # what the gRPC interceptor sends


@dataclass
class _Request:
    images: np.ndarray  # (n, H, W, 3) float32
    wanted: frozenset  # the output names this request asks for
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class LoneRequests:
    """Tells when requests come one at a time (a client at concurrency 1), so that a lone image may run inline.

    A request counts from its arrival (before decoding) until its engine call is over. `alone` is true once
    STREAK requests in a row arrived to find no other in flight. While calls run inline the loop reads no new
    request until the call ends, so a second client would look alone too: every PROBE_EVERY-th lone request
    therefore runs off the loop, and a request arriving meanwhile ends the streak.
    """

    STREAK = 4
    PROBE_EVERY = 16

    def __init__(self):
        self.in_flight = 0
        self.streak = 0

    def arrived(self) -> None:
        self.in_flight += 1
        self.streak = self.streak + 1 if self.in_flight == 1 else 0

    def left(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    @property
    def alone(self) -> bool:
        return self.streak >= self.STREAK and self.streak % self.PROBE_EVERY != 0


class Batcher:
    """Merges concurrent `submit` calls into calls of `run(batch, wanted)`, one at a time on a dedicated thread."""

    def __init__(self, run: Callable[[np.ndarray, frozenset], tuple], *, max_batch_images: int, max_delay: float,
                 max_queue_images: int, run_async: Callable[[np.ndarray, frozenset], Awaitable | None] | None = None,
                 inline: Callable[[np.ndarray], bool] | None = None, call_timeout: float | None = None, metrics=None):
        self.run = run  # ((N, H, W, 3) float32, wanted output names) -> tuple of arrays with N rows each (or None)
        self.run_async = run_async  # the same, as an awaitable, or None where the engine has no such call for it
        self.inline = inline  # batch -> whether to run it with `run` on the event loop itself
        self.call_timeout = call_timeout  # seconds before a `run_async` call that never ends fails its batch
        self.max_batch_images = max_batch_images
        self.max_delay = max_delay
        self.max_queue_images = max_queue_images
        self.metrics = metrics  # serve.metrics.ModelMetrics or None
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._running = False  # an engine call is under way
        self._loop_task: asyncio.Task | None = None
        # One thread: the engine's own threads do the parallel work; a second batch would only compete with them.
        self._engine_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="effnet-engine")

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def idle(self) -> bool:
        """Nothing queued and no engine call under way: a request submitted now runs at once."""
        return not self._queue and not self._running

    def run_inline(self, images: np.ndarray, wanted: frozenset = frozenset()) -> tuple | None:
        """`run`'s outputs for `images`, run right here on the event loop, when the batcher is idle and
        `inline(images)` allows it; else None (then `submit`)."""
        if not self.idle or self.inline is None or not self.inline(images):
            return None
        started = time.perf_counter()
        self._running = True
        try:
            outputs = self.run(images, wanted)
        finally:
            self._running = False
        self._observe(started, len(images))
        return outputs

    async def submit(self, images: np.ndarray, wanted: frozenset = frozenset()) -> tuple:
        """Run `images` in the next batch that has room; the rows of `run`'s outputs for them."""
        self._start()
        if self._queued_images + len(images) > self.max_queue_images and self._queue:
            raise QueueFull(f"the queue holds {self._queued_images} images, the limit is {self.max_queue_images} "
                            "(--max-queue-images); retry shortly")
        request = _Request(images, frozenset(wanted), asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._queued_images += len(images)
        self._report_depth()
        self._wakeup.set()
        return await request.future

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._engine_thread.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> None:
        # Started on first use, in the loop that serves requests (the server's, or a Ray Serve replica's).
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop(), name="effnet-batcher")

    def _report_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_images.set(self._queued_images)

    async def _batch_loop(self) -> None:
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0]
            deadline = first.arrived + self.max_delay  # already past when max_delay is 0: no wait
            while self._images_like(first) < self.max_batch_images and time.perf_counter() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch(first)
            if not batch:
                continue
            images = batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch])
            wanted = frozenset().union(*(r.wanted for r in batch))
            started = time.perf_counter()
            self._running = True
            try:
                outputs = await self._call(images, wanted)
            except Exception as error:  # noqa: BLE001 - the engine's failure is every batched request's failure
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            finally:
                self._running = False
            self._observe(started, len(images))
            start = 0
            for request in batch:
                stop = start + len(request.images)
                if not request.future.done():
                    request.future.set_result(tuple(None if o is None else o[start:stop] for o in outputs))
                start = stop

    def _observe(self, started: float, images: int) -> None:
        if self.metrics is not None:
            self.metrics.engine_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_images.observe(images)

    async def _call(self, images: np.ndarray, wanted: frozenset) -> tuple:
        """One engine call from the batch loop: the engine's own asynchronous call where it has one for this
        batch, else `run` on the engine thread."""
        started = self.run_async(images, wanted) if self.run_async is not None else None
        if started is None:
            return await asyncio.get_running_loop().run_in_executor(self._engine_thread, self.run, images, wanted)
        try:
            return await asyncio.wait_for(started, self.call_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the engine did not answer within {self.call_timeout:g} s") from None

    def _images_like(self, first: _Request) -> int:
        size = first.images.shape[1:]
        return sum(len(r.images) for r in self._queue if r.images.shape[1:] == size)

    def _take_batch(self, first: _Request) -> list[_Request]:
        """The oldest request and the next requests of its image size that fit; the rest keep their order."""
        size, batch, kept, count = first.images.shape[1:], [], collections.deque(), 0
        for request in self._queue:
            fits = request.images.shape[1:] == size and (not batch or count + len(request.images) <= self.max_batch_images)
            if fits and not request.future.done():
                batch.append(request)
                count += len(request.images)
            elif not request.future.done():
                kept.append(request)
        self._queue = kept
        self._queued_images = sum(len(r.images) for r in kept)
        self._report_depth()
        return batch

    def _drop_abandoned(self) -> None:
        if any(r.future.done() for r in self._queue):
            self._queue = collections.deque(r for r in self._queue if not r.future.done())
            self._queued_images = sum(len(r.images) for r in self._queue)
            self._report_depth()
