"""Settings chosen from the data when the user leaves them out: image size, crop area, epochs, learning rate.

The fixed defaults of the EfficientNet originals (an 8%-area random crop, a few epochs at one learning rate)
were set for ImageNet's photos. On a 28-pixel grayscale set an 8% crop keeps a 8 x 8 patch of a digit or a
shoe, and 4 epochs of 1,600 images are 200 optimizer steps from a zero head: the default fine-tune ended below
logistic regression on raw pixels. The rules here follow BiT's "HyperRule" (Kolesnikov et al. 2020, section
3.3: the schedule length from the data set's size, the resolution from the images' size), scaled to a CPU.

    shape = measure(train_set)                       # how many images, how large
    choices = choose(config, shape, native_size)     # {"epochs": Choice(12, "why ..."), ...} for each None
    settings = dataclasses.replace(config, **{name: c.value for name, c in choices.items()})

Every choice carries its reason; `run` prints them and writes them to report.json under "automatic".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data import LabelledImages

SAMPLED_IMAGES = 64  # image headers read to measure the resolution (seeded sample; headers only, no decode)
MIN_SIZE = 64  # below this Lite0's stride-32 feature map is 1 x 1
SIZE_STEP = 32  # EfficientNet's total stride: sizes on its multiples waste no padding

# Random-resized-crop floors by the images' short side. ImageNet's 0.08 assumes large photos whose object
# survives a small crop; small images are mostly one centred object (digits, clothing, CIFAR) that a small
# crop cuts to a stroke (the digits fine-tune of tests/test_finetune.py needs 0.5).
CROP_AREA_BY_SHORT_SIDE = ((64, 0.5), (160, 0.25))  # (short side up to, min crop area); larger: IMAGENET
IMAGENET_CROP_AREA = 0.08

# Schedule length: BiT trains 500 steps of 512 images on sets under 20k images. On a CPU with batches of 32,
# about 300 steps from the probe's head or a zero head; at least 3 epochs (one for warm-up, two to decay),
# at most 30 (tiny sets: more passes over the same images only overfit).
TARGET_STEPS = 300
EPOCH_RANGE = (3, 30)

# Peak rates start from the optimizer's fine-tuning rate (train.OPTIMIZER_DEFAULTS: adamw 1e-3, measured best
# from a zero head on 600 digits; sgd 5e-3, the hub tutorial's). LP-FT starts from a fitted head, so the
# backbone only needs to adapt, at a third of that (Kumar et al. 2022 fine-tune after the probe with a smaller
# rate). Sets under 1,000 images take the rate down by sqrt(n / 1000): fewer images, noisier gradients,
# easier to forget ImageNet.
LP_FT_LR_FACTOR = 1 / 3
SMALL_SET = 1000


@dataclass(frozen=True)
class DataShape:
    """What the automatic settings depend on."""

    train_images: int
    classes: int
    short_side: int  # median over a sample of the training images, in pixels
    long_side: int


@dataclass(frozen=True)
class Choice:
    value: object
    why: str

    def as_json(self) -> dict:
        return {"value": self.value, "why": self.why}


def measure(images: LabelledImages, seed: int = 0) -> DataShape:
    """The data set's size and its images' median resolution (a seeded sample of headers; unreadable files
    are skipped here, training reports them by name)."""
    rng = np.random.default_rng([seed, 0x517E])
    picked = rng.permutation(len(images))[:SAMPLED_IMAGES]
    sizes = []
    for index in picked:
        try:
            with Image.open(images.paths[index]) as image:
                sizes.append(sorted(image.size))
        except (OSError, ValueError, SyntaxError):
            continue
    short, long = (int(np.median([s[i] for s in sizes])) for i in (0, 1)) if sizes else (0, 0)
    return DataShape(len(images), len(images.classes), short, long)


def choose(config, shape: DataShape, native_size: int, base_lr: float) -> dict[str, Choice]:
    """A Choice for each of size, min_crop_area, epochs, lr that `config` leaves as None; `base_lr` is the
    optimizer's fine-tuning rate from a zero head."""
    choices: dict[str, Choice] = {}
    if config.size is None:
        choices["size"] = _size(shape, native_size)
    if config.mode == "linear-probe":
        return choices  # one full-batch solve on unaugmented images: no crops, epochs or learning rate
    if config.min_crop_area is None:
        choices["min_crop_area"] = _crop_area(shape)
    batch_size = config.batch_size * config.accumulate
    if config.epochs is None:
        choices["epochs"] = _epochs(shape, batch_size)
    if config.lr is None:
        choices["lr"] = _learning_rate(shape, config.mode, config.optimizer, base_lr)
    return choices


