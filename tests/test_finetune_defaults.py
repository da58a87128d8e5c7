"""effnet.finetune.defaults: settings chosen from the data, stated with their reasons in report.json.

A 28-pixel set and a 224-pixel set (the same real photos, scikit-image's, cut into tiles and resized), each run
through `effnet finetune` with nothing but a short schedule given: the automatic size and crop area differ as
the rules say, and report.json states each choice and why. The rules themselves are checked on data shapes
(a 28-pixel set of 1,600 images, 12-MP photos, a large set) without running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from effnet.finetune import defaults, train
from effnet.finetune.command import finetune_command
from effnet.finetune.defaults import DataShape


def write_tiles(folder: Path, side: int, per_class: int = 8) -> Path:
    """Two classes of real photo tiles (astronaut vs coffee), `per_class` each, saved at side x side px."""
    from skimage import data

    for name, photo in (("astronaut", data.astronaut()), ("coffee", data.coffee())):
        (folder / name).mkdir(parents=True, exist_ok=True)
        height, width = photo.shape[:2]
        tile = min(height, width) // 2
        for index in range(per_class):
            top, left = (index // 4) * tile // 4, (index % 4) * (width - tile) // 4
            crop = Image.fromarray(photo[top:top + tile, left:left + tile]).resize((side, side), Image.Resampling.BILINEAR)
            crop.save(folder / name / f"{index}.png")
    return folder


def automatic_choices(data: Path, out: Path) -> dict:
    result = CliRunner().invoke(finetune_command, [str(data), "-o", str(out), "--epochs", "1", "--batch-size", "8",
                                                   "--threads", "1", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_a_28_pixel_set_and_a_224_pixel_set_get_different_defaults_in_report_json(tmp_path):
    small = automatic_choices(write_tiles(tmp_path / "small", 28), tmp_path / "out-28")
    large = automatic_choices(write_tiles(tmp_path / "large", 224), tmp_path / "out-224")
    for report in (small, large):
        assert report["mode"] == "lp-ft"  # the default
        assert {"size", "min_crop_area", "lr", "flip"} <= report["automatic"].keys()
        assert "epochs" not in report["automatic"]  # given on the command line: not automatic
        assert all(choice["why"] for choice in report["automatic"].values())
        # what the run used is what the report states
        for name, choice in report["automatic"].items():
            if name != "threads":
                assert report["settings"][name] == choice["value"], name
        assert report["config"]["size"] is None and report["config"]["min_crop_area"] is None
    assert (small["automatic"]["size"]["value"], large["automatic"]["size"]["value"]) == (64, 224)
    assert small["image_size"] == 64 and large["image_size"] == 224
    assert small["automatic"]["min_crop_area"]["value"] == 0.5
    assert large["automatic"]["min_crop_area"]["value"] == defaults.IMAGENET_CROP_AREA
    assert "28 px" in small["automatic"]["size"]["why"] and "224 px" in large["automatic"]["size"]["why"]
    # lp-ft: the probe's head was fitted first and is recorded
    assert small["probe"]["sweep"] and large["probe"]["sweep"]


def test_rules_follow_image_size_and_set_size():
    config = train.Config(data="d", out="o")  # everything automatic, lp-ft
    choose = lambda config, shape: defaults.choose(config, shape, 224, train.OPTIMIZER_DEFAULTS["adamw"].fine_tune_lr)
    tiny = choose(config, DataShape(train_images=1600, classes=10, short_side=28, long_side=28))
    photos = choose(config, DataShape(train_images=1600, classes=10, short_side=3000, long_side=4000))
    large = choose(config, DataShape(train_images=60_000, classes=10, short_side=28, long_side=28))
    few = choose(config, DataShape(train_images=264, classes=10, short_side=64, long_side=64))
    assert (tiny["size"].value, photos["size"].value) == (64, 224)
    assert tiny["min_crop_area"].value > photos["min_crop_area"].value == defaults.IMAGENET_CROP_AREA
    # 1,600 images: 50 steps an epoch -> 6 epochs for ~300 steps; 60,000: the 3-epoch floor; 264: the ceiling
    assert (tiny["epochs"].value, large["epochs"].value, few["epochs"].value) == (6, 3, 30)
    assert few["lr"].value < tiny["lr"].value == large["lr"].value  # small sets train more gently
    fine_tune = choose(train.Config(data="d", out="o", mode="fine-tune"), DataShape(1600, 10, 28, 28))
    assert fine_tune["lr"].value == pytest.approx(3 * tiny["lr"].value, rel=0.01)  # lp-ft: a third
    # a linear probe has no schedule and no augmentation to choose
    probe_only = choose(train.Config(data="d", out="o", mode="linear-probe"), DataShape(1600, 10, 28, 28))
    assert set(probe_only) == {"size"}
    # what the user gives is never overridden
    given = choose(train.Config(data="d", out="o", size=96, epochs=2, lr=0.1, min_crop_area=0.3),
                   DataShape(1600, 10, 28, 28))
    assert given == {}


def test_flip_follows_what_the_probe_saw_on_mirrored_images():
    assert defaults.flip({"val_accuracy": 0.94, "mirrored_val_accuracy": 0.85}).value is False
    assert defaults.flip({"val_accuracy": 0.95, "mirrored_val_accuracy": 0.94}).value is True
    assert defaults.flip({"val_accuracy": 0.95}).value is True  # no validation split: nothing to test
    assert defaults.flip(None).value is True  # fine-tune mode: no probe, the originals' flip


def test_measure_reads_the_median_image_size(tmp_path):
    folder = write_tiles(tmp_path / "tiles", 40, per_class=4)
    from effnet.finetune.data import read_labelled

    shape = defaults.measure(read_labelled(folder))
    assert shape == DataShape(train_images=8, classes=2, short_side=40, long_side=40)
    Image.new("RGB", (300, 200)).save(folder / "coffee" / "big.png")
    Image.new("RGB", (300, 200)).save(folder / "coffee" / "big2.png")
    assert defaults.measure(read_labelled(folder)).short_side == 40  # the median, not the largest
    np.testing.assert_equal(defaults.measure(read_labelled(folder), seed=1).train_images, 10)
