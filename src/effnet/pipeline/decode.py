"""Decode stage: one image file -> uint8 RGB pixels at the model size, or an error string. Never raises.

What "decoded right" means here, in the order it happens:

1. **Bounded.** A zero-byte file, a file that is not an image, a truncated one and a decompression bomb each
   become an error string for that file. The bomb check reads only the header: `Image.open` parses the size
   (for PNG the IHDR chunk) without touching pixel data, and an image over `max_pixels` (Pillow's
   `MAX_IMAGE_PIXELS`, about 89.5 MP, by default) is refused before any pixel buffer is allocated. Pillow
   itself only *warns* between 1x and 2x that limit; here it is an error.
2. **Reduced-size JPEG decoding.** When the region that ends up at `size x size` is at least twice as large,
   libjpeg decodes it at 1/2, 1/4 or 1/8 scale in the DCT domain (`Image.draft`), which skips most of the
   inverse DCT and the full-size buffer. The scale is capped so that the region still has at least `size`
   pixels on each side: it never upsamples.
3. **EXIF orientation** (tag 274) is applied, so a portrait photo stored sideways comes out upright, and the
   reported width/height are the upright ones. (TensorFlow's `decode_jpeg` ignores EXIF: upstream evaluated on
   ImageNet, whose JPEGs carry no rotation.)
4. **To RGB**: grayscale, palette, CMYK, YCbCr, LAB → RGB via Pillow; 16-bit integer images are scaled to 8
   bits (x/257; Pillow's own `convert` would clip them at 255); images with alpha (RGBA, LA, palette with
   transparency) are composited over white, because the colour under fully transparent pixels is arbitrary
   (TF's `decode_png(channels=3)` drops alpha instead). ICC profiles are ignored, as upstream does.
   Animated GIF/WebP and multi-page TIFF give their first frame.
5. **Resize**, `resize="crop" | "pad" | "stretch"`, with the family's eval recipe from upstream:

   | family                              | crop (the reference)                       | resampling |
   |-------------------------------------|--------------------------------------------|------------|
   | efficientnet (B0-B7)                | centre square of side int(S/(S+32)*min(h,w)), offset ((h-c)+1)//2 | bicubic |
   | efficientnet_lite (Lite0-4)         | same crop                                  | bilinear   |
   | efficientnetv2 B0-B3                | same crop (V1 "legacy" eval)               | bicubic    |
   | efficientnetv2 S/M/L/XL             | that crop only when S < 320, else none; offset (h-c)//2 | bilinear |

   Sources: tensorflow/tpu `models/official/efficientnet/preprocessing.py` (`_decode_and_center_crop`,
   `CROP_PADDING = 32`, `tf.image.resize_bicubic`; a later revision replaced the constant by
   `CROP_FRACTION = 0.875`, i.e. padding round(S/7), which equals 32 only at 224 — the released B0-B7 and Lite
   checkpoints predate it, and timm's `crop_pct = S/(S+32)` agrees). tpu `main.py`: "lite or edgetpu use
   bilinear for easier post-quantization" (`resize_method = BILINEAR` for `efficientnet-lite*`). google/automl
   `efficientnetv2/preprocessing.py` `preprocess_for_eval` (crop iff `image_size < 320`, `tf.image.resize`,
   bilinear) and `effnetv2_configs.py` (B0-B3 train with `augname='effnetv1_autoaug'`, which routes to
   `preprocess_legacy.py`: the V1 crop and bicubic). Normalization is not here: the model does it.

   "pad" keeps the whole image: the longer side is scaled to S and the rest filled with black; "stretch" scales
   the whole image to S x S ignoring the aspect ratio (automl's V2 eval at S >= 320 *is* a stretch).

   Resampling is Pillow's, which antialiases when downscaling; TF's `resize_bicubic` / `resize(bilinear)` do
   not (and TF1's bicubic uses a = -0.75 and corner-aligned sampling). Pixels therefore differ from the TF
   pipeline by a few grey levels on large downscales; the recipe (crop box, filter family) is the same.

The output is uint8 HWC (S, S, 3): stacking N of them gives an NHWC buffer, which PyTorch views as an NCHW
tensor in channels_last layout with no copy. Conversion to float happens in the batch stage.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .sources import Item, is_url, open_url

# The bomb check below is ours and is an error; Pillow's warning for the same condition would only repeat it
# (and cannot be silenced per call without thread-unsafe `warnings.catch_warnings`).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

RESIZE_MODES = ("crop", "pad", "stretch")
CROP_PADDING = 32  # tpu preprocessing.py / automl preprocess_legacy.py: crop = S / (S + 32) of the short side
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as a browser or viewer would
PAD_COLOR = (0, 0, 0)  # "pad" mode: black bars (letterbox)
EXIF_ORIENTATION = 0x0112

# EXIF orientation -> the transpose that makes the image upright (None: already upright). 5-8 swap axes.
_ORIENTATION_TRANSPOSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class Recipe:
    """One family's eval resize: how much to crop, where the crop starts, which filter."""

    crop_padding: int  # crop side = S / (S + crop_padding) * short side
    crop_below: int | None  # crop only when S < crop_below (automl V2: 320); None: always crop
    offset_rounds_up: bool  # tpu: ((h - c) + 1) // 2; automl V2: (h - c) // 2
    resample: Image.Resampling

    def crops_at(self, size: int) -> bool:
        return self.crop_below is None or size < self.crop_below


