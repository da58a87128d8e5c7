"""The whole pipeline on the hostile corpus with the real EfficientNet-Lite0: bad input never changes good rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effnet
from effnet.embed import classify, embed, run
from effnet.errors import EffnetError
from effnet.engines.torch_engines import TorchEngine
from effnet.pipeline import Batcher, Decoder, MemorySink, EmbeddingColumns, Runner, Sources, recipe_for
from effnet.pipeline.batch import to_tensor

from .test_pipeline_corpus import BAD, GOOD, build_corpus


@pytest.fixture(scope="module")
def model():
    return effnet.load("efficientnet_lite0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def hostile(corpus, model):
    """The corpus with good and bad files interleaved, embedded in one run."""
    order = [name for pair in zip(GOOD, list(BAD) * 4) for name in pair]
    order = list(dict.fromkeys(order + GOOD))
    table = embed([str(corpus[name]) for name in order], model, errors="keep", as_table=True, batch_size=4)
    return order, table


def test_every_input_has_exactly_one_row_in_input_order(corpus, hostile):
    order, table = hostile
    assert table.column("path").to_pylist() == [str(corpus[name]) for name in order]


def test_errors_name_the_problem(hostile):
    order, table = hostile
    errors = dict(zip(order, table.column("error").to_pylist()))
    for name, word in BAD.items():
        assert word in errors[name]
    assert all(errors[name] is None for name in GOOD)


def test_good_images_embed_the_same_with_or_without_bad_neighbours(corpus, model, hostile):
    order, table = hostile
    alone = embed([str(corpus[name]) for name in GOOD], model, batch_size=4)
    mixed = np.stack([table.column("embedding")[order.index(name)].values.to_numpy() for name in GOOD])
    assert alone.shape == (len(GOOD), 1280)
    np.testing.assert_allclose(mixed, alone, rtol=0, atol=1e-6)


def test_rows_do_not_depend_on_workers_executor_or_batch_size(corpus, model):
    sources = [str(corpus[name]) for name in ("chelsea.jpg", "rotated.jpg", "gray16.png", "coffee.png", "rgba.png")]
    threads = embed(sources, model, batch_size=2, workers=2)
    inline = embed(sources, model, batch_size=5, workers=0)
    np.testing.assert_allclose(threads, inline, rtol=0, atol=1e-5)  # batch size changes oneDNN's blocking only
    processes = run("embed", sources[:2], model, batch_size=2, workers=1, executor="process").result
    np.testing.assert_array_equal(threads[:2], np.stack([r.values.to_numpy() for r in processes.column("embedding")]))


def test_embedding_equals_the_model_on_the_decoded_pixels(corpus, model):
    decoder = Decoder(224, recipe_for("efficientnet_lite0", "efficientnet_lite"))
    from effnet.pipeline.sources import Item

    pixels = decoder(Item(str(corpus["chelsea.jpg"]))).pixels
    with torch.no_grad():
        expected = model.eval().feature_vector(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255)
    np.testing.assert_allclose(embed(str(corpus["chelsea.jpg"]), model)[0], expected[0].numpy(), atol=1e-4)


def test_classify_finds_the_cat_and_the_coffee(corpus, model):
    table = classify([str(corpus["chelsea.jpg"]), str(corpus["coffee.png"])], model, top_k=3)
    labels = table.column("labels").to_pylist()
    assert "cat" in " ".join(labels[0]).lower() and "espresso" in labels[1]
    scores = table.column("scores").to_pylist()
    assert all(a >= b for row in scores for a, b in zip(row, row[1:]))


def test_library_raises_on_failures_unless_asked_not_to(corpus, model):
    with pytest.raises(EffnetError, match="1 of 2 inputs could not be read: .*empty.jpg: empty file"):
        embed([str(corpus["chelsea.jpg"]), str(corpus["empty.jpg"])], model)
    vectors = embed([str(corpus["chelsea.jpg"]), str(corpus["empty.jpg"])], model, errors="keep")
    assert np.isnan(vectors[1]).all() and not np.isnan(vectors[0]).any()


def test_runner_records_time_per_stage(corpus, model):
    sink = MemorySink(EmbeddingColumns(1280), {})
    report = Runner(Sources([str(corpus["chelsea.jpg"])]), Decoder(224), Batcher(), TorchEngine(model, signature="features"), sink,
                    progress=False)()
    assert {"source", "decode", "batch", "engine", "sink"} <= set(report.stages)
    assert all(seconds >= 0 for seconds in report.stages.values()) and report.stages["engine"] > 0


def test_batch_stage_gives_channels_last_float_in_unit_range():
    pixels = [np.full((4, 4, 3), value, np.uint8) for value in (0, 255)]
    images = to_tensor(pixels)
    assert images.shape == (2, 3, 4, 4) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert images[0].max() == 0 and images[1].min() == 1
