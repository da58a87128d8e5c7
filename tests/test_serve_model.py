"""EffnetModel's request path without a server: a request that waits past --timeout gets RequestTimeout (504)
and leaves the queue before it costs an engine call; V1 answers are shaped as TF Serving's; the classifier runs
only for requests that want logits; requests that come one at a time run their engine call and (small JPEGs)
their decode on the event loop itself, anything else off it."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import torch

from effnet.pipeline.decode import Decoder, recipe_for
from effnet.serve.batching import Batcher
from effnet.serve.inputs import Image, Parsed
from effnet.serve.model import EffnetModel, RequestTimeout, ServeSettings


def test_a_request_past_its_timeout_gets_504_and_never_runs():
    gate, calls = threading.Event(), []

    def engine(images, wanted):
        gate.wait(10)
        calls.append(len(images))
        return np.zeros((len(images), 2), np.float32), None

    async def main():
        model = EffnetModel("m", None, ServeSettings(timeout=0.2))
        model.batcher = Batcher(engine, max_batch_images=1, max_delay=0.0, max_queue_images=10)
        busy = asyncio.ensure_future(model.batcher.submit(np.zeros((1, 2, 2, 3), np.float32)))  # holds the engine
        await asyncio.sleep(0.05)
        parsed = Parsed([Image("instances[0]", pixels=np.zeros((2, 2, 3), np.float32))], "v1-rows")
        with pytest.raises(RequestTimeout, match="--timeout"):
            await model.predict(parsed)
        gate.set()
        await busy
        await asyncio.sleep(0.05)
        model.batcher.close()

    asyncio.run(main())
    assert calls == [1]  # only the request that held the engine ran


def test_v1_answers_are_shaped_as_tf_servings():
    model = EffnetModel("m", None)
    model.classifier = object()  # a classification module: two outputs
    features, logits = np.ones((2, 3), np.float32), np.zeros((2, 4), np.float32)

    def answer(protocol):
        return asyncio.run(model.postprocess((Parsed([], protocol), features, logits)))

    rows = answer("v1-rows")["predictions"]
    assert len(rows) == 2 and rows[0]["feature_vector"] == [1.0] * 3 and rows[0]["logits"] == [0.0] * 4
    assert answer("v1-columns")["outputs"]["logits"] == logits.tolist()
    model.classifier = None  # a feature-vector module: one output, a plain list per image (TF Serving's rule)
    assert asyncio.run(model.postprocess((Parsed([], "v1-rows"), features, None))) == {"predictions": features.tolist()}


def test_logits_are_computed_only_for_batches_that_ask_for_them():
    model = EffnetModel("m", None)
    model.engine_ = lambda batch: np.ones((len(batch), 3), np.float32)  # (N, 3, H, W) -> features
    model.classifier = torch.nn.Linear(3, 4)  # a classification module: feature_vector and logits
    images = np.zeros((2, 5, 5, 3), np.float32)
    assert model._run(images, frozenset({"feature_vector"}))[1] is None
    features, logits = model._run(images, frozenset({"feature_vector", "logits"}))
    assert features.shape == (2, 3) and logits.shape == (2, 4)

    def wanted(protocol, outputs=None, classification=None):
        return model._wanted(Parsed([], protocol, classification=classification, outputs=outputs))

    assert wanted("v1-rows") == {"feature_vector", "logits"}  # TF Serving answers with every output
    assert wanted("v2") == {"feature_vector", "logits"}  # no outputs named: all of them
    assert wanted("v2", ["feature_vector"]) == {"feature_vector"}
    assert wanted("v2", ["logits"], classification=3) == {"logits"}


class ThreadRecordingEngine:
    """features = ones; records the thread of each call. No asynchronous call of its own (start -> None)."""

    def __init__(self):
        self.threads = []

    def __call__(self, batch):
        self.threads.append(threading.get_ident())
        return np.ones((len(batch), 3), np.float32)

    def start(self, batch):
        return None


def _model_with(engine, lone_call_seconds: float) -> EffnetModel:
    """A model wired as load() wires it, around a stand-in engine."""
    model = EffnetModel("m", None)
    model.engine_ = engine
    model.lone_call_seconds = lone_call_seconds
    model.batcher = Batcher(model._run, run_async=model._run_async, inline=model._inline, max_batch_images=8,
                            max_delay=0.0, max_queue_images=100)
    return model


async def _request(model: EffnetModel):
    parsed = await model.preprocess({"instances": [np.full((4, 4, 3), 0.5).tolist()]})
    return await model.predict(parsed)


def test_requests_one_at_a_time_run_inline_until_a_second_client_comes():
    engine = ThreadRecordingEngine()

    async def main():
        model = _model_with(engine, lone_call_seconds=0.001)
        loop_thread = threading.get_ident()
        for _ in range(20):
            await _request(model)
        off_loop = [number for number, thread in enumerate(engine.threads, 1) if thread != loop_thread]
        before = len(engine.threads)
        model.lone.arrived()  # a second client's request, still being read or decoded
        await _request(model)  # finds it in flight: off the loop, and the streak starts again
        model.lone.left()
        await _request(model)
        model.batcher.close()
        return off_loop, [thread != loop_thread for thread in engine.threads[before:]]

    off_loop, after_a_second_client = asyncio.run(main())
    assert off_loop == [1, 2, 3, 16]  # the streak builds up over 3 requests; the 16th is a probe
    assert after_a_second_client == [True, True]


def test_a_slow_lone_call_never_runs_inline():
    engine = ThreadRecordingEngine()

    async def main():
        model = _model_with(engine, lone_call_seconds=1.0)  # past INLINE_CALL_MAX_SECONDS: the loop would stall
        for _ in range(8):
            await _request(model)
        model.batcher.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert loop_thread not in engine.threads


def test_a_lone_small_jpeg_is_decoded_on_the_loop_when_the_model_is_idle_and_in_the_pool_otherwise():
    from PIL import Image as PILImage
    jpeg, png = io.BytesIO(), io.BytesIO()
    picture = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    picture.save(jpeg, "JPEG")
    picture.save(png, "PNG")
    threads = []

    async def main():
        model = _model_with(ThreadRecordingEngine(), lone_call_seconds=0.001)
        model.decoder = Decoder(32, recipe_for("efficientnet_lite0", "efficientnet_lite"), "crop")
        decode_one = model._decode_one
        model._decode_one = lambda data: (threads.append(threading.get_ident()), decode_one(data))[1]

        async def decode(data):
            images = [Image("images[0]", encoded=data)]
            await model._decode(images)
            assert images[0].pixels.shape == (32, 32, 3)

        await decode(jpeg.getvalue())  # idle: on the loop
        await decode(png.getvalue())  # a PNG's decode time does not follow its size: the pool
        model.batcher._running = True  # an engine call under way: the loop stays free for it
        await decode(jpeg.getvalue())
        model.batcher.close()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert [thread == loop_thread for thread in threads] == [True, False, False]


def test_openvinos_own_call_answers_a_lone_image_as_the_blocking_call_does(lite0):
    """With OpenVINO, a lone image off the loop goes through the engine's asynchronous call (no engine thread):
    the same features as `_run`, logits when asked; a batch of two has no such call and takes the engine thread."""
    model = EffnetModel("lite", lite0, ServeSettings(engine="openvino", max_batch_images=4))
    model.load()
    assert model.lone_call_seconds < 1.0  # timed at load
    images = np.random.default_rng(0).random((2, 224, 224, 3), dtype=np.float32)
    wanted = frozenset({"feature_vector", "logits"})

    async def main():
        return await model._run_async(images[:1], wanted), model._run_async(images, wanted)

    (features, logits), for_two = asyncio.run(main())
    reference_features, reference_logits = model._run(images[:1], wanted)
    np.testing.assert_allclose(features, reference_features, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert for_two is None
    model.stop()
