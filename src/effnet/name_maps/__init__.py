"""Upstream variable names -> effnet parameter names, one table per upstream scheme.

Each scheme module (keras.py, model_garden.py, tpu.py, automl.py) lists, for a given architecture, the upstream
layers in the upstream's own creation order as `UpstreamLayer(name, kind, target)`. The kind says which variables
the layer holds and how each is laid out; this module turns the tables plus a dict of upstream arrays into a
state dict, and refuses anything that is not a total, shape-exact load (STYLE 15, 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import WeightsError


@dataclass(frozen=True)
class UpstreamLayer:
    name: str  # upstream layer (or variable scope) name, e.g. "block1a_dwconv", "stack_0/block_0/depthwise_conv2d"
    kind: str  # a key of KINDS
    target: str  # effnet module path, e.g. "stages.0.0.depthwise.conv"


# TF layouts -> PyTorch layouts, and back (for writing upstream files in tests and exports).
# conv kernel: TF (kh, kw, in, out) -> torch (out, in, kh, kw); depthwise: TF (kh, kw, C, 1) -> torch (C, 1, kh, kw);
# dense: TF (in, out) -> torch (out, in).
Layout = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
CONV: Layout = (lambda a: a.transpose(3, 2, 0, 1), lambda t: t.transpose(2, 3, 1, 0))
DEPTHWISE: Layout = (lambda a: a.transpose(2, 3, 0, 1), lambda t: t.transpose(2, 3, 0, 1))
DENSE: Layout = (lambda a: a.T, lambda t: t.T)
AS_IS: Layout = (lambda a: a, lambda t: t)

# kind -> [(upstream variable, effnet parameter, layout)] in the upstream's variable order
KINDS: dict[str, list[tuple[str, str, Layout]]] = {
    "conv": [("kernel", "weight", CONV)],
    "conv_bias": [("kernel", "weight", CONV), ("bias", "bias", AS_IS)],
    "depthwise": [("depthwise_kernel", "weight", DEPTHWISE)],
    "bn": [("gamma", "weight", AS_IS), ("beta", "bias", AS_IS),
           ("moving_mean", "running_mean", AS_IS), ("moving_variance", "running_var", AS_IS)],
    "dense": [("kernel", "weight", DENSE), ("bias", "bias", AS_IS)],
    # PyTorch ports (already in torch layout)
    "torch_conv": [("weight", "weight", AS_IS)],
    "torch_conv_bias": [("weight", "weight", AS_IS), ("bias", "bias", AS_IS)],
    "torch_bn": [("weight", "weight", AS_IS), ("bias", "bias", AS_IS),
                 ("running_mean", "running_mean", AS_IS), ("running_var", "running_var", AS_IS)],
    "torch_linear": [("weight", "weight", AS_IS), ("bias", "bias", AS_IS)],
}


def expected_variables(layers: list[UpstreamLayer]) -> dict[str, tuple[str, Layout]]:
    """upstream "layer/variable" -> (effnet parameter, layout)."""
    table = {}
    for layer in layers:
        for variable, parameter, layout in KINDS[layer.kind]:
            table[f"{layer.name}/{variable}"] = (f"{layer.target}.{parameter}", layout)
    return table


def to_state_dict(arrays: dict[str, np.ndarray], layers: list[UpstreamLayer], model: torch.nn.Module,
                  *, source: str, ignore: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
    """Map upstream arrays onto `model`'s parameters; every variable used, every parameter filled, shapes exact.

    `ignore` names upstream variables that are known not to be parameters (optimizer slots, preprocessing
    constants that effnet applies itself); everything else unmapped is an error.
    """
    table = expected_variables(layers)
    own = model.state_dict()
    state, mis_shaped = {}, []
    for name, (parameter, (to_torch, _)) in table.items():
        if name not in arrays:
            continue
        value = np.ascontiguousarray(to_torch(np.asarray(arrays[name])))
        if parameter not in own or tuple(own[parameter].shape) != value.shape:
            expected = tuple(own[parameter].shape) if parameter in own else "no such parameter"
            mis_shaped.append(f"{name} {value.shape} -> {parameter} {expected}")
            continue
        state[parameter] = torch.from_numpy(value).to(own[parameter].dtype)
    unexpected = sorted(n for n in arrays if n not in table and not ignore(n))
    missing = sorted(
        p for p in own if p not in state and not p.endswith("num_batches_tracked")
    )
    if unexpected or missing or mis_shaped:
        parts = [f"weights in {source} do not fit {getattr(model, 'spec', None) and model.spec.name}:"]
        if mis_shaped:
            parts.append(f"  mis-shaped ({len(mis_shaped)}): " + "; ".join(mis_shaped[:20]))
        if unexpected:
            parts.append(f"  unexpected upstream variables ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        if missing:
            parts.append(f"  parameters left unfilled ({len(missing)}): " + ", ".join(missing[:20]))
        parts.append("  Check that the file is for this architecture (name and size) and of this naming scheme.")
        raise WeightsError("\n".join(parts))
    for p in own:
        if p.endswith("num_batches_tracked"):
            state[p] = own[p]
    return state


def from_state_dict(state: dict[str, torch.Tensor], layers: list[UpstreamLayer]) -> dict[str, np.ndarray]:
    """The inverse: effnet parameters -> upstream "layer/variable" arrays in upstream layouts."""
    out = {}
    for name, (parameter, (_, to_upstream)) in expected_variables(layers).items():
        out[name] = np.ascontiguousarray(to_upstream(state[parameter].detach().cpu().numpy()))
    return out
