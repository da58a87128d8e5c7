"""effnet.search.dedup and image search on real photos: the near-duplicate corpus (tests/near_duplicates.py).

The corpus is embedded once per module with the real Lite0 weights, through `effnet embed`'s pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest

from effnet.embed import run
from effnet.errors import EffnetError
from effnet.search import DEFAULT_SIZE, DEFAULT_THRESHOLD, Index, dedup
from effnet.search.dedup import groups_of
from tests import near_duplicates


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, truth: path -> original name, embeddings.parquet) of the 40-file corpus."""
    folder = tmp_path_factory.mktemp("near_duplicates")
    truth = near_duplicates.write(folder / "images")
    embeddings = folder / "embeddings.parquet"
    run("embed", str(folder / "images"), "efficientnet_lite0", out=embeddings)
    return folder, truth, str(embeddings)


def precision_recall(groups, truth) -> tuple[float, float]:
    found = near_duplicates.pairs_of_groups(groups.column("path").to_pylist(), groups.column("group").to_pylist())
    return near_duplicates.precision_recall(found, near_duplicates.true_pairs(truth))


# The bar of issue 12: recall >= 0.95 at precision >= 0.98, at the default size and threshold (160 px, 0.70).
# Measured: 1.000 and 1.000 on both corpora, and from the 224-px vectors `effnet embed` writes (docs/search.md).

def test_dedup_of_images_precision_and_recall_at_the_defaults(corpus):
    folder, truth, _ = corpus
    groups = dedup(str(folder / "images"))
    precision, recall = precision_recall(groups, truth)
    assert (DEFAULT_SIZE, DEFAULT_THRESHOLD) == (160, 0.70)
    assert precision >= 0.98 and recall >= 0.95, (precision, recall)
    assert len(set(groups.column("group").to_pylist())) == len(near_duplicates.ORIGINALS)


def test_dedup_of_embed_output_at_its_native_size_meets_the_same_bar(corpus):
    _, truth, embeddings = corpus  # written by `effnet embed` at Lite0's native 224 px
    precision, recall = precision_recall(dedup([embeddings]), truth)
    assert precision >= 0.98 and recall >= 0.95, (precision, recall)


def test_dedup_precision_and_recall_on_the_wide_corpus(tmp_path):
    # 21 real photos of every kind the packages ship, textures that look alike among them: 147 files, 441 pairs
    truth = near_duplicates.write(tmp_path, near_duplicates.WIDE, ())
    groups = dedup(str(tmp_path))
    precision, recall = precision_recall(groups, truth)
    assert precision >= 0.98 and recall >= 0.95, (precision, recall)
    assert len(set(groups.column("group").to_pylist())) == len(near_duplicates.WIDE)


def test_each_group_suggests_the_largest_resolution_then_the_largest_file(corpus):
    _, truth, embeddings = corpus
    groups = dedup([embeddings]).to_pandas()
    for _, members in groups.groupby("group"):
        kept = members[members["keep"]]
        assert len(kept) == 1
        pixels = members["width"] * members["height"]
        best = members[pixels == pixels.max()]
        assert kept["path"].iloc[0] == best.sort_values("size_bytes", ascending=False)["path"].iloc[0]
        assert kept["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
        assert (members["similarity"] >= DEFAULT_THRESHOLD - 0.1).all()  # chained members may sit a bit below


def test_every_original_finds_its_copies_in_its_top_10_searching_with_the_image(corpus):
    folder, truth, embeddings = corpus
    index = Index.build([embeddings], folder / "index")
    originals = sorted(path for path in truth if path.endswith("__original.jpg"))
    results = index.search(originals, k=10).to_pandas()  # the images go through the pipeline again
    for original in originals:
        name = truth[original]
        copies = {path for path, of in truth.items() if of == name}
        top = set(results[results["query"] == original]["path"])
        assert copies <= top, (original, copies - top)
        best = results[(results["query"] == original) & (results["rank"] == 1)]
        assert best["path"].iloc[0] == original and best["score"].iloc[0] == pytest.approx(1.0, abs=1e-4)


def test_a_query_image_that_fails_to_decode_is_an_error_naming_it(corpus, tmp_path):
    folder, _, embeddings = corpus
    index = Index.build([embeddings], tmp_path / "index")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(EffnetError, match="broken.jpg"):
        index.search([str(broken)])


def test_dedup_of_images_lists_failed_inputs_as_error_rows(corpus, tmp_path):
    _, truth, _ = corpus
    originals = sorted(path for path in truth if truth[path] == "coffee")[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    groups = dedup([*originals, str(broken)]).to_pandas()
    assert set(groups[groups["group"].notna()]["path"]) == set(originals)
    failed = groups[groups["error"].notna()]
    assert list(failed["path"]) == [str(broken)] and failed["group"].isna().all()


def test_groups_join_through_shared_members_and_leave_singletons_out():
    # a - b - c chain (each link 0.95 similar, a-c only ~0.8) joins into one group; d is alone
    a = np.array([1.0, 0.0, 0.0, 0.0])
    b = np.array([0.95, np.sqrt(1 - 0.95**2), 0.0, 0.0])
    angle = 2 * np.arccos(0.95)
    c = np.array([np.cos(angle), np.sin(angle), 0.0, 0.0])
    d = np.array([0.0, 0.0, 0.0, 1.0])
    labels = groups_of(np.stack([a, b, c, d]).astype(np.float32), threshold=0.9)
    assert list(labels) == [0, 0, 0, -1]
    assert list(groups_of(np.stack([a, d]).astype(np.float32), threshold=0.9)) == [-1, -1]
