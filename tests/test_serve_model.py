"""EffnetModel's request path without a server: a request that waits past --timeout gets RequestTimeout (504)
and leaves the queue before it costs an engine call; V1 answers are shaped as TF Serving's; the classifier runs
only for requests that want logits."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

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
