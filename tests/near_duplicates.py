"""The near-duplicate corpus: real photos, their edited copies and distractors, written to a folder.

Used by tests/test_search_dedup.py (precision/recall at the default threshold), benchmarks/search.py (effnet
dedup vs imagededup's PHash) and benchmarks/dedup_curve.py (the curves that chose the default size and threshold).

The small corpus (`write(folder)`): scikit-image's astronaut, coffee, rocket and chelsea, and scikit-learn's china,
scaled so the longer side is 320 px (small, so the tests stay fast). Each gets COPIES: resized to 50 %, JPEG
quality 30, cropped to the central 90 %, brightness +20 % and -20 %, and a 10-px black border. Distractors, in no
group: other real photos shipped by the same packages (camera, coins, hubble_deep_field, immunohistochemistry,
sklearn's flower). 35 + 5 = 40 files.

The wide corpus (`write(folder, WIDE, ())`): every real photo in PHOTOS (21, from scikit-image, scikit-learn,
matplotlib and PyWavelets: people, animals, objects, scenes, microscopy, astronomy, grey-level textures such as
grass and gravel that look alike) with the same copies: 147 files, 441 copy pairs, each original a distractor for
the others. The truth is the file name's prefix: `<original>__<edit>.jpg` (`distractor__<name>.jpg`: none).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LONG_SIDE = 320
ORIGINALS = ("astronaut", "coffee", "rocket", "chelsea", "china")
DISTRACTORS = ("camera", "coins", "hubble_deep_field", "immunohistochemistry", "flower")
# name -> (package, how to get its pixels); every one ships with its package, nothing is downloaded
PHOTOS = {
    **{name: ("skimage", name) for name in (
        "astronaut", "coffee", "rocket", "chelsea", "camera", "coins", "hubble_deep_field", "immunohistochemistry",
        "retina", "moon", "brick", "grass", "gravel", "cell", "clock")},
    "stereo_motorcycle": ("skimage", "stereo_motorcycle"),  # the left view
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
    "ascent": ("pywt", "ascent"),
    "aero": ("pywt", "aero"),
}
WIDE = tuple(PHOTOS)
COPIES = {
    "half": lambda image: image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR),
    "jpeg30": None,  # the original re-saved at quality 30 (see `write`)
    "crop90": lambda image: image.crop(_central(image, 0.9)),
    "brighter": lambda image: ImageEnhance.Brightness(image).enhance(1.2),
    "darker": lambda image: ImageEnhance.Brightness(image).enhance(0.8),
    "border10": lambda image: ImageOps.expand(image, border=10, fill=(0, 0, 0)),
}


def _central(image: Image.Image, fraction: float) -> tuple[int, int, int, int]:
    width, height = round(image.width * fraction), round(image.height * fraction)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return left, top, left + width, top + height


def photo(name: str, long_side: int = LONG_SIDE) -> Image.Image:
    """A named photo of PHOTOS, RGB, scaled so that its longer side is `long_side`."""
    package, item = PHOTOS[name]
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        pixels = load_sample_image(item)
    elif package == "matplotlib":
        from matplotlib import cbook

        pixels = Image.open(cbook.get_sample_data(item))
    elif package == "pywt":
        import pywt.data

        pixels = getattr(pywt.data, item)()
    else:
        import skimage.data

        pixels = getattr(skimage.data, item)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # stereo_motorcycle: (left, right, disparity)
    image = Image.fromarray(np.asarray(pixels).astype(np.uint8)).convert("RGB")
    scale = long_side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)


def write(folder: str | Path, originals: tuple[str, ...] = ORIGINALS,
          distractors: tuple[str, ...] = DISTRACTORS) -> dict[str, str]:
    """Write a corpus into `folder`; returns file path -> its original's name ("" for distractors).

    The defaults write the small corpus; `write(folder, WIDE, ())` the wide one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name in originals:
        original = photo(name)
        path = folder / f"{name}__original.jpg"
        original.save(path, quality=95)
        truth[str(path)] = name
        for edit, change in COPIES.items():
            path = folder / f"{name}__{edit}.jpg"
            if change is None:
                original.save(path, quality=30)
            else:
                change(original).save(path, quality=95)
            truth[str(path)] = name
    for name in distractors:
        path = folder / f"distractor__{name}.jpg"
        photo(name).save(path, quality=95)
        truth[str(path)] = ""
    return truth


def true_pairs(truth: dict[str, str]) -> set[frozenset[str]]:
    """Every pair of files that are copies of the same original."""
    return {frozenset((a, b)) for a, b in combinations(sorted(truth), 2) if truth[a] and truth[a] == truth[b]}


def pairs_of_groups(paths: list[str], groups: list[int | None]) -> set[frozenset[str]]:
    """Every pair of files put in the same group."""
    members: dict[int, list[str]] = {}
    for path, group in zip(paths, groups):
        if group is not None and group >= 0:
            members.setdefault(group, []).append(path)
    return {frozenset(pair) for files in members.values() for pair in combinations(sorted(files), 2)}


def precision_recall(found: set, truth: set) -> tuple[float, float]:
    """Pairwise precision and recall (precision is 1 when nothing was found)."""
    hits = len(found & truth)
    return (hits / len(found) if found else 1.0), (hits / len(truth) if truth else 1.0)
