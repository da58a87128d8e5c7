"""The `effnet` command: a table of commands, each over a library function.

    effnet embed SRC... [-m MODEL] -o OUT.parquet|OUT.npy    feature vectors      (effnet.embed.run)
    effnet classify SRC... [-m MODEL] --top-k 5 -o OUT       top-k labels/scores  (effnet.embed.run)
    effnet models                                            the catalogue        (effnet.catalogue.list_modules)
    effnet info MODEL                                        a model's spec, JSON (effnet.create)
    effnet export MODEL -o OUT.onnx                          ONNX, verified       (effnet.export.to_onnx)
    effnet finetune DATA -o OUT                              a new head / LP-FT   (effnet.finetune.run)
    effnet serve [NAME=]MODEL... --port P                    V1 + V2 server       (effnet.serve, on kserve)
    effnet index EMB.parquet... -o INDEX_DIR                 faiss index          (effnet.search.Index.build)
    effnet search INDEX_DIR QUERY... -k 10                   nearest images       (effnet.search.Index.search)
    effnet dedup SRC|EMB.parquet -o groups.parquet           near-duplicates      (effnet.search.dedup)
    embed/classify ... --ray [ADDRESS]                       on Ray Data          (effnet.scale_out)

Exit status: 0 all inputs done; 3 some inputs failed (their rows say why); 130 interrupted (re-run the same
command to resume); 1 any other error; 2 bad usage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from .errors import EffnetError
from .pipeline.decode import RESIZE_MODES, recipe_for

EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="effnet")
def main() -> None:
    """EfficientNet (V1, Lite, V2) feature vectors and classifications for folders of images."""


class _ByteSize(click.ParamType):
    """A byte count written 1073741824, 1G, 512M or 64K (powers of 1024)."""

    name = "size"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        number, unit = (text[:-1], text[-1]) if text[-1:] in self._UNITS else (text, "")
        try:
            count = int(float(number) * self._UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size such as 512M or 2G", param, ctx)
        if count < 1:
            self.fail(f"{value!r} must be positive", param, ctx)
        return count


def _pipeline_options(command):
    """The options `embed` and `classify` share."""
    options = [
        click.argument("sources", nargs=-1, required=True),
        click.option("-m", "--model", default=None, help="Model name, hub handle or weights file [default: efficientnet_lite0]."),
        click.option("-o", "--output", required=True, type=click.Path(),
                     help="OUT.parquet (default format), or OUT.npy (+ sidecar OUT.parquet) for embed; with --ray "
                          "a folder (or s3://bucket/prefix/) of Parquet files."),
        click.option("--size", type=click.IntRange(min=1), help="Input resolution [default: the model's native size]."),
        click.option("--resize", type=click.Choice(RESIZE_MODES), default="crop", show_default=True,
                     help="crop: the family's eval recipe (centre crop S/(S+32)); pad: letterbox; stretch: squash."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--workers", type=click.IntRange(min=0), help="Decode workers [default: CPU count]; 0: decode inline."),
        click.option("--executor", type=click.Choice(["thread", "process"]), default="thread", show_default=True,
                     help="Decode in threads (Pillow releases the GIL) or processes."),
        click.option("--threads", type=click.IntRange(min=1), help="PyTorch intra-op threads [default: PyTorch's, the physical cores]."),
        click.option("--engine", type=click.Choice(["auto", "torch", "torch-compile", "onnxruntime", "openvino"]),
                     default="auto", show_default=True,
                     help="What runs the model. auto: eager torch for under 200 images; for more, it times the "
                          "installed engines once (cached) and keeps the fastest. See docs/engines.md."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8", "auto"]), default="fp32",
                     show_default=True, help="auto admits a reduced precision only with its measured error stated."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where the model runs. auto: a CUDA GPU where PyTorch sees one, else the CPU."),
        click.option("--path-column", default="path", show_default=True, help="Column of paths in CSV/Parquet manifests."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=None,
                     help="Refuse images with more pixels (a decompression-bomb guard) [default: 89,478,485]."),
        click.option("--decode-memory", type=_ByteSize(), default="1G", show_default=True,
                     help="Decode working memory all workers share (512M, 2G ...); larger images wait their turn, "
                          "one that could never fit is an error row. See docs/limits.md."),
        click.option("--shard-rows", type=click.IntRange(min=1), default=1024, show_default=True,
                     help="Rows per shard in OUT.parts/ (what an interruption can lose at most)."),
        click.option("--overwrite", is_flag=True, help="Start over: delete OUT and OUT.parts/ instead of resuming."),
        click.option("--ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                     help="Run on Ray Data. Alone: a Ray instance on this machine, or RAY_ADDRESS's cluster; with "
                          "ADDRESS (auto, host:port, ray://host:port): that cluster. Put it after SOURCES (or "
                          "write --ray=ADDRESS). See docs/scale-out.md."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@_pipeline_options
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage type of the vectors.")
def embed(**options) -> None:
    """Feature vectors of the images in SOURCES (files, folders, globs, manifests, URLs)."""
    _run("embed", **options)


@main.command()
@_pipeline_options
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=5, show_default=True)
def classify(**options) -> None:
    """Top-k class labels and probabilities of the images in SOURCES."""
    _run("classify", **options)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line (handle, key, sizes, format ...).")
def models(as_json: bool) -> None:
    """The catalogue: every TF Hub module effnet knows, by handle."""
    from . import catalogue

    for handle in catalogue.list_modules():
        if as_json:
            click.echo(json.dumps(_jsonable(catalogue.find(handle)), sort_keys=True, default=str))
        else:
            click.echo(handle)


@main.command()
@click.argument("model")
def info(model: str) -> None:
    """The spec of MODEL (architecture name, hub handle or weights file) as JSON, with its preprocessing."""
    import effnet

    from . import catalogue
    from .embed import _load_model

    with _errors_as_exit():
        if model in effnet.list_models():  # an architecture: no weights needed to describe it
            network = effnet.create(model)
            record, architecture = _jsonable(network.spec), network.spec
        else:
            try:
                found = catalogue.find(model)
            except effnet.EffnetError:
                network = _load_model(model)  # a weights file or module directory
                record, architecture = _jsonable(network.spec), network.spec
            else:
                record, architecture = _jsonable(found), effnet.create(found.architecture).spec
    recipe = recipe_for(architecture.name, architecture.family)
    crops = recipe.crops_at(architecture.native_size)
    record["preprocessing"] = {
        "resize": "crop" if crops else "stretch",
        "crop_padding": recipe.crop_padding if crops else None,
        "resample": recipe.resample.name.lower(),
        "input": "RGB in [0, 1], NCHW; normalization inside the model",
    }
    click.echo(json.dumps(record, indent=2, sort_keys=True, default=str))


def _run(task: str, *, sources, model, output, threads, quiet, **options) -> None:
    import torch

    from .embed import DEFAULT_MODEL, run

    if model is not None and not model.strip():
        raise click.UsageError("-m/--model is empty; name a model (effnet models lists them) or leave -m out "
                               "for the default, efficientnet_lite0")
    if threads:
        torch.set_num_threads(threads)
    if not options.get("ray") and os.path.isdir(output):
        raise click.BadParameter(f"{output} is a folder; the local job writes one file (a folder is --ray's output)",
                                 param_hint="-o/--output")
    try:
        with _errors_as_exit():
            report = run(task, list(sources), model or DEFAULT_MODEL, out=output, progress=not quiet, **options)
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: finished rows are saved in {output}{'' if options.get('ray') else '.parts'}/; "
            "run the same command again to resume",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    summary = report.summary
    skipped_by_reason, warned = getattr(report, "skipped", {}), getattr(report, "warnings", [])
    skipped = (f"skipped {sum(skipped_by_reason.values())} files: "
               + ", ".join(f"{count} {reason}" for reason, count in sorted(skipped_by_reason.items())))
    if summary.rows == 0:
        raise click.ClickException(f"found no images in {' '.join(sources)} (folders are searched for "
                                   "image extensions; name other files directly or in a manifest)"
                                   + (f"; {skipped}" if skipped_by_reason else ""))
    if skipped_by_reason:  # shown even with -q: inputs not taken are never silent
        click.echo(f"{skipped} (name them directly or in a manifest to read them anyway)", err=True)
    if warned:  # after the progress bar, not through it
        shown = "; ".join(f"{path}: {message}" for path, message in warned[:5])
        more = f" (and {len(warned) - 5} more)" if len(warned) > 5 else ""
        click.echo(f"{len(warned)} decoder warnings: {shown}{more}", err=True)
    if not quiet or summary.failed:
        done = summary.rows - summary.failed
        verb = "embedded" if task == "embed" else "classified"
        click.echo(
            f"{verb} {done} of {summary.rows} inputs -> {output} "
            f"({report.processed} this run, {report.resumed} resumed; "
            f"{report.seconds:.1f} s, {report.images_per_second:.1f} img/s)",
            err=True,
        )
        if summary.failed:
            reasons = "; ".join(f"{count} x {reason}" for reason, count in list(summary.errors.items())[:5])
            click.echo(f"{summary.failed} failed, see the 'error' column: {reasons}", err=True)
        if not quiet:
            stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report.stages.items())
            click.echo(f"time by stage: {stages} (decode is summed over workers)", err=True)
    if summary.failed:
        sys.exit(EXIT_SOME_FAILED)


class _errors_as_exit:
    """EffnetError (a user's mistake, with its fix in the message) -> 'Error: ...' and exit status 1."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, EffnetError):
            message = str(error)
            for library_hint, command in _CLI_HINTS.items():
                message = message.replace(library_hint, command)
            raise click.ClickException(message) from None
        return False


# The library's messages name Python functions; on the command line the command that does the same is the hint.
_CLI_HINTS = {"effnet.catalogue.list_modules()": "`effnet models`", "effnet.list_models()": "`effnet models`"}


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "to_json"):
        return value.to_json()
    return value if isinstance(value, (str, int, float, list, dict)) or value is None else str(value)


