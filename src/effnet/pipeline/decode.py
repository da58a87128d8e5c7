"""Decode stage: one image file -> uint8 RGB pixels at the model size, or an error string. Never raises.

What "decoded right" means here, in the order it happens:

1. **Bounded.** A zero-byte file, a file that is not an image, a truncated one and a decompression bomb each
   become an error string for that file. The bomb check reads only the header: `Image.open` parses the size
   (for PNG the IHDR chunk) without touching pixel data, and an image over `max_pixels` (Pillow's
   `MAX_IMAGE_PIXELS`, about 89.5 MP, by default; `--max-pixels`) is refused before any pixel buffer is
   allocated. Pillow itself only *warns* between 1x and 2x that limit; here it is an error.
   **Decode memory is budgeted** (`decode_memory`, `--decode-memory`, 1 GiB by default): from the header (and the
   draft scale) each image's peak working memory is estimated (`decode_cost`: Pillow's buffers at 1, 2 or 4
   bytes per pixel, plus the RGB conversion and rotation copies), and an image is admitted only when it fits in
   what the workers of this process are not already using. Large images therefore decode one at a time, and
   one that could never fit is an error row naming the option. PNG, TIFF, WebP have no reduced-scale decode in
   Pillow, so admission is the only bound for them; JPEGs are costed at their draft scale.
   **No silent truncation.** libjpeg fills the blocks after the end of the entropy data with grey and only
   warns, and Pillow drops the warning, so a JPEG cut short and given a new end-of-image marker decodes
   "successfully". Two checks catch it (`_check_jpeg_data_length`, `_jpeg_data_ran_out`): the header's
   dimensions need at least 2 bits per 8x8 block (baseline; 1 for progressive), so a file too small for them
   is refused before decoding; and when the decoded image ends in libjpeg's exact grey fill, the file is
   decoded once more with filler bytes in place of its end marker: complete data never reads them, so any
   difference means the data ended before the pixels did. A progressive JPEG cut short keeps its first scans
   (every pixel, coarsely), so its scan headers must bring every coefficient to its last bit
   (`_check_progressive_scans`).
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

import contextlib
import dataclasses
import io
import math
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .sources import Item, is_url, open_url

# The bomb check below is ours and is an error; Pillow's warning for the same condition would only repeat it
# (and cannot be silenced per call without thread-unsafe `warnings.catch_warnings`).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

DEFAULT_DECODE_MEMORY = 1 << 30  # bytes of decode working memory per process, all workers together

# Pillow allocates large images in blocks of 16 MiB, below glibc's mmap threshold (which grows to 32 MiB), so a
# freed image stays in the decoding thread's malloc arena: 8 decodes of 9400x9400 RGBA PNGs on 4 threads, one at
# a time by the budget, peaked at 2.98 GB RSS, against 1.08 GB with 64 MiB blocks, which are always mmap-ed and
# go back to the OS when the image is freed; small images are allocated at their own size either way.
# PILLOW_BLOCK_SIZE, when set, is the user's choice.
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(64 << 20)

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
    warnings: tuple[str, ...] = ()  # what Pillow warned about while decoding this input (see `_capture_warnings`)


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
    decode_memory: int | None = DEFAULT_DECODE_MEMORY  # bytes shared by this process's decodes; None: unbounded

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if self.size < 1:
            raise ValueError(f"size must be a positive number of pixels, not {self.size}")

    def __call__(self, item: Item) -> Decoded:
        start = time.perf_counter()
        with _capture_warnings() as caught:
            try:
                if item.error:
                    raise DecodeError(item.error)
                if item.size == 0:
                    raise DecodeError("empty file (0 bytes)")
                pixels, width, height = self._decode(item)
                result = Decoded(pixels, width, height, None, time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001 - every failure of one file becomes its row's error
                result = Decoded(None, None, None, describe(error), time.perf_counter() - start)
        return dataclasses.replace(result, warnings=tuple(caught)) if caught else result

    def decode_bytes(self, data: bytes, formats: tuple[str, ...] | None = None) -> Decoded:
        """`__call__` for an image held in memory (a server request): the same rules and the same pixels as for
        that file. `formats`: the Pillow formats to accept (None: all), for untrusted input."""
        start = time.perf_counter()
        try:
            if not data:
                raise DecodeError("empty image (0 bytes)")
            pixels, width, height = self._decode_source(io.BytesIO(data), formats)
            return Decoded(pixels, width, height, None, time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - as __call__: the failure becomes this input's error
            return Decoded(None, None, None, describe(error), time.perf_counter() - start)

    def _decode(self, item: Item) -> tuple[np.ndarray, int, int]:
        source = io.BytesIO(open_url(item.path)) if is_url(item.path) else item.path
        return self._decode_source(source)

    def _decode_source(self, source, formats: tuple[str, ...] | None = None) -> tuple[np.ndarray, int, int]:
        with Image.open(source, formats=formats) as image:
            if image.width < 1 or image.height < 1:
                raise DecodeError(f"corrupt image: its header says {image.width}x{image.height} pixels")
            limit = Image.MAX_IMAGE_PIXELS if self.max_pixels is None else self.max_pixels
            if limit is not None and image.width * image.height > limit:
                raise DecodeError(_too_large(image.width, image.height, limit))
            orientation = _orientation(image, before_load=True)
            upright = (image.height, image.width) if orientation in _SWAPS_AXES else image.size
            draft_size = None
            is_jpeg = image.format in ("JPEG", "MPO")  # MPO: a camera's JPEG with extra pictures appended
            if is_jpeg:
                _check_jpeg_data_length(image, _byte_size(source))
                if image.info.get("progressive") or image.info.get("progression"):
                    _check_progressive_scans(source)
            if self.reduce_jpeg and image.format == "JPEG":
                draft_size = self._draft(image, upright, orientation)
            with self._admitted(decode_cost(image, orientation, self.size)):
                image.load()  # the actual decode; truncated data raises OSError here
                if not is_jpeg:  # a PNG's eXIf chunk may follow its pixels: Pillow reads it only now
                    orientation = _orientation(image)
                    upright = (image.height, image.width) if orientation in _SWAPS_AXES else image.size
                if is_jpeg and _jpeg_data_ran_out(image, source, draft_size):
                    raise DecodeError("truncated JPEG: the image data ends before its pixels do "
                                      "(the decoder would fill the missing part with grey)")
                pixels = self._resize(_upright(_to_rgb(image), orientation))
        return pixels, upright[0], upright[1]

    def _admitted(self, cost: int):
        """Wait until this image's decode fits in the process's decode-memory budget (see the module docstring)."""
        if self.decode_memory is None:
            return contextlib.nullcontext()
        if cost > self.decode_memory:
            raise DecodeError(
                f"image needs about {_mib(cost)} to decode, over the decode-memory budget of "
                f"{_mib(self.decode_memory)}; raise it with --decode-memory (decode_memory=) or lower --max-pixels")
        return _budget(self.decode_memory).admit(cost)

    def _draft(self, image: Image.Image, upright: tuple[int, int], orientation: int) -> None:
        """Ask libjpeg for the smallest DCT scale that keeps at least `size` source pixels per output pixel."""
        where = plan(*upright, self.size, self.resize, self.recipe)
        box_w, box_h = where.box[2] - where.box[0], where.box[3] - where.box[1]
        max_scale = min(box_w / where.content[0], box_h / where.content[1])  # source px per output px
        if max_scale < 2:
            return None
        # draft picks scale = min(W // want_w, H // want_h), rounded down to 8/4/2/1, so it is <= max_scale.
        want_w, want_h = math.ceil(image.width / max_scale), math.ceil(image.height / max_scale)
        image.draft("RGB", (want_w, want_h))
        return (want_w, want_h)

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


def _orientation(image: Image.Image, before_load: bool = False) -> int:
    if before_load and image.format == "PNG" and "exif" not in image.info:
        return 1  # PngImageFile.getexif() would decode the whole image to look for an eXIf chunk after it
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
        # paste with the alpha as mask: "over white" with one RGB canvas, not alpha_composite's three RGBA copies
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        canvas.paste(rgba, (0, 0), rgba)
        return canvas
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F


def _too_large(width: int, height: int, limit: int) -> str:
    return (
        f"image too large: {width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
        "(a decompression-bomb guard; raise it with --max-pixels (max_pixels=) to allow it)"
    )


def _mib(count: int) -> str:
    return f"{count / 2**20:,.0f} MiB"


# --- Decode-memory budget ------------------------------------------------------------------------------------

# Bytes per pixel of Pillow's image buffers: 1-byte modes, 16-bit modes, and 4 bytes for every other mode
# (Pillow stores RGB, RGBA, CMYK, YCbCr, LA, I and F in 32-bit pixels).
_ONE_BYTE_MODES = {"1", "L", "P"}
_TWO_BYTE_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def decode_cost(image: Image.Image, orientation: int = 1, size: int = 0) -> int:
    """Peak bytes of decoding `image` (opened, draft applied, not loaded) to RGB: the decoded buffer, the RGB
    conversion (16-bit: the float copies of `_to_rgb`), the EXIF rotation copy and the resize's intermediate."""
    pixels = image.width * image.height
    mode = image.mode
    stored = 1 if mode in _ONE_BYTE_MODES else 2 if mode in _TWO_BYTE_MODES else 4
    if mode == "RGB":
        convert = 0
    elif mode in _SIXTEEN_BIT_MODES:
        convert = 4 + 4 + 1 + 4  # float32 copy, rint's result, uint8 gray, RGB
    elif mode == "RGBA":
        convert = 4  # the RGB canvas
    else:
        convert = 4 + 4  # RGBA or RGB copy (+ canvas when it has alpha)
    rotate = 4 if orientation != 1 else 0
    resize = 4 * (image.height + size) * size  # horizontal pass (h x S), then S x S
    return pixels * (stored + convert + rotate) + resize


