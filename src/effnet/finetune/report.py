"""What a fine-tuning run leaves beside the module: the per-epoch metrics log, the confusion matrix, the curves.

    OUTDIR/metrics.jsonl          one JSON object per epoch (epoch, lr, train_loss, train_accuracy, val_loss,
                                  val_accuracy, seconds), rewritten from the history each epoch
    OUTDIR/confusion_matrix.csv   rows: true class, columns: predicted class, on the validation set, best epoch
    OUTDIR/report.json            the summary: accuracies, best epoch, per-class recall, the confusion matrix,
                                  "automatic" (each setting chosen from the data, with why), "probe" (the
                                  linear probe's L2 sweep), "config" (as given), "settings" (as run)
    OUTDIR/curves.png             loss and accuracy per epoch (needs matplotlib: pip install effnet[finetune])
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

METRICS = "metrics.jsonl"
CONFUSION = "confusion_matrix.csv"
REPORT = "report.json"
CURVES = "curves.png"


def write_metrics(history: Sequence[dict], out: Path) -> None:
    (out / METRICS).write_text("".join(json.dumps(row) + "\n" for row in history))


def confusion_matrix(targets: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; [i, j] = images of class i predicted as j."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def write_confusion(matrix: np.ndarray, classes: Sequence[str], out: Path) -> None:
    with open(out / CONFUSION, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, matrix.tolist()):
            writer.writerow([name, *row])


def per_class_recall(matrix: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """The fraction of each class's validation images classified right (None: no images of that class)."""
    totals = matrix.sum(axis=1)
    return {name: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(classes)}


def write_report(summary: dict, out: Path) -> None:
    (out / REPORT).write_text(json.dumps(summary, indent=2))


def plot_curves(history: Sequence[dict], out: Path) -> Path | None:
    """curves.png: loss and accuracy against epoch, train and validation. None when matplotlib is missing.

    Drawn on a bare Agg canvas, not through pyplot: it changes no global backend of the caller's process.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    for axes, metric, title in zip(figure.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy")):
        for split, style in (("train", "o-"), ("val", "s-")):
            values = [row.get(f"{split}_{metric}") for row in history]
            if any(v is not None for v in values):
                axes.plot(epochs, [np.nan if v is None else v for v in values], style, label=split)
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    path = out / CURVES
    figure.savefig(path)
    return path
