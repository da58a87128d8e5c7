"""The fine-tuning loop behind `effnet finetune`: a module, a folder of labelled images -> a new effnet module.

    result = effnet.finetune.run(Config(data="flowers/", out="flowers-lite0", model="efficientnet_lite0"))
    model = effnet.load("flowers-lite0")                        # like any module: labels, classify, export

Three modes:
- "linear-probe": the backbone frozen (batch norm too), its feature vectors computed once for every image with
  the eval preprocessing; then multinomial logistic regression solved to convergence on them, its L2 strength
  chosen on the validation split, refitted on train + validation (`probe.py`). No epochs, no learning rate.
- "fine-tune": everything trains on augmented images (random resized crop, flip, optional RandAugment) from a
  zero head; batch norm statistics frozen unless `train_batch_norm` (see `trainable.py` for why).
- "lp-ft" (the default): the linear probe (fitted on train only), then full fine-tuning from that head at a
  smaller rate (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
  Out-of-Distribution": a fitted head sends useful gradients into the backbone from the first step).

Settings left as None (size, min_crop_area, epochs, lr) are chosen from the data by `defaults.py`; each choice
is printed and written to report.json with its reason.

Each epoch: training, then validation, then a checkpoint (`checkpoint.py`) and the metrics log (`report.py`).
The learning rate warms up linearly, then follows a cosine to 0 (tpu/automl `WarmupLearningRateSchedule` with
`lr_decay_type='cosine'`), set per optimizer step. At the end the best validation epoch's weights are written
as an effnet module (`effnet.save`), with the class names as its labels and the training size as its
`native_size`, so `effnet classify --model OUTDIR` feeds it what it was trained on.

Resume is exact: the data order is drawn from (seed, epoch), each image's augmentation from (seed, epoch,
index), and torch's generator (dropout, stochastic depth) is reseeded from (seed, epoch) at the start of each
epoch; the checkpoint holds the model, the optimizer and the step. A run stopped after epoch k and resumed
ends with the same weights, bit for bit on the same machine, as a run that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .. import loading
from ..errors import EffnetError
from ..model import EfficientNet
from ..pipeline.batch import to_tensor
from ..pipeline.decode import RESIZE_MODES, Decoder, recipe_for
from . import checkpoint, defaults, probe, report
from .data import (Augmentation, LabelledImages, evaluation_batch, read_labelled, stratified_split, training_batch,
                   with_classes)
from .trainable import set_trainable, with_new_head

MODES = ("lp-ft", "fine-tune", "linear-probe")
FINE_TUNING_MODES = ("fine-tune", "lp-ft")  # the backbone trains
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class OptimizerDefaults:
    """Fine-tuning rates for batch size 32 from the zero head of `with_new_head`: where `defaults.py`'s
    automatic learning rate starts (it scales them for lp-ft and small sets).

    Measured on the digits of tests/test_finetune.py (Lite0, 600 train / 200 validation images at 64 px, 5
    epochs), validation accuracy: adamw 1e-3: 0.98, sgd 5e-3: 0.935.
    """

    fine_tune_lr: float
    weight_decay: float


OPTIMIZER_DEFAULTS = {
    # SGD with momentum 0.9 at 0.005 is the hub's fine-tuning tutorial (tf.keras.optimizers.SGD(0.005, 0.9)).
    "sgd": OptimizerDefaults(fine_tune_lr=0.005, weight_decay=1e-4),
    # AdamW: decoupled weight decay (lr * weight_decay * w per step).
    "adamw": OptimizerDefaults(fine_tune_lr=1e-3, weight_decay=1e-2),
}
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class Config:
    """One fine-tuning run. `data` and `out` are required; the rest have the defaults of `effnet finetune`."""

    data: str  # class-per-subfolder folder or path,label CSV
    out: str  # the output module directory
    model: str = "efficientnet_lite0"  # anything effnet.load accepts
    mode: str = "lp-ft"  # MODES
    val: str | None = None  # a separate validation folder/CSV; None: split `val_fraction` off `data`
    val_fraction: float = 0.2  # stratified, drawn with `seed`; 0: no validation
    size: int | None = None  # training and evaluation resolution; None: from the images (defaults.py)
    resize: str = "crop"  # evaluation resize (RESIZE_MODES), as `effnet classify --resize`
    epochs: int | None = None  # None: from the data set's size (defaults.py); linear-probe: unused
    batch_size: int = 32
    accumulate: int = 1  # micro-batches per optimizer step (batch norm still sees `batch_size`)
    optimizer: str = "adamw"  # OPTIMIZERS
    lr: float | None = None  # peak learning rate; None: from the mode and the data set's size (defaults.py)
    weight_decay: float | None = None  # None: OPTIMIZER_DEFAULTS; never applied to biases and BN gamma/beta
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1  # tpu/automl `label_smoothing=0.1`
    min_crop_area: float | None = None  # random resized crop: the smallest box, as a fraction of the image;
    # None: from the images' size (defaults.py)
    flip: bool | None = None  # random horizontal flip; None: lp-ft tests it with the probe (defaults.py), else on
    randaugment_layers: int = 0  # 0: off; tpu's RandAugment uses 2
    randaugment_magnitude: float = 9.0  # 0..10
    train_batch_norm: bool = False  # fine-tune mode: update batch norm statistics (see trainable.py)
    precision: str = "float32"  # PRECISIONS; "bfloat16": autocast (CPUs with AVX512-BF16/AMX, recent GPUs)
    device: str = "auto"  # DEVICES
    seed: int = 0
    patience: int | None = None  # early stopping: epochs without a better validation accuracy
    stop_after_epoch: int | None = None  # stop (resumably) after this epoch, the schedule still for `epochs`
    workers: int = 4  # image decoding threads

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return OPTIMIZER_DEFAULTS[self.optimizer].fine_tune_lr  # (run sets lr; a linear probe has none)

    def weight_decay_value(self) -> float:
        return self.weight_decay if self.weight_decay is not None else OPTIMIZER_DEFAULTS[self.optimizer].weight_decay

    def check(self) -> None:
        choices = {"mode": MODES, "optimizer": OPTIMIZERS, "precision": PRECISIONS, "device": DEVICES,
                   "resize": RESIZE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise EffnetError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        positive = ("epochs", "batch_size", "accumulate", "workers")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EffnetError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise EffnetError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.min_crop_area is not None and not 0 < self.min_crop_area <= 1:
            raise EffnetError(f"min_crop_area must be in (0, 1], not {self.min_crop_area}")


# Settings a resumed run may change; any other difference from the checkpoint's settings is an error.
# (A new `epochs` stretches the cosine schedule from the resumed step on: that run is no longer the same as an
# uninterrupted one. `stop_after_epoch` keeps the schedule.)
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "stop_after_epoch", "workers", "device", "out"})


@dataclass
class Result:
    """What `run` did. `finished` is False when it stopped at `stop_after_epoch` (continue with resume=True)."""

    out: Path
    finished: bool
    epochs_run: int
    best_epoch: int | None
    val_accuracy: float | None  # at best_epoch
    classes: list[str]
    history: list[dict]
    confusion: np.ndarray | None  # validation set, best epoch; None without validation
    stopped_early: bool
    seconds: float
    curves: Path | None = None  # curves.png; None when matplotlib is missing (or the run did not finish)
    model: EfficientNet | None = field(default=None, repr=False)  # the exported module, eval mode, CPU


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed of an epoch (dropout, stochastic depth): a function of (seed, epoch) only."""
    return int(np.random.SeedSequence([seed, epoch, 0x70C4]).generate_state(1, dtype=np.uint64)[0] >> 1)