@main.command()
@click.argument("model")
@click.option("--format", "file_format", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="OUT.onnx")
@click.option("--signature", type=click.Choice(["logits", "features"]), default=None,
              help="The graph's output [default: what the model's forward gives].")
@click.option("--size", type=click.IntRange(min=1), help="Trace size [default: the model's native size].")
@click.option("--static-size", is_flag=True, help="Fixed height/width (default: dynamic for flexible-size models).")
def export(model, file_format, output, signature, size, static_size) -> None:
    """Write MODEL as ONNX (dynamic batch, dynamic H/W), verified against the PyTorch module on export."""
    from .embed import _load_model
    from .export import to_onnx
    with _errors_as_exit():
        network = _load_model(model)
        report = to_onnx(network, output, signature=signature or network.spec.output,
                         dynamic_size=not static_size, input_size=(size, size) if size else None)
    click.echo(report.summary())


def _register_commands_of_other_modules() -> None:
    """Commands that live beside their library code (the CLI stays a table of commands over library functions)."""
    # Each module imports its optional packages (kserve, faiss, ray) only when its command runs.
    from .finetune.command import finetune_command
    from .search.command import dedup_command, index_command, search_command
    from .serve.command import serve_command

    for command in (finetune_command, serve_command, index_command, search_command, dedup_command):
        main.add_command(command)


_register_commands_of_other_modules()

if __name__ == "__main__":
    main()