_V1_EVAL = Recipe(CROP_PADDING, None, True, Image.Resampling.BICUBIC)
_LITE_EVAL = Recipe(CROP_PADDING, None, True, Image.Resampling.BILINEAR)
_V2_EVAL = Recipe(CROP_PADDING, 320, False, Image.Resampling.BILINEAR)

# family -> recipe; architectures whose training used another family's recipe are listed by name.
RECIPES = {"efficientnet": _V1_EVAL, "efficientnet_lite": _LITE_EVAL, "efficientnetv2": _V2_EVAL}
RECIPE_BY_NAME = {  # automl effnetv2_configs.py: B0-B3 use 'effnetv1_autoaug' -> preprocess_legacy (V1 eval)
    "efficientnetv2_b0": _V1_EVAL,
    "efficientnetv2_b1": _V1_EVAL,
    "efficientnetv2_b2": _V1_EVAL,
    "efficientnetv2_b3": _V1_EVAL,
}


def recipe_for(name: str, family: str) -> Recipe:
    """The eval recipe of an architecture (`spec.name`, `spec.family`)."""
    if name in RECIPE_BY_NAME:
        return RECIPE_BY_NAME[name]
    if family not in RECIPES:
        raise ValueError(f"no preprocessing recipe for family {family!r}; known: {sorted(RECIPES)}")
    return RECIPES[family]


@dataclass(frozen=True)
class Decoded:
    """The decode stage's result for one input: pixels or an error, and the upright original size."""

    pixels: np.ndarray | None  # uint8 (S, S, 3) RGB, C-contiguous; None when `error` is set
    width: int | None  # of the original image after EXIF orientation
    height: int | None
    error: str | None = None
    seconds: float = 0.0  # time spent decoding this input (summed by the runner)


class DecodeError(Exception):
    """A problem with one input file; its message becomes that row's `error`."""


@dataclass(frozen=True)
class Plan:
    """Where the pixels of an upright (w, h) image go: `box` is resized to `content` and pasted at `offset`."""

    box: tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels
    content: tuple[int, int]  # resized size of the box
    offset: tuple[int, int]  # top-left of the content on the S x S canvas


