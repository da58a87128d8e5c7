"""Transfer learning with effnet on real labelled sets that Python packages ship: accuracy and time of five ways.

    python benchmarks/transfer.py                      # both sets, all five ways (~10 min on 2 busy cores)
    python benchmarks/transfer.py --sets lfw --ways c d e

The sets (written as image folders, so effnet's real path runs: folder walk, decode, split, augmentation):
- digits: scikit-learn's handwritten digits (8x8 scans, 10 classes), upscaled to 48 px on a 64 px canvas; a
  seeded draw of 400, 330 train / 70 test (the issue's split);
- lfw: scikit-image's `lfw_subset` (25 x 25 grayscale photos: 100 faces from Labeled Faces in the Wild, 100
  non-face patches), 2 classes; a seeded 140 train / 60 test.

The five ways, each given the same train images and scored on the same test images:
(a) scikit-learn LogisticRegression on the raw pixels (standardized), C chosen on a validation split;
(b) the same on effnet's Lite0 feature vectors (`effnet.embed`, at the size finetune picks: 64 px here);
(c) `effnet finetune --mode linear-probe`;  (d) `--mode fine-tune`;  (e) `--mode lp-ft` (the default),
    all three with every other setting left to effnet (automatic size, crop, epochs, rate, flip, threads).
For (a) and (b) the validation split is finetune's own (stratified 20%, seed 0), and the final fit uses train +
validation, as (c) does. Test accuracy of (c)-(e) is `effnet.classify` with the output module on the test
images. Times are wall-clock seconds of each whole way (features included), on the same machine in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effnet.embed import classify, embed
from effnet.finetune import Config, run
from effnet.finetune.data import read_labelled, stratified_split

WAYS = {"a": "logistic regression, raw pixels", "b": "sklearn logistic regression, effnet features",
        "c": "effnet linear probe", "d": "effnet fine-tune", "e": "effnet lp-ft"}
C_GRID = np.logspace(-4, 4, 17)
FEATURE_SIZE = 64  # what finetune's automatic size picks for both sets (images <= 64 px)


def write_digits(root: Path) -> tuple[list[str], list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    picked = np.random.default_rng(14).permutation(len(digits.target))[:400]
    paths = []
    for index in picked:
        path = root / str(digits.target[index]) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        scan = Image.fromarray(np.uint8(np.rint(digits.images[index] * 255 / 16)), "L")
        canvas = Image.new("L", (64, 64), 0)
        canvas.paste(scan.resize((48, 48), Image.Resampling.BICUBIC), (8, 8))
        canvas.save(path)
        paths.append(str(path))
    return paths[:330], paths[330:]


def write_lfw(root: Path) -> tuple[list[str], list[str]]:
    from skimage.data import lfw_subset

    images = lfw_subset()  # (200, 25, 25) float in 0..1; the first 100 are faces
    order = np.random.default_rng(14).permutation(len(images))
    paths = []
    for index in order:
        path = root / ("face" if index < 100 else "not_face") / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(np.rint(images[index] * 255)), "L").save(path)
        paths.append(str(path))
    return paths[:140], paths[140:]


SETS = {"digits": write_digits, "lfw": write_lfw}


def link_folder(paths: list[str], folder: Path) -> Path:
    """A class-per-subfolder folder of symlinks to `paths` (each path's parent folder is its class)."""
    for path in paths:
        target = folder / Path(path).parent.name / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    return folder


def logistic_regression(x_train, y_train, x_val, y_val, x_test, y_test) -> tuple[float, float]:
    """(test accuracy, chosen C): standardized, C by validation accuracy, refit on train + validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def fitted(c, x, y):
        scaler = StandardScaler().fit(x)
        return scaler, LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x), y)

    scores = []
    for c in C_GRID:
        scaler, model = fitted(c, x_train, y_train)
        scores.append(model.score(scaler.transform(x_val), y_val))
    best = C_GRID[int(np.argmax(scores))]
    scaler, model = fitted(best, np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]))
    return float(model.score(scaler.transform(x_test), y_test)), float(best)


def pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).ravel() for p in paths])


def label_of(path: str) -> str:
    return Path(path).parent.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    parser.add_argument("--ways", nargs="+", choices=sorted(WAYS), default=list(WAYS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for (b)'s embedding and the test scoring; finetune picks its own")
    arguments = parser.parse_args()
    from threadpoolctl import threadpool_limits

    rows = []
    with tempfile.TemporaryDirectory() as scratch, threadpool_limits(1):
        for name in arguments.sets:
            root = Path(scratch) / name
            train_paths, test_paths = SETS[name](root / "all")
            train_folder = link_folder(train_paths, root / "train")
            images = read_labelled(train_folder)
            train_part, val_part = stratified_split(images, 0.2, seed=0)  # finetune's own split
            y = lambda paths: np.asarray([label_of(p) for p in paths])
            y_train, y_val, y_test = y(train_part.paths), y(val_part.paths), y(test_paths)
            print(f"{name}: {len(train_part)} train / {len(val_part)} validation / {len(test_paths)} test, "
                  f"{len(images.classes)} classes", flush=True)
            for way in arguments.ways:
                torch.set_num_threads(arguments.threads)
                started = time.perf_counter()
                detail = ""
                if way == "a":
                    accuracy, c = logistic_regression(pixels(train_part.paths), y_train, pixels(val_part.paths), y_val,
                                                      pixels(test_paths), y_test)
                    detail = f"C {c:.3g}"
                elif way == "b":
                    features = lambda paths: embed(list(paths), "efficientnet_lite0", size=FEATURE_SIZE, engine="torch")
                    accuracy, c = logistic_regression(features(train_part.paths), y_train, features(val_part.paths),
                                                      y_val, features(test_paths), y_test)
                    detail = f"C {c:.3g}"
                else:
                    mode = {"c": "linear-probe", "d": "fine-tune", "e": "lp-ft"}[way]
                    out = root / f"out-{mode}"
                    torch.set_num_threads(os.cpu_count() or 1)  # as the command starts; it times 1 vs this
                    result = run(Config(data=str(train_folder), out=str(out), mode=mode), choose_threads=True)
                    seconds_train = time.perf_counter() - started
                    torch.set_num_threads(arguments.threads)
                    table = classify(test_paths, str(out), top_k=1, engine="torch")
                    predicted = [labels[0] for labels in table.column("labels").to_pylist()]
                    accuracy = float(np.mean(np.asarray(predicted) == y_test))
                    report = json.loads((out / "report.json").read_text())
                    automatic = {k: v["value"] for k, v in report["automatic"].items()}
                    detail = (f"val {result.val_accuracy:.3f} at epoch {result.best_epoch}/{result.epochs_run}; "
                              f"train {seconds_train:.0f} s; automatic {automatic}")
                seconds = time.perf_counter() - started
                rows.append((name, way, accuracy, seconds, detail))
                print(f"  ({way}) {WAYS[way]:<45} test accuracy {accuracy:.4f}  {seconds:7.1f} s  {detail}", flush=True)

    print("\n| set | way | test accuracy | seconds |\n|---|---|---|---|")
    for name, way, accuracy, seconds, _ in rows:
        print(f"| {name} | ({way}) {WAYS[way]} | {accuracy:.4f} | {seconds:.1f} |")
    goals(rows)


def goals(rows) -> None:
    """The issue's goals, checked on this run: (c) >= (b); (d) and (e) > (a) and (b); (e) >= (d)."""
    for name in dict.fromkeys(r[0] for r in rows):
        score = {way: accuracy for set_name, way, accuracy, _, _ in rows if set_name == name}
        checks = []
        if {"b", "c"} <= score.keys():
            checks.append(("(c) >= (b)", score["c"] >= score["b"]))
        for way in ("d", "e"):
            for baseline in ("a", "b"):
                if {way, baseline} <= score.keys():
                    checks.append((f"({way}) > ({baseline})", score[way] > score[baseline]))
        if {"d", "e"} <= score.keys():
            checks.append(("(e) >= (d)", score["e"] >= score["d"]))
        print(f"{name}: " + ", ".join(f"{label} {'met' if ok else 'MISSED'}" for label, ok in checks))


if __name__ == "__main__":
    sys.exit(main())
