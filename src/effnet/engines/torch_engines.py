"""PyTorch engines: eager (`torch`) and compiled (`torch-compile`), on CPU or CUDA.

Both run the engine's own copy of the model under `torch.inference_mode`, with three inference-only rewrites.
Measured with benchmarks/embed_folder.py on 2 cores, engine alone, batch 16, img/s (random weights, a shared
machine: the ratios are the point):

    model                  NCHW (PyTorch default)   channels_last   channels_last + folded BN + in-place act
    efficientnet_b2@260        2.43 | 7.69          3.28 | 13.90          4.92 | 17.71
    efficientnetv2_m@480       0.85 | 0.34          1.15 | 0.50           1.57 | 0.68

- channels_last weights and input: oneDNN's and cuDNN's depthwise and 1x1 convolutions are NHWC-native, so
  NCHW input is reordered around every layer;
- batch norm folded into the convolution before it (`fuse_conv_bn_eval`): one pass less over every activation.
  The folded weights are the same affine map rounded differently: outputs move by ~1e-6 relative;
- activations in place: every activation here follows a convolution whose output nothing else reads.
(`torch.jit.freeze` + `optimize_for_inference` measured 9.7 img/s for B2 where this engine gave 17.6.)
Reduced precision is autocast over fp32 weights:
bf16 (CPU with AVX512-BF16/AMX, or CUDA), fp16 (CUDA). On CUDA, fp32 means fp32: TF32 convolutions are
switched off for the call (cuDNN's default would round inputs to 10 mantissa bits), and with a fixed
input size and batch the eager engine replays a captured CUDA graph (no per-layer launch overhead).
"""

from __future__ import annotations

import contextlib
import copy
import os

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .base import TORCH_RUN_PIXELS, Engine, EngineUnavailableError, images_per_run, machine

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
INPLACE_ACTIVATIONS = (nn.SiLU, nn.ReLU6, nn.ReLU, nn.Hardswish)


def check_precision(engine: str, precision: str, device: str, emulate: bool = False) -> str | None:
    """None when `engine` can run `precision` on `device`, else the reason it cannot.

    Without bf16 instructions PyTorch runs bf16 convolutions in its reference kernel (`_slow_conv2d_forward`,
    one call per depthwise group): Lite0 @ 224, batch 4 took 20-120 s against 0.3 s in fp32 on this project's
    AVX2 machine. That is refused unless asked for with emulate=True (numerics checks only).
    """
    if precision == "int8":
        return f"{engine} has no int8 path; use engine='openvino' or 'onnxruntime' with precision='int8'"
    if device == "cpu" and precision == "fp16" and not machine().native_fp16 and not emulate:
        return "fp16 on this CPU has no hardware support (AVX512-FP16/AMX-FP16); use fp32 (or bf16 where native)"
    if device == "cpu" and precision == "bf16" and not machine().native_bf16 and not emulate:
        return ("bf16 needs AVX512-BF16 or AMX on the CPU and this one has neither (PyTorch would run its slow "
                "reference convolution, ~100x slower than fp32); use precision='fp32', or emulate=True to check "
                "bf16 numerics")
    return None


