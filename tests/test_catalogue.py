"""Contract tests over every catalogue record, and find() on every handle/URL form."""

import re
import urllib.parse

import pytest

from effnet import catalogue, labels
from effnet.catalogue import CATALOGUE, find, list_modules
from effnet.errors import UnknownModelError

RECORDS = list(CATALOGUE.values())
ids = [r.handle for r in RECORDS]

# Pooled feature width per architecture, from the papers' round_filters(1280 * width) (and Lite's fixed head).
FEATURE_DIM = {
    **dict(zip((f"efficientnet_b{i}" for i in range(8)), (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560))),
    **{f"efficientnet_lite{i}": 1280 for i in range(5)},
    "efficientnetv2_b0": 1280, "efficientnetv2_b1": 1280, "efficientnetv2_b2": 1408, "efficientnetv2_b3": 1536,
    "efficientnetv2_s": 1280, "efficientnetv2_m": 1280, "efficientnetv2_l": 1280, "efficientnetv2_xl": 1280,
}
NUM_CLASSES = {None: 0, "imagenet1k": 1000, "imagenet1k_background": 1001, "imagenet21k": 21843}
SEEDS = (
    "google/imagenet/efficientnet_v2_imagenet21k_ft1k_m/feature_vector/1",
    "tensorflow/efficientnet/b6/feature-vector/1",
    "google/efficientnet/b2/classification/1",
)


def test_counts():
    assert len(CATALOGUE) == len(list_modules()) == 88
    prefixes = [r.handle.split("/")[0] + "/" + r.handle.split("/")[1] for r in RECORDS]
    assert prefixes.count("google/efficientnet") == 16
    assert prefixes.count("google/imagenet") == 46
    assert sum(1 for r in RECORDS if r.architecture.startswith("efficientnet_lite")) == 10
    assert sum(1 for r in RECORDS if r.name_scheme == "model_garden") == 16


def test_keys_and_handles_unique():
    assert len({r.key for r in RECORDS}) == 88
    assert len({r.unversioned_handle for r in RECORDS}) == 88
    assert all(CATALOGUE[handle].handle == handle for handle in CATALOGUE)


@pytest.mark.parametrize("record", RECORDS, ids=ids)
def test_record_fields_consistent(record):
    assert record.pretraining in catalogue.PRETRAININGS
    assert record.signature in catalogue.SIGNATURES
    assert record.output in catalogue.OUTPUTS
    assert record.labels in (*catalogue.LABELS, None)
    assert record.normalization in catalogue.NORMALIZATIONS
    assert record.format in catalogue.FORMATS
    assert record.name_scheme in catalogue.NAME_SCHEMES
    assert record.feature_dim == FEATURE_DIM[record.architecture]
    assert record.num_classes == NUM_CLASSES[record.labels]
    # a feature-vector module has no head; a classifier has one and a label list of the same length
    if record.signature == "feature_vector":
        assert (record.output, record.num_classes, record.labels) == ("features", 0, None)
    else:
        assert record.output in ("logits", "probabilities")
        assert len(labels.for_catalogue(record.labels)) == record.num_classes
    # only Model Garden's export ends in softmax
    assert (record.output == "probabilities") == (record.name_scheme == "model_garden" and record.num_classes > 0)
    # the key is architecture.tag.signature
    assert record.key.startswith(record.architecture + ".") and record.key.endswith("." + record.signature)
    # V2 hub modules fix the input size; V1 and Lite are flexible
    assert record.fixed_size == record.architecture.startswith("efficientnetv2")
    assert (record.format == "hub_tf1") == (record.name_scheme == "tpu")
    assert record.version == record.versions[-1]
    assert record.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", record.sha256)


@pytest.mark.parametrize("record", RECORDS, ids=ids)
def test_urls_well_formed(record):
    assert record.urls
    for url in (*record.urls, record.tfhub_url, record.kaggle_url, *(s.url for s in record.other_sources)):
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "https" and parts.netloc and " " not in url, url
    assert any(record.handle in url for url in record.urls)
    assert any(record.kaggle_path in url for url in record.urls)
    for source in record.other_sources:
        assert source.format in catalogue.SOURCE_FORMATS
        assert source.md5 is None or re.fullmatch(r"[0-9a-f]{32}", source.md5)


@pytest.mark.parametrize("record", RECORDS, ids=ids)
def test_matches_architecture_table(record):
    """Metadata tested against the model it describes (STYLE 18): head width and native size."""
    architectures = pytest.importorskip("effnet.architectures")
    if not hasattr(architectures, "architecture"):
        pytest.skip("effnet.architectures has no architecture() yet")
    arch = architectures.architecture(record.architecture)
    assert arch.head_channels == record.feature_dim
    assert arch.scaling.native_size == record.native_size


def test_normalization_names_exist_in_tf_compat():
    tf_compat = pytest.importorskip("effnet.tf_compat")
    assert set(catalogue.NORMALIZATIONS) <= set(tf_compat.NORMALIZATIONS)


