"""Every engine side by side, in one run: images/s, the ratio to eager PyTorch fp32 NCHW, and the error.

    python benchmarks/engines.py            # B2 @ 260 logits, B6 @ 528 features, V2-M @ 480 features; batch 1, 8
    python benchmarks/engines.py --quick    # fewer timed calls, batch 8 only for B6 and V2-M
    python benchmarks/engines.py --rows b2 --batches 8 --compile   # also torch.compile (minutes to compile)

Contenders in every row, on the same inputs, in the same process:
- peers, what one would write without effnet: eager fp32 NCHW (the baseline, `model(x)` under no_grad), eager
  channels_last, eager bf16 autocast (channels_last), ONNX Runtime fp32 with default session options, and
  OpenVINO with default settings (`core.compile_model(onnx_file, "CPU")`: dynamic shapes, its default precision,
  which is bf16 on CPUs with AVX512-BF16/AMX); the peers run effnet's ONNX export, the same file for both;
- the noise floor: a second ONNX Runtime session identical to the peer's (its ratio to the peer shows how far
  apart two identical contenders land in this run);
- effnet engines: onnxruntime fp32, openvino fp32, openvino int8 (calibrated on the 4 photos), torch-compile
  (with --compile), `auto` fp32 and `auto` with precision="auto". effnet's `torch` engine is the channels_last
  peer plus inference_mode and is not timed twice.
Weights are random and conditioned (tests/conditioning.py) so the error column means something: max relative
error of each contender's output against eager fp32 NCHW's, on the 4 scikit-image photos (repeated to the batch).
Timing: every contender is built and called once (warm-up), then all are timed in `--rounds` interleaved rounds
of `--seconds / rounds` each (at least one call per round), and the fastest call counts (as `timeit` does):
other processes only ever slow a call down, and interleaving spreads what they do over every contender.
On a shared machine the rates still move by +-10-20 % between runs; compare rows within one run. A contender whose warm-up call took more than
20 s (or twice `--seconds`) is not called again: its warm-up rate is shown (eager B6 @ 528 on 2 AVX2 cores). `auto`'s own selection (timing its
candidates once, then cached on disk) is reported in the note and not counted in its rate.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers: photos and conditioning

import effnet  # noqa: E402
from effnet.engines import EngineUnavailableError, create_engine, machine  # noqa: E402
from effnet.engines.artifacts import onnx_file  # noqa: E402
from effnet.export import relative_error  # noqa: E402
from tests.conditioning import condition  # noqa: E402
from tests.conftest import photo_batch  # noqa: E402

ROWS = {  # key -> (architecture, input size, signature)
    "b2": ("efficientnet_b2", 260, "logits"),
    "b6": ("efficientnet_b6", 528, "features"),
    "v2m": ("efficientnetv2_m", 480, "features"),
}
BASELINE = "eager fp32 NCHW"
SLOW_CALL_SECONDS = 20.0
PEERS = (BASELINE, "eager channels_last", "eager bf16 autocast", "ORT fp32 (defaults)", "OpenVINO (defaults)")
# A second, identical ONNX Runtime session: not a peer, the noise floor. Two identical sessions in one process
# measured up to 15 % apart on the shared 2-core VM; a ratio closer to 1.0 than this spread is a tie.
NOISE = "ORT fp32 (defaults), 2nd session"


@dataclass
class Result:
    name: str
    images_per_second: float | None = None
    error: float | None = None
    calls: int = 0
    note: str = ""
    engine: object = field(default=None, repr=False)


class Contender:
    """One way to run the row's model: a callable on numpy images, timed in interleaved rounds."""

    def __init__(self, name: str, run, note: str = ""):
        self.name, self.run, self.note = name, run, note
        self.rates: list[float] = []
        self.warm_seconds = 0.0
        self.output = None

    def warm_up(self, images: np.ndarray) -> None:
        started = time.perf_counter()
        self.output = self.run(images)  # compiles, picks kernels; also the output the error is measured on
        self.warm_seconds = time.perf_counter() - started

    def time_round(self, images: np.ndarray, seconds: float) -> None:
        calls, started = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - started < seconds:  # at least one call per round
            call_started = time.perf_counter()
            self.run(images)
            self.rates.append(len(images) / (time.perf_counter() - call_started))
            calls += 1

    def result(self, batch: int) -> Result:
        if self.rates:  # the fastest call: other processes only ever slow a call down (as timeit does)
            return Result(self.name, max(self.rates), calls=len(self.rates), note=self.note)
        note = "warm-up call only" + (f"; {self.note}" if self.note else "")
        return Result(self.name, batch / self.warm_seconds, calls=1, note=note)


