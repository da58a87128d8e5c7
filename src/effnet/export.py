"""ONNX export of any effnet module, with dynamic batch and (for flexible-size modules) dynamic height/width.

    report = effnet.export.to_onnx(model, "b2.onnx", signature="logits")
    report.max_relative_error   # max |onnx - torch| / max |torch| over the sizes checked (raises above 1e-4)

How, and why this way:
1. torch's exporter (`torch.onnx.export(..., dynamo=True)`) traces the module at ONE static size. Tracing with
   symbolic height/width does not work for these models: TF "SAME" padding of strided convolutions depends on
   the parity of the size at every stride (`tf_compat.same_padding`), and torch.export's symbolic shapes either
   give up ("Constraints violated ... != 1") or spend minutes in sympy on the nested ceil/max expressions
   (measured: 5 min for Lite0, against 10-20 s for the static export).
2. The static graph has every strided convolution's SAME padding folded into its `pads` attribute (or, with
   older exporters, a `Pad` node in front of it). ONNX has TF's rule built in: `auto_pad="SAME_UPPER"` pads
   `max((ceil(n/s) - 1) * s + k - n, 0)` with the odd pixel AFTER, exactly TF "SAME" (onnx/docs/Operators.md#Conv).
   So each strided convolution gets `auto_pad=SAME_UPPER` instead of its baked pads, after checking that the
   baked pads were TF SAME for the traced size (anything else is refused, not silently rewritten).
   Stride-1 convolutions keep their symmetric `k // 2` pads, which are SAME for every size.
3. The input's batch/height/width become named symbolic dimensions and the traced intermediate shapes are
   dropped, so runtimes infer them per call.
4. The file is run with ONNX Runtime against the PyTorch module at the traced size (batch 2) AND at an odd,
   non-square size, odd at every stride (32m + 1 rows, batch 1); the export fails above `tolerance`.

The graph's input is `images` (float32 NCHW RGB in [0, 1], the model's own contract; normalization is inside);
its output is `logits` or `features`. The spec, signature and labels travel as ONNX metadata (`effnet.*`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EffnetError

SIGNATURES = ("logits", "features")
INPUT_NAME = "images"
DEFAULT_TOLERANCE = 1e-4  # the bound for "same numbers" after export; measured: ~1e-6 (docs/engines.md)


class ExportError(EffnetError):
    """An export that failed, or whose file does not compute what the PyTorch module computes."""


@dataclass(frozen=True)
class ExportReport:
    """What `to_onnx` wrote and how well the file matches the PyTorch module."""

    path: Path
    signature: str  # "logits" | "features": the graph's output
    traced_size: tuple[int, int]  # (H, W) the graph was traced at
    dynamic_batch: bool
    dynamic_size: bool  # False for fixed-size modules (spec.fixed_size): the graph only takes traced_size
    max_relative_error: float | None  # None when verify=False
    checked: tuple[tuple[tuple[int, ...], float], ...] = ()  # (input shape, relative error) per check
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        dims = ("N" if self.dynamic_batch else "fixed N") + (", H, W dynamic" if self.dynamic_size else
                                                             f", {self.traced_size[0]}x{self.traced_size[1]} only")
        error = "not verified" if self.max_relative_error is None else f"max rel. error {self.max_relative_error:.1e}"
        return f"{self.path} ({self.signature}; {dims}; {error}; {self.seconds:.1f} s)"


class SignatureModule(nn.Module):
    """The module as one named hub signature: images -> logits, or images -> pooled features."""

    def __init__(self, model: nn.Module, signature: str):
        super().__init__()
        check_signature(model, signature)
        self.model = model
        self.signature = signature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.signature == "features":
            return self.model.feature_vector(images)
        return self.model(images)


def check_signature(model: nn.Module, signature: str) -> None:
    if signature not in SIGNATURES:
        raise ValueError(f"signature must be one of {SIGNATURES}, not {signature!r}")
    if signature == "logits" and getattr(model, "classifier", None) is None:
        raise ExportError(f"{model.spec.name} has no classifier (a feature-vector module); "
                          "use signature='features'")


def to_onnx(model: nn.Module, path: str | os.PathLike, *, signature: str = "logits", dynamic_batch: bool = True,
            dynamic_size: bool = True, input_size: tuple[int, int] | None = None, verify: bool = True,
            tolerance: float = DEFAULT_TOLERANCE, opset: int | None = None) -> ExportReport:
    """Write `model` as an ONNX file at `path` and check it against the module.

    dynamic_size=True makes height and width symbolic, unless the module fixes its size (`spec.fixed_size`,
    like the hub modules that only take their native size); the report says which. `input_size` is the (H, W)
    to trace at (default: the native size); with dynamic_size=False it is the only size the graph takes.
    verify=True (default) runs the file with onnxruntime (or openvino) and raises ExportError when the relative error exceeds `tolerance`.
    """
    start = time.perf_counter()
    onnx = _require("onnx")
    _require("onnxscript")  # torch's dynamo exporter writes the graph with it
    spec = model.spec
    notes = []
    if dynamic_size and spec.fixed_size:
        notes.append(f"{spec.name} is a fixed-size module: exported for {spec.native_size}x{spec.native_size} only")
        dynamic_size = False
    height, width = input_size or (spec.native_size, spec.native_size)
    was_training = model.training
    model.eval()  # dropout and batch-norm statistics as in inference, for the trace and for the check
    try:
        proto = _trace(SignatureModule(model, signature), (2 if dynamic_batch else 1, 3, height, width), signature, opset)
        if dynamic_size:
            _make_size_dynamic(proto, (height, width))
        _set_input_dims(proto, dynamic_batch, dynamic_size, signature)
        _add_metadata(proto, model, signature)
        onnx.checker.check_model(proto, full_check=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(proto, path)
        checked: list[tuple[tuple[int, ...], float]] = []
        worst = None
        if verify:
            for shape in verification_shapes((height, width), dynamic_batch, dynamic_size):
                checked.append((shape, _compare_with_torch(path, model, signature, shape)))
            worst = max(error for _, error in checked)
            if not worst <= tolerance:  # also catches NaN
                bad = ", ".join(f"{'x'.join(map(str, s))}: {e:.1e}" for s, e in checked)
                path.unlink(missing_ok=True)
                raise ExportError(f"the ONNX export of {spec.name} does not match the PyTorch module "
                                  f"(max relative error {worst:.1e} > {tolerance:.0e}; {bad}); nothing was kept. "
                                  "Please report this with the model name and the torch/onnx versions.")
    finally:
        model.train(was_training)
    return ExportReport(path=path, signature=signature, traced_size=(height, width), dynamic_batch=dynamic_batch,
                        dynamic_size=dynamic_size, max_relative_error=worst, checked=tuple(checked),
                        seconds=time.perf_counter() - start, notes=tuple(notes))


def verification_shapes(traced: tuple[int, int], dynamic_batch: bool, dynamic_size: bool) -> list[tuple[int, ...]]:
    """The traced size, and (if dynamic) an odd, non-square size that is odd at every stride.

    32m + 1 stays odd through all five stride-2 layers (ceil((32m + 1) / 2) = 16m + 1, ...), so every SAME
    padding takes the other branch than at an even traced size like 224 or 260.
    """
    height, width = traced
    shapes = [(2 if dynamic_batch else 1, 3, height, width)]
    if dynamic_size:
        odd_height = 32 * max(1, round(height / 32)) + 1
        odd_width = 32 * max(2, round(width / 32)) - 31  # also odd at every stride; differs from odd_height
        shapes.append((1, 3, odd_height, odd_width))  # batch 1 also differs from the traced batch of 2
    return shapes


# ------------------------------------------------------------------------------------------------ tracing
def _trace(module: nn.Module, shape: tuple[int, ...], signature: str, opset: int | None):
    """torch's dynamo exporter at one static shape -> onnx.ModelProto (constant-folded, pads fused into Conv)."""
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    options = {"opset_version": opset} if opset else {}
    with _quiet_exporter():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[signature], optimize=True, verbose=False, **options)
    if program is None:
        raise ExportError("torch.onnx.export returned nothing; effnet needs torch >= 2.5 for the dynamo exporter")
    return program.model_proto


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs progress lines and warns about torchvision ops it skips; none of it concerns us."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as sink:
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                sink.close()
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------- graph rewrite
def _make_size_dynamic(proto, traced: tuple[int, int]) -> None:
    """Replace the baked SAME padding of every strided Conv with auto_pad=SAME_UPPER (see the module docstring)."""
    from onnx import helper, numpy_helper, shape_inference

    graph = proto.graph
    shapes = _value_shapes(shape_inference.infer_shapes(proto), graph)
    producers = {output: node for node in graph.node for output in node.output}
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    removed_pads = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        strides = list(attributes.get("strides", [1, 1]))
        if max(strides) == 1:
            continue
        kernel = list(attributes["kernel_shape"])
        baked = list(attributes.get("pads", [0, 0, 0, 0]))  # [top, left, bottom, right]
        source = node.input[0]
        pad_node = producers.get(source)
        if pad_node is not None and pad_node.op_type == "Pad":  # an unfused F.pad in front (older onnxscript)
            explicit = _constant_pads(pad_node, constants)
            baked = [b + e for b, e in zip(baked, explicit)]
            source = pad_node.input[0]
            removed_pads.append(pad_node)
        input_shape = shapes.get(source)
        if input_shape is None or len(input_shape) != 4:
            raise ExportError(f"cannot make {node.name!r} size-dynamic: the shape of its input is unknown")
        expected = _tf_same_pads(input_shape[2:], kernel, strides)
        if baked != expected:
            raise ExportError(f"strided convolution {node.name!r} has pads {baked}, not TF SAME {expected} for "
                              f"input {input_shape}; export with dynamic_size=False")
        node.input[0] = source
        keep = [a for a in node.attribute if a.name not in ("pads", "auto_pad")]
        del node.attribute[:]
        node.attribute.extend([*keep, helper.make_attribute("auto_pad", "SAME_UPPER")])
    for pad_node in removed_pads:
        if not any(pad_node.output[0] in n.input for n in graph.node if n is not pad_node):
            graph.node.remove(pad_node)
    leftover = [n.name for n in graph.node if n.op_type in ("Pad", "Reshape", "Expand", "Tile", "Resize")]
    if leftover:  # these could hold the traced size as a constant; the odd-size check would catch it anyway
        raise ExportError(f"the traced graph has size-dependent nodes {leftover[:5]}; "
                          "export with dynamic_size=False")


