"""The decode stage: formats, modes, orientation, bounds, recipes and reduced-size JPEG decoding."""

from __future__ import annotations

import pickle
import resource
import time

import numpy as np
import pytest
from PIL import Image

from effnet.pipeline.decode import RECIPES, Decoder, plan, recipe_for
from effnet.pipeline.sources import Item
from .test_pipeline_corpus import BAD, GOOD, build_corpus, jpeg_bytes, photo

V1 = recipe_for("efficientnet_b0", "efficientnet")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def decode(path, size=64, **options):
    return Decoder(size, options.pop("recipe", V1), **options)(Item(str(path), path.stat().st_size))


@pytest.mark.parametrize("name", GOOD)
def test_good_files_decode_to_rgb_at_model_size(corpus, name):
    result = decode(corpus[name])
    assert result.error is None, result.error
    assert result.pixels.shape == (64, 64, 3) and result.pixels.dtype == np.uint8
    assert result.pixels.flags.c_contiguous
    assert result.width > 0 and result.height > 0


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_become_an_error_that_names_the_problem(corpus, name):
    result = decode(corpus[name])
    assert result.pixels is None and result.width is None
    assert BAD[name] in result.error


def test_header_bomb_is_refused_fast_without_allocating(corpus):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    result = decode(corpus["bomb.png"])
    assert time.perf_counter() - start < 0.5
    assert "too large" in result.error and "900000000 pixels" in result.error
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # 2.7 GB would show


def test_max_pixels_is_an_error_not_a_warning(corpus):
    with_limit = decode(corpus["astronaut.jpg"], max_pixels=512 * 512 - 1)
    assert "too large" in with_limit.error
    assert decode(corpus["astronaut.jpg"], max_pixels=512 * 512).error is None


def test_missing_file_and_source_errors():
    assert Decoder(64)(Item("/no/such/file.jpg")).error == "file not found"
    assert Decoder(64)(Item("x.jpg", error="no file matches this pattern")).error == "no file matches this pattern"


def test_exif_orientation_is_applied(corpus, tmp_path):
    # rotated.jpg: a 300x200 crop stored with orientation 6 ("rotate 90 clockwise to view"): upright it is 200x300.
    result = decode(corpus["rotated.jpg"], size=128)
    assert (result.width, result.height) == (200, 300)
    # the same JPEG data without the EXIF tag, rotated by hand and stored losslessly, gives the same pixels
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(jpeg_bytes(photo("chelsea")[:200, :300]))
    by_hand = tmp_path / "by_hand.png"
    Image.open(plain).transpose(Image.Transpose.ROTATE_270).save(by_hand)
    assert np.array_equal(result.pixels, decode(by_hand, size=128).pixels)
    assert not np.array_equal(result.pixels, decode(plain, size=128).pixels)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "levels.png"
    Image.fromarray(np.array([[0, 32896, 65535, 65535]], np.uint16).repeat(4, axis=0)).save(path)
    result = decode(path, size=4, resize="stretch", recipe=RECIPES["efficientnet_lite"])
    assert result.pixels[0, 0, 0] == 0 and result.pixels[0, -1, 0] == 255
    assert 100 < result.pixels[0, 1, 0] < 160  # mid-grey stays mid-grey (Pillow's convert would give 255)


def test_transparent_pixels_are_white(corpus):
    result = decode(corpus["rgba.png"], size=64, resize="stretch")
    assert (result.pixels[:, :20] == 255).all()  # the left half is fully transparent


def test_animated_gif_gives_its_first_frame(corpus):
    pixels = decode(corpus["palette.gif"]).pixels
    assert pixels[..., 0].min() > 200 and pixels[..., 2].max() < 50  # red, not blue


def test_one_pixel_image(corpus):
    pixels = decode(corpus["tiny.png"]).pixels
    assert (pixels == np.array([200, 30, 40], np.uint8)).all()