def plan(width: int, height: int, size: int, resize: str, recipe: Recipe) -> Plan:
    """The geometry of one resize mode (pure arithmetic; see the module docstring for the recipes)."""
    if resize == "crop" and recipe.crops_at(size):
        # tpu: padded_center_crop_size = int(S / (S + 32) * min(h, w)); at least 1 pixel for tiny images
        side = max(1, int(size / (size + recipe.crop_padding) * min(width, height)))
        extra = 1 if recipe.offset_rounds_up else 0
        left, top = (width - side + extra) // 2, (height - side + extra) // 2
        return Plan((left, top, left + side, top + side), (size, size), (0, 0))
    if resize in ("crop", "stretch"):  # automl V2 at S >= 320 resizes the whole image: a stretch
        return Plan((0, 0, width, height), (size, size), (0, 0))
    if resize == "pad":
        scale = size / max(width, height)
        content = (max(1, round(width * scale)), max(1, round(height * scale)))
        return Plan((0, 0, width, height), content, ((size - content[0]) // 2, (size - content[1]) // 2))
    raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")


@dataclass(frozen=True)
class Decoder:
    """The decode stage: `Decoder(size, recipe)(item) -> Decoded`. Picklable, so it runs in worker processes."""

    size: int
    recipe: Recipe = _V1_EVAL
    resize: str = "crop"
    max_pixels: int | None = None  # None: Pillow's Image.MAX_IMAGE_PIXELS at call time
    reduce_jpeg: bool = True  # decode large JPEGs at 1/2, 1/4, 1/8 scale (DCT domain) when that loses nothing

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if self.size < 1:
            raise ValueError(f"size must be a positive number of pixels, not {self.size}")

    def __call__(self, item: Item) -> Decoded:
        start = time.perf_counter()
        try:
            if item.error:
                raise DecodeError(item.error)
            if item.size == 0:
                raise DecodeError("empty file (0 bytes)")
            pixels, width, height = self._decode(item)
            return Decoded(pixels, width, height, None, time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - every failure of one file becomes its row's error
            return Decoded(None, None, None, describe(error), time.perf_counter() - start)

    def _decode(self, item: Item) -> tuple[np.ndarray, int, int]:
        source = io.BytesIO(open_url(item.path)) if is_url(item.path) else item.path
        with Image.open(source) as image:
            limit = Image.MAX_IMAGE_PIXELS if self.max_pixels is None else self.max_pixels
            if limit is not None and image.width * image.height > limit:
                raise DecodeError(_too_large(image.width, image.height, limit))
            orientation = _orientation(image)
            upright = (image.height, image.width) if orientation in _SWAPS_AXES else image.size
            if self.reduce_jpeg and image.format == "JPEG":
                self._draft(image, upright, orientation)
            image.load()  # the actual decode; truncated data raises OSError here
            pixels = self._resize(_upright(_to_rgb(image), orientation))
        return pixels, upright[0], upright[1]

    def _draft(self, image: Image.Image, upright: tuple[int, int], orientation: int) -> None:
        """Ask libjpeg for the smallest DCT scale that keeps at least `size` source pixels per output pixel."""
        where = plan(*upright, self.size, self.resize, self.recipe)
        box_w, box_h = where.box[2] - where.box[0], where.box[3] - where.box[1]
        max_scale = min(box_w / where.content[0], box_h / where.content[1])  # source px per output px
        if max_scale < 2:
            return
        # draft picks scale = min(W // want_w, H // want_h), rounded down to 8/4/2/1, so it is <= max_scale.
        want_w, want_h = math.ceil(image.width / max_scale), math.ceil(image.height / max_scale)
        image.draft("RGB", (want_w, want_h))

    def _resize(self, image: Image.Image) -> np.ndarray:
        # Planned again on the image actually decoded (it may be a 1/2..1/8 draft): the same recipe at that scale.
        where = plan(image.width, image.height, self.size, self.resize, self.recipe)
        content = image.resize(where.content, self.recipe.resample, box=where.box)
        if where.content != (self.size, self.size):
            canvas = Image.new("RGB", (self.size, self.size), PAD_COLOR)
            canvas.paste(content, where.offset)
            content = canvas
        return np.asarray(content)  # (S, S, 3) uint8, a fresh C-contiguous copy


def upright_rgb(image: Image.Image) -> Image.Image:
    """A loaded image as 8-bit RGB the right way up: the pipeline's colour and EXIF rules, at full size
    (what fine-tuning reads before augmenting)."""
    return _upright(_to_rgb(image), _orientation(image))


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not fail an otherwise good image
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE[orientation]
    return image if method is None else image.transpose(method)


_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # "I": Pillow's mode for 16-bit grayscale PNG


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the rules)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.float32)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F


def _too_large(width: int, height: int, limit: int) -> str:
    return (
        f"image too large: {width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
        "(a decompression-bomb guard; raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
    )


def describe(error: BaseException) -> str:
    """A one-line, user-facing description of why a file could not be decoded."""
    if isinstance(error, DecodeError):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large (a decompression-bomb guard): {error}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or corrupt header)"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, MemoryError):
        return "out of memory while decoding"
    message = str(error) or type(error).__name__
    if isinstance(error, OSError) and "truncated" in message:
        return f"truncated image data ({message})"
    if isinstance(error, (OSError, SyntaxError, ValueError, EOFError)):  # Pillow's corrupt-data errors
        return f"corrupt image data ({type(error).__name__}: {message})"
    return f"{type(error).__name__}: {message}"
