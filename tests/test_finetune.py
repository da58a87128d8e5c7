"""effnet.finetune: real fine-tuning of the trained Lite0 on real labelled images, exact resume, frozen batch norm,
and the output module, through the `effnet finetune` command (click's CliRunner) where the issue asks for it.

The images: scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes), upscaled to 48 px (bicubic),
centred on a 64 px black canvas and written as grayscale PNGs into DATA/<digit>/*.png, so the real CLI path
(folder walk, decode, grayscale -> RGB, split, augmentation) is what is tested. 80 per class go to DATA (the
command splits them 600 train / 200 validation, stratified); the next 10 per class are a holdout the runs never
see. Figures and timings: docs/finetune.md.

PyTorch runs with one intra-op thread here (THREADS): on 2 cores shared with other jobs, OpenMP's spinning
barriers made this file take 355 s with 2 threads against 73 s with 1, and it must stay under CI's 6 minutes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import effnet
from effnet.finetune import FrozenStatsBatchNorm2d, set_trainable, with_new_head
from effnet.finetune import augment, checkpoint, command, train
from effnet.finetune.command import finetune_command
from effnet.finetune.data import read_labelled, stratified_split

from .conftest import photo_batch

THREADS = 1
PER_CLASS = 80  # into DATA: 800 images -> 600 train / 200 validation at --val-fraction 0.25
HOLDOUT_PER_CLASS = 10
SIZE = 64
LINEAR_PROBE_MIN_ACCURACY = 0.90  # the converged probe: measured 0.930 on the holdout (docs/finetune.md)
FINE_TUNE_MIN_ACCURACY = 0.95  # the target; measured 0.98


def write_digits(folder: Path, first: int, count: int) -> Path:
    """Digits `first`..`first + count - 1` of each class as 64 px grayscale PNGs in folder/<digit>/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(digits.target == digit)[first:first + count]:
            scan = Image.fromarray(np.uint8(np.rint(digits.images[index] * 255 / 16)), "L")  # 0..16 -> 0..255
            canvas = Image.new("L", (SIZE, SIZE), 0)
            canvas.paste(scan.resize((48, 48), Image.Resampling.BICUBIC), (8, 8))
            canvas.save(folder / str(digit) / f"{index:04d}.png")
    return folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"), 0, PER_CLASS)