def test_artifact_facts_over_cards():
    """The corrections of hub-catalogue.md §2 footnotes, pinned."""
    assert find("google/imagenet/efficientnet_v2_imagenet1k_b2/feature_vector/2").feature_dim == 1408
    assert find("google/imagenet/efficientnet_v2_imagenet21k_b3/feature_vector/2").feature_dim == 1536
    v2_1k = find("google/imagenet/efficientnet_v2_imagenet1k_s/classification/2")
    assert (v2_1k.num_classes, v2_1k.labels) == (1001, "imagenet1k_background")
    assert find("google/imagenet/efficientnet_v2_imagenet21k_m/classification/2").num_classes == 21843
    assert find("google/imagenet/efficientnet_v2_imagenet21k_ft1k_l/classification/2").num_classes == 1000
    assert find("tensorflow/efficientnet/b0/classification/1").output == "probabilities"
    assert find("google/efficientnet/b0/classification/1").output == "logits"
    assert find("tensorflow/efficientnet/lite0/classification/2").normalization == "lite_127_128"
    assert find("google/imagenet/efficientnet_v2_imagenet21k_ft1k_m/feature_vector/2").native_size == 480


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_modules(seed):
    record = find(seed)
    assert record.handle == seed
    assert record.urls[1] == f"https://tfhub.dev/{seed}?tf-hub-format=compressed"


@pytest.mark.parametrize("record", RECORDS, ids=ids)
def test_find_round_trips(record):
    assert find(record.handle) is record
    assert find(record.unversioned_handle) is record
    assert find(record.key) is record
    assert find(record.tfhub_url) is record
    assert find(record.kaggle_url) is record
    for url in record.urls:
        assert find(url) is record, url


def test_find_url_forms():
    b6 = "tensorflow/efficientnet/b6/feature-vector/1"
    forms = [
        f"https://tfhub.dev/{b6}",
        f"http://tfhub.dev/{b6}/",
        f"https://tfhub.dev/{b6}?tf-hub-format=compressed",
        f"https://hub.tensorflow.google.cn/{b6}",
        f"https://storage.googleapis.com/tfhub-modules/{b6}.tar.gz",
        "https://www.kaggle.com/models/tensorflow/efficientnet/tensorFlow2/b6-feature-vector/1",
        "https://www.kaggle.com/models/tensorflow/efficientnet/TensorFlow2/b6-feature-vector/1",
        "https://www.kaggle.com/models/tensorflow/efficientnet/frameworks/TensorFlow2/variations/b6-feature-vector"
        "/versions/1",
        "https://www.kaggle.com/api/v1/models/tensorflow/efficientnet/tensorFlow2/b6-feature-vector/1/download",
        "efficientnet_b6.aa_in1k_tf2.feature_vector",
        "  tensorflow/efficientnet/b6/feature-vector  ",
    ]
    for form in forms:
        assert find(form).handle == b6, form


def test_find_older_version_gives_that_version():
    record = find("https://tfhub.dev/google/imagenet/efficientnet_v2_imagenet21k_ft1k_m/feature_vector/1")
    assert record.handle.endswith("/feature_vector/1") and record.version == 1
    assert record.kaggle_version == 1
    assert all("/1" in url for url in record.urls)
    assert record.key == "efficientnetv2_m.in21k_ft_in1k.feature_vector"
    lite3_v1 = "tensorflow/efficientnet/lite3/classification/1"
    assert find(lite3_v1).handle == lite3_v1


def test_kaggle_renumbered_versions():
    # tfhub.dev only had /2 of these; Kaggle numbers them /1 (hub-catalogue.md §2 ◊)
    xl = find("https://www.kaggle.com/models/google/efficientnet-v2/TensorFlow2/imagenet21k-xl-classification/1")
    assert xl.handle == "google/imagenet/efficientnet_v2_imagenet21k_xl/classification/2"
    assert xl.kaggle_version == 1
    b3 = find("https://www.kaggle.com/models/google/efficientnet-v2/tensorFlow2/imagenet21k-b3-feature-vector/1")
    assert b3.handle == "google/imagenet/efficientnet_v2_imagenet21k_b3/feature_vector/2"
    # handles with v1 and v2 on tfhub.dev keep their numbers
    m = find("https://www.kaggle.com/models/google/efficientnet-v2/tensorFlow2/imagenet21k-ft1k-m-feature-vector/2")
    assert m.handle == "google/imagenet/efficientnet_v2_imagenet21k_ft1k_m/feature_vector/2"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownModelError) as info:
        find("google/efficientnet/b9/classification/1")
    assert "Did you mean" in str(info.value)
    assert "google/efficientnet/b7/classification/1" in str(info.value)
    with pytest.raises(UnknownModelError) as info:
        find("efficientnetv2_m.in21k_ft_in1k")
    assert "efficientnetv2_m.in21k_ft_in1k.feature_vector" in str(info.value)
    with pytest.raises(KeyError):  # UnknownModelError is also a KeyError
        find("https://example.com/resnet50/1")


def test_unknown_versions_are_errors():
    with pytest.raises(UnknownModelError, match="published versions: 1"):
        find("google/efficientnet/b0/feature-vector/3")
    with pytest.raises(UnknownModelError, match="known versions"):
        find("https://www.kaggle.com/models/google/efficientnet/tensorFlow1/b0-feature-vector/7")