def test_cmyk_comes_out_close_to_the_rgb_original(corpus):
    rgb = decode(corpus["coffee.png"]).pixels.astype(int)
    cmyk = decode(corpus["cmyk.jpg"]).pixels.astype(int)
    assert np.abs(rgb - cmyk).mean() < 10


# --- recipes and geometry --------------------------------------------------------------------------------


def test_tpu_centre_crop_geometry():
    # tpu: crop = int(224 / (224 + 32) * min(h, w)); offset = ((h - crop) + 1) // 2
    where = plan(400, 300, 224, "crop", V1)
    assert where.box == (69, 19, 69 + 262, 19 + 262)
    assert where.content == (224, 224) and where.offset == (0, 0)


def test_v2_recipe_crops_only_below_320_and_rounds_offsets_down():
    v2 = recipe_for("efficientnetv2_s", "efficientnetv2")
    assert plan(400, 300, 384, "crop", v2).box == (0, 0, 400, 300)  # automl: no crop at >= 320
    small = plan(401, 300, 224, "crop", v2)
    assert small.box == ((401 - 262) // 2, (300 - 262) // 2, (401 - 262) // 2 + 262, (300 - 262) // 2 + 262)
    assert v2.resample == Image.Resampling.BILINEAR


def test_family_recipes():
    assert recipe_for("efficientnet_b3", "efficientnet").resample == Image.Resampling.BICUBIC
    assert recipe_for("efficientnet_lite2", "efficientnet_lite").resample == Image.Resampling.BILINEAR
    legacy = recipe_for("efficientnetv2_b1", "efficientnetv2")  # automl 'effnetv1_autoaug' -> V1 eval
    assert legacy.resample == Image.Resampling.BICUBIC and legacy.crops_at(480)
    with pytest.raises(ValueError, match="no preprocessing recipe"):
        recipe_for("resnet50", "resnet")


def test_pad_keeps_the_whole_image():
    where = plan(400, 200, 100, "pad", V1)
    assert where.box == (0, 0, 400, 200) and where.content == (100, 50) and where.offset == (0, 25)


@pytest.mark.parametrize("resize", ["crop", "pad", "stretch"])
def test_every_resize_mode_gives_the_model_size(corpus, resize):
    assert decode(corpus["rocket.png"], size=72, resize=resize).pixels.shape == (72, 72, 3)


# --- reduced-size JPEG decoding --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "large.jpg"
    big = Image.fromarray(photo("chelsea")).resize((2400, 1600), Image.Resampling.BICUBIC)
    big.save(path, quality=90)
    return path


@pytest.mark.parametrize("resize", ["crop", "pad", "stretch"])
def test_draft_never_goes_below_what_the_crop_needs(large_jpeg, resize):
    decoder = Decoder(224, V1, resize)
    with Image.open(large_jpeg) as image:
        decoder._draft(image, image.size, 1)
        drafted = image.size
    assert drafted[0] < 2400  # it did reduce
    where = plan(*drafted, 224, resize, V1)
    box_w, box_h = where.box[2] - where.box[0], where.box[3] - where.box[1]
    assert box_w >= where.content[0] and box_h >= where.content[1]  # never upsampled


def test_draft_is_close_to_a_full_decode(large_jpeg):
    reduced = Decoder(224, V1)(Item(str(large_jpeg))).pixels.astype(float)
    full = Decoder(224, V1, reduce_jpeg=False)(Item(str(large_jpeg))).pixels.astype(float)
    assert np.abs(reduced - full).mean() < 3  # grey levels out of 255


def test_decoder_pickles_for_worker_processes():
    decoder = Decoder(96, recipe_for("efficientnet_lite0", "efficientnet_lite"), "pad")
    assert pickle.loads(pickle.dumps(decoder)) == decoder


def test_invalid_arguments():
    with pytest.raises(ValueError, match="resize"):
        Decoder(64, V1, "zoom")
    with pytest.raises(ValueError, match="size"):
        Decoder(0, V1)
