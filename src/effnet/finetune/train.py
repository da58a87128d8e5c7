"""The fine-tuning loop behind `effnet finetune`: a module, a folder of labelled images -> a new effnet module.

    result = effnet.finetune.run(Config(data="flowers/", out="flowers-lite0", model="efficientnet_lite0"))
    model = effnet.load("flowers-lite0")                        # like any module: labels, classify, export

Two modes:
- "linear-probe": the backbone frozen (batch norm too), its feature vectors computed once for every image with
  the eval preprocessing and kept in memory; only the new classifier trains, on those vectors. Minutes on a CPU.
- "fine-tune": everything trains on augmented images (random resized crop, flip, optional RandAugment); batch
  norm statistics frozen unless `train_batch_norm` (see `trainable.py` for why).

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
from . import checkpoint, report
from .data import (Augmentation, LabelledImages, evaluation_batch, read_labelled, stratified_split, training_batch,
                   with_classes)
from .trainable import set_trainable, with_new_head

MODES = ("fine-tune", "linear-probe")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class OptimizerDefaults:
    """Starting points for batch size 32 and the zero head of `with_new_head`; tune `lr` for your data.

    Measured on the digits of tests/test_finetune.py (Lite0, 600 train / 200 validation images at 64 px),
    validation accuracy: fine-tune 5 epochs, adamw 1e-3: 0.98, sgd 5e-3: 0.935; linear probe 30 epochs, adamw
    3e-3: 0.935, sgd 1e-2: 0.93. The probe's SGD rate is small because Lite0's pooled features are large
    (ReLU6 outputs, 1280 of them): sgd 5e-2 and above made the logits blow up (training loss 1.8 to 20).
    """

    fine_tune_lr: float
    linear_probe_lr: float
    weight_decay: float


OPTIMIZER_DEFAULTS = {
    # SGD with momentum 0.9 at 0.005 is the hub's fine-tuning tutorial (tf.keras.optimizers.SGD(0.005, 0.9)).
    "sgd": OptimizerDefaults(fine_tune_lr=0.005, linear_probe_lr=0.01, weight_decay=1e-4),
    # AdamW: decoupled weight decay (lr * weight_decay * w per step).
    "adamw": OptimizerDefaults(fine_tune_lr=1e-3, linear_probe_lr=3e-3, weight_decay=1e-2),
}
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class Config:
    """One fine-tuning run. `data` and `out` are required; the rest have the defaults of `effnet finetune`."""

    data: str  # class-per-subfolder folder or path,label CSV
    out: str  # the output module directory
    model: str = "efficientnet_lite0"  # anything effnet.load accepts
    mode: str = "fine-tune"  # MODES
    val: str | None = None  # a separate validation folder/CSV; None: split `val_fraction` off `data`
    val_fraction: float = 0.2  # stratified, drawn with `seed`; 0: no validation
    size: int | None = None  # training and evaluation resolution; None: the model's native size
    resize: str = "crop"  # evaluation resize (RESIZE_MODES), as `effnet classify --resize`
    epochs: int = 10
    batch_size: int = 32
    accumulate: int = 1  # micro-batches per optimizer step (batch norm still sees `batch_size`)
    optimizer: str = "adamw"  # OPTIMIZERS
    lr: float | None = None  # peak learning rate; None: OPTIMIZER_DEFAULTS for the mode
    weight_decay: float | None = None  # None: OPTIMIZER_DEFAULTS; never applied to biases and BN gamma/beta
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1  # tpu/automl `label_smoothing=0.1`
    min_crop_area: float = 0.08  # random resized crop: the smallest box, as a fraction of the image
    flip: bool = True  # random horizontal flip (turn off for text, digits, anything a mirror changes)
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
        defaults = OPTIMIZER_DEFAULTS[self.optimizer]
        return defaults.fine_tune_lr if self.mode == "fine-tune" else defaults.linear_probe_lr

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
            if getattr(self, name) < 1:
                raise EffnetError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise EffnetError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if not 0 < self.min_crop_area <= 1:
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
def run(config: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = False) -> Result:
    """Fine-tune `config.model` on `config.data` and write the module to `config.out` (see the module doc).

    resume: continue from OUTDIR/checkpoints (the settings must be the checkpoint's, but RESUMABLE_CHANGES).
    overwrite: delete an earlier run's checkpoints in OUTDIR and start over.
    progress: a tqdm bar per epoch and a line of metrics after it, on stderr.
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
    size = config.size or base_spec.native_size
    _prepare(model, config, classes, device)
    optimizer = _optimizer(model, config)
    fine_tune = config.mode == "fine-tune"

    state = {"step": 0, "epoch": 0, "history": [], "best_epoch": None, "best_accuracy": None,
             "best_predictions": None, "epochs_since_best": 0, "stopped_early": False}
    if resume:
        tensors, optimizer_state, saved = checkpoint.load(folder)
        _check_same_settings(config, saved["config"], out)
        _load_trained(model, tensors, config.mode, folder)
        optimizer.load_state_dict(optimizer_state)
        state = {key: saved[key] for key in state}
        # a new --patience applies to the epochs already run (a larger one lets an early-stopped run go on)
        state["stopped_early"] = config.patience is not None and state["epochs_since_best"] >= config.patience

    recipe = recipe_for(base_spec.name, base_spec.family)
    decoder = Decoder(size, recipe, config.resize)
    trainer = _Trainer(model, optimizer, config, device, progress)
    with ThreadPoolExecutor(config.workers) as pool, ThreadPoolExecutor(1) as prefetcher:
        if fine_tune:
            augmentation = Augmentation(size, recipe, config.min_crop_area, config.randaugment_layers,
                                        config.randaugment_magnitude, config.flip)
            train_epoch = lambda epoch: trainer.train_images(train_set, augmentation, epoch, pool, prefetcher)
            evaluate = lambda: trainer.evaluate_images(val_set, decoder, pool)
        else:
            # features computed once, eval preprocessing, then only the head trains on them (no augmentation)
            train_features = trainer.features(train_set, decoder, pool, "train features")
            val_features = trainer.features(val_set, decoder, pool, "val features")
            train_targets = torch.tensor(train_set.targets, dtype=torch.int64, device=device)
            val_targets = torch.tensor(val_set.targets, dtype=torch.int64, device=device)
            train_epoch = lambda epoch: trainer.train_features(train_features, train_targets, epoch)
            evaluate = lambda: trainer.evaluate_features(val_features, val_targets)
        trainer.step = state["step"]
        trainer.total_steps = config.epochs * trainer.steps_per_epoch(len(train_set))

        while state["epoch"] < config.epochs and not state["stopped_early"]:
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
                _print_epoch(row, config.epochs, state)

    return _finish(model, config, state, classes, base_spec, size, len(train_set), val_set, started)


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


def _finish(model: EfficientNet, config: Config, state: dict, classes: list[str], base_spec, size: int,
            train_count: int, val_set: LabelledImages, started: float) -> Result:
    """Best weights -> effnet module directory; confusion matrix, report and curves beside it."""
    out = Path(config.out)
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
               "stopped_early": state["stopped_early"]}
    if state["best_predictions"] is not None:
        confusion = report.confusion_matrix(val_set.targets, state["best_predictions"], len(classes))
        report.write_confusion(confusion, classes, out)
        summary |= {"per_class_recall": report.per_class_recall(confusion, classes),
                    "confusion_matrix": confusion.tolist()}
    summary |= {"seconds": round(time.perf_counter() - started, 1), "config": dataclasses.asdict(config)}
    report.write_report(summary, out)
    curves = report.plot_curves(state["history"], out)
    return Result(out, True, state["epoch"], state["best_epoch"], state["best_accuracy"], classes,
                  state["history"], confusion, state["stopped_early"], time.perf_counter() - started,
                  curves, loading.load(out))


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
    fine_tune = config.mode == "fine-tune"
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
                pixels, targets = pending.result()
                if next_indices is not None:  # decode the next batch while this one trains
                    pending = prefetcher.submit(load, next_indices)
                inputs = to_tensor(list(pixels)).to(self.device)
                yield (lambda: self.model(inputs)), torch.from_numpy(targets).to(self.device)

        return self._train_batches(prefetched(), len(batches), epoch)

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
    def features(self, images: LabelledImages, decoder: Decoder, pool, description: str) -> torch.Tensor:
        """(N, feature_dim) float32 feature vectors, eval preprocessing, model in eval mode."""
        self.model.eval()
        vectors = []
        for inputs in self._eval_inputs(images, decoder, pool, description):
            with self._autocast():
                vectors.append(self.model.feature_vector(inputs).float())
        return torch.cat(vectors) if vectors else torch.empty((0, self.model.num_features), device=self.device)

    @_one_thread
    def train_features(self, features: torch.Tensor, targets: torch.Tensor, epoch: int) -> dict:
        batches = epoch_batches(len(features), self.config.batch_size, self.config.seed, epoch)

        def pairs():
            for indices in batches:
                rows = torch.from_numpy(indices).to(self.device)
                yield (lambda: self.model.classifier(self.model.dropout(features[rows]))), targets[rows]

        return self._train_batches(pairs(), len(batches), epoch)

    @_one_thread
    @torch.no_grad()
    def evaluate_features(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, np.ndarray]:
        self.model.eval()
        return self._scores(self.model.classifier(features), targets)

    def _eval_inputs(self, images: LabelledImages, decoder: Decoder, pool, description: str) -> Iterator[torch.Tensor]:
        size = self.config.batch_size * 2  # no gradients: twice the batch fits
        starts = range(0, len(images), size)
        with self._bar(len(starts), description) as bar:
            for start in starts:
                pixels, _ = evaluation_batch(images, range(start, min(start + size, len(images))), decoder, pool)
                yield to_tensor(list(pixels)).to(self.device)
                bar.update()

    @staticmethod
    def _scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, np.ndarray]:
        """(cross-entropy without smoothing, accuracy, predicted classes) of a whole split."""
        logits = logits.float()
        predictions = logits.argmax(dim=1)
        loss = F.cross_entropy(logits, targets).item()
        return loss, float((predictions == targets).float().mean()), predictions.cpu().numpy()
