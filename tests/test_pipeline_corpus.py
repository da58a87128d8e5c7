"""The hostile corpus the pipeline tests share: real photos plus every kind of bad or awkward file.

`build_corpus(folder)` writes it and returns {name: path}; `GOOD` and `BAD` say which names must decode. The
tests in this file only check that the corpus is what it claims to be (e.g. that the bomb really claims
30000x30000), so a failure elsewhere is about the pipeline, not the fixture.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

PHOTOS = {"chelsea": "jpg", "coffee": "png", "astronaut": "jpg", "rocket": "png"}
GOOD = [
    "chelsea.jpg", "coffee.png", "astronaut.jpg", "rocket.png", "cmyk.jpg", "gray16.png", "rgba.png",
    "rotated.jpg", "tiny.png", "palette.gif", "photo.webp", "photo.bmp", "photo.tiff",
]
BAD = {  # name -> a word the error must contain
    "truncated.jpg": "truncated",
    "empty.jpg": "empty",
    "text.jpg": "not an image",
    "bomb.png": "too large",
}


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as uint8 RGB (H, W, 3)."""
    image = getattr(skimage.data, name)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def jpeg_bytes(pixels: np.ndarray, quality: int = 90, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


def png_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A ~70-byte PNG whose IHDR claims width x height RGB pixels (and whose data is one empty row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def build_corpus(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}

    def write(name: str, data: bytes) -> None:
        paths[name] = folder / name
        paths[name].write_bytes(data)

    def save(name: str, image: Image.Image, **options) -> None:
        paths[name] = folder / name
        image.save(paths[name], **options)

    for name, extension in PHOTOS.items():
        save(f"{name}.{extension}", Image.fromarray(photo(name)), **({"quality": 90} if extension == "jpg" else {}))
    chelsea = photo("chelsea")
    write("truncated.jpg", jpeg_bytes(chelsea)[:6000])
    write("empty.jpg", b"")
    write("text.jpg", b"this is a text file, not a JPEG\n" * 10)
    save("cmyk.jpg", Image.fromarray(photo("coffee")).convert("CMYK"), quality=90)
    ramp = (np.linspace(0, 65535, 160 * 120).reshape(120, 160)).astype(np.uint16)
    save("gray16.png", Image.fromarray(ramp))
    rgba = np.dstack([photo("astronaut"), np.full((512, 512), 255, np.uint8)])
    rgba[:, :256, 3] = 0  # left half fully transparent
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    write("rotated.jpg", jpeg_bytes(chelsea[:200, :300], exif=exif_orientation(6)))
    save("tiny.png", Image.fromarray(np.array([[[200, 30, 40]]], np.uint8)))
    write("bomb.png", png_header_bomb())
    frames = [Image.new("RGB", (64, 48), colour).convert("P") for colour in ((255, 0, 0), (0, 0, 255))]
    save("palette.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
    rocket = Image.fromarray(photo("rocket"))
    save("photo.webp", rocket, quality=90)
    save("photo.bmp", rocket)
    save("photo.tiff", rocket)
    return paths


def test_corpus_has_every_kind(tmp_path):
    paths = build_corpus(tmp_path)
    assert set(paths) == set(GOOD) | set(BAD)
    assert Image.open(paths["cmyk.jpg"]).mode == "CMYK"
    assert Image.open(paths["gray16.png"]).mode in ("I;16", "I")
    assert Image.open(paths["rotated.jpg"]).getexif()[0x0112] == 6
    assert Image.open(paths["palette.gif"]).n_frames == 2
    assert paths["empty.jpg"].stat().st_size == 0


def test_bomb_is_small_and_claims_30000_squared(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_bomb())
    assert path.stat().st_size < 100
    with pytest.raises(Image.DecompressionBombError):  # what Pillow itself does at 2x its limit
        Image.open(path)