class DecodeBudget:
    """A semaphore counted in bytes: `with budget.admit(cost):` waits until `cost` fits beside the others."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def admit(self, cost: int):
        with self._changed:
            self._changed.wait_for(lambda: self.used + cost <= self.limit or self.used == 0)
            self.used += cost
        try:
            yield
        finally:
            with self._changed:
                self.used -= cost
                self._changed.notify_all()


_BUDGETS: dict[int, DecodeBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def _budget(limit: int) -> DecodeBudget:
    """The process's budget of that size, shared by every Decoder (and worker thread) that uses it."""
    with _BUDGETS_LOCK:
        return _BUDGETS.setdefault(limit, DecodeBudget(limit))


# --- Truncated JPEGs ------------------------------------------------------------------------------------------

_GREY_FILL = 128  # libjpeg's output for an all-zero block (no data): level shift 128, Cb = Cr = 128 -> grey
_FILLER = b"\x55" * 4096  # entropy-coded bits with no 0xFF byte, so no marker: libjpeg decodes them as data


def _byte_size(source) -> int | None:
    if isinstance(source, io.BytesIO):
        return len(source.getbuffer())
    try:
        return os.path.getsize(source)
    except (OSError, TypeError):
        return None


def _jpeg_blocks(image: Image.Image) -> int:
    """8x8 blocks the header's size needs, all components (from the SOF sampling factors Pillow parsed)."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    h_max = max(h for _, h, _, _ in layers)
    v_max = max(v for _, _, v, _ in layers)
    return sum(math.ceil(math.ceil(image.width * h / h_max) / 8) * math.ceil(math.ceil(image.height * v / v_max) / 8)
               for _, h, v, _ in layers)


def _check_jpeg_data_length(image: Image.Image, file_bytes: int | None) -> None:
    """Baseline Huffman coding spends at least 2 bits per block (a DC code and an end-of-block code, each at least
    1 bit); progressive at least 1 (the first DC scan; later scans can skip runs of blocks). A file smaller than
    that cannot hold the pixels its header claims."""
    if file_bytes is None:
        return
    bits_per_block = 1 if image.info.get("progressive") or image.info.get("progression") else 2
    needed = _jpeg_blocks(image) * bits_per_block // 8
    if file_bytes < needed:
        raise DecodeError(
            f"truncated or corrupt JPEG: its header says {image.width}x{image.height}, which needs at least "
            f"{needed:,} bytes of image data, but the file has {file_bytes:,}")


_MARKER_AFTER_DATA = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in entropy data: FF00 is a stuffed byte, D0-D7 RSTn


def _check_progressive_scans(source) -> None:
    """A progressive JPEG cut short keeps its first scans: every pixel is there, coarsely. Complete files bring
    every component's DC and AC coefficients 1..63 down to their last bit (Al = 0); walk the scan headers and
    refuse a file whose scans stop before that."""
    data = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
    final: dict[int, set[int]] = {}  # component id -> coefficient indices refined to their last bit
    components: list[int] = []
    position = 2  # after SOI
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return  # not where a marker should be: leave it to the decoder
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:  # EOI
            break
        length = int.from_bytes(data[position + 2:position + 4], "big")
        segment = data[position + 4:position + 2 + length]
        if marker in (0xC2, 0xC6, 0xCA) and len(segment) >= 6:  # progressive SOF: the components
            components = [segment[6 + 3 * i] for i in range(segment[5]) if 6 + 3 * i < len(segment)]
        position += 2 + length
        if marker == 0xDA and segment:  # SOS: then entropy-coded data up to the next real marker
            count = segment[0]
            if len(segment) < 1 + 2 * count + 3:
                return
            start, end, approximation = segment[1 + 2 * count], segment[2 + 2 * count], segment[3 + 2 * count]
            if approximation & 0x0F == 0:
                for component in segment[1:1 + 2 * count:2]:
                    final.setdefault(component, set()).update(range(start, end + 1))
            found = _MARKER_AFTER_DATA.search(data, position)
            position = found.start() if found else len(data)
    missing = [c for c in components if not final.get(c, set()) >= set(range(64))]
    if missing:
        raise DecodeError(f"truncated progressive JPEG: the scans that complete component(s) "
                          f"{', '.join(map(str, missing))} are missing (the image data ends early)")


def _jpeg_data_ran_out(image: Image.Image, source, draft_size) -> bool:
    """Whether libjpeg ran out of entropy-coded data and grey-filled the rest (see the module docstring)."""
    if image.mode not in ("RGB", "L"):  # CMYK (Adobe's inverted ink) has no single "no data" value
        return False
    # blocks are coded in raster order, so data that ends early always leaves the bottom-right pixel grey
    corner = image.crop((image.width - 1, image.height - 1, image.width, image.height))
    if not (np.asarray(corner) == _GREY_FILL).all():
        return False
    data = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
    end = data.rfind(b"\xff\xd9")
    if end < 0:
        return False
    with Image.open(io.BytesIO(data[:end] + _FILLER + data[end:])) as again:
        if draft_size is not None:
            again.draft("RGB", draft_size)
        try:
            again.load()
        except (OSError, SyntaxError, ValueError):
            return True
        return again.size != image.size or not np.array_equal(np.asarray(again), np.asarray(image))


# --- Pillow's warnings, onto the row of the image that caused them -------------------------------------------

_capturing = threading.local()
_PILLOW = re.compile(r"PIL\.")
_show_warning_elsewhere = warnings.showwarning


def _route_warning(message, category, filename, lineno, file=None, line=None):
    collected = getattr(_capturing, "warnings", None)
    if collected is not None:
        collected.append(f"{category.__name__}: {message}")
    else:
        _show_warning_elsewhere(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def _capture_warnings():
    """Warnings raised in this thread while decoding go to the row (`Decoded.warnings`), not to stderr, where they
    would tear the progress bar. Installed per call because `warnings.catch_warnings` elsewhere restores the hook
    and the filters."""
    if warnings.showwarning is not _route_warning:
        warnings.showwarning = _route_warning
    if not any(rule[0] == "always" and rule[3] == _PILLOW for rule in warnings.filters):
        # every warning, not only the first from each line of Pillow (Python's default) reaches its row
        warnings.filterwarnings("always", module=_PILLOW.pattern)
    collected: list[str] = []
    _capturing.warnings = collected
    try:
        yield collected
    finally:
        _capturing.warnings = None


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
