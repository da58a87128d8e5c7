"""effnet.finetune.probe: the linear probe solved to convergence reaches scikit-learn's LogisticRegression with the
best C on the same Lite0 feature vectors, and `effnet finetune --mode linear-probe` delivers it as a module.

The data is the issue's: scikit-learn's digits (real 8x8 scans) shown at 64 px, a seeded draw of 400 split
330 train / 70 test. Both sides choose their regularization on the same validation split of the 330 (the
command's stratified 20%, seed 0) and refit on all 330 with it; the 70 test images are seen by neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import effnet
from effnet.finetune import probe
from effnet.finetune.command import finetune_command
from effnet.finetune.data import read_labelled, stratified_split

SIZE = 64
TRAIN, TEST = 330, 70
# scikit-learn's side: C over 8 decades at half-decade steps (17 values), the usual sweep
SKLEARN_C_GRID = np.logspace(-4, 4, 17)


def write_digit(path: Path, scan: np.ndarray) -> None:
    """One 8x8 digit (values 0..16) upscaled to 48 px, centred on a 64 px black canvas, as a grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    small = Image.fromarray(np.uint8(np.rint(scan * 255 / 16)), "L")
    canvas = Image.new("L", (SIZE, SIZE), 0)
    canvas.paste(small.resize((48, 48), Image.Resampling.BICUBIC), (8, 8))
    canvas.save(path)


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    """(train folder DATA/<digit>/*.png, test image paths, test labels): a seeded 330 / 70 split of 400."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    picked = np.random.default_rng(14).permutation(len(digits.target))[:TRAIN + TEST]
    root = tmp_path_factory.mktemp("digits_probe")
    for index in picked[:TRAIN]:
        write_digit(root / "train" / str(digits.target[index]) / f"{index:04d}.png", digits.images[index])
    test_paths = []
    for index in picked[TRAIN:]:
        test_paths.append(str(root / "test" / f"{index:04d}.png"))
        write_digit(Path(test_paths[-1]), digits.images[index])
    return root / "train", test_paths, digits.target[picked[TRAIN:]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_probe_reaches_sklearn_best_c_on_the_same_lite0_features(digits_split, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from effnet.embed import embed

    train_folder, test_paths, test_labels = digits_split
    out = tmp_path / "probe"
    result = CliRunner().invoke(finetune_command, [str(train_folder), "-o", str(out), "--mode", "linear-probe",
                                                   "--size", str(SIZE), "--threads", "1", "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["probe"]["refit_on_validation"] and len(report["probe"]["sweep"]) == len(probe.L2_GRID)

    # the same feature vectors, as `effnet embed` computes them (the eval preprocessing finetune uses)
    images = read_labelled(train_folder)
    train_part, val_part = stratified_split(images, 0.2, seed=0)  # the command's split (--val-fraction 0.2)
    features = lambda paths: embed(list(paths), "efficientnet_lite0", size=SIZE, engine="torch")
    x_train, x_val, x_test = features(train_part.paths), features(val_part.paths), features(test_paths)
    y_train, y_val = np.asarray(train_part.targets), np.asarray(val_part.targets)
    classes = np.asarray([int(c) for c in images.classes])

    with threadpool_limits(1):
        def fitted(c, x, y):
            scaler = StandardScaler().fit(x)
            return scaler, LogisticRegression(C=c, max_iter=10_000).fit(scaler.transform(x), y)

        val_scores = []
        for c in SKLEARN_C_GRID:
            scaler, model = fitted(c, x_train, y_train)
            val_scores.append(model.score(scaler.transform(x_val), y_val))
        best_c = SKLEARN_C_GRID[int(np.argmax(val_scores))]
        scaler, model = fitted(best_c, np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]))
        sklearn_accuracy = float(np.mean(classes[model.predict(scaler.transform(x_test))] == test_labels))

    module = effnet.load(out)  # the probe folded into the output module's classifier
    with torch.no_grad():
        predicted = module.classifier(torch.from_numpy(x_test)).argmax(1).numpy()
    ours = float(np.mean(classes[predicted] == test_labels))
    print(f"\nlinear probe on {TEST} test digits: effnet {ours:.4f} (l2 {report['probe']['l2']:.3g}), scikit-learn "
          f"{sklearn_accuracy:.4f} (C {best_c:.3g}, validation {max(val_scores):.4f})")
    assert ours >= sklearn_accuracy


def test_the_solve_reaches_sklearn_optimum_at_the_same_strength():
    """Convergence, not just accuracy: at one strength, the coefficients of our L-BFGS and scikit-learn's
    (C = 1 / (l2 n), its lbfgs at gtol 1e-10) agree to 1e-3 of their scale: both solve the same convex problem."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 30)) * 2
    y = rng.integers(0, 4, size=200)
    x = centres[y] + rng.normal(size=(200, 30)) * 3  # overlapping classes: a finite optimum at small l2
    l2 = 1e-3
    fitted = probe.fit(torch.tensor(x), torch.tensor(y), torch.empty(0, 30), torch.empty(0), 4,
                       grid=(l2,))
    standardized = (x - x.mean(0)) / x.std(0)
    reference = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=100_000).fit(standardized, y)
    # multinomial logits are defined up to a per-row constant: compare centred coefficients
    ours = fitted.weight.numpy() - fitted.weight.numpy().mean(0)
    theirs = reference.coef_ - reference.coef_.mean(0)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()


def test_fold_into_a_linear_gives_the_probe_logits_on_raw_features():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(60, 8)) * rng.uniform(0.1, 10, size=8) + rng.normal(size=8) * 5)
    x[:, 3] = 2.0  # a constant column (a unit that never fires) must not divide by zero
    y = torch.tensor(rng.integers(0, 3, size=60))
    fitted = probe.fit(x[:45], y[:45], x[45:], y[45:], 3)
    assert fitted.val_predictions is not None and len(fitted.val_predictions) == 15
    assert fitted.l2 in probe.L2_GRID and not fitted.refit_on_validation
    layer = nn.Linear(8, 3).double()
    fitted.fold_into(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fitted.logits(x), rtol=1e-9, atol=1e-9)
    # the sweep picked the strength with the best validation accuracy
    best = max(row["val_accuracy"] for row in fitted.sweep)
    assert next(row for row in fitted.sweep if row["l2"] == fitted.l2)["val_accuracy"] == best
