"""One served effnet module: a `kserve.Model` whose `preprocess` parses and decodes, `predict` waits for the
batcher, and `postprocess` answers in the protocol the request came in.

    model = EffnetModel("efficientnet_lite0", "efficientnet_lite0", ServeSettings(engine="torch"))
    model.load()   # the module, its engine (timed once here with engine="auto", never per request), the decoder

The SDK calls `__call__` (preprocess -> validate -> predict -> postprocess) for V1 `:predict`, V2 REST (JSON and
binary tensors) and V2 gRPC alike; V1 bodies arrive as dicts, V2 requests as `InferRequest`. Outputs are named as
the hub signatures: `feature_vector` (N, D) always, `logits` (N, classes) for classification modules. Both come
from one engine call: the engine runs the "features" signature and the classifier (one linear layer) is applied
to its output, so a client asking for both pays for one forward pass, and one asking for `feature_vector` only
does not pay for the classifier (batches compute the outputs their requests asked for).

Encoded images are decoded with the pipeline's own `Decoder` and `to_tensor` (the same recipe, resampling and
float conversion as `effnet embed/classify`, so a file gives the same vector here as in a batch job), in the
decode thread pool, beside the engine's thread (a lone small JPEG on an idle model: on the event loop, see
`_decode`). Only the formats in `ENCODED_FORMATS` are opened: requests are untrusted, and Pillow's other plug-ins
(EPS via Ghostscript, for one) are not for the open internet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from kserve import Model
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from ..pipeline.batch import to_tensor
from ..pipeline.decode import Decoder, recipe_for
from .batching import Batcher, LoneRequests
from .inputs import BadInput, Parsed, parse_v1, parse_v2
from .metrics import ModelMetrics

ENCODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow's JPEG opener also gives cameras' MPO files
# A JPEG up to this size is decoded on the event loop itself when the model is idle (`_decode`): its decode time
# follows its size (~17 us a KiB here, at most ~9 ms), unlike a PNG's, so the loop is held up for a bounded time.
INLINE_DECODE_MAX_BYTES = 512 * 1024
# A lone image's engine call runs on the event loop itself (batching.py) only when it took at most this long at
# start-up: the loop, /metrics and health checks included, waits for it (Lite0 @ 224 ~5 ms, B2 @ 260 ~20 ms on
# 2 cores).
INLINE_CALL_MAX_SECONDS = 0.03
OUTPUTS = ("feature_vector", "logits")


class RequestTimeout(Exception):
    """A request that waited longer than --timeout for its batch (504)."""


@dataclass(frozen=True)
class ServeSettings:
    """How every served model runs (the `effnet serve` options)."""

    engine: str = "auto"
    precision: str = "fp32"
    max_batch_images: int = 16  # images per engine call
    max_delay: float = 0.0  # seconds a short batch waits for others on an idle engine (batching.py: opt-in)
    max_queue_images: int = 256  # images waiting before new requests get 503
    max_request_images: int = 64  # images in one request
    timeout: float = 30.0  # seconds a request may wait for its result
    engine_threads: int | None = None  # torch intra-op threads (None: see command.split_cores)
    engine_options: tuple[tuple[str, object], ...] = ()  # create_engine(**options): threads=, fold_batch_norm= ...


class EffnetModel(Model):
    """An effnet module served under `name`; `source` is anything `effnet.load` takes, or a loaded module."""

    def __init__(self, name: str, source, settings: ServeSettings = ServeSettings(),
                 decode_pool: concurrent.futures.Executor | None = None):
        super().__init__(name)
        self.source = source
        self.settings = settings
        self.decode_pool = decode_pool
        # `engine_`, not `engine`: the SDK's model base class uses `self.engine` as a flag ("start an engine task").
        self.network = self.engine_ = self.decoder = self.batcher = None
        self.classifier = self.labels = None
        self._pool_decodes = 0  # images of this model in the decode pool now
        self.lone = LoneRequests()
        self.lone_call_seconds = float("inf")  # one lone image's engine call, timed at load
        self._metrics: ModelMetrics | None = None

    # -- life cycle -------------------------------------------------------------------------------------------

    def load(self) -> bool:
        import effnet
        from ..engines import create_engine

        if self.ready:  # the SDK's RayModel.load() asks a replica that loaded itself already
            return True
        settings = self.settings
        if settings.engine_threads:
            torch.set_num_threads(settings.engine_threads)
        network = effnet.load(self.source) if isinstance(self.source, str) else self.source
        network.eval()
        spec = network.spec
        size = spec.native_size
        self.network = network
        self.decoder = Decoder(size, recipe_for(spec.name, spec.family), "crop")
        self.engine_ = create_engine(network, settings.engine, settings.precision, input_size=(size, size),
                                     signature="features", batch_size=settings.max_batch_images,
                                     **dict(settings.engine_options))
        self.classifier = network.classifier
        self.labels = getattr(network, "labels", None)
        self.lone_call_seconds = self._time_lone_call(size)
        self.batcher = Batcher(self._run, run_async=self._run_async, inline=self._inline,
                               max_batch_images=settings.max_batch_images, max_delay=settings.max_delay,
                               max_queue_images=settings.max_queue_images, call_timeout=settings.timeout,
                               metrics=self.metrics)
        self.ready = True
        return self.ready

    @property
    def metrics(self) -> ModelMetrics:
        # Looked up once: prometheus_client's labels() takes a lock and hashes the labels, ~2 us a call, six a lookup
        if self._metrics is None:
            self._metrics = ModelMetrics.for_model(self.name)
        return self._metrics

    @property
    def outputs(self) -> tuple[str, ...]:
        return OUTPUTS if self.classifier is not None else OUTPUTS[:1]

    @property
    def description(self) -> str:
        return f"{self.name}: {self.network.spec.name} ({self.engine_.description})"

    def stop(self):
        if self.batcher is not None:
            self.batcher.close()

    # -- metadata (V2 /v2/models/NAME) ------------------------------------------------------------------------

    def get_input_types(self):
        return [{"name": "images", "datatype": "FP32", "shape": [-1, -1, -1, 3]}]

    def get_output_types(self):
        dims = {"feature_vector": self.network.spec.feature_dim, "logits": self.network.spec.num_classes}
        return [{"name": name, "datatype": "FP32", "shape": [-1, dims[name]]} for name in self.outputs]

    # -- the request path -------------------------------------------------------------------------------------

    async def preprocess(self, payload, headers=None) -> Parsed:
        self.lone.arrived()  # until predict() ends (or this fails)
        try:
            return await self._parse_and_decode(payload)
        except BaseException:
            self.lone.left()
            raise

    async def _parse_and_decode(self, payload) -> Parsed:
        limit = self.settings.max_request_images
        parsed = parse_v2(payload, limit) if isinstance(payload, InferRequest) else parse_v1(payload, limit)
        if parsed.outputs:
            unknown = [name for name in parsed.outputs if name not in self.outputs]
            if unknown:
                raise BadInput(f"unknown output(s) {unknown}; {self.name} has {list(self.outputs)}")
        if parsed.classification and self.classifier is None:
            raise BadInput(f"the classification extension needs logits; {self.name} is a feature-vector module")
        encoded = [image for image in parsed.images if image.encoded is not None]
        if encoded:
            await self._decode(encoded)
        pixel_count = len(parsed.images) - len(encoded)
        if pixel_count:
            self.metrics.images_pixels.inc(pixel_count)
        sizes = {image.pixels.shape for image in parsed.images}
        if len(sizes) > 1:  # only possible in V1, where each instance is its own list
            raise BadInput(f"all images of one request must have the same size, got {sorted(s[:2] for s in sizes)}")
        return parsed

    def validate(self, payload):
        return payload  # checked in preprocess, with messages that name the field

    async def predict(self, parsed: Parsed, headers=None) -> tuple[Parsed, np.ndarray, np.ndarray | None]:
        if len(parsed.images) == 1:
            images = parsed.images[0].pixels[None]  # a view, not a copy
        else:
            images = np.stack([image.pixels for image in parsed.images])
        wanted = self._wanted(parsed)
        try:
            outputs = self.batcher.run_inline(images, wanted)
            if outputs is None:
                outputs = await asyncio.wait_for(self.batcher.submit(images, wanted), self.settings.timeout)
            features, logits = outputs
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no result within {self.settings.timeout:g} s (--timeout); the server is "
                                 "overloaded or the request too large") from None
        finally:
            self.lone.left()
        return parsed, features, logits

    async def postprocess(self, result, headers=None, response_headers=None):
        parsed, features, logits = result
        arrays = {"feature_vector": features, "logits": logits}
        if parsed.protocol == "v2":
            return self._v2_response(parsed, arrays)
        names = self.outputs
        if parsed.protocol == "v1-rows":  # TF Serving: one output -> a list of values, several -> a list of dicts
            if len(names) == 1:
                return {"predictions": arrays[names[0]].tolist()}
            return {"predictions": [{name: arrays[name][i].tolist() for name in names} for i in range(len(features))]}
        if len(names) == 1:
            return {"outputs": arrays[names[0]].tolist()}
        return {"outputs": {name: arrays[name].tolist() for name in names}}

    def _v2_response(self, parsed: Parsed, arrays: dict) -> InferResponse:
        request = parsed.request
        outputs = []
        for name in parsed.outputs or self.outputs:
            array = arrays[name]
            if parsed.classification and name == "logits":
                array, datatype = self._classes(array, parsed.classification), "BYTES"
            else:
                array, datatype = np.ascontiguousarray(array, np.float32), "FP32"
            output = InferOutput(name, list(array.shape), datatype)
            # Held as raw bytes: the SDK's to_grpc() tests `output.data` for truth, which fails on a numpy array;
            # to_rest() turns raw bytes back into JSON data when the client did not ask for binary.
            output.set_data_from_numpy(array, binary_data=True)
            outputs.append(output)
        return InferResponse(request.id or str(uuid.uuid4()), self.name, outputs, from_grpc=request.from_grpc,
                             use_binary_outputs=request.use_binary_outputs, requested_outputs=request.request_outputs)

    def _classes(self, logits: np.ndarray, k: int) -> np.ndarray:
        """Triton's classification extension: the top k as "score:index:label" BYTES strings, (N, k)."""
        k = min(k, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        labels = self.labels or []
        rows = [[f"{row[i]:f}:{i}:{labels[i] if i < len(labels) else ''}".encode() for i in indices]
                for row, indices in zip(logits, top)]
        return np.array(rows, dtype=np.object_)

    async def _decode(self, images) -> None:
        """Decode a request's encoded images in the decode pool, beside the engine; or, for a lone small JPEG when
        the model is idle (nothing queued or running, no decode in the pool), on the event loop itself: then there
        is nothing else for the loop to do, and the hand-over to a pool thread and back (two wake-ups of a
        sleeping thread, ~0.3 ms on 2 cores) would be the request's only cost beyond the decode."""
        if len(images) == 1 and self._pool_decodes == 0 and self.batcher.idle and _small_jpeg(images[0].encoded):
            decoded = [self._decode_one(images[0].encoded)]
        else:
            decoded = await self._decode_in_pool(images)
        metrics = self.metrics
        metrics.images_encoded.inc(len(images))
        for image, (pixels, result) in zip(images, decoded):
            metrics.decode_seconds.observe(result.seconds)
            if result.error is not None:
                raise BadInput(f"{image.name}: cannot decode the image: {result.error}")
            image.pixels, image.encoded = pixels, None

    async def _decode_in_pool(self, images) -> list:
        loop = asyncio.get_running_loop()
        if self.decode_pool is None:  # used without `effnet serve` or ray_serve, which size it (split_cores)
            self.decode_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="effnet-decode")
        self._pool_decodes += len(images)
        try:
            return await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self._decode_one, image.encoded)
                                          for image in images))
        finally:
            self._pool_decodes -= len(images)

    def _decode_one(self, data: bytes):
        """One image's decode and float conversion, in one go on a decode thread (one hop there and back, not
        two) or on the event loop (`_decode`):
        (float32 (S, S, 3) pixels or None, the Decoded result)."""
        result = self.decoder.decode_bytes(data, ENCODED_FORMATS)
        if result.error is not None:
            return None, result
        # The batch stage's own uint8 -> float conversion (elementwise, so one image at a time gives the same
        # bits as a batch), so the pixels equal effnet embed's bit for bit.
        return to_tensor([result.pixels]).permute(0, 2, 3, 1).numpy()[0], result

    def _wanted(self, parsed: Parsed) -> frozenset:
        """The outputs a request answers with: those it names (V2), else all (V1 answers with all, as TF Serving)."""
        wanted = frozenset(parsed.outputs or self.outputs)
        return (wanted | {"logits"}) if parsed.classification else wanted

    def _run(self, images: np.ndarray, wanted: frozenset) -> tuple[np.ndarray, np.ndarray | None]:
        """One engine call, on the engine thread (or on the event loop, batching.py): (N, H, W, 3) -> feature
        vectors and, when a request of the batch wants them, logits (None otherwise)."""
        features = self.engine_(_nchw(images))
        return features, self._logits(features, wanted)

    def _inline(self, images: np.ndarray) -> bool:
        """Run this batch on the event loop itself: a lone image, requests coming one at a time, a short call."""
        return len(images) == 1 and self.lone.alone and self.lone_call_seconds <= INLINE_CALL_MAX_SECONDS

    def _time_lone_call(self, size: int) -> float:
        """The faster of two lone-image engine calls (after the engine's own warm-up), in seconds."""
        image = np.zeros((1, size, size, 3), np.float32)
        times = []
        for _ in range(2):
            started = time.perf_counter()
            self._run(image, frozenset())
            times.append(time.perf_counter() - started)
        return min(times)

    def _run_async(self, images: np.ndarray, wanted: frozenset):
        """`_run` as an awaitable where the engine can run these images on its own threads (Engine.start), else
        None."""
        started = self.engine_.start(_nchw(images))
        return None if started is None else self._finish(asyncio.wrap_future(started), wanted)

    async def _finish(self, started: asyncio.Future, wanted: frozenset) -> tuple[np.ndarray, np.ndarray | None]:
        features = await started
        return features, self._logits(features, wanted)

    def _logits(self, features: np.ndarray, wanted: frozenset) -> np.ndarray | None:
        if self.classifier is None or "logits" not in wanted:
            return None
        with torch.inference_mode():
            return self.classifier(torch.from_numpy(np.ascontiguousarray(features))).numpy()


def _small_jpeg(data: bytes) -> bool:
    return len(data) <= INLINE_DECODE_MAX_BYTES and data[:3] == b"\xff\xd8\xff"


def _nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) -> an NCHW view in channels_last layout, as `effnet embed` passes its batches."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)

