"""Class names for the hub classifiers' outputs: ImageNet-1k (with and without "background") and ImageNet-21k.

The lists are bundled data (src/effnet/data/*.txt, one `<synset id>\\t<WordNet lemmas>` per line), copied from
timm 1.0.31's `timm/data/_info/` (Apache-2.0): `imagenet_synsets.txt` (the standard ILSVRC-2012 order),
`imagenet21k_goog_synsets.txt` (Google's 21843-class order) and `imagenet_synset_to_lemma.txt`.

Which list a head uses (shared/research/hub-catalogue.md §2, weights-formats.md §3.2):
- V1 and Lite classifiers: 1000 outputs, index 0 = tench (`imagenet1k`).
- V2 `imagenet1k_*` classifiers: 1001 outputs, index 0 = background (`imagenet1k_background`), the layout of
  TensorFlow's `ImageNetLabels.txt`.
- V2 `imagenet21k_*` classifiers: 21843 outputs in Google's order (`imagenet21k`): fall11's 21841 synsets plus
  n03931044 and n09859684. It is not automl's `imagenet21k_labels.txt`, which has 21842 lines and shifts every
  index after 9205; `n03931765` (picture frame) is 9206 here and 9205 there.

A readable name is the first WordNet lemma ("tench", "Egyptian cat"), as in TensorFlow's `ImageNetLabels.txt`.
Some names repeat (1k has two "crane" and two "maillot"); use the synset ids where you need unique keys.
"""

from __future__ import annotations

import functools
from pathlib import Path

from effnet.errors import UnknownModelError

BACKGROUND = "background"
_DATA = Path(__file__).parent / "data"  # shipped as package data (pyproject: effnet = ["data/*"])


@functools.cache
def _read(file_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(synset ids, lemma strings) of a bundled list; lines starting with '#' are provenance notes."""
    text = (_DATA / file_name).read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(synset for synset, _ in rows), tuple(lemmas for _, lemmas in rows)


def _first_lemma(lemmas: str) -> str:
    return lemmas.split(", ", 1)[0]


def synsets_1k() -> list[str]:
    """The 1000 ILSVRC-2012 WordNet ids in output order (n01440764 = tench first)."""
    return list(_read("imagenet1k_labels.txt")[0])


def synsets_21k() -> list[str]:
    """The 21843 WordNet ids of Google's ImageNet-21k in output order."""
    return list(_read("imagenet21k_labels.txt")[0])


def imagenet1k() -> list[str]:
    """1000 readable names in output order: "tench", "goldfish", "great white shark", ..."""
    return [_first_lemma(lemmas) for lemmas in _read("imagenet1k_labels.txt")[1]]


def imagenet1k_with_background() -> list[str]:
    """1001 names: "background" at index 0, then the 1000 classes (the V2 imagenet1k heads)."""
    return [BACKGROUND, *imagenet1k()]


def imagenet21k() -> list[str]:
    """21843 readable names in Google's ImageNet-21k order (the V2 imagenet21k heads)."""
    return [_first_lemma(lemmas) for lemmas in _read("imagenet21k_labels.txt")[1]]


@functools.cache
def _lemmas_by_synset() -> dict[str, str]:
    # The 21k list covers every 1k synset but one, n04399382 (teddy bear), which fall11 lacks.
    table = dict(zip(*_read("imagenet21k_labels.txt")))
    table.update(zip(*_read("imagenet1k_labels.txt")))
    return table


def lemmas(synset: str) -> str:
    """Every WordNet lemma of a synset id, comma-separated: "n02124075" -> "Egyptian cat"."""
    try:
        return _lemmas_by_synset()[synset]
    except KeyError:
        raise UnknownModelError(
            f"{synset!r} is not a synset id in effnet's ImageNet-1k or ImageNet-21k lists "
            "(ids look like 'n01440764'; see effnet.labels.synsets_1k() / synsets_21k())."
        ) from None


LABEL_LISTS = {
    "imagenet1k": imagenet1k,
    "imagenet1k_background": imagenet1k_with_background,
    "imagenet21k": imagenet21k,
}


def for_catalogue(labels_name: str | None) -> list[str]:
    """The names for a catalogue record's `labels` field ('imagenet1k', 'imagenet1k_background', 'imagenet21k')."""
    if labels_name is None:
        raise UnknownModelError(
            "This module has no class labels: it is a feature-vector module (record.labels is None). "
            "Use its classification handle to get class scores."
        )
    try:
        return LABEL_LISTS[labels_name]()
    except KeyError:
        raise UnknownModelError(
            f"No label list named {labels_name!r}; known: {', '.join(LABEL_LISTS)}."
        ) from None