def peers(model, onnx_path: Path):
    """name -> callable(np images) -> np outputs, or a string saying why it does not run here."""
    import onnxruntime
    import openvino

    signature_forward = model.feature_vector if model.spec.output == "features" else model.forward
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    last_forward = channels_last.feature_vector if model.spec.output == "features" else channels_last.forward

    def eager(images):
        with torch.no_grad():
            return signature_forward(torch.from_numpy(images)).numpy()

    def eager_cl(images):
        with torch.no_grad():
            return last_forward(torch.from_numpy(images).contiguous(memory_format=torch.channels_last)).numpy()

    def eager_bf16(images):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
            return last_forward(x).float().numpy()

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    twin = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    compiled = openvino.Core().compile_model(str(onnx_path), "CPU")
    return {
        BASELINE: eager,
        "eager channels_last": eager_cl,
        "eager bf16 autocast": eager_bf16 if machine().native_bf16 else
        "not run: no AVX512-BF16/AMX here, PyTorch falls back to its reference convolution (~100x slower)",
        "ORT fp32 (defaults)": lambda images: session.run(None, {"images": images})[0],
        NOISE: lambda images: twin.run(None, {"images": images})[0],
        "OpenVINO (defaults)": lambda images: compiled(images)[0],
        "_openvino_default_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
    }


def effnet_engines(model, size: int, batch: int, calibration: np.ndarray, with_compile: bool):
    """name -> (factory, note); factories build lazily so a failure is one row's note, not the whole run."""
    common = dict(input_size=(size, size), batch_size=batch)
    engines = {
        "effnet onnxruntime fp32": lambda: create_engine(model, "onnxruntime", "fp32", **common),
        "effnet openvino fp32": lambda: create_engine(model, "openvino", "fp32", **common),
        "effnet openvino int8": lambda: create_engine(model, "openvino", "int8", calibration=calibration, **common),
        "effnet auto fp32": lambda: create_engine(model, "auto", "fp32", **common),
        "effnet auto (precision=auto)": lambda: create_engine(model, "auto", "auto", calibration=None, **common),
    }
    if with_compile:
        engines["effnet torch-compile fp32"] = lambda: create_engine(model, "torch-compile", "fp32", **common)
    return engines


