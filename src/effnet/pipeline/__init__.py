"""The batch pipeline behind `effnet embed` / `effnet classify` and `effnet.embed` / `effnet.classify`.

    source -> decode -> batch -> engine -> sink

Each stage is a small class with `__call__` (sources.py, decode.py, batch.py, sinks.py), and `Runner` (runner.py)
moves data between them and records how long each takes. Any stage can be replaced by a callable with the same
signature. The engine is any `(N, 3, S, S) float32 tensor in [0, 1] -> numpy (N, D)` callable, usually one of
`effnet.engines` (the pipeline has no engine of its own), or a `JobSizedEngine` that picks one once the runner
knows how many inputs it will run.
"""

from .batch import Batch, Batcher
from .decode import RESIZE_MODES, Decoded, Decoder, recipe_for
from .runner import JobSizedEngine, Report, Runner
from .sinks import EmbeddingColumns, MemorySink, ParquetSink, TopKColumns
from .sources import Item, Sources

__all__ = [
    "Batch",
    "Batcher",
    "Decoded",
    "Decoder",
    "EmbeddingColumns",
    "Item",
    "JobSizedEngine",
    "MemorySink",
    "ParquetSink",
    "RESIZE_MODES",
    "Report",
    "Runner",
    "Sources",
    "TopKColumns",
    "recipe_for",
]
