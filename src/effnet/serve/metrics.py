"""The server's Prometheus metrics, registered in prometheus_client's default registry, which the SDK's `/metrics`
endpoint already exposes (next to its own `request_preprocess_seconds` / `request_predict_seconds` /
`request_postprocess_seconds` histograms per model).

What the SDK does not count, and we add: requests and responses by status code, the batch sizes the batcher
formed, the queue depth, and decode and engine time separately (the SDK's "predict" histogram is queue + engine).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

RESPONSES = Counter("effnet_responses", "HTTP inference responses by model, protocol and status code",
                    ["model", "protocol", "code"])
IMAGES = Counter("effnet_images", "Images received, by model and how they came (pixels or encoded)", ["model", "kind"])
BATCH_IMAGES = Histogram("effnet_batch_images", "Images per engine call (the batches the batcher formed)", ["model"],
                         buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
QUEUE_IMAGES = Gauge("effnet_queue_images", "Images waiting for the engine", ["model"])
DECODE_SECONDS = Histogram("effnet_decode_seconds", "Decode + resize time of one encoded image", ["model"],
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
ENGINE_SECONDS = Histogram("effnet_engine_seconds", "Time of one engine call (one batch)", ["model"],
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))


@dataclass
class ModelMetrics:
    """The metric children of one served model name."""

    images_pixels: object
    images_encoded: object
    batch_images: object
    queue_images: object
    decode_seconds: object
    engine_seconds: object

    @classmethod
    def for_model(cls, name: str) -> "ModelMetrics":
        return cls(IMAGES.labels(name, "pixels"), IMAGES.labels(name, "encoded"), BATCH_IMAGES.labels(name),
                   QUEUE_IMAGES.labels(name), DECODE_SECONDS.labels(name), ENGINE_SECONDS.labels(name))
