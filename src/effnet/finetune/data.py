"""Labelled images for fine-tuning: where they are, which class each is, the split, and the pixels of a batch.

A data set is a folder with one subfolder per class (`DATA/<class>/**/*.jpg`; classes in sorted order), or a
CSV manifest with a header and the columns `path,label` (relative paths are relative to the manifest's folder;
classes in sorted order). Pixels come out as uint8 (N, S, S, 3) batches:

- training images: decoded, upright, RGB (the rules of `pipeline.decode`), then `augment`ed with a numpy
  Generator seeded by (seed, epoch, index): an image's crop does not depend on which batch or thread
  decoded it, so a resumed run sees the same pixels as an uninterrupted one;
- evaluation images: `pipeline.decode.Decoder`, the same eval crop and filter `effnet classify` uses, so the
  validation accuracy is what classify will see.
"""

from __future__ import annotations

import csv
import math
import os
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import EffnetError
from ..pipeline.decode import Decoder, Recipe, upright_rgb
from ..pipeline.sources import IMAGE_EXTENSIONS, Item
from . import augment

MANIFEST_COLUMNS = ("path", "label")


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with class indices into `classes`."""

    paths: tuple[str, ...]
    targets: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        return LabelledImages(tuple(self.paths[i] for i in indices), tuple(self.targets[i] for i in indices),
                              self.classes)

    def counts(self) -> list[int]:
        """Images per class, in class order."""
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes)).tolist()


def read_labelled(source: str | os.PathLike) -> LabelledImages:
    """A class-per-subfolder folder or a `path,label` CSV manifest (see the module docstring)."""
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_manifest(path)
    if not path.exists():
        raise EffnetError(f"{source}: no such folder or file; give a folder with one subfolder per class "
                          "or a CSV manifest with the columns path,label")
    raise EffnetError(f"{source}: not a folder or a .csv manifest; give a folder with one subfolder per class "
                      "or a CSV manifest with the columns path,label")


def _read_folder(folder: Path) -> LabelledImages:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, targets = [], []
    for index, name in enumerate(classes):
        found = 0
        for root, dirs, files in os.walk(folder / name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in place: os.walk descends in this order
            for file in sorted(files):
                if not file.startswith(".") and os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                    paths.append(os.path.join(root, file))
                    targets.append(index)
                    found += 1
        if not found:
            raise EffnetError(f"{folder / name}: class folder without images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                              "add images or remove the folder")
    if len(classes) < 2:
        raise EffnetError(f"{folder}: found {len(classes)} class folder(s); a classifier needs at least 2 "
                          "subfolders, one per class, each with its images")
    return LabelledImages(tuple(paths), tuple(targets), tuple(classes))


def _read_manifest(manifest: Path) -> LabelledImages:
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise EffnetError(f"{manifest}: no column {', '.join(missing)} in the header "
                              f"(columns: {', '.join(reader.fieldnames or [])}); the manifest needs path,label")
        rows = [(row["path"].strip(), row["label"].strip()) for row in reader if (row["path"] or "").strip()]
    classes = sorted({label for _, label in rows})
    if len(classes) < 2:
        raise EffnetError(f"{manifest}: {len(classes)} distinct label(s); a classifier needs at least 2")
    index = {name: i for i, name in enumerate(classes)}
    paths = tuple(p if os.path.isabs(p) else os.path.join(manifest.parent, p) for p, _ in rows)
    return LabelledImages(paths, tuple(index[label] for _, label in rows), tuple(classes))


def stratified_split(images: LabelledImages, val_fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """(train, val): from each class, round(val_fraction * its count) images, drawn with `seed`, go to val.

    Every class with 2 images or more keeps at least one in each part.
    """
    rng = np.random.default_rng([seed, 0x5EED])  # its own stream: the split does not shift with other draws
    targets = np.asarray(images.targets)
    train, val = [], []
    for target in range(len(images.classes)):
        members = np.flatnonzero(targets == target)
        members = members[rng.permutation(len(members))]
        take = int(round(val_fraction * len(members)))
        if val_fraction > 0 and len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        val.extend(members[:take].tolist())
        train.extend(members[take:].tolist())
    return images.subset(sorted(train)), images.subset(sorted(val))


def with_classes(images: LabelledImages, classes: Sequence[str], name: str) -> LabelledImages:
    """`images` relabelled to `classes` (the training classes); an unknown class is an error."""
    unknown = sorted(set(images.classes) - set(classes))
    if unknown:
        raise EffnetError(f"{name} has classes the training data lacks: {', '.join(unknown[:10])}; "
                          "the validation classes must be a subset of the training classes")
    index = {c: i for i, c in enumerate(classes)}
    return LabelledImages(images.paths, tuple(index[images.classes[t]] for t in images.targets), tuple(classes))


# ---------------------------------------------------------------------------------------------------- pixels
@dataclass(frozen=True)
class Augmentation:
    """What the training decoder does to each image (see `augment`)."""

    size: int
    recipe: Recipe  # the family's resampling filter, and its eval crop as the crop fallback
    min_crop_area: float = augment.MIN_CROP_AREA
    randaugment_layers: int = 0  # 0: no RandAugment
    randaugment_magnitude: float = 9.0
    flip: bool = True

    def __call__(self, path: str, rng: np.random.Generator) -> np.ndarray:
        image = _open_rgb(path, self.smallest_source_side())
        image = augment.random_resized_crop(image, self.size, rng, self.recipe, self.min_crop_area)
        if self.flip:
            image = augment.horizontal_flip(image, rng)
        if self.randaugment_layers:
            image = augment.rand_augment(image, rng, self.randaugment_layers, self.randaugment_magnitude)
        return np.asarray(image)  # (S, S, 3) uint8

    def smallest_source_side(self) -> int:
        """The short side an image needs so that even the smallest crop is not upscaled: size / sqrt(area)."""
        return math.ceil(self.size / math.sqrt(self.min_crop_area))


def _open_rgb(path: str, short_side: int) -> Image.Image:
    """Decoded, upright RGB. A JPEG larger than needed is decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT
    (`Image.draft`, as `pipeline.decode` does for evaluation), keeping a short side >= `short_side`: a 12-MP
    photo trained at 224 px with 8% crops decodes at 1/2 scale, a quarter of the pixels (decode was most of
    an epoch's data time for such photos)."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (short_side, short_side))
            image.load()
            return upright_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise EffnetError(f"{path}: cannot read this training image ({error}); fix or remove it") from error


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation stream of image `index` in `epoch`: independent of batching, threads and resume."""
    return np.random.default_rng([seed, epoch, index])


def training_batch(images: LabelledImages, indices: Sequence[int], augmentation: Augmentation, seed: int,
                   epoch: int, executor: Executor) -> tuple[np.ndarray, np.ndarray]:
    """Augmented pixels (N, S, S, 3) uint8 and targets (N,) int64 of `indices`."""
    pixels = list(executor.map(lambda i: augmentation(images.paths[i], sample_rng(seed, epoch, i)), indices))
    return np.stack(pixels), np.asarray([images.targets[i] for i in indices], dtype=np.int64)


def evaluation_batch(images: LabelledImages, indices: Sequence[int], decoder: Decoder,
                     executor: Executor) -> tuple[np.ndarray, np.ndarray]:
    """Eval-preprocessed pixels (N, S, S, 3) uint8 and targets (N,) int64 of `indices`."""
    decoded = list(executor.map(lambda i: decoder(Item(images.paths[i])), indices))
    for i, result in zip(indices, decoded):
        if result.error:
            raise EffnetError(f"{images.paths[i]}: cannot read this image ({result.error}); fix or remove it")
    return np.stack([d.pixels for d in decoded]), np.asarray([images.targets[i] for i in indices], dtype=np.int64)
