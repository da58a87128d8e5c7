"""The runner: source -> decode -> batch -> engine -> sink, with decoding overlapped with inference.

Each stage is a small callable (see the sibling modules); the runner only moves data between them and records
how long each one takes (`Report.stages`). Decoding runs in a pool of workers, `window` inputs ahead of the
engine, so the next batch is being decoded while the engine runs the current one; results come back in input
order. Threads are the default: Pillow releases the GIL while it decodes and resizes. On the 2-core machine
(B2 @ 260, 16 photos of 12 MP, batch 8) threads gave 2.3-2.5 img/s and processes 1.6-2.1: a process pool
starts workers that import effnet (and so PyTorch) -- about 4 s before the first image -- and pickles every
decoded image back.

Bad inputs never stop the run: the decode stage turns them into error rows. An interruption (Ctrl-C) or a crash
in a later stage first hands every row already computed to the sink's `flush`, then re-raises.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .batch import Batcher
from .decode import Decoded, Decoder
from .sinks import Summary
from .sources import Item

EXECUTORS = ("thread", "process")


@dataclass
class Report:
    """What a run did, and where its time went."""

    inputs: int  # inputs listed by the source
    resumed: int  # of those, already done by an earlier run
    processed: int  # decoded (or failed) and written in this run
    summary: Summary  # rows / failed / errors of the whole output, resumed rows included
    seconds: float  # wall time of the run
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (decode: summed over workers)
    result: object = None  # what the sink's finish returned (an Arrow table for MemorySink)
    skipped: dict[str, int] = field(default_factory=dict)  # files folder walks saw and did not take, by reason
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, message) the decoder warned about

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


class JobSizedEngine:
    """An engine chosen when the runner knows how many inputs are left to run: `choose(count) -> engine`.

    `engine="auto"` uses it to skip timing engines for a handful of images, and a job that is already complete
    (everything resumed) builds no engine at all.
    """

    def __init__(self, choose: Callable[[int], Callable]):
        self.choose = choose


class Runner:
    """`Runner(source, decode, batch, engine, sink)()` -> Report."""

    def __init__(
        self,
        source: Callable[[], Iterable[Item]],
        decode: Decoder,
        batch: Batcher,
        engine: Callable,
        sink,
        *,
        batch_size: int = 16,
        workers: int | None = None,
        executor: str = "thread",
        progress: bool = True,
    ):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, not {executor!r}")
        self.source, self.decode, self.batch, self.engine, self.sink = source, decode, batch, engine, sink
        self.batch_size = max(1, batch_size)
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.executor = executor
        self.progress = progress
        self.stages: dict[str, float] = collections.defaultdict(float)

    def __call__(self) -> Report:
        start = time.perf_counter()
        with self._timed("source"):
            items = list(self.source())
        with self._timed("resume"):
            done = self.sink.done()
        todo = [item for item in items if item.key not in done]
        if isinstance(self.engine, JobSizedEngine) and todo:
            with self._timed("engine_setup"):
                self.engine = self.engine.choose(len(todo))
        failed = 0
        self.warnings: list[tuple[str, str]] = []
        bar = _progress_bar(len(items), len(items) - len(todo), self.progress)
        decoded = self._decoded(todo)
        try:
            pending: list[tuple[Item, Decoded]] = []
            for pair in decoded:
                pending.append(pair)
                failed += pair[1].error is not None
                self.warnings += [(pair[0].path, message) for message in pair[1].warnings]
                if len(pending) == self.batch_size:
                    self._process(pending)
                    bar.update(len(pending))
                    bar.set_postfix(failed=failed, refresh=False)
                    pending = []
            if pending:
                self._process(pending)
                bar.update(len(pending))
                bar.set_postfix(failed=failed, refresh=False)
        except BaseException:
            decoded.close()  # stops the workers: queued decodes are cancelled
            bar.close()
            with self._timed("sink"):
                self.sink.flush()  # everything computed so far reaches disk before the interruption propagates
            raise
        bar.close()
        with self._timed("merge"):
            result, summary = self.sink.finish(items)
        seconds = time.perf_counter() - start
        skipped = {reason: count for reason, count in getattr(self.source, "skipped", {}).items() if count}
        return Report(len(items), len(items) - len(todo), len(todo), summary, seconds, dict(self.stages), result,
                      skipped, self.warnings)

    def _process(self, pairs: list[tuple[Item, Decoded]]) -> None:
        with self._timed("batch"):
            batch = self.batch(pairs)
        outputs = None
        if batch.images is not None:
            with self._timed("engine"):
                outputs = self.engine(batch.images)
        with self._timed("sink"):
            self.sink(batch, outputs)

    def _decoded(self, items: list[Item]) -> Iterator[tuple[Item, Decoded]]:
        """Decode `items` in a worker pool, up to `window` ahead, yielding results in input order."""
        if self.workers == 0 or not items:
            for item in items:
                result = self.decode(item)
                self.stages["decode"] += result.seconds
                yield item, result
            return
        window = max(2 * self.batch_size, 4 * self.workers)
        pool = _pool(self.executor, self.workers)
        queue: collections.deque[tuple[Item, Future]] = collections.deque()
        upcoming = iter(items)
        try:
            for item in upcoming:
                queue.append((item, pool.submit(self.decode, item)))
                if len(queue) >= window:
                    break
            while queue:
                item, future = queue.popleft()
                with self._timed("decode_wait"):
                    result = future.result()
                self.stages["decode"] += result.seconds
                following = next(upcoming, None)
                if following is not None:
                    queue.append((following, pool.submit(self.decode, following)))
                yield item, result
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _timed(self, stage: str) -> "_Timer":
        return _Timer(self.stages, stage)


class _Timer:
    def __init__(self, stages: dict[str, float], stage: str):
        self.stages, self.stage = stages, stage

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.stages[self.stage] += time.perf_counter() - self.start


def _pool(kind: str, workers: int) -> Executor:
    if kind == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="effnet-decode")
    # forkserver: forking a process that already runs PyTorch's thread pools is unsafe
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_interrupts)


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group; only the main process should react (flush, then exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, smoothing=0.1)
