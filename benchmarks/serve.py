"""`effnet serve` under load, against the offline ceiling and a naive server, in one run.

    python benchmarks/serve.py                      # B2 @ 260 (conditioned random weights) and Lite0 @ 224 (real)
    python benchmarks/serve.py --models efficientnet_lite0 --requests 64

For each model, on real JPEGs (scikit-image's sample photos and examples/photos, resized/cropped copies of
640x480 to 1024x768, quality 90):
- effnet serve (subprocess, the default `--engine auto`, default batching), one image per request, V2 binary
  tensors: BYTES (the encoded JPEG, decoded by the server) and FP32 ([1, S, S, 3] pixels, decoded here with the
  same Decoder), closed-loop clients at concurrency 1, 8 and 32: throughput, p50, p99;
- (a) `effnet embed` (`effnet.embed.run`, in this process) over the same JPEGs with the engine the server picked:
  the offline ceiling;
- (b) a naive server: FastAPI + uvicorn, one request per eager PyTorch call (the same Decoder for BYTES, a sync
  endpoint, so FastAPI's thread pool runs concurrent requests side by side), the same clients;
- the latency floor for concurrency 1: one engine call on one image plus one decode, timed here.

Goals (issue 10): at concurrency 32, >= 80% of (a) and >= 3x (b); at concurrency 1, p50 within 1.3x of one
engine call plus decode. The clients run in this process (threads, `requests`), so they take CPU from the
server too; on 2 cores that is a real share. Each point alternates between the two servers for --rounds rounds
and keeps each one's fastest round; the ceiling and the floor are measured before and after and the best kept,
so that load from other jobs falls on both sides instead of deciding the comparison.

Measured on the 2-core development machine while four other engineers ran tests and benchmarks on it (load
average 5-8 during this run, 9-14 in earlier ones): `python benchmarks/serve.py` (40 requests per point, best of
2 rounds: reduced from the hundreds a quiet machine would get, to stay under 10 minutes; 128 distinct JPEGs).
`--engine auto` picked OpenVINO fp32 for both models; server split: 2 decode threads beside OpenVINO.

    efficientnet_b2@260   (a) effnet embed 12.0 img/s; one engine call 145.3 ms, one decode 3.6 ms
    input  conc | serve img/s   p50 ms   p99 ms | naive img/s   p50 ms   p99 ms | vs (a) vs naive p50/floor
    BYTES     1 |         5.8    172.5    208.8 |        11.1     86.1    116.4 |   48%     0.5x      1.16
    BYTES     8 |        14.0    560.6    713.0 |        14.1    522.0    854.3 |  116%     1.0x
    BYTES    32 |        14.8   1683.5   2505.8 |        12.3   2515.6   3006.4 |  123%     1.2x
    FP32      1 |         6.1    162.3    208.6 |        10.0    100.6    140.2 |   50%     0.6x      1.12
    FP32      8 |        12.3    653.7    737.8 |        13.0    605.6    789.0 |  102%     1.0x
    FP32     32 |        15.7   1338.2   2055.8 |        10.4   2994.7   3485.9 |  130%     1.5x
    efficientnet_lite0@224   (a) effnet embed 36.4 img/s; one engine call 49.5 ms, one decode 2.9 ms
    BYTES     1 |        14.7     64.8     92.7 |        22.5     40.6     61.7 |   40%     0.7x      1.24
    BYTES     8 |        45.1    204.5    259.1 |        26.1    304.6    386.9 |  124%     1.7x
    BYTES    32 |        52.4    440.2    679.0 |        25.9   1128.3   1292.8 |  144%     2.0x
    FP32      1 |        15.6     60.6     99.2 |        11.0     90.6    107.4 |   43%     1.4x      1.22
    FP32      8 |        42.6    177.6    257.8 |        31.5    242.7    316.5 |  117%     1.4x
    FP32     32 |        51.5    511.0    667.4 |        28.4   1086.1   1314.3 |  141%     1.8x

Against the goals: at concurrency 32, >= 80 % of (a): met (123-144 %; (a) includes the job's own set-up, engine
load and decode workers, a few seconds of a ~10 s job, so it is a low ceiling at this size). >= 3x the naive
server: not met in this run (1.2-2.0x); in the run before it, at lower load, 2.0-3.4x for JPEGs and 2.4-6.2x for
FP32 (that run's (a) column was void: it repeated paths, which the pipeline runs once). The ratio moves with the
load because the naive server's concurrent eager calls oversubscribe the cores more as other jobs take them.
At concurrency 1, p50 within 1.3x of one engine call plus decode: met (1.12-1.24). But that floor is OpenVINO's
one-image call, which pads to its per-request size (2 images at 260, 3 at 224), so the naive server's eager
PyTorch answers one B2 image faster (86 ms vs 173 ms): `--engine auto` chooses for throughput at batch 16, not
for one-client latency (`--engine torch` is the choice there).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers: conditioning, server runner
import effnet  # noqa: E402
from effnet.embed import run as embed_run  # noqa: E402
from effnet.engines import create_engine  # noqa: E402
from effnet.pipeline.batch import to_tensor  # noqa: E402
from effnet.pipeline.decode import Decoder, recipe_for  # noqa: E402
from tests.conditioning import condition  # noqa: E402
from tests.serving import free_port, running_server  # noqa: E402

CONCURRENCY = (1, 8, 32)
MODELS = ("efficientnet_b2@260", "efficientnet_lite0@224")


def make_photos(folder: Path, count: int) -> list[Path]:
    """`count` JPEGs cut from real photos at web sizes (640x480 .. 1024x768), quality 90."""
    import skimage.data

    sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
               for name in ("chelsea", "coffee", "astronaut", "rocket")]
    sources += [Image.open(p).convert("RGB") for p in sorted((Path(__file__).parents[1] / "examples/photos").glob("*.jpg"))]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        width = int(rng.integers(640, 1025))
        scaled = source.resize((width, round(width * 3 / 4)), Image.Resampling.LANCZOS)  # upscaled or downscaled
        path = folder / f"photo{index:03d}.jpg"
        scaled.save(path, quality=90)
        paths.append(path)
    return paths


def model_source(name: str, folder: Path):
    """(what `effnet serve` and the naive server load, the module): real Lite0, conditioned B2 saved as a folder."""
    if name == "efficientnet_lite0":
        return name, effnet.load(name).eval()
    torch.manual_seed(0)
    size = effnet.create(name).spec.native_size
    network = condition(effnet.create(name), torch.rand(8, 3, size, size)).eval()
    return str(effnet.save(network, folder / name)), network


# -- clients ---------------------------------------------------------------------------------------------------

def v2_binary(datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "images", "shape": shape, "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "feature_vector", "parameters": {"binary_data": True}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


@dataclass
class Point:
    images_per_second: float
    p50_ms: float
    p99_ms: float


def closed_loop(url: str, payloads: list[tuple[bytes, dict]], concurrency: int, total: int) -> Point:
    """`concurrency` clients, each sending its next request when the last one is answered, `total` in all."""
    latencies, errors, lock, next_index = [], [], threading.Lock(), [0]

    def client():
        session = requests.Session()
        while True:
            with lock:
                index = next_index[0]
                next_index[0] += 1
            if index >= total:
                return
            body, headers = payloads[index % len(payloads)]
            started = time.perf_counter()
            response = session.post(url, data=body, headers=headers, timeout=300)
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if response.status_code == 200 else errors).append(
                    elapsed if response.status_code == 200 else response.text[:200])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    milliseconds = np.array(latencies) * 1000
    return Point(total / wall, float(np.percentile(milliseconds, 50)), float(np.percentile(milliseconds, 99)))


# -- the naive server ------------------------------------------------------------------------------------------

NAIVE_SERVER = textwrap.dedent("""
    import sys
    import numpy as np, torch, uvicorn
    from fastapi import FastAPI, Request, Response
    from starlette.concurrency import run_in_threadpool
    import effnet
    from effnet.pipeline.batch import to_tensor
    from effnet.pipeline.decode import Decoder, recipe_for
    source, port = sys.argv[1], int(sys.argv[2])
    model = effnet.load(source).eval()
    decoder = Decoder(model.spec.native_size, recipe_for(model.spec.name, model.spec.family))
    app = FastAPI()

    def answer(x):
        with torch.inference_mode():
            return Response(model.feature_vector(x).numpy().tobytes(), media_type="application/octet-stream")

    @app.get("/ready")
    def ready():
        return {"ready": True}

    @app.post("/bytes")
    async def encoded(request: Request):
        data = await request.body()
        return await run_in_threadpool(lambda: answer(to_tensor([decoder.decode_bytes(data).pixels]).contiguous()))

    @app.post("/pixels")
    async def pixels(request: Request):
        size = model.spec.native_size
        data = np.frombuffer(await request.body(), np.float32).reshape(1, size, size, 3)
        return await run_in_threadpool(answer, torch.from_numpy(data.copy()).permute(0, 3, 1, 2).contiguous())

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
""")


class NaiveServer:
    def __init__(self, source: str):
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-c", NAIVE_SERVER, source, str(self.port)])
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/ready", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the naive server did not start")
            time.sleep(0.5)

    def close(self):
        self.process.terminate()
        self.process.wait(30)


# -- one model -------------------------------------------------------------------------------------------------

def bench_model(key: str, photos: list[Path], folder: Path, total: int, rounds: int) -> list[str]:
    name, size = key.split("@")
    size = int(size)
    source, network = model_source(name, folder)
    decoder = Decoder(size, recipe_for(network.spec.name, network.spec.family))
    encoded = [path.read_bytes() for path in photos]
    pixels = [to_tensor([decoder.decode_bytes(data).pixels]).permute(0, 2, 3, 1).numpy() for data in encoded]
    payloads = {
        "BYTES": [v2_binary("BYTES", [1], struct.pack("<I", len(data)) + data) for data in encoded],
        "FP32": [v2_binary("FP32", [1, size, size, 3], array.tobytes()) for array in pixels],
    }
    naive_payloads = {
        "BYTES": [(data, {"Content-Type": "application/octet-stream"}) for data in encoded],
        "FP32": [(array.tobytes(), {"Content-Type": "application/octet-stream"}) for array in pixels],
    }
    results: dict[tuple[str, str, int], Point] = {}

    def keep_best(key, point):  # other jobs only ever slow a round down: the faster round is the system's own
        if key not in results or point.images_per_second > results[key].images_per_second:
            results[key] = point
        print(f"# {name} {key}: {point}", file=sys.stderr)

    images = [str(p) for p in photos]  # distinct files: the pipeline runs a repeated path once
    ceilings, floors = [], []

    def offline_ceiling_and_floor(engine, precision, threads):
        """(a) effnet embed over the same JPEGs with the same engine; and one engine call + one decode."""
        embed_run("embed", [str(p) for p in photos[:8]], network, engine=engine, precision=precision)  # warm-up
        started = time.perf_counter()
        report = embed_run("embed", images, network, engine=engine, precision=precision)
        ceilings.append(len(images) / (time.perf_counter() - started))
        assert report.summary.failed == 0 and report.summary.rows == len(images)
        torch.set_num_threads(threads)
        single = create_engine(network, engine, precision, input_size=(size, size), signature="features",
                               batch_size=16)
        x = torch.from_numpy(pixels[0]).permute(0, 3, 1, 2)
        single(x)
        floors.append((min(_timed(lambda: single(x)) for _ in range(10)),
                       min(_timed(lambda: decoder.decode_bytes(encoded[0])) for _ in range(10))))
        torch.set_num_threads(default_threads)

    default_threads = torch.get_num_threads()
    with running_server(source) as server:
        log = server.log.read_text()
        picked = re.search(r"auto -> (\S+) (\S+)", log)
        engine, precision = (picked.group(1), picked.group(2)) if picked else ("torch", "fp32")
        split = re.search(r"decode threads: (\d+); torch engine threads: (\d+)", log)
        threads = int(split.group(2)) if split and engine.startswith("torch") else default_threads
        naive = NaiveServer(source)
        try:
            ours_url = f"{server.base}/v2/models/{network.spec.name}/infer"
            naive_urls = {"BYTES": f"http://127.0.0.1:{naive.port}/bytes",
                          "FP32": f"http://127.0.0.1:{naive.port}/pixels"}
            for kind in ("BYTES", "FP32"):  # warm-up
                closed_loop(ours_url, payloads[kind], 4, 8)
                closed_loop(naive_urls[kind], naive_payloads[kind], 4, 8)
            offline_ceiling_and_floor(engine, precision, threads)
            # Rounds, each point alternating between the two servers, best round kept: load from other jobs
            # that comes and goes then falls on both instead of deciding the comparison.
            for _ in range(rounds):
                for kind in ("BYTES", "FP32"):
                    for concurrency in CONCURRENCY:
                        keep_best(("serve", kind, concurrency),
                                  closed_loop(ours_url, payloads[kind], concurrency, total))
                        keep_best(("naive", kind, concurrency),
                                  closed_loop(naive_urls[kind], naive_payloads[kind], concurrency, total))
            offline_ceiling_and_floor(engine, precision, threads)
        finally:
            naive.close()
    ceiling = max(ceilings)
    call, decode = min(f[0] for f in floors), min(f[1] for f in floors)

    lines = [f"## {key}: engine {engine} {precision} (auto, as the server picked); server split "
             f"{split.group(0) if split else '?'}; {total} requests per point, best of {rounds} rounds",
             f"   (a) effnet embed, same JPEGs, same engine: {ceiling:.1f} img/s;  one engine call {call * 1000:.1f} ms, "
             f"one decode {decode * 1000:.1f} ms",
             f"   {'input':6} {'conc':>4} | {'serve img/s':>11} {'p50 ms':>8} {'p99 ms':>8} | {'naive img/s':>11} "
             f"{'p50 ms':>8} {'p99 ms':>8} | {'vs (a)':>6} {'vs naive':>8} {'p50/floor':>9}"]
    for kind in ("BYTES", "FP32"):
        floor = call + (decode if kind == "BYTES" else 0.0)
        for concurrency in CONCURRENCY:
            ours, theirs = results["serve", kind, concurrency], results["naive", kind, concurrency]
            lines.append(f"   {kind:6} {concurrency:>4} | {ours.images_per_second:>11.1f} {ours.p50_ms:>8.1f} "
                         f"{ours.p99_ms:>8.1f} | {theirs.images_per_second:>11.1f} {theirs.p50_ms:>8.1f} "
                         f"{theirs.p99_ms:>8.1f} | {ours.images_per_second / ceiling:>5.0%} "
                         f"{ours.images_per_second / theirs.images_per_second:>7.1f}x "
                         f"{ours.p50_ms / 1000 / floor if concurrency == 1 else float('nan'):>9.2f}")
    return lines


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="NAME@SIZE (the native size)")
    parser.add_argument("--requests", type=int, default=40, help="requests per point (per concurrency and input)")
    parser.add_argument("--photos", type=int, default=128, help="distinct JPEGs (embed's job: enough to amortise "
                        "its set-up)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per point; the fastest counts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="effnet-serve-bench-") as tmp:
        photos = make_photos(Path(tmp) / "photos", args.photos)
        lines = []
        for key in args.models:
            lines += bench_model(key, photos, Path(tmp), args.requests, args.rounds)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
