"""The linear probe as the field runs it: multinomial logistic regression on cached feature vectors, solved to
convergence with full-batch L-BFGS, its L2 strength chosen on the validation split over a log grid.

This is the protocol of CLIP's linear-probe evaluation (Radford et al. 2021, appendix A.3: scikit-learn's
L-BFGS logistic regression, the L2 strength swept on a validation split) and of BiT's (Kolesnikov et al. 2020).
A few epochs of mini-batch AdamW on a zero head stop far from that optimum on small sets (issue 14: 30 epochs
of ~9 steps on 330 digits reached 0.61-0.64, scikit-learn's `LogisticRegression` on the same features
0.71-0.74); this probe matches scikit-learn's best C (tests/test_finetune_probe.py).

    probe = fit(train_features, train_targets, val_features, val_targets, num_classes)
    probe.fold_into(model.classifier)        # the head now takes raw feature vectors

The objective for strength `l2` is mean cross-entropy + l2/2 * ||W||^2 (the bias is not penalized), on
standardized features (each column minus its train mean, over its train standard deviation). scikit-learn's
`C` is the same fit with l2 = 1 / (C * n_train). It runs in float64 on the CPU: the problem is small
(n x feature_dim x classes) and float32's rounding stops L-BFGS early, a few tenths of a percent short.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# L2 strengths swept, strongest first (each fit starts from the previous one's solution: warm starts make the
# sweep about 3x cheaper). Half-decade steps from 1e2 (weights near zero: the class-mean direction, which is
# what wins on a hundred images) to 1e-6 (nearly unregularized on a few hundred): scikit-learn's C from 1e-4
# to 1e4 at n = 100..10,000, and inside CLIP's sweep (C from 1e-6 to 1e6).
L2_GRID = tuple(10.0 ** (k / 2) for k in range(4, -13, -1))
MAX_ITERATIONS = 1000  # L-BFGS iterations per fit; the gradient tolerance ends most fits well before
GRADIENT_TOLERANCE = 1e-7
HISTORY = 20


@dataclass
class Probe:
    """A fitted probe: logits = weight @ ((x - mean) / std) + bias, and how its strength was chosen."""

    weight: torch.Tensor  # (classes, features) float64, on standardized features
    bias: torch.Tensor  # (classes,)
    mean: torch.Tensor  # (features,)
    std: torch.Tensor  # (features,)
    l2: float  # the chosen strength
    refit_on_validation: bool  # True: the final fit used train + validation (see `fit`)
    sweep: list[dict] = field(default_factory=list)  # per strength: l2, val_accuracy, val_loss, iterations
    val_predictions: np.ndarray | None = None  # of the train-only fit at `l2`; None without validation

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return _standardized(features.double().cpu(), self.mean, self.std) @ self.weight.T + self.bias

    @torch.no_grad()
    def fold_into(self, classifier: nn.Linear) -> None:
        """Write the probe into `classifier` so that it takes raw feature vectors:
        W ((x - m) / s) + b = (W / s) x + (b - W (m / s))."""
        weight = self.weight / self.std
        bias = self.bias - weight @ self.mean
        classifier.weight.copy_(weight.to(classifier.weight))
        classifier.bias.copy_(bias.to(classifier.bias))


def fit(train_features: torch.Tensor, train_targets: torch.Tensor, val_features: torch.Tensor,
        val_targets: torch.Tensor, num_classes: int, *, refit_on_validation: bool = False,
        grid: tuple[float, ...] = L2_GRID) -> Probe:
    """The probe with the L2 strength of `grid` that scores best on the validation split; among equal
    accuracies (common on a few dozen validation images) the strongest, the simplest model. Without validation
    vectors the strength is the grid's median.

    refit_on_validation: fit again with the chosen strength on train + validation (CLIP's final step; 25% more
    data on a 80/20 split). Its validation accuracy is then no longer a held-out figure: the sweep's is reported.
    """
    with _one_thread():
        return _fit(train_features, train_targets, val_features, val_targets, num_classes, refit_on_validation,
                    grid)


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread for the solve: its matmuls (n x features x classes) are too small to gain from more,
    and beside other processes OpenMP's barriers cost far more than the work (the sweep on 264 digits: 40 s
    with 2 threads on 2 busy cores, 4 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(train_features, train_targets, val_features, val_targets, num_classes, refit_on_validation, grid) -> Probe:
    x, y = train_features.double().cpu(), train_targets.long().cpu()
    mean, std = _moments(x)
    x = _standardized(x, mean, std)
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    sweep, solutions, predictions = [], [], None
    if len(val_features):
        xv, yv = _standardized(val_features.double().cpu(), mean, std), val_targets.long().cpu()
        for l2 in grid:
            weight, bias, iterations = _minimize(x, y, l2, weight, bias)
            logits = xv @ weight.T + bias
            sweep.append({"l2": l2, "val_accuracy": float((logits.argmax(1) == yv).double().mean()),
                          "val_loss": float(F.cross_entropy(logits, yv)), "iterations": iterations})
            solutions.append((weight, bias, logits.argmax(1).numpy()))
        best = max(range(len(grid)), key=lambda i: (sweep[i]["val_accuracy"], grid[i]))
        l2, (weight, bias, predictions) = grid[best], solutions[best]
    else:
        l2 = sorted(grid)[len(grid) // 2]
        weight, bias, _ = _minimize(x, y, l2, weight, bias)
    if refit_on_validation and len(val_features):
        x = torch.cat([train_features, val_features]).double().cpu()
        y = torch.cat([train_targets, val_targets]).long().cpu()
        mean, std = _moments(x)
        weight, bias, _ = _minimize(_standardized(x, mean, std), y, l2, weight, bias)
    return Probe(weight, bias, mean, std, l2, refit_on_validation and bool(len(val_features)), sweep, predictions)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a constant column (a ReLU6 unit that never fires on this data) gets std 1: it stays 0 after centring
    std = x.std(dim=0, unbiased=False)
    return x.mean(dim=0), torch.where(std > 1e-12, std, torch.ones_like(std))


def _standardized(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def _minimize(x: torch.Tensor, y: torch.Tensor, l2: float, weight: torch.Tensor,
              bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean cross-entropy + l2/2 ||W||^2 minimized by L-BFGS with a strong-Wolfe line search, from (weight,
    bias). Returns the solution and the iterations used. Convex: the start changes the time, not the optimum."""
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITERATIONS, history_size=HISTORY,
                                  tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise FloatingPointError(f"linear probe diverged at l2={l2}")
    return weight.detach(), bias.detach(), int(optimizer.state[weight].get("n_iter", 0))