class TorchEngine(Engine):
    """Eager PyTorch, channels_last, inference_mode, autocast for bf16/fp16; CUDA graphs on CUDA."""

    name = "torch"
    accepts = "torch"

    def __init__(self, model, *, precision="fp32", device="cpu", signature="logits", input_size=None,
                 batch_size=None, channels_last: bool = True, fold_batch_norm: bool = True,
                 cuda_graphs: bool | None = None, emulate: bool = False, run_images: int | None = None):
        super().__init__(model, precision=precision, device=device, signature=signature,
                         input_size=input_size, batch_size=batch_size)
        reason = check_precision(self.name, precision, device, emulate)
        if reason:
            raise EngineUnavailableError(reason)
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailableError("device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Our own copy: moving to the device and to channels_last must not change the caller's model.
        self.model = copy.deepcopy(model).eval()
        if fold_batch_norm:
            fold_batch_norms(self.model)
        for module in self.model.modules():
            if isinstance(module, INPLACE_ACTIVATIONS):
                module.inplace = True
        self.model.to(device=device, memory_format=self.memory_format)
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        # CPU: a batch runs in pieces of about TORCH_RUN_PIXELS (base.images_per_run: V2-M @ 480 in runs of 2
        # images, 1.27x one run of 8). CUDA wants whole batches.
        self.run_images = run_images or (images_per_run(self.input_size, TORCH_RUN_PIXELS) if device == "cpu"
                                         else self.batch_size)
        self.cuda_graphs = (device == "cuda" and input_size is not None) if cuda_graphs is None else cuda_graphs
        self._graph = None  # (input shape, static input, static output, CUDAGraph) once captured
        emulated = device == "cpu" and (precision == "bf16" and not machine().native_bf16
                                        or precision == "fp16" and not machine().native_fp16)
        self.details = ", ".join(filter(None, [
            "channels_last" if channels_last else "NCHW",
            "folded BN" if fold_batch_norm else "",
            "autocast" if self.autocast_dtype else "",
            f"emulated {precision} (no hardware support: slow)" if emulated else "",
            "CUDA graphs" if self.cuda_graphs else "",
        ]))

    def warm_up(self) -> None:
        """Eager CPU has nothing to prepare; CUDA picks cuDNN algorithms and captures its graph."""
        if self.device == "cuda":
            super().warm_up()

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.signature == "features":
            return self.model.feature_vector(images)
        return self.model(images)

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device, dtype=self.autocast_dtype))
        if self.device == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False,
                                                           allow_tf32=self.precision != "fp32"))
        return stack

    def _run(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        if self.cuda_graphs and self.input_size and tuple(batch.shape) == (self.batch_size, 3, *self.input_size):
            return self._replay(batch)
        with self._context():
            if len(batch) <= self.run_images:
                return self._forward(batch).float().cpu().numpy()
            step = self.run_images
            return torch.cat([self._forward(batch[i:i + step]).float() for i in range(0, len(batch), step)]).numpy()

    def _replay(self, batch: torch.Tensor) -> np.ndarray:
        """CUDA graph of one forward at the engine's fixed shape: capture once, then copy in, replay, copy out."""
        if self._graph is None:
            static_input = torch.zeros_like(batch)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), self._context():
                for _ in range(3):  # warm-up on a side stream: cuDNN picks its algorithms before capture
                    self._forward(static_input)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), self._context():
                static_output = self._forward(static_input)
            self._graph = (static_input, static_output, graph)
        static_input, static_output, graph = self._graph
        static_input.copy_(batch)
        graph.replay()
        return static_output.float().cpu().numpy()


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """In place: every Conv2d directly followed by a BatchNorm2d in a Sequential becomes one biased Conv2d."""
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for name, following in zip(names, names[1:]):
                conv, norm = module._modules[name], module._modules[following]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module._modules[name] = fuse_conv_bn_eval(conv, norm)  # keeps the conv's class (SAME padding)
                    module._modules[following] = nn.Identity()
    return model


class TorchCompileEngine(TorchEngine):
    """`torch.compile` (inductor) of the eager engine's forward, one specialization per input shape.

    Compiling takes minutes on a small CPU (B2 @ 260: 140 s on 2 cores) and is cached on disk by inductor's
    FX graph cache, which effnet points at `$EFFNET_HOME/engines/inductor` unless TORCHINDUCTOR_CACHE_DIR is set.
    On CUDA it compiles with mode="reduce-overhead" (inductor's own CUDA graphs).
    """

    name = "torch-compile"

    def __init__(self, model, *, precision="fp32", device="cpu", signature="logits", input_size=None,
                 batch_size=None, channels_last: bool = True, mode: str | None = None):
        super().__init__(model, precision=precision, device=device, signature=signature, input_size=input_size,
                         batch_size=batch_size, channels_last=channels_last, cuda_graphs=False)
        _use_effnet_inductor_cache()
        self.mode = mode or ("reduce-overhead" if device == "cuda" else None)
        self._compiled = torch.compile(self._eager_forward, dynamic=False, mode=self.mode)
        self.details = ", ".join(filter(None, [self.details, f"inductor{' ' + self.mode if self.mode else ''}"]))

    def warm_up(self) -> None:
        Engine.warm_up(self)  # compiles for input_size now rather than on the first real call

    def _eager_forward(self, images: torch.Tensor) -> torch.Tensor:
        return TorchEngine._forward(self, images)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._compiled(images)


def _use_effnet_inductor_cache() -> None:
    """Point inductor's caches at $EFFNET_HOME/engines/inductor unless the user chose a folder.

    Inductor reads TORCHINDUCTOR_CACHE_DIR when it compiles, and writes its default back into the environment
    the first time it looks (torch.export does too), so "the default" is recognised by value, not by absence.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from .artifacts import inductor_cache_dir
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