def batches_per_epoch(count: int, batch_size: int) -> int:
    """Full batches only (tpu `drop_remainder=True`: a batch of 1 breaks batch norm in training mode), or one
    batch of everything when the data set is smaller than a batch."""
    return max(1, count // batch_size)


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The shuffled batches (index arrays) of an epoch: a function of (seed, epoch) only."""
    order = np.random.default_rng([seed, epoch]).permutation(count)
    if count <= batch_size:
        return [order]
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(batches_per_epoch(count, batch_size))]


# --------------------------------------------------------------------------------------------------- the run
def run(config: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = False,
        choose_threads: bool = False) -> Result:
    """Fine-tune `config.model` on `config.data` and write the module to `config.out` (see the module doc).

    resume: continue from OUTDIR/checkpoints (the settings must be the checkpoint's, but RESUMABLE_CHANGES).
    overwrite: delete an earlier run's checkpoints in OUTDIR and start over.
    progress: a tqdm bar per epoch and a line of metrics after it, on stderr.
    choose_threads: on a CPU, time a training step with 1 and with torch's current intra-op threads and keep
        the faster (`effnet finetune` without --threads); the choice is in report.json's "automatic".
    """
    started = time.perf_counter()
    config = _normalized(config)
    config.check()
    out = Path(config.out)
    folder = out / "checkpoints"
    if resume and overwrite:
        raise EffnetError("--resume continues the run in OUTDIR and --overwrite deletes it: give one of them")
    if checkpoint.exists(folder) and not (resume or overwrite):
        raise EffnetError(f"{out} holds the checkpoint of an earlier run: pass --resume to continue it, or "
                          "--overwrite to start over")
    if resume and not checkpoint.exists(folder):
        raise EffnetError(f"{out}: no checkpoint to resume from; run without --resume")
    if overwrite:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)

    train_set, val_set = _data(config)
    classes = list(train_set.classes)
    device = _device(config.device)
    model = loading.load(config.model)
    base_spec = model.spec
    # `config` stays as given (resume compares it with the checkpoint's); `settings` has the automatic choices
    automatic = defaults.choose(config, defaults.measure(train_set, config.seed), base_spec.native_size,
                                OPTIMIZER_DEFAULTS[config.optimizer].fine_tune_lr)
    settings = dataclasses.replace(config, **{name: choice.value for name, choice in automatic.items()})
    if config.mode == "linear-probe":
        settings = dataclasses.replace(settings, epochs=1)  # one full-batch solve, recorded as epoch 1
    if progress:
        _print_automatic(automatic)
    size = settings.size
    _prepare(model, settings, classes, device)
    optimizer = _optimizer(model, settings)
    if choose_threads and device.type == "cpu":
        automatic["threads"] = _choose_threads(model, settings)
        if progress:
            _print_automatic({"threads": automatic["threads"]})

    state = {"step": 0, "epoch": 0, "history": [], "best_epoch": None, "best_accuracy": None,
             "best_predictions": None, "epochs_since_best": 0, "stopped_early": False, "probe": None}
    if resume:
        tensors, optimizer_state, saved = checkpoint.load(folder)
        _check_same_settings(config, saved["config"], out)
        _load_trained(model, tensors, config.mode, folder)
        optimizer.load_state_dict(optimizer_state)
        state = {key: saved.get(key) for key in state}
        # a new --patience applies to the epochs already run (a larger one lets an early-stopped run go on)
        state["stopped_early"] = config.patience is not None and state["epochs_since_best"] >= config.patience

    recipe = recipe_for(base_spec.name, base_spec.family)
    decoder = Decoder(size, recipe, settings.resize)
    trainer = _Trainer(model, optimizer, settings, device, progress)
    with ThreadPoolExecutor(settings.workers) as pool, ThreadPoolExecutor(1) as prefetcher:
        if config.mode == "linear-probe":
            if state["epoch"] == 0:
                _linear_probe(trainer, state, train_set, val_set, decoder, pool, config)
        else:
            if config.mode == "lp-ft" and state["epoch"] == 0 and state["probe"] is None:
                # the probe's head first (fitted on train only: validation stays held out for the fine-tune)
                state["probe"], predictions = _fit_probe(trainer, train_set, val_set, decoder, pool, refit=False,
                                                         test_mirroring=config.flip is None)
                # the probe's head is the best so far (epoch 0): fine-tuning must beat it on validation to replace it
                _track_best(state, {"epoch": 0, "val_accuracy": state["probe"].get("val_accuracy")}, predictions, None)
                checkpoint.save_tensors(_trained(model, config.mode), folder / checkpoint.BEST)
            if config.flip is None:
                automatic["flip"] = defaults.flip(state["probe"])
                settings = dataclasses.replace(settings, flip=automatic["flip"].value)
                trainer.config = settings
                if progress:
                    _print_automatic({"flip": automatic["flip"]})
            augmentation = Augmentation(size, recipe, settings.min_crop_area, settings.randaugment_layers,
                                        settings.randaugment_magnitude, settings.flip)
            train_epoch = lambda epoch: trainer.train_images(train_set, augmentation, epoch, pool, prefetcher)
            evaluate = lambda: trainer.evaluate_images(val_set, decoder, pool)
            trainer.step = state["step"]
            trainer.total_steps = settings.epochs * trainer.steps_per_epoch(len(train_set))

        while state["epoch"] < settings.epochs and not state["stopped_early"]:
            if config.stop_after_epoch is not None and state["epoch"] >= config.stop_after_epoch:
                return Result(out, False, state["epoch"], state["best_epoch"], state["best_accuracy"], classes,
                              state["history"], None, False, time.perf_counter() - started)
            epoch = state["epoch"] + 1
            epoch_started = time.perf_counter()
            torch.manual_seed(epoch_seed(config.seed, epoch))
            row = {"epoch": epoch, **train_epoch(epoch)}
            predictions = None
            if len(val_set):
                val_loss, val_accuracy, predictions = evaluate()
                row |= {"val_loss": val_loss, "val_accuracy": val_accuracy}
            row["seconds"] = round(time.perf_counter() - epoch_started, 3)
            state["history"].append(row)
            state |= {"step": trainer.step, "epoch": epoch}
            if _track_best(state, row, predictions, config.patience):
                checkpoint.save_tensors(_trained(model, config.mode), folder / checkpoint.BEST)
            checkpoint.save(folder, epoch, _trained(model, config.mode), optimizer,
                            {**state, "config": dataclasses.asdict(config)})
            report.write_metrics(state["history"], out)
            if progress:
                _print_epoch(row, settings.epochs, state)

    return _finish(model, config, settings, automatic, state, classes, base_spec, len(train_set), val_set, started)


def _choose_threads(model: EfficientNet, config: Config) -> defaults.Choice:
    """Time one forward + backward of a training batch with 1 thread and with torch's current count; keep the
    faster. OpenMP's threads spin at their barriers: when other processes (or our decode threads) hold a core,
    every step waits for a descheduled thread. Measured on 2 cores shared with other jobs, Lite0 at 64 px,
    batch 32: 1 thread 0.57-1.3 s a step, 2 threads 4-8 s (decode + augment: 10-25 ms a batch); on idle cores
    2 threads win. The model's weights and statistics are untouched (eval mode, gradients cleared)."""
    most = torch.get_num_threads()
    if most == 1:
        return defaults.Choice(1, "torch has one intra-op thread here")
    inputs = torch.rand(config.batch_size, 3, config.size, config.size).contiguous(memory_format=torch.channels_last)
    was_training, timings = model.training, {}
    model.eval()
    for threads in (1, most, 1, most):  # interleaved, the best of two each: load from other jobs comes and goes
        torch.set_num_threads(threads)
        started = time.perf_counter()
        if config.mode == "linear-probe":  # it only computes features
            with torch.no_grad():
                model.feature_vector(inputs)
        else:
            model(inputs).float().logsumexp(dim=1).sum().backward()
        timings[threads] = min(timings.get(threads, math.inf), time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    chosen = min(timings, key=timings.get)
    torch.set_num_threads(chosen)
    measured = ", ".join(f"{t} thread(s) {timings[t]:.2f} s" for t in sorted(timings))
    step = "feature batch" if config.mode == "linear-probe" else "training step"
    return defaults.Choice(chosen, f"one {step} of {config.batch_size} at {config.size} px took {measured}; "
                                   "the faster count trains (pass --threads to set it)")


def _fit_probe(trainer: "_Trainer", train_set: LabelledImages, val_set: LabelledImages, decoder: Decoder, pool,
               refit: bool, test_mirroring: bool = False) -> tuple[dict, np.ndarray | None]:
    """Features once (eval preprocessing, model in eval mode), the probe solved on them and folded into the
    model's classifier. Returns the probe's record for report.json and the validation predictions of the
    train-only fit at the chosen strength (None without validation)."""
    fitted_at = time.perf_counter()
    features = [trainer.features(part, decoder, pool, f"{name} features")
                for name, part in (("train", train_set), ("val", val_set))]
    feature_seconds = time.perf_counter() - fitted_at
    device = features[0].device
    targets = [torch.tensor(part.targets, dtype=torch.int64, device=device) for part in (train_set, val_set)]
    fitted = probe.fit(features[0], targets[0], features[1], targets[1], len(train_set.classes),
                       refit_on_validation=refit)
    fitted.fold_into(trainer.model.classifier)
    train_loss, train_accuracy, _ = trainer.evaluate_features(features[0], targets[0])
    record = {"l2": fitted.l2, "refit_on_validation": fitted.refit_on_validation, "sweep": fitted.sweep,
              "train_loss": train_loss, "train_accuracy": train_accuracy,
              "feature_seconds": round(feature_seconds, 3),
              "solve_seconds": round(time.perf_counter() - fitted_at - feature_seconds, 3)}
    if fitted.sweep:
        chosen = next(row for row in fitted.sweep if row["l2"] == fitted.l2)
        record |= {"val_loss": chosen["val_loss"], "val_accuracy": chosen["val_accuracy"]}
        if test_mirroring:  # does a mirror keep the class? (defaults.flip decides from this)
            mirrored = trainer.features(val_set, decoder, pool, "mirrored val features", mirrored=True)
            hits = fitted.logits(mirrored).argmax(1).numpy() == np.asarray(val_set.targets)
            record["mirrored_val_accuracy"] = float(hits.mean())
    if trainer.progress:
        from tqdm import tqdm
        held_out = f", validation accuracy {record['val_accuracy']:.4f}" if fitted.sweep else ""
        tqdm.write(f"linear probe: l2 {fitted.l2:.3g}{held_out}{' (then refitted on train + validation)' if refit else ''}"
                   f"; features {record['feature_seconds']:.1f} s, solve {record['solve_seconds']:.1f} s")
    return record, fitted.val_predictions


def _linear_probe(trainer: "_Trainer", state: dict, train_set: LabelledImages, val_set: LabelledImages,
                  decoder: Decoder, pool, config: Config) -> None:
    """The whole linear-probe run, recorded as epoch 1. The validation accuracy is the sweep's, of the fit on
    train only: held out, unlike the refitted head's."""
    started = time.perf_counter()
    record, predictions = _fit_probe(trainer, train_set, val_set, decoder, pool, refit=True)
    row = {"epoch": 1, "lr": 0.0, "train_loss": record["train_loss"], "train_accuracy": record["train_accuracy"]}
    if predictions is not None:  # the train-only fit's, at the chosen strength (the confusion matrix's too)
        row |= {"val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"]}
    row["seconds"] = round(time.perf_counter() - started, 3)
    state |= {"epoch": 1, "history": [row], "probe": record}
    _track_best(state, row, predictions, None)
    tensors, folder = _trained(trainer.model, config.mode), Path(config.out) / "checkpoints"
    checkpoint.save_tensors(tensors, folder / checkpoint.BEST)
    checkpoint.save(folder, 1, tensors, trainer.optimizer, {**state, "config": dataclasses.asdict(config)})
    report.write_metrics(state["history"], Path(config.out))


def _track_best(state: dict, row: dict, predictions: np.ndarray | None, patience: int | None) -> bool:
    """Update the best epoch and early stopping in `state`; True when this epoch is the new best (strictly
    better validation accuracy; without validation, every epoch is)."""
    if predictions is None or state["best_accuracy"] is None or row["val_accuracy"] > state["best_accuracy"]:
        state |= {"best_epoch": row["epoch"], "best_accuracy": row.get("val_accuracy"), "epochs_since_best": 0,
                  "best_predictions": None if predictions is None else predictions.tolist()}
        return True
    state["epochs_since_best"] += 1
    state["stopped_early"] = patience is not None and state["epochs_since_best"] >= patience
    return False


def _finish(model: EfficientNet, config: Config, settings: Config, automatic: dict[str, defaults.Choice],
            state: dict, classes: list[str], base_spec, train_count: int, val_set: LabelledImages,
            started: float) -> Result:
    """Best weights -> effnet module directory; confusion matrix, report and curves beside it."""
    out, size = Path(config.out), settings.size
    best = out / "checkpoints" / checkpoint.BEST
    _load_trained(model, checkpoint.load_file(str(best)), config.mode, best)
    model.with_spec(native_size=size, extra={"finetune": {
        "base_model": config.model, "base_source": base_spec.source, "mode": config.mode,
        "epochs_run": state["epoch"], "best_epoch": state["best_epoch"], "val_accuracy": state["best_accuracy"],
        "image_size": size, "eval_resize": config.resize}})
    loading.save(model.cpu(), out)
    confusion = None
    summary = {"model": config.model, "mode": config.mode, "classes": classes, "image_size": size,
               "train_images": train_count, "val_images": len(val_set), "epochs_run": state["epoch"],
               "best_epoch": state["best_epoch"], "val_accuracy": state["best_accuracy"],
               "stopped_early": state["stopped_early"],
               "automatic": {name: choice.as_json() for name, choice in automatic.items()}}
    if state["probe"] is not None:
        summary["probe"] = state["probe"]
    if state["best_predictions"] is not None:
        confusion = report.confusion_matrix(val_set.targets, state["best_predictions"], len(classes))
        report.write_confusion(confusion, classes, out)
        summary |= {"per_class_recall": report.per_class_recall(confusion, classes),
                    "confusion_matrix": confusion.tolist()}
    summary |= {"seconds": round(time.perf_counter() - started, 1), "config": dataclasses.asdict(config),
                "settings": dataclasses.asdict(settings)}  # config as given; settings with the automatic choices
    report.write_report(summary, out)
    curves = report.plot_curves(state["history"], out)
    return Result(out, True, state["epoch"], state["best_epoch"], state["best_accuracy"], classes,
                  state["history"], confusion, state["stopped_early"], time.perf_counter() - started,
                  curves, loading.load(out))


def _print_automatic(automatic: dict[str, defaults.Choice]) -> None:
    from tqdm import tqdm
    for name, choice in automatic.items():
        tqdm.write(f"automatic {name} = {choice.value}: {choice.why}")


def _print_epoch(row: dict, epochs: int, state: dict) -> None:
    from tqdm import tqdm
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.2e}", f"train loss {row['train_loss']:.4f}",
             f"train acc {row['train_accuracy']:.4f}"]
    if "val_accuracy" in row:
        parts += [f"val loss {row['val_loss']:.4f}", f"val acc {row['val_accuracy']:.4f}"]
    parts.append(f"{row['seconds']:.1f} s")
    if state["stopped_early"]:
        parts.append(f"early stop: best epoch {state['best_epoch']}")
    tqdm.write("  ".join(parts))