def _size(shape: DataShape, native_size: int) -> Choice:
    if shape.short_side >= native_size or shape.short_side == 0:
        return Choice(native_size, f"images' short side {shape.short_side} px >= the model's native "
                                   f"{native_size} px: train at the native size")
    size = max(MIN_SIZE, SIZE_STEP * math.ceil(shape.short_side / SIZE_STEP))
    return Choice(size, f"images' short side {shape.short_side} px < native {native_size} px: their own "
                        f"resolution rounded up to a multiple of {SIZE_STEP} (at least {MIN_SIZE}); upscaling "
                        "further adds no detail and costs (size/that)^2 the compute")


def _crop_area(shape: DataShape) -> Choice:
    for limit, area in CROP_AREA_BY_SHORT_SIDE:
        if shape.short_side <= limit:
            return Choice(area, f"images' short side {shape.short_side} px <= {limit}: small, centred "
                                f"objects that an ImageNet-sized crop ({IMAGENET_CROP_AREA}) would cut away")
    return Choice(IMAGENET_CROP_AREA, f"images' short side {shape.short_side} px: photos, ImageNet's crop floor")


def _epochs(shape: DataShape, batch_size: int) -> Choice:
    steps_per_epoch = max(1, shape.train_images // batch_size)
    low, high = EPOCH_RANGE
    epochs = min(high, max(low, math.ceil(TARGET_STEPS / steps_per_epoch)))
    return Choice(epochs, f"{shape.train_images} training images = {steps_per_epoch} steps of {batch_size} an "
                          f"epoch; about {TARGET_STEPS} steps, within {low}..{high} epochs")


def _learning_rate(shape: DataShape, mode: str, optimizer: str, base_lr: float) -> Choice:
    lr, why = base_lr, [f"{optimizer} {base_lr:g}"]
    if mode == "lp-ft":
        lr *= LP_FT_LR_FACTOR
        why.append(f"x {LP_FT_LR_FACTOR:.2g} after the probe (the head starts fitted)")
    if shape.train_images < SMALL_SET:
        factor = math.sqrt(shape.train_images / SMALL_SET)
        lr *= factor
        why.append(f"x sqrt({shape.train_images}/{SMALL_SET}) = {factor:.2f} for a small set")
    return Choice(float(f"{lr:.3g}"), "; ".join(why))


# A random horizontal flip doubles the data only where a mirror keeps the class (photos, faces, clothing); on
# digits, letters or arrows it makes new, wrong examples. lp-ft tests that before training with the probe it
# has just fitted: its validation accuracy on mirrored images. A weak test (Lite0's pooled features are nearly
# mirror-invariant: cosine 0.88-0.97 between a digit and its mirror image), so it only turns flip off on clear
# evidence: it did on the digits of benchmarks/transfer.py (lp-ft test accuracy 0.971 without flip, 0.929
# with), and did not on another split of the digits (0.911 plain and mirrored).
MIRROR_TOLERANCE = 0.05


def flip(probe_record: dict | None) -> Choice:
    """Whether to flip, from lp-ft's probe record (its "val_accuracy" and "mirrored_val_accuracy")."""
    if not probe_record or "mirrored_val_accuracy" not in probe_record:
        return Choice(True, "no probe on a validation split to test mirrored images: flip, as the originals")
    plain, mirrored = probe_record["val_accuracy"], probe_record["mirrored_val_accuracy"]
    keeps_class = mirrored >= plain - MIRROR_TOLERANCE
    verdict = "a mirror keeps the class: flip" if keeps_class else "a mirror changes the class: no flip"
    return Choice(keeps_class, f"the probe's validation accuracy {plain:.3f} on the images, {mirrored:.3f} on their "
                               f"mirror images: {verdict} (tolerance {MIRROR_TOLERANCE})")
