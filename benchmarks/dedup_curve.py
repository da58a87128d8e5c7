"""The precision/recall curve that chose `effnet dedup`'s default threshold: docs/search_dedup_curve.png.

    python benchmarks/dedup_curve.py            # writes docs/search_dedup_curve.png and prints the table

The near-duplicate corpus of the tests (tests/near_duplicates.py: 5 real photos x 7 versions + 5 distractors) is
embedded with Lite0 through `effnet embed`'s pipeline; for each cosine threshold the groups of
`effnet.search.dedup.groups_of` are scored pairwise against the truth (precision: grouped pairs that are copies of
one original; recall: copy pairs that were grouped). Also printed: the weakest copy pair and the closest unrelated
pair, which bound the range of thresholds that is perfect on this corpus.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ helpers: the near-duplicate corpus

import effnet  # noqa: E402
from effnet.search import DEFAULT_THRESHOLD  # noqa: E402
from effnet.search.dedup import groups_of  # noqa: E402
from tests import near_duplicates  # noqa: E402

THRESHOLDS = np.round(np.arange(0.30, 1.0001, 0.01), 2)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        truth = near_duplicates.write(folder)
        paths = sorted(truth)
        vectors = effnet.embed(paths)
    true = near_duplicates.true_pairs(truth)
    curve = []
    for threshold in THRESHOLDS:
        found = near_duplicates.pairs_of_groups(paths, list(groups_of(vectors, float(threshold))))
        curve.append((threshold, *near_duplicates.precision_recall(found, true)))

    normalized = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = normalized @ normalized.T
    upper = np.triu_indices(len(paths), 1)
    same = np.array([frozenset((paths[i], paths[j])) in true for i, j in zip(*upper)])
    weakest, closest = similarity[upper][same].min(), similarity[upper][~same].max()
    print(f"copy pairs: {same.sum()}, weakest at cosine {weakest:.3f}; unrelated pairs: {(~same).sum()}, "
          f"closest at {closest:.3f}")
    print(f"{'threshold':>9} {'precision':>9} {'recall':>7}")
    for threshold, precision, recall in curve:
        if round(threshold * 100) % 5 == 0:
            print(f"{threshold:>9.2f} {precision:>9.3f} {recall:>7.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    axes.plot(THRESHOLDS, [c[1] for c in curve], label="precision (pairs)")
    axes.plot(THRESHOLDS, [c[2] for c in curve], label="recall (pairs)")
    axes.axvline(DEFAULT_THRESHOLD, color="grey", linestyle="--", label=f"default {DEFAULT_THRESHOLD}")
    axes.axvspan(closest, weakest, color="green", alpha=0.08, label="perfect on this corpus")
    axes.set_xlabel("cosine threshold (Lite0 feature vectors)")
    axes.set_ylim(0, 1.05)
    axes.set_title("effnet dedup on the near-duplicate corpus (40 files)")
    axes.legend(loc="lower left")
    figure.tight_layout()
    out = ROOT / "docs" / "search_dedup_curve.png"
    figure.savefig(out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
