"""Fine-tuning, the hub modules' `trainable=True`: as an API and as the `effnet finetune` command.

    from effnet.finetune import set_trainable, with_new_head
    model = effnet.load("efficientnet_lite0")
    with_new_head(model, 5, ["daisy", "dandelion", "rose", "sunflower", "tulip"])
    set_trainable(model, trainable=True, train_batch_norm=False)   # BN statistics stay frozen in model.train()

    from effnet.finetune import Config, run
    result = run(Config(data="flowers/", out="flowers-lite0"))   # lp-ft, settings from the data -> a module

trainable.py  set_trainable, with_new_head, FrozenStatsBatchNorm2d
data.py       labelled folders and CSV manifests, the stratified split, training/eval pixels
augment.py    random resized crop, flip, RandAugment (tpu autoaugment.py's ops, with PIL)
train.py      Config, run, Result: the loop, the schedule; linear probe, full fine-tuning and LP-FT
probe.py      the linear probe: L-BFGS logistic regression on cached features, L2 chosen on validation
defaults.py   size, crop area, epochs and learning rate chosen from the data, each with its reason
checkpoint.py safetensors + JSON checkpoints (model, optimizer, trainer state), resume
report.py     metrics.jsonl, confusion matrix, report.json, curves.png
command.py    `effnet finetune`, a click command over `run`
"""

from .train import Config, Result, run
from .trainable import FrozenStatsBatchNorm2d, set_trainable, with_new_head

__all__ = ["Config", "Result", "run", "set_trainable", "with_new_head", "FrozenStatsBatchNorm2d"]
