"""The hub's `trainable=` for a loaded module, with batch norm as a separate choice, and a new head for your classes.

TF Hub: `hub.KerasLayer(handle, trainable=False)` (the default) freezes the module's weights; with
`trainable=True` they train, and a module called with `training=True` also runs its batch norm in training
mode (tensorflow/hub#24: the "train" graph "operates batch norm in training mode"): it normalizes with each
batch's statistics and moves the running statistics towards them. That is the modules' known pitfall: on the
small batches of a fine-tuning set the running statistics drift away from ImageNet's and inference accuracy
drops (the Keras transfer-learning guide: keep batch norm in inference mode when you unfreeze a base model).
Here the two are separate choices:

    set_trainable(model, trainable=True, train_batch_norm=False)   # weights train, BN statistics stay frozen

A frozen batch norm stays frozen through `model.train()`: its class becomes `FrozenStatsBatchNorm2d`, whose
`train()` always leaves it in inference mode. Its gamma and beta still train when `trainable=True`.

`set_trainable` covers the backbone, everything but `model.classifier`: the classifier is your head (see
`with_new_head`) and keeps its own `requires_grad`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import EffnetError
from ..model import EfficientNet


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics are frozen: it always normalizes with them and never updates them,
    even after `model.train()`. Its weight (gamma) and bias (beta) still learn when they require grad.

    The state dict is the plain BatchNorm2d's, so checkpoints and `effnet.save` do not see the difference.
    """

    def train(self, mode: bool = True) -> "FrozenStatsBatchNorm2d":
        return super().train(False)


def set_trainable(model: EfficientNet, trainable: bool = False, train_batch_norm: bool = False) -> EfficientNet:
    """Freeze or unfreeze the backbone of `model` in place (and return it), as the hub's `trainable=`.

    trainable: whether the backbone's weights (convolutions, SE, BN gamma/beta) require grad.
    train_batch_norm: whether batch norm uses batch statistics and updates its running statistics in
        `model.train()` (True) or always uses the running statistics and leaves them unchanged (False).
    """
    for name, parameter in model.named_parameters():
        if not name.startswith("classifier."):
            parameter.requires_grad_(trainable)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # Swapping the class keeps the module object, its parameters and buffers: optimizers, hooks and
            # references to it stay valid (a new module would orphan them).
            module.__class__ = nn.BatchNorm2d if train_batch_norm else FrozenStatsBatchNorm2d
            module.train(model.training)
    return model


def is_batch_norm_frozen(model: EfficientNet) -> bool:
    """Whether every batch norm of `model` has frozen statistics (see `set_trainable`)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return all(isinstance(m, FrozenStatsBatchNorm2d) for m in norms)


def with_new_head(model: EfficientNet, num_classes: int, labels: Sequence[str] | None = None) -> EfficientNet:
    """Replace the classifier of `model` in place (and return it) by a new one for `num_classes` classes.

    Works on feature-vector modules (no classifier) and classification modules alike; num_classes=0 removes
    the classifier, leaving a feature-vector module. `labels` (one name per class) become `model.labels`,
    which `effnet.save` writes to labels.txt.

    The new layer starts at zero, weights and bias, as BiT does for transfer (Kolesnikov et al. 2020, "Big
    Transfer", section 3.3: "we initialize the head to all zeros"): the first logits are all 0 (loss ln C) and
    no gradient reaches the backbone until the head has learned something. Keras's Dense default (Glorot
    uniform), which the hub tutorials use, starts with logits of a few units and sends large random gradients
    into the backbone. Measured, full fine-tuning of Lite0 (frozen BN, AdamW 1e-3, 3 epochs, the 600/200
    digits of tests/test_finetune.py): validation accuracy 0.13 / 0.24 / 0.33 per epoch from a Glorot head,
    0.49 / 0.89 / 0.94 from a zero head.
    """
    if num_classes < 0:
        raise EffnetError(f"num_classes must be 0 (no classifier) or more, not {num_classes}")
    if labels is not None and len(labels) != num_classes:
        raise EffnetError(f"{len(labels)} labels for {num_classes} classes: give one label per class, in class order")
    classifier = None
    if num_classes > 0:
        device = next(model.parameters()).device
        classifier = nn.Linear(model.num_features, num_classes, device=device)
        with torch.no_grad():
            classifier.weight.zero_()
            classifier.bias.zero_()
        classifier.train(model.training)
    model.classifier = classifier
    model.with_spec(num_classes=num_classes, output="logits" if num_classes else "features", labels=None)
    model.labels = list(labels) if labels is not None else None
    return model