def run_row(key: str, batch: int, seconds: float, rounds: int, with_compile: bool, cache: dict) -> list[Result]:
    name, size, signature = ROWS[key]
    if key not in cache:
        started = time.perf_counter()
        # BN statistics from the photos at <= 256 px: a forward at 528 in training mode would cost a minute here,
        # and the point is only well-conditioned weights (tests/conditioning.py).
        model = condition(effnet.create(name, num_classes=1000 if signature == "logits" else 0),
                          photo_batch(min(size, 256)))
        path = onnx_file(model, signature)
        cache[key] = (model, path, photo_batch(size).numpy())
        print(f"# {name}: conditioned and exported ({path.name}) in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    model, path, photos = cache[key]
    images = np.ascontiguousarray(np.concatenate([photos] * (batch // len(photos) + 1))[:batch])

    contenders, skipped = [], []
    found = peers(model, path)
    default_precision = found.pop("_openvino_default_precision")
    for label, run in found.items():
        if isinstance(run, str):
            skipped.append(Result(label, note=run))
        else:
            note = f"runs {default_precision}" if label.startswith("OpenVINO") else ""
            contenders.append(Contender(label, run, note))
    for label, factory in effnet_engines(model, size, batch, photos, with_compile).items():
        started = time.perf_counter()
        try:
            engine = factory()
        except EngineUnavailableError as error:
            skipped.append(Result(label, note=f"not run: {error}"))
            continue
        note = f"{engine.name} {engine.precision}"
        if label.startswith("effnet auto"):
            note = f"-> {note}; selection {time.perf_counter() - started:.0f} s (once, then cached)"
        contenders.append(Contender(label, engine, note))
        print(f"#   {key} b{batch} {label}: {engine.description}", file=sys.stderr)

    for contender in contenders:
        contender.warm_up(images)
    timed = [c for c in contenders if c.warm_seconds < max(2 * seconds, SLOW_CALL_SECONDS)]  # else warm-up only
    for _ in range(rounds if seconds > 0 else 1):
        for contender in timed:
            contender.time_round(images, seconds / max(rounds, 1))
    reference = next(c for c in contenders if c.name == BASELINE).output
    results = []
    for contender in contenders:
        result = contender.result(batch)
        result.error = relative_error(contender.output, reference)
        results.append(result)
        print(f"#   {key} b{batch} {contender.name}: {result.images_per_second:.2f} img/s", file=sys.stderr)
    order = {name: i for i, name in enumerate([*PEERS, NOISE, *(c.name for c in contenders)])}
    return sorted([*results, *skipped], key=lambda r: order[r.name])


def table(rows: dict[tuple[str, int], list[Result]]) -> str:
    lines = ["| model | batch | contender | images/s | × eager fp32 NCHW | rel. error | note |",
             "|---|---|---|---|---|---|---|"]
    summary = ["", "| model | batch | auto fp32 img/s | best peer | auto fp32 / best peer | auto fp32 / ORT fp32 "
               "| auto (precision=auto) / best peer | noise: ORT twin sessions |", "|---|---|---|---|---|---|---|---|"]
    for (key, batch), results in rows.items():
        name, size, signature = ROWS[key]
        by_name = {r.name: r for r in results}
        base = by_name[BASELINE].images_per_second
        for r in results:
            rate = f"{r.images_per_second:.2f}" if r.images_per_second else "–"
            ratio = f"{r.images_per_second / base:.2f}" if r.images_per_second else "–"
            error = f"{r.error:.1e}" if r.error is not None else "–"
            lines.append(f"| {name} @ {size} ({signature}) | {batch} | {r.name} | {rate} | {ratio} | {error} "
                         f"| {r.note} |")
        peer_rates = {p: by_name[p].images_per_second for p in PEERS if by_name.get(p) and
                      by_name[p].images_per_second}
        best_peer = max(peer_rates, key=peer_rates.get)
        auto = by_name.get("effnet auto fp32")
        auto_any = by_name.get("effnet auto (precision=auto)")
        if auto and auto.images_per_second:
            ort = peer_rates.get("ORT fp32 (defaults)")
            any_ratio = (f"{auto_any.images_per_second / peer_rates[best_peer]:.2f}"
                         if auto_any and auto_any.images_per_second else "–")
            twin = by_name.get(NOISE)
            spread = (f"{twin.images_per_second / ort:.2f}" if twin and twin.images_per_second and ort else "–")
            summary.append(f"| {name} @ {size} | {batch} | {auto.images_per_second:.2f} | {best_peer} "
                           f"{peer_rates[best_peer]:.2f} | {auto.images_per_second / peer_rates[best_peer]:.2f} | "
                           f"{auto.images_per_second / ort:.2f} | {any_ratio} | {spread} |")
    return "\n".join(lines + summary)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="b2,b6,v2m", help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per contender and row")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds the seconds are split into")
    parser.add_argument("--quick", action="store_true",
                        help="one round of one call per contender; B6 and V2-M at batch 8 only")
    parser.add_argument("--compile", action="store_true", help="also time torch-compile (compiles for minutes)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    seconds, rounds = (0.0, 1) if args.quick else (args.seconds, args.rounds)
    hardware = machine()
    print(f"# {hardware.cpu}, {hardware.cores} cores, bf16 native: {hardware.native_bf16}, VNNI: {hardware.vnni}; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.1f}", file=sys.stderr)
    started, rows, cache = time.perf_counter(), {}, {}
    for key in args.rows.split(","):
        for batch in map(int, args.batches.split(",")):
            if args.quick and key != "b2" and batch == 1:
                continue
            rows[(key, batch)] = run_row(key, batch, seconds, rounds, args.compile, cache)
    print(table(rows))
    print(f"\n{hardware.cpu}, {hardware.cores} cores; load average at the end {os.getloadavg()[0]:.1f}; "
          f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({f"{k}@{b}": [{**r.__dict__, "engine": None} for r in rs]
                                         for (k, b), rs in rows.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
