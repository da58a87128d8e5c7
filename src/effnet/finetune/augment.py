"""Training augmentation as the EfficientNet originals fine-tune with: random resized crop, horizontal flip, and
optionally RandAugment. Every random choice comes from the numpy Generator passed in, so an image's
augmentation is a function of the seed it is given (the trainer derives it from (seed, epoch, index)).

Upstream: tensorflow/tpu `models/official/efficientnet/preprocessing.py` (`preprocess_for_train`:
`_decode_and_random_crop` -> `_flip` -> optional `autoaugment.distort_image_with_randaugment`) and
`autoaugment.py` (the RandAugment op list and magnitude-to-argument rules); google/automl
`efficientnetv2/autoaugment.py` is the same code.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ..pipeline.decode import Recipe, plan

# tpu preprocessing.py `distorted_bounding_box_crop`: area_range=(0.08, 1.0), aspect_ratio_range=(3/4, 4/3),
# max_attempts=10, then the eval centre crop as the fallback. (TF's sampler also asks the box to cover 10% of
# the image, `min_object_covered=0.1`; here the area fraction is drawn directly, as torchvision does.)
MIN_CROP_AREA = 0.08
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, recipe: Recipe,
                        min_area: float = MIN_CROP_AREA) -> Image.Image:
    """A random box of min_area..100% of the image with aspect ratio 3/4..4/3, resized to size x size."""
    width, height = image.size
    log_low, log_high = math.log(ASPECT_RATIO_RANGE[0]), math.log(ASPECT_RATIO_RANGE[1])
    for _ in range(CROP_ATTEMPTS):
        area = width * height * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(log_low, log_high))  # width / height, log-uniform
        box_width, box_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            left = int(rng.integers(0, width - box_width + 1))
            top = int(rng.integers(0, height - box_height + 1))
            return image.resize((size, size), recipe.resample, box=(left, top, left + box_width, top + box_height))
    where = plan(width, height, size, "crop", recipe)  # no box fitted: the family's eval centre crop
    return image.resize(where.content, recipe.resample, box=where.box)


def horizontal_flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirror left-right with probability 1/2 (tpu `_flip`)."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


# ---------------------------------------------------------------------------------------------- RandAugment
# tpu autoaugment.py: _MAX_LEVEL = 10; geometric ops fill with grey 128 (`replace_value = [128] * 3`) and sample
# with nearest neighbour; translate_const = 100 and cutout_const = 40 pixels for 224-pixel images. Those two
# are scaled here with the image size (100/224 and 40/224 of it), so a small image is not pushed out of frame.
MAX_LEVEL = 10
FILL = (128, 128, 128)
TRANSLATE_FRACTION = 100 / 224
CUTOUT_FRACTION = 40 / 224


def _signed(value: float, rng: np.random.Generator) -> float:
    """tpu `_randomly_negate_tensor`: flip the sign with probability 1/2."""
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    # PIL's AFFINE maps each output pixel to an input pixel, as tf contrib `transform` does.
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.NEAREST, fillcolor=FILL)


def _enhance(enhancer):
    # tpu `_enhance_level_to_arg`: factor = level/10 * 1.8 + 0.1 (1.0 is the identity)
    return lambda image, level, rng: enhancer(image).enhance(level / MAX_LEVEL * 1.8 + 0.1)


def _solarize_add(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """tpu `solarize_add`: add level/10 * 110 to the pixels below 128."""
    pixels = np.asarray(image).astype(np.int16)
    added = np.clip(pixels + int(level / MAX_LEVEL * 110), 0, 255)
    return Image.fromarray(np.where(pixels < 128, added, pixels).astype(np.uint8))


def _cutout(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """tpu `cutout`: a grey square of side 2 * pad, centred at a uniform random pixel, clipped to the image."""
    pad = int(level / MAX_LEVEL * CUTOUT_FRACTION * min(image.size))
    pixels = np.array(image)
    y, x = int(rng.integers(0, image.height)), int(rng.integers(0, image.width))
    pixels[max(0, y - pad):y + pad, max(0, x - pad):x + pad] = FILL
    return Image.fromarray(pixels)


# name -> op(image, level, rng); `level` is the magnitude, 0..10. The order is tpu's `available_ops`.
RANDAUGMENT_OPS = {
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Invert": lambda image, level, rng: ImageOps.invert(image),
    "Rotate": lambda image, level, rng: image.rotate(  # up to 30 degrees either way
        _signed(level / MAX_LEVEL * 30, rng), Image.Resampling.NEAREST, fillcolor=FILL),
    # tpu keeps int(level/10 * 4) bits: a larger magnitude distorts LESS here (upstream's quirk, kept)
    "Posterize": lambda image, level, rng: ImageOps.posterize(image, int(level / MAX_LEVEL * 4)),
    "Solarize": lambda image, level, rng: ImageOps.solarize(image, int(level / MAX_LEVEL * 256)),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda image, level, rng: _affine(image, (1, _signed(level / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda image, level, rng: _affine(image, (1, 0, 0, _signed(level / MAX_LEVEL * 0.3, rng), 1, 0)),
    "TranslateX": lambda image, level, rng: _affine(
        image, (1, 0, _signed(level / MAX_LEVEL * TRANSLATE_FRACTION * image.width, rng), 0, 1, 0)),
    "TranslateY": lambda image, level, rng: _affine(
        image, (1, 0, 0, 0, 1, _signed(level / MAX_LEVEL * TRANSLATE_FRACTION * image.height, rng))),
    "Cutout": _cutout,
    "SolarizeAdd": _solarize_add,
}


def rand_augment(image: Image.Image, rng: np.random.Generator, layers: int, magnitude: float) -> Image.Image:
    """tpu `distort_image_with_randaugment`: `layers` times, one op drawn uniformly, applied at `magnitude`.

    (Upstream draws a probability per op but never uses it: every drawn op is applied, as here.)
    """
    names = list(RANDAUGMENT_OPS)
    for _ in range(layers):
        image = RANDAUGMENT_OPS[names[int(rng.integers(len(names)))]](image, magnitude, rng)
    return image
