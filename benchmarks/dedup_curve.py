"""The curves that chose `effnet dedup`'s default input size and threshold: docs/search_dedup_curve.png.

    python benchmarks/dedup_curve.py            # writes docs/search_dedup_curve.png and prints the tables

Both near-duplicate corpora of the tests (tests/near_duplicates.py: the small one, 5 photos x 7 versions + 5
distractors, and the wide one, 21 photos x 7 versions) are embedded with Lite0 through `effnet embed`'s pipeline
at each input size in SIZES (centre crop, as `effnet dedup` does). For each size and cosine threshold the groups of
`effnet.search.dedup.groups_of` are scored pairwise against the truth (precision: grouped pairs that are copies
of one original; recall: copy pairs that were grouped). Printed per size: the weakest copy pair, the closest
unrelated pair, and the band of thresholds that is perfect (precision = recall = 1) on both corpora. The size
with the widest band is the default, and the threshold sits inside its band.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ helpers: the near-duplicate corpora

from effnet.embed import run  # noqa: E402
from effnet.pipeline.sinks import embedding_matrix  # noqa: E402
from effnet.search import DEFAULT_SIZE, DEFAULT_THRESHOLD  # noqa: E402
from effnet.search.dedup import groups_of  # noqa: E402
from tests import near_duplicates  # noqa: E402

THRESHOLDS = np.round(np.arange(0.30, 1.0001, 0.01), 2)
SIZES = (96, 128, 160, 192, 224)
CORPORA = {"small": (near_duplicates.ORIGINALS, near_duplicates.DISTRACTORS), "wide": (near_duplicates.WIDE, ())}


def curve(paths: list[str], vectors: np.ndarray, true: set) -> np.ndarray:
    """(threshold, precision, recall) rows."""
    rows = []
    for threshold in THRESHOLDS:
        found = near_duplicates.pairs_of_groups(paths, list(groups_of(vectors, float(threshold))))
        rows.append((threshold, *near_duplicates.precision_recall(found, true)))
    return np.array(rows)


def extremes(paths: list[str], vectors: np.ndarray, true: set) -> tuple[float, float]:
    """Cosine of the weakest copy pair and of the closest unrelated pair."""
    normalized = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = normalized @ normalized.T
    upper = np.triu_indices(len(paths), 1)
    same = np.array([frozenset((paths[i], paths[j])) in true for i, j in zip(*upper)])
    return float(similarity[upper][same].min()), float(similarity[upper][~same].max())


def main() -> None:
    curves = {}  # (corpus, size) -> rows
    with tempfile.TemporaryDirectory() as folder:
        for corpus, (originals, distractors) in CORPORA.items():
            truth = near_duplicates.write(Path(folder) / corpus, originals, distractors)
            paths, true = sorted(truth), near_duplicates.true_pairs(truth)
            for size in SIZES:
                table = run("embed", paths, "efficientnet_lite0", size=size).result
                vectors = embedding_matrix(table, table.schema.field("embedding").type.list_size, np.float32)
                curves[corpus, size] = curve(paths, vectors, true)
                weakest, closest = extremes(paths, vectors, true)
                print(f"{corpus:>5} corpus, {size} px: {len(true)} copy pairs, weakest at cosine {weakest:.3f}; "
                      f"closest unrelated pair at {closest:.3f}", flush=True)

    print(f"\n{'size':>4}  thresholds perfect on both corpora   precision / recall at {DEFAULT_THRESHOLD} (small, wide)")
    for size in SIZES:
        perfect = np.logical_and.reduce([(curves[c, size][:, 1] == 1) & (curves[c, size][:, 2] == 1) for c in CORPORA])
        band = THRESHOLDS[perfect]
        at_default = [curves[c, size][np.isclose(THRESHOLDS, DEFAULT_THRESHOLD)][0, 1:] for c in CORPORA]
        print(f"{size:>4}  {f'{band.min():.2f} to {band.max():.2f}' if len(band) else 'none':<34} "
              + "   ".join(f"{p:.3f} / {r:.3f}" for p, r in at_default))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for corpus, style in (("wide", "-"), ("small", ":")):
        rows = curves[corpus, DEFAULT_SIZE]
        axes.plot(rows[:, 0], rows[:, 1], style, color="tab:blue", label=f"precision, {corpus} corpus")
        axes.plot(rows[:, 0], rows[:, 2], style, color="tab:orange", label=f"recall, {corpus} corpus")
    axes.axvline(DEFAULT_THRESHOLD, color="grey", linestyle="--", label=f"default {DEFAULT_THRESHOLD}")
    axes.set_xlabel(f"cosine threshold (Lite0 feature vectors at {DEFAULT_SIZE} px)")
    axes.set_ylim(0, 1.05)
    axes.set_title("effnet dedup: pairwise precision and recall")
    axes.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    out = ROOT / "docs" / "search_dedup_curve.png"
    figure.savefig(out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