def _tf_same_pads(size: list[int], kernel: list[int], strides: list[int]) -> list[int]:
    """[top, left, bottom, right] of TF SAME (the smaller half before), as ONNX orders Conv pads."""
    before, after = [], []
    for n, k, s in zip(size, kernel, strides):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        before.append(total // 2)
        after.append(total - total // 2)
    return before + after


def _constant_pads(pad_node, constants) -> list[int]:
    """A 4-D constant zero Pad's spatial pads as Conv orders them, [top, left, bottom, right]."""
    pads = constants.get(pad_node.input[1]) if len(pad_node.input) > 1 else None
    mode = next((a.s for a in pad_node.attribute if a.name == "mode"), b"constant")
    value = constants.get(pad_node.input[2]) if len(pad_node.input) > 2 and pad_node.input[2] else None
    if pads is None or mode != b"constant" or (value is not None and float(value) != 0.0):
        raise ExportError(f"Pad node {pad_node.name!r} is not a constant zero pad; export with dynamic_size=False")
    pads = [int(p) for p in pads]  # ONNX: [x1_begin, x2_begin, ..., x1_end, x2_end, ...] over N, C, H, W
    if pads[0] or pads[1] or pads[4] or pads[5]:
        raise ExportError(f"Pad node {pad_node.name!r} pads batch or channels; export with dynamic_size=False")
    return [pads[2], pads[3], pads[6], pads[7]]


def _value_shapes(inferred, graph) -> dict[str, list[int]]:
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _set_input_dims(proto, dynamic_batch: bool, dynamic_size: bool, signature: str) -> None:
    """Name the symbolic dimensions and drop the traced intermediate shapes (runtimes infer them per call)."""
    graph = proto.graph
    names = ["batch" if dynamic_batch else None, None,
             "height" if dynamic_size else None, "width" if dynamic_size else None]
    for dim, name in zip(graph.input[0].type.tensor_type.shape.dim, names):
        if name:
            dim.ClearField("dim_value")
            dim.dim_param = name
    if dynamic_batch:
        for output in graph.output:
            dim = output.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_value")
            dim.dim_param = "batch"
    if dynamic_batch or dynamic_size:
        del graph.value_info[:]


def _add_metadata(proto, model: nn.Module, signature: str) -> None:
    spec = model.spec
    entries = {
        "effnet.spec": json.dumps(spec.to_json(), sort_keys=True, default=str),
        "effnet.signature": signature,
        "effnet.input": "images: float32 NCHW RGB in [0, 1]; normalization is inside the graph",
    }
    if signature == "logits" and getattr(model, "labels", None):
        entries["effnet.labels"] = "\n".join(model.labels)
    for key, value in entries.items():
        item = proto.metadata_props.add()
        item.key, item.value = key, value
    proto.producer_name = "effnet"


def _atomic_save(proto, path: Path) -> None:
    import onnx

    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        onnx.save(proto, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------- verification
def _compare_with_torch(path: Path, model: nn.Module, signature: str, shape: tuple[int, ...]) -> float:
    images = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = run_onnx_file(path, images.numpy())
    with torch.inference_mode():
        reference = SignatureModule(model, signature)(images).float().numpy()
    return relative_error(ours, reference)


def run_onnx_file(path: Path, images: np.ndarray) -> np.ndarray:
    """One fp32 run of an exported file: with ONNX Runtime, or OpenVINO when only that is installed."""
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {INPUT_NAME: images})[0]
    try:
        import openvino
    except ImportError as error:
        raise ExportError("checking the export needs onnxruntime or openvino: pip install 'effnet[onnx]', "
                          "or pass verify=False") from error
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(images)[0]


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference| (the issue's metric)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        return math.inf
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


_EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def _require(package: str):
    """Import an optional package, or say which pip command provides it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        extra = _EXTRAS.get(package, package)
        raise ExportError(f"{package} is not installed; pip install 'effnet[{extra}]' (or pip install {package})") from error