# ------------------------------------------------------------------------------------------------ the pieces
def _normalized(config: Config) -> Config:
    """Paths made absolute, so a resumed run started from another folder compares equal."""
    resolve = lambda p: str(Path(p).expanduser().resolve())
    model = resolve(config.model) if Path(config.model).expanduser().exists() else config.model
    return dataclasses.replace(config, data=resolve(config.data), out=resolve(config.out), model=model,
                               val=resolve(config.val) if config.val else None)


def _prepare(model: EfficientNet, config: Config, classes: list[str], device: torch.device) -> None:
    """The loaded module -> the model to train: a new head, the mode's trainable parts, device and layout."""
    torch.manual_seed(config.seed)  # reproducible whatever the head's initializer draws
    with_new_head(model, len(classes), classes)
    fine_tune = config.mode in FINE_TUNING_MODES
    set_trainable(model, trainable=fine_tune, train_batch_norm=fine_tune and config.train_batch_norm)
    # channels_last: the layout the input batches already have (pipeline.batch.to_tensor), and oneDNN's fast
    # path on CPU (training steps of Lite0 at 64 px about 20% faster, measured)
    model.to(device, memory_format=torch.channels_last)


def _data(config: Config) -> tuple[LabelledImages, LabelledImages]:
    images = read_labelled(config.data)
    if config.val:
        return images, with_classes(read_labelled(config.val), images.classes, config.val)
    return stratified_split(images, config.val_fraction, config.seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EffnetError("device cuda: this PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def _optimizer(model: EfficientNet, config: Config) -> torch.optim.Optimizer:
    """Weight decay on convolution and linear weights only, not on biases and BN gamma/beta (tpu/automl
    exclude 'batch_normalization' variables; decaying a BN scale only fights the next layer's weights)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": config.weight_decay_value()},
        {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    lr = config.learning_rate()
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def _trained(model: EfficientNet, mode: str) -> dict[str, torch.Tensor]:
    """The tensors training changes: what a checkpoint has to keep."""
    state = model.state_dict()
    if mode == "linear-probe":
        return {k: v for k, v in state.items() if k.startswith("classifier.")}
    return state


def _load_trained(model: EfficientNet, tensors: dict[str, torch.Tensor], mode: str, where: Path) -> None:
    expected = set(_trained(model, mode))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise EffnetError(f"{where}: this checkpoint does not fit the model (missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}); resume with the settings it was written with, or --overwrite")
    model.load_state_dict(tensors, strict=False)


def _check_same_settings(config: Config, saved: dict, out: Path) -> None:
    now = dataclasses.asdict(config)
    differences = [f"{name}={now.get(name)!r} (checkpoint: {saved.get(name)!r})"
                   for name in sorted(set(now) | set(saved))
                   if name not in RESUMABLE_CHANGES and now.get(name) != saved.get(name)]
    if differences:
        raise EffnetError(f"{out}: --resume with other settings than the checkpoint's: {'; '.join(differences)}. "
                          "Resume with the checkpoint's settings, or --overwrite to start over")


def _one_thread(method):
    """Run `method` with one intra-op thread, then restore the count. For the linear probe's head: its matmuls
    (batch x feature_dim x classes) are too small to gain from threads, and when other processes share the
    cores, OpenMP's barriers between threads cost far more than the work: 20 steps of a 1280 -> 10 head took
    1.7 s with 2 threads and 0.04 s with 1 (measured on 2 busy cores)."""
    import functools

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return method(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


class _Trainer:
    """The per-epoch work, for both modes: one optimizer, one schedule, one step counter."""

    def __init__(self, model: EfficientNet, optimizer: torch.optim.Optimizer, config: Config, device: torch.device,
                 progress: bool):
        self.model, self.optimizer, self.config, self.device = model, optimizer, config, device
        self.progress = progress
        self.step = 0
        self.total_steps = 1
        self.data_wait = 0.0  # seconds the training steps waited for augmented batches, this epoch

    def steps_per_epoch(self, count: int) -> int:
        return math.ceil(batches_per_epoch(count, self.config.batch_size) / self.config.accumulate)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bfloat16")

    def _bar(self, total: int, description: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=description, unit="batch", leave=False, disable=not self.progress,
                    dynamic_ncols=True)

    def _train_batches(self, batches: Iterator[tuple[Callable[[], torch.Tensor], torch.Tensor]], count: int,
                       epoch: int) -> dict:
        """Forward, loss, backward per micro-batch; an optimizer step every `accumulate` of them."""
        config = self.config
        warmup = round(config.warmup_epochs * self.total_steps / config.epochs)
        losses, correct, seen, lr = 0.0, 0, 0, 0.0
        self.model.train()
        with self._bar(count, f"epoch {epoch}/{config.epochs}") as bar:
            for index, (logits_of, targets) in enumerate(batches):
                with self._autocast():
                    logits = logits_of()
                # the loss in float32 whatever the autocast precision
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
                (loss / config.accumulate).backward()
                if (index + 1) % config.accumulate == 0 or index + 1 == count:
                    lr = learning_rate(self.step, self.total_steps, warmup, config.learning_rate())
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                losses += loss.item() * len(targets)
                correct += int((logits.argmax(dim=1) == targets).sum())
                seen += len(targets)
                bar.update()
                bar.set_postfix(loss=f"{losses / seen:.4f}", acc=f"{correct / seen:.3f}")
        return {"lr": lr, "train_loss": losses / seen, "train_accuracy": correct / seen}

    # fine-tune mode: images through the whole model
    def train_images(self, images: LabelledImages, augmentation: Augmentation, epoch: int, pool, prefetcher) -> dict:
        seed = self.config.seed
        batches = epoch_batches(len(images), self.config.batch_size, seed, epoch)
        load = lambda indices: training_batch(images, indices, augmentation, seed, epoch, pool)

        def prefetched():
            pending = prefetcher.submit(load, batches[0])
            for next_indices in [*batches[1:], None]:
                waited = time.perf_counter()
                pixels, targets = pending.result()
                self.data_wait += time.perf_counter() - waited
                if next_indices is not None:  # decode the next batch while this one trains
                    pending = prefetcher.submit(load, next_indices)
                inputs = to_tensor(list(pixels)).to(self.device)
                yield (lambda: self.model(inputs)), torch.from_numpy(targets).to(self.device)

        self.data_wait = 0.0
        row = self._train_batches(prefetched(), len(batches), epoch)
        # where the epoch's time went: waiting for decode/augment (not hidden behind the step) vs the steps
        return row | {"data_wait_seconds": round(self.data_wait, 3)}

    @torch.no_grad()
    def evaluate_images(self, images: LabelledImages, decoder: Decoder, pool) -> tuple[float, float, np.ndarray]:
        self.model.eval()
        logits = []
        for inputs in self._eval_inputs(images, decoder, pool, "validate"):
            with self._autocast():
                logits.append(self.model(inputs).float())
        return self._scores(torch.cat(logits), torch.tensor(images.targets, device=self.device))

    # linear-probe mode: cached feature vectors through the head only
    @torch.no_grad()
    def features(self, images: LabelledImages, decoder: Decoder, pool, description: str,
                 mirrored: bool = False) -> torch.Tensor:
        """(N, feature_dim) float32 feature vectors, eval preprocessing (mirrored left-right if asked), model in
        eval mode."""
        self.model.eval()
        vectors = []
        for inputs in self._eval_inputs(images, decoder, pool, description, mirrored):
            with self._autocast():
                vectors.append(self.model.feature_vector(inputs).float())
        return torch.cat(vectors) if vectors else torch.empty((0, self.model.num_features), device=self.device)

    @_one_thread
    @torch.no_grad()
    def evaluate_features(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, np.ndarray]:
        self.model.eval()
        return self._scores(self.model.classifier(features), targets)

    def _eval_inputs(self, images: LabelledImages, decoder: Decoder, pool, description: str,
                     mirrored: bool = False) -> Iterator[torch.Tensor]:
        size = self.config.batch_size * 2  # no gradients: twice the batch fits
        starts = range(0, len(images), size)
        with self._bar(len(starts), description) as bar:
            for start in starts:
                pixels, _ = evaluation_batch(images, range(start, min(start + size, len(images))), decoder, pool)
                if mirrored:
                    pixels = np.ascontiguousarray(pixels[:, :, ::-1])
                yield to_tensor(list(pixels)).to(self.device)
                bar.update()

    @staticmethod
    def _scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, np.ndarray]:
        """(cross-entropy without smoothing, accuracy, predicted classes) of a whole split."""
        logits = logits.float()
        predictions = logits.argmax(dim=1)
        loss = F.cross_entropy(logits, targets).item()
        return loss, float((predictions == targets).float().mean()), predictions.cpu().numpy()