@pytest.fixture(scope="module")
def holdout(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("holdout"), PER_CLASS, HOLDOUT_PER_CLASS)


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def finetune(*arguments):
    """`effnet finetune ...` in this process; fails the test on a non-zero exit, with the command's output."""
    result = CliRunner().invoke(finetune_command, [str(a) for a in arguments] + ["--threads", THREADS, "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def fine_tuned(digits, tmp_path_factory) -> Path:
    """Full fine-tuning of the trained Lite0, 5 epochs at 64 px; settings for digits: a crop keeps at least half
    the image (a smaller one can cut a digit to a stroke) and no flip (a mirrored 2 is not a 2)."""
    out = tmp_path_factory.mktemp("fine_tuned") / "digits-lite0"
    finetune(digits, "-m", "efficientnet_lite0", "-o", out, "--mode", "fine-tune", "--size", SIZE,
             "--epochs", 5, "--batch-size", 16, "--lr", 3e-4, "--min-crop-area", 0.5, "--no-flip",
             "--val-fraction", 0.25, "--seed", 0)
    return out


def test_linear_probe_on_real_digits_reaches_its_measured_accuracy(digits, holdout, tmp_path):
    out = tmp_path / "probe"
    finetune(digits, "-m", "efficientnet_lite0", "-o", out, "--mode", "linear-probe", "--size", SIZE,
             "--val", holdout)
    report = json.loads((out / "report.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # one full-batch solve, recorded as epoch 1; its validation accuracy is the fit on train only (the sweep's)
    assert report["epochs_run"] == report["best_epoch"] == len(history) == 1
    chosen = [row for row in report["probe"]["sweep"] if row["l2"] == report["probe"]["l2"]]
    assert chosen and chosen[0]["val_accuracy"] == report["val_accuracy"] == history[0]["val_accuracy"]
    assert report["val_accuracy"] == max(row["val_accuracy"] for row in report["probe"]["sweep"])
    print(f"\nlinear probe: holdout accuracy {report['val_accuracy']:.4f} (l2 {report['probe']['l2']:.3g}), "
          f"{report['seconds']} s")
    assert (report["train_images"], report["val_images"]) == (10 * PER_CLASS, 10 * HOLDOUT_PER_CLASS)
    assert report["val_accuracy"] >= LINEAR_PROBE_MIN_ACCURACY
    # linear-probe checkpoints hold only what trains: the head
    assert set(load_file(str(out / "checkpoints" / checkpoint.BEST))) == {"classifier.weight", "classifier.bias"}


def test_full_fine_tune_on_real_digits_reaches_95_percent(fine_tuned):
    report = json.loads((fine_tuned / "report.json").read_text())
    print(f"\nfull fine-tune: validation accuracy {report['val_accuracy']:.4f} (best epoch {report['best_epoch']}), "
          f"{report['seconds']} s")
    assert (report["train_images"], report["val_images"]) == (600, 200)  # stratified 25% of 800
    assert report["val_accuracy"] >= FINE_TUNE_MIN_ACCURACY

    history = [json.loads(line) for line in (fine_tuned / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    with open(fine_tuned / "confusion_matrix.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == [str(d) for d in range(10)]
    matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert matrix.sum() == 200 and np.trace(matrix) / 200 == pytest.approx(report["val_accuracy"])
    assert (fine_tuned / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoints: safetensors and JSON only, nothing pickled
    files = [p for p in (fine_tuned / "checkpoints").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}


def test_output_directory_is_a_module_that_classifies_with_its_own_labels(fine_tuned, holdout):
    from effnet.embed import classify

    model = effnet.load(fine_tuned)
    assert model.labels == [str(d) for d in range(10)]
    assert (model.spec.num_classes, model.spec.native_size, model.spec.output) == (10, SIZE, "logits")
    assert model.spec.extra["finetune"]["base_model"] == "efficientnet_lite0"
    assert model(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 10)

    table = classify(str(holdout), str(fine_tuned), top_k=1)  # as `effnet classify --model OUTDIR` does
    truth = [Path(p).parent.name for p in table.column("path").to_pylist()]
    predicted = [labels[0] for labels in table.column("labels").to_pylist()]
    accuracy = np.mean([t == p for t, p in zip(truth, predicted)])
    print(f"\nfine-tuned module on the {len(truth)} holdout digits: accuracy {accuracy:.3f}")
    assert len(truth) == 10 * HOLDOUT_PER_CLASS and accuracy >= 0.9


def test_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    data = write_digits(tmp_path / "data", 0, 6)  # 60 images: 48 train, 12 validation; 6 batches of 8
    settings = [data, "--size", 32, "--epochs", 2, "--batch-size", 8, "--randaugment", 2, "--train-batch-norm",
                "--seed", 3, "--warmup-epochs", 0.5]
    finetune(*settings, "-o", tmp_path / "straight")
    stopped = finetune(*settings, "-o", tmp_path / "resumed", "--stop-after-epoch", 1)
    assert "stopped after epoch 1;" in stopped.output
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "latest.json").read_text())["epoch"] == 1
    finetune(*settings, "-o", tmp_path / "resumed", "--resume")

    for relative in ("model.safetensors", "checkpoints/epoch-0002/model.safetensors",
                     "checkpoints/epoch-0002/optimizer.safetensors"):
        straight, resumed = load_file(str(tmp_path / "straight" / relative)), load_file(str(tmp_path / "resumed" / relative))
        assert straight.keys() == resumed.keys()
        different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
        assert not different, f"{relative}: {different[:5]}"
    without_time = lambda out: [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
                                for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert without_time(tmp_path / "straight") == without_time(tmp_path / "resumed")
    # batch norm trained (--train-batch-norm): its statistics moved away from Lite0's
    trained = load_file(str(tmp_path / "straight" / "checkpoints" / "epoch-0002" / "model.safetensors"))
    base = effnet.load("efficientnet_lite0").state_dict()
    assert not torch.equal(trained["stem.bn.running_mean"], base["stem.bn.running_mean"])


def test_resume_refuses_other_settings_and_a_rerun_refuses_to_clobber(tmp_path):  # (and bfloat16 runs)
    data = write_digits(tmp_path / "data", 0, 3)
    settings = [data, "-o", tmp_path / "out", "--mode", "linear-probe", "--size", 32, "--epochs", 2,
                "--batch-size", 8, "--precision", "bfloat16", "--threads", THREADS, "-q"]
    finetune(*settings[:-3], "--stop-after-epoch", 1)
    runner = CliRunner()
    again = runner.invoke(finetune_command, [str(a) for a in settings])
    assert again.exit_code == 1 and "--resume" in again.output and "--overwrite" in again.output
    other = runner.invoke(finetune_command, [str(a) for a in settings] + ["--resume", "--lr", "0.5"])
    assert other.exit_code == 1 and "lr=0.5 (checkpoint: None)" in other.output
    assert runner.invoke(finetune_command, [str(a) for a in settings] + ["--resume"]).exit_code == 0


def test_frozen_batch_norm_keeps_its_statistics_while_gamma_and_beta_train():
    model = with_new_head(effnet.load("efficientnet_lite0"), 4, ["a", "b", "c", "d"])
    set_trainable(model, trainable=True, train_batch_norm=False)
    model.train()  # what a training loop does: must not unfreeze batch norm
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert norms and all(isinstance(m, FrozenStatsBatchNorm2d) and not m.training for m in norms.values())
    assert model.dropout.training  # the rest of the model is in training mode

    def snapshot():
        return {k: v.clone() for k, v in model.state_dict().items()}

    def train_steps(steps: int) -> None:
        images, targets = photo_batch(SIZE), torch.arange(4)  # the four real photos, one class each
        # 0.005: at 0.05 the first step alone separated the 4 photos (loss 0.0), and the backbone's gradients
        # from then on (~1e-9) left gamma unchanged in float32
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005)
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()

    before = snapshot()
    train_steps(3)
    after = snapshot()
    statistics = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(before[k], after[k]) for k in statistics)
    for name in ("stem.bn.weight", "stem.bn.bias", "head.bn.weight", "stem.conv.weight", "classifier.weight"):
        assert not torch.equal(before[name], after[name]), name

    set_trainable(model, trainable=True, train_batch_norm=True)
    model.train()
    assert all(type(m) is nn.BatchNorm2d and m.training for m in norms.values())
    train_steps(1)
    moved = snapshot()
    assert all(not torch.equal(after[k], moved[k]) for k in statistics if k.endswith("running_mean"))


def test_not_trainable_freezes_the_backbone_but_not_the_new_head():
    model = set_trainable(with_new_head(effnet.load("efficientnet_lite0"), 3), trainable=False)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"] and len(frozen) > 100
    assert model.labels is None and model.spec.num_classes == 3 and model.spec.labels is None
    assert torch.count_nonzero(model.classifier.weight) == 0  # BiT's zero head
    assert with_new_head(model, 0).classifier is None and model.spec.output == "features"


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    for make in (lambda p: torch.optim.AdamW(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)):
        torch.manual_seed(0)
        layer = nn.Linear(5, 3)
        optimizer = make(layer.parameters())
        for _ in range(2):
            layer(torch.randn(4, 5)).sum().backward()
            optimizer.step()
        tensors, rest = checkpoint.flatten_optimizer(optimizer.state_dict())
        checkpoint.save_tensors(tensors, tmp_path / "optimizer.safetensors")
        (tmp_path / "rest.json").write_text(json.dumps(rest))
        restored = make(nn.Linear(5, 3).parameters())
        restored.load_state_dict(checkpoint.unflatten_optimizer(load_file(str(tmp_path / "optimizer.safetensors")),
                                                                json.loads((tmp_path / "rest.json").read_text())))
        original, copy = optimizer.state_dict(), restored.state_dict()
        for index, entries in original["state"].items():
            for name, value in entries.items():
                assert torch.equal(value, copy["state"][index][name]), (index, name)


def test_labelled_folders_manifests_and_the_stratified_split(tmp_path):
    data = write_digits(tmp_path / "data", 0, 5)
    images = read_labelled(data)
    assert images.classes == tuple(str(d) for d in range(10)) and images.counts() == [5] * 10
    train_part, val_part = stratified_split(images, 0.2, seed=7)
    assert train_part.counts() == [4] * 10 and val_part.counts() == [1] * 10
    assert set(train_part.paths).isdisjoint(val_part.paths)
    assert stratified_split(images, 0.2, seed=7) == (train_part, val_part)

    manifest = tmp_path / "manifest.csv"
    rows = [(str(Path(p).relative_to(tmp_path)), "odd" if int(Path(p).parent.name) % 2 else "even") for p in images.paths]
    manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    listed = read_labelled(manifest)
    assert listed.classes == ("even", "odd") and listed.counts() == [25, 25]
    assert all(Path(p).exists() for p in listed.paths)


def test_augmentation_ops_are_seeded_and_keep_size():
    image = Image.fromarray(photo_batch(SIZE)[0].mul(255).byte().permute(1, 2, 0).numpy())
    for name, op in augment.RANDAUGMENT_OPS.items():
        result = op(image, 9.0, np.random.default_rng(0))
        assert result.size == image.size and result.mode == "RGB", name
    from effnet.pipeline.decode import recipe_for

    recipe = recipe_for("efficientnet_lite0", "efficientnet_lite")
    crop = lambda seed: np.asarray(augment.random_resized_crop(image, 32, np.random.default_rng(seed), recipe))
    assert crop(1).shape == (32, 32, 3) and np.array_equal(crop(1), crop(1)) and not np.array_equal(crop(1), crop(2))


def test_schedule_warms_up_then_decays_to_zero():
    rates = [train.learning_rate(step, 100, 10, 1.0) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 1e-3


def test_command_choices_match_the_library():
    assert (command.MODES, command.OPTIMIZERS, command.PRECISIONS, command.DEVICES) == (
        train.MODES, train.OPTIMIZERS, train.PRECISIONS, train.DEVICES)
    from effnet.pipeline.decode import RESIZE_MODES

    assert command.RESIZE_MODES == RESIZE_MODES
    options = {p.name for p in finetune_command.params} - {"threads", "resume", "overwrite", "quiet"}
    assert options == {f.name for f in dataclasses.fields(train.Config)}
