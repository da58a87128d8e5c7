"""Training checkpoints as safetensors + JSON: no pickle anywhere, so a checkpoint is safe to load from anyone.

Layout, under OUTDIR/checkpoints/:

    latest.json                  {"epoch": 3, "directory": "epoch-0003"}; replaced atomically, read by --resume
    epoch-0003/model.safetensors      the tensors training changes (linear probe: the classifier; fine-tune:
                                      the whole state dict, batch-norm statistics included)
    epoch-0003/optimizer.safetensors  the optimizer's per-parameter tensors, key "<parameter index>.<name>"
    epoch-0003/trainer.json           epoch, optimizer step, history, best epoch, the run's settings, and the
                                      optimizer's param_groups and non-tensor per-parameter values
    best.safetensors                  the model tensors of the best validation epoch so far

An optimizer's `state_dict()` is {"state": {index: {name: tensor or value}}, "param_groups": [...]}: its tensors
go to optimizer.safetensors, the rest (plain numbers, lists, None) to trainer.json. Only the newest epoch
directory is kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import EffnetError

LATEST = "latest.json"
BEST = "best.safetensors"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors for safetensors, JSON-able rest)."""
    tensors, values = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            key = f"{index}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                values[key] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of `flatten_optimizer`: a dict `optimizer.load_state_dict` accepts."""
    state: dict[int, dict] = defaultdict(dict)
    for key, value in [*tensors.items(), *rest["values"].items()]:
        index, name = key.split(".", 1)
        state[int(index)][name] = value
    return {"state": dict(state), "param_groups": rest["param_groups"]}


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors, written beside and renamed into place: a crash never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary))
    os.replace(temporary, path)


def save(folder: Path, epoch: int, model_tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         trainer: dict) -> None:
    """Write the checkpoint of `epoch`, point latest.json at it, then delete the older epoch directories."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    target = folder / name
    if target.exists():
        shutil.rmtree(target)
    staging = folder / (name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_tensors(model_tensors, staging / MODEL)
    optimizer_tensors, optimizer_rest = flatten_optimizer(optimizer.state_dict())
    save_tensors(optimizer_tensors, staging / OPTIMIZER)
    (staging / TRAINER).write_text(json.dumps({**trainer, "epoch": epoch, "optimizer": optimizer_rest}, indent=1))
    os.replace(staging, target)
    _atomic_write_text(folder / LATEST, json.dumps({"epoch": epoch, "directory": name}))
    for old in folder.glob("epoch-*"):
        if old.name != name:
            shutil.rmtree(old)


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model tensors, optimizer state dict, trainer JSON) of the latest checkpoint in `folder`."""
    pointer = folder / LATEST
    if not pointer.exists():
        raise EffnetError(f"{folder}: no checkpoint to resume from ({LATEST} is missing); run without --resume")
    directory = folder / json.loads(pointer.read_text())["directory"]
    trainer = json.loads((directory / TRAINER).read_text())
    optimizer_rest = trainer.pop("optimizer")
    optimizer_state = unflatten_optimizer(load_file(str(directory / OPTIMIZER)), optimizer_rest)
    return load_file(str(directory / MODEL)), optimizer_state, trainer


def exists(folder: Path) -> bool:
    return (folder / LATEST).exists()
