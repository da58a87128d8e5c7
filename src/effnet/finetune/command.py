"""`effnet finetune DATA -m MODEL -o OUTDIR`: a click command over `effnet.finetune.run`.

Registered in effnet/cli.py with `main.add_command(finetune_command)`. Exit status: 0 done (or stopped at
--stop-after-epoch); 130 interrupted (the last finished epoch is checkpointed: add --resume); 1 any other error;
2 bad usage.
"""

from __future__ import annotations

import sys

import click

EXIT_INTERRUPTED = 130
# The choices, repeated from train.py so that --help needs no torch import (test_finetune checks they agree).
MODES = ("lp-ft", "fine-tune", "linear-probe")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
RESIZE_MODES = ("crop", "pad", "stretch")


@click.command("finetune", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("data", type=click.Path(exists=True))
@click.option("-m", "--model", default="efficientnet_lite0", show_default=True,
              help="The module to start from: a model name, hub handle, weights file or effnet module directory.")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="OUTDIR: the new effnet module, with metrics.jsonl, report.json, confusion_matrix.csv, "
                   "curves.png and checkpoints/.")
@click.option("--mode", type=click.Choice(MODES), default="lp-ft", show_default=True,
              help="linear-probe: frozen backbone, features computed once, logistic regression solved to "
                   "convergence on them (seconds on a CPU); fine-tune: train everything on augmented images "
                   "from a zero head; lp-ft: the probe, then fine-tuning from its head at a smaller rate.")
@click.option("--val", type=click.Path(exists=True), help="Validation folder/CSV [default: split off DATA].")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Stratified share of DATA held out for validation when there is no --val; 0: none.")
@click.option("--size", type=click.IntRange(min=1), help="Image size for training and evaluation [default: from "
                                                          "the images, at most the model's native size].")
@click.option("--resize", type=click.Choice(RESIZE_MODES), default="crop", show_default=True,
              help="Evaluation resize, as `effnet classify --resize`.")
@click.option("--epochs", type=click.IntRange(min=1),
              help="[default: from the data set's size, about 300 steps in 3..30 epochs]; not for linear-probe.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Gradient accumulation: micro-batches per optimizer step.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate [default: from the mode and the data set's size: adamw 1e-3 fine-tune, "
                   "1/3 of it for lp-ft, lower under 1,000 images; sgd 5x].")
@click.option("--weight-decay", type=click.FloatRange(min=0), help="[default: adamw 1e-2, sgd 1e-4]; never on "
                                                                   "biases and batch-norm gamma/beta.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Linear warm-up, then cosine decay to 0.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--min-crop-area", type=click.FloatRange(0, 1, min_open=True),
              help="Random resized crop: the smallest crop, as a fraction of the image area [default: from the "
                   "images' size: 0.5 up to 64 px, 0.25 up to 160 px, else ImageNet's 0.08].")
@click.option("--flip/--no-flip", default=None,
              help="Random horizontal flip [default: lp-ft fits the probe, then flips unless the probe scores "
                   "clearly worse on mirrored validation images; fine-tune: flip]. --no-flip for digits, text.")
@click.option("--randaugment", "randaugment_layers", type=click.IntRange(min=0), default=0, show_default=True,
              help="RandAugment ops per image (tpu uses 2); 0: off.")
@click.option("--randaugment-magnitude", type=click.FloatRange(0, 10), default=9.0, show_default=True)
@click.option("--train-batch-norm/--freeze-batch-norm", default=False, show_default=True,
              help="Fine-tune mode: update batch-norm statistics, or keep ImageNet's (safer on small batches).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="bfloat16: autocast (fast on CPUs with AVX512-BF16/AMX and on recent GPUs).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Split, head initialization, data order, augmentation, dropout: all follow from it.")
@click.option("--patience", type=click.IntRange(min=1),
              help="Early stopping: stop after this many epochs without a better validation accuracy.")
@click.option("--stop-after-epoch", type=click.IntRange(min=1),
              help="Stop after this epoch (the schedule still runs to --epochs); continue later with --resume.")
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in OUTDIR, with the same settings.")
@click.option("--overwrite", is_flag=True, help="Delete the checkpoints of an earlier run in OUTDIR and start over.")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True, help="Image decoding threads.")
@click.option("--threads", type=click.IntRange(min=1),
              help="PyTorch intra-op threads [default: 1 or the CPU count, whichever trains a step faster here, "
                   "timed at the start].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no per-epoch lines.")
def finetune_command(threads: int | None, resume: bool, overwrite: bool, quiet: bool, **options) -> None:
    """Fine-tune MODEL on the labelled images in DATA (one subfolder per class, or a path,label CSV) and
    write the result to OUTDIR as an effnet module: `effnet classify --model OUTDIR` uses it."""
    import torch

    from ..errors import EffnetError
    from .train import Config, run

    if threads:
        torch.set_num_threads(threads)
    config = Config(**options)
    try:
        result = run(config, resume=resume, overwrite=overwrite, progress=not quiet, choose_threads=not threads)
    except EffnetError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the last finished epoch is checkpointed in {config.out}/checkpoints; "
                   "run the same command with --resume to continue", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if not result.finished:
        click.echo(f"stopped after epoch {result.epochs_run}; run the same command with "
                   "--resume to continue", err=True)
        return
    accuracy = "no validation set" if result.val_accuracy is None else (
        f"validation accuracy {result.val_accuracy:.4f} at epoch {result.best_epoch}")
    click.echo(f"{config.mode}: {len(result.classes)} classes, {result.epochs_run} epoch(s), {accuracy}"
               f"{' (stopped early)' if result.stopped_early else ''}; {result.seconds:.1f} s -> {result.out}",
               err=True)
    if result.curves is None:
        click.echo("curves.png not drawn: matplotlib is not installed (pip install matplotlib)", err=True)
