"""The model API: hub outputs, multi-scale endpoints, any input size, training-only randomness."""

import copy

import pytest
import torch

import effnet

from .conftest import random_batch


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnet_lite0", "efficientnetv2_b0"])
@pytest.mark.parametrize("height,width", [(224, 224), (97, 131), (33, 65)])
def test_outputs_at_any_size(name, height, width):
    model = effnet.create(name, num_classes=10).eval()
    x = random_batch(2, height, width)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, -(-height // 32), -(-width // 32))
        assert model(x).shape == (2, 10)
        assert model.feature_vector(x).shape == (2, model.spec.feature_dim)
        endpoints = model.endpoints(x)
    assert sorted(endpoints) == [2, 4, 8, 16, 32]
    for info in model.feature_info:
        tensor = endpoints[info.reduction]
        assert tensor.shape == (2, info.channels, -(-height // info.reduction), -(-width // info.reduction))


def test_feature_vector_module_returns_features():
    model = effnet.create("efficientnet_b0", num_classes=0).eval()
    assert model.classifier is None and model.spec.output == "features"
    with torch.no_grad():
        assert model(random_batch(1, 64, 64)).shape == (1, 1280)


def test_dropout_and_drop_path_only_in_training():
    model = effnet.create("efficientnet_b0").eval()
    x = random_batch(2, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: deterministic
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
    assert not torch.allclose(a, b)  # training: dropout / drop path sample


def test_batch_norm_is_tf_convention():
    model = effnet.create("efficientnetv2_s")
    bn = model.stem.bn
    assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.1)  # automl bn_momentum 0.9
    assert effnet.create("efficientnet_b0").stem.bn.momentum == pytest.approx(0.01)  # TF 0.99


def test_batch_independence():
    """An image's output does not depend on what else is in the batch (eval mode)."""
    model = effnet.create("efficientnet_lite0").eval()
    x = random_batch(3, 96, 80)
    with torch.no_grad():
        together = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_unknown_name_suggests():
    with pytest.raises(effnet.UnknownModelError, match="efficientnet_b2"):
        effnet.create("efficientnet-b2")


def test_save_and_load_roundtrip(tmp_path):
    model = effnet.create("efficientnet_lite0", num_classes=3).eval()
    model.labels = ["a", "b", "c"]
    effnet.save(model, tmp_path / "m")
    again = effnet.load(tmp_path / "m")
    assert again.spec == model.spec and again.labels == ["a", "b", "c"]
    x = random_batch(1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_list_models_shows_the_hub_catalogue():
    handles = effnet.list_models("hub")
    assert len(handles) == 88
    assert "google/imagenet/efficientnet_v2_imagenet21k_ft1k_m/feature_vector/2" in handles
    assert "tensorflow/efficientnet/b6/feature-vector/1" in handles
