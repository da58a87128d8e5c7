"""The bundled ImageNet-1k / 21k label lists: lengths, order, and the Google 21k layout."""

import pytest

from effnet import labels
from effnet.errors import UnknownModelError


def test_lengths():
    assert len(labels.imagenet1k()) == len(labels.synsets_1k()) == 1000
    assert len(labels.imagenet1k_with_background()) == 1001
    assert len(labels.imagenet21k()) == len(labels.synsets_21k()) == 21843


def test_imagenet1k_order():
    names = labels.imagenet1k()
    assert names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[285] == "Egyptian cat"
    assert names[999] == "toilet tissue"
    assert labels.synsets_1k()[0] == "n01440764"
    assert labels.synsets_1k()[285] == "n02124075"
    assert len(set(labels.synsets_1k())) == 1000


def test_background_first():
    with_background = labels.imagenet1k_with_background()
    assert with_background[0] == "background"
    assert with_background[1:] == labels.imagenet1k()


def test_imagenet21k_google_order():
    synsets = labels.synsets_21k()
    assert len(set(synsets)) == 21843
    # the index that tells Google's list (9206) from automl's imagenet21k_labels.txt (9205)
    assert synsets[9206] == "n03931765"
    assert labels.imagenet21k()[9206] == "picture frame"
    # the two synsets Google's ImageNet-21k has beyond fall11's 21841
    assert "n03931044" in synsets and "n09859684" in synsets


def test_1k_synsets_within_21k():
    # every 1k class is a 21k class except teddy bear, which fall11 (and so Google's 21k) lacks
    assert set(labels.synsets_1k()) - set(labels.synsets_21k()) == {"n04399382"}


def test_lemmas_and_for_catalogue():
    assert labels.lemmas("n01440764") == "tench, Tinca tinca"
    assert labels.lemmas("n04399382") == "teddy, teddy bear"
    assert labels.for_catalogue("imagenet1k") == labels.imagenet1k()
    assert len(labels.for_catalogue("imagenet1k_background")) == 1001
    assert len(labels.for_catalogue("imagenet21k")) == 21843
    with pytest.raises(UnknownModelError, match="feature-vector"):
        labels.for_catalogue(None)
    with pytest.raises(UnknownModelError, match="known: imagenet1k"):
        labels.for_catalogue("imagenet22k")
    with pytest.raises(UnknownModelError):
        labels.lemmas("n00000000")


def test_lists_are_copies():
    names = labels.imagenet1k()
    names[0] = "changed"
    assert labels.imagenet1k()[0] == "tench"
