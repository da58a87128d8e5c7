"""`effnet serve` under load, against the offline ceiling and a naive server, in one run.

    python benchmarks/serve.py                      # B2 @ 260 (conditioned random weights) and Lite0 @ 224 (real)
    python benchmarks/serve.py --models efficientnet_lite0@224 --requests 128

For each model, on real JPEGs (scikit-image's sample photos and examples/photos, resized/cropped copies of
640x480 to 1024x768, quality 90):
- effnet serve (subprocess, the default `--engine auto`, default batching), one image per request, V2 binary
  tensors: BYTES (the encoded JPEG, decoded by the server) and FP32 ([1, S, S, 3] pixels, decoded here with the
  same Decoder), closed-loop clients at concurrency 1, 8 and 32: throughput, p50, p99;
- (a) `effnet embed` (`effnet.embed.run`, in this process) over the same JPEGs with the engine the server picked:
  the offline ceiling;
- (b) a naive server: FastAPI + uvicorn, one request per eager PyTorch call (the same Decoder for BYTES, a sync
  endpoint, so FastAPI's thread pool runs concurrent requests side by side), the same clients;
- the latency floor for concurrency 1: for each JPEG of a round of requests, one decode and then one engine call
  on its pixels (`create_engine` as the server builds it, one image per call), timed here one after the other.
  "p50/floor" divides the server's p50 by the floor's p50 over the same images (call + decode for BYTES, the
  call alone for FP32); "vs fastest" divides it by the fastest call plus the fastest decode, the optimist's
  floor. Both are warm, back-to-back calls. "p50/lone" divides by the "lone floor": the same decode + call, each
  after a LONE_GAP idle gap, as a request at concurrency 1 meets them (a lone call after a few idle milliseconds
  was up to ~0.7 ms slower for Lite0 on this machine in some runs: OpenVINO's threads and caches go cold).

Goals (issue 10): at concurrency 32, >= 80% of (a) and >= 3x (b); at concurrency 1, p50 within 1.3x of one
engine call plus decode. The clients run in this process, one thread and one keep-alive `http.client`
connection each (see `closed_loop`), so they take CPU from the server too; on 2 cores that is a real share.
Each point alternates between the two servers for --rounds rounds and keeps each one's fastest round; the
ceiling and the floor are measured before and after and the best kept, so that load from other jobs falls on
both sides instead of deciding the comparison.

Measured on the 2-core development machine, 2026-12-01 04:30 UTC, no other job running (load average 2-5, the
run's own naive server): `python benchmarks/serve.py` (64 requests per point, best of 3 rounds, 128 distinct
JPEGs; 4 minutes). `--engine auto` picked OpenVINO fp32 for both models; 2 decode threads beside it.

    efficientnet_b2@260   (a) effnet embed 36.6 img/s; one engine call 21.9 ms p50 (17.4 fastest), one decode 5.3 ms
                          p50; lone floor (after a 2 ms gap) p50 BYTES 28.4 ms, FP32 22.3 ms
    input  conc | serve img/s   p50 ms   p99 ms | naive img/s   p50 ms   p99 ms | vs (a) vs naive p50/lone p50/floor vs fastest
    BYTES     1 |        33.2     29.6     36.4 |        13.8     72.2     87.4 |   91%     2.4x     1.04      1.07       1.42
    BYTES     8 |        43.7    179.7    221.0 |        14.7    552.0    632.2 |  120%     3.0x
    BYTES    32 |        45.4    658.9   1023.5 |        12.6   2455.0   3296.5 |  124%     3.6x
    FP32      1 |        43.6     22.2     25.6 |        13.8     71.9     85.9 |  119%     3.2x     0.99      1.02       1.28
    FP32      8 |        45.2    181.3    198.5 |        17.2    457.1    554.7 |  123%     2.6x
    FP32     32 |        47.9    644.6    801.5 |        12.5   2400.3   3299.7 |  131%     3.8x
    efficientnet_lite0@224  (a) effnet embed 81.3 img/s; one engine call 6.4 ms p50 (6.0 fastest), one decode 4.5 ms
                          p50; lone floor p50 BYTES 11.2 ms, FP32 6.3 ms
    BYTES     1 |        69.7     14.2     17.7 |        22.2     44.4     51.2 |   86%     3.1x     1.27      1.30       1.57
    BYTES     8 |        80.8     95.6    142.9 |        33.4    239.2    289.2 |   99%     2.4x
    BYTES    32 |       119.9    233.3    354.0 |        26.0   1201.0   1482.4 |  148%     4.6x
    FP32      1 |       118.8      8.3     13.6 |        26.2     37.5     47.9 |  146%     4.5x     1.32      1.30       1.38
    FP32      8 |       114.4     68.7     83.7 |        30.0    274.6    326.0 |  141%     3.8x
    FP32     32 |       136.8    198.0    272.7 |        27.1   1053.5   1625.3 |  168%     5.1x

Against the goals: at concurrency 32, >= 80 % of (a) and >= 3x the naive server: met in every run of the day
(120-178 %, 3.5-5.1x). At concurrency 1, p50 within 1.3x of one engine call plus decode: B2 holds (0.99-1.07
here, 1.02-1.36 against the back-to-back floor over five runs); Lite0 sits at the edge (1.27-1.32 here,
1.11-1.56 over five runs): its floor is 6-11 ms, a request adds ~2-3 ms, and the floor's own p50 moves by 1-2 ms
between runs on these 2 virtual cores. docs/serving.md has what a request still adds beside the floor.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
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
# The lone floor sleeps this long before each decode + call: about what a concurrency-1 request spends outside
# them (HTTP, hops; ~1.5-2.5 ms measured in the server). After such a gap a decode or call can be slower than back
# to back (caches and the engine's threads go cold), and that is no cost of the server's.
LONE_GAP = 0.002
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
    """`concurrency` clients, each sending its next request when the last one is answered, `total` in all.

    Each client is a thread with one keep-alive `http.client` connection: the thinnest standard client, so that
    what is timed is the server's. (`requests`, even with a Session, added ~1 ms of client-side Python per request
    on this machine, measured interleaved against the same server: a sixth of a Lite0 request at concurrency 1,
    and CPU taken from the server beside it.) Both servers get the same client.
    """
    latencies, errors, lock, next_index = [], [], threading.Lock(), [0]
    address = urllib.parse.urlsplit(url)

    def client():
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=300)
        try:
            while True:
                with lock:
                    index = next_index[0]
                    next_index[0] += 1
                if index >= total:
                    return
                body, headers = payloads[index % len(payloads)]
                started = time.perf_counter()
                connection.request("POST", address.path, body=body, headers=headers)
                response = connection.getresponse()
                answer = response.read()
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(f"{response.status}: {answer[:200]!r}")
        finally:
            connection.close()

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
    ceilings, floors, lone_floors = [], [], []

    def offline_ceiling_and_floor(engine, precision, threads):
        """(a) effnet embed over the same JPEGs with the same engine; and the floor: for each JPEG of the first
        round of requests, its decode, then one engine call on its pixels, as a request at concurrency 1 does."""
        embed_run("embed", [str(p) for p in photos[:8]], network, engine=engine, precision=precision)  # warm-up
        started = time.perf_counter()
        report = embed_run("embed", images, network, engine=engine, precision=precision)
        ceilings.append(len(images) / (time.perf_counter() - started))
        assert report.summary.failed == 0 and report.summary.rows == len(images)
        torch.set_num_threads(threads)
        single = create_engine(network, engine, precision, input_size=(size, size), signature="features",
                               batch_size=16)
        single(torch.from_numpy(pixels[0]).permute(0, 3, 1, 2))
        calls, decodes, lone_bytes, lone_calls = [], [], [], []
        for data, array in zip(encoded[:total], pixels):
            decodes.append(_timed(lambda: decoder.decode_bytes(data)))
            x = torch.from_numpy(array).permute(0, 3, 1, 2)
            calls.append(_timed(lambda: single(x)))
        for data, array in zip(encoded[:total], pixels):  # lone: after the idle gap a request leaves
            x = torch.from_numpy(array).permute(0, 3, 1, 2)
            time.sleep(LONE_GAP)
            lone_bytes.append(_timed(lambda: decoder.decode_bytes(data)) + _timed(lambda: single(x)))
            time.sleep(LONE_GAP)
            lone_calls.append(_timed(lambda: single(x)))
        floors.append((np.array(calls), np.array(decodes)))
        lone_floors.append({"BYTES": np.array(lone_bytes), "FP32": np.array(lone_calls)})
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
    # The floor, for BYTES (decode + call) and FP32 (call): its p50 over the same images, which is what a request's
    # p50 compares with, and its fastest (the fastest call plus the fastest decode), the optimist's floor. Of the
    # two measurements (before and after the rounds), the lower counts.
    floor_p50 = {"BYTES": min(float(np.median(c + d)) for c, d in floors),
                 "FP32": min(float(np.median(c)) for c, _ in floors)}
    floor_fastest = {"BYTES": min(c.min() + d.min() for c, d in floors), "FP32": min(c.min() for c, _ in floors)}
    call_p50, decode_p50 = (min(float(np.median(f[i])) for f in floors) for i in (0, 1))
    floor_lone = {kind: min(float(np.median(f[kind])) for f in lone_floors) for kind in ("BYTES", "FP32")}

    lines = [f"## {key}: engine {engine} {precision} (auto, as the server picked); server split "
             f"{split.group(0) if split else '?'}; {total} requests per point, best of {rounds} rounds",
             f"   (a) effnet embed, same JPEGs, same engine: {ceiling:.1f} img/s;  "
             f"one engine call {call_p50 * 1000:.1f} ms p50 ({floor_fastest['FP32'] * 1000:.1f} fastest), "
             f"one decode {decode_p50 * 1000:.1f} ms p50; floor = call + decode (BYTES), call (FP32); lone floor "
             f"(after a {LONE_GAP * 1000:.0f} ms gap) p50 BYTES {floor_lone['BYTES'] * 1000:.1f} ms, FP32 "
             f"{floor_lone['FP32'] * 1000:.1f} ms",
             f"   {'input':6} {'conc':>4} | {'serve img/s':>11} {'p50 ms':>8} {'p99 ms':>8} | {'naive img/s':>11} "
             f"{'p50 ms':>8} {'p99 ms':>8} | {'vs (a)':>6} {'vs naive':>8} {'p50/lone':>8} {'p50/floor':>9} "
             f"{'vs fastest':>10}"]
    for kind in ("BYTES", "FP32"):
        for concurrency in CONCURRENCY:
            ours, theirs = results["serve", kind, concurrency], results["naive", kind, concurrency]
            p50 = ours.p50_ms / 1000
            floor_ratios = (f"{p50 / floor_lone[kind]:>8.2f} {p50 / floor_p50[kind]:>9.2f} "
                            f"{p50 / floor_fastest[kind]:>10.2f}" if concurrency == 1 else "")
            lines.append(f"   {kind:6} {concurrency:>4} | {ours.images_per_second:>11.1f} {ours.p50_ms:>8.1f} "
                         f"{ours.p99_ms:>8.1f} | {theirs.images_per_second:>11.1f} {theirs.p50_ms:>8.1f} "
                         f"{theirs.p99_ms:>8.1f} | {ours.images_per_second / ceiling:>5.0%} "
                         f"{ours.images_per_second / theirs.images_per_second:>7.1f}x {floor_ratios}".rstrip())
    return lines


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="NAME@SIZE (the native size)")
    parser.add_argument("--requests", type=int, default=64, help="requests per point (per concurrency and input)")
    parser.add_argument("--photos", type=int, default=128, help="distinct JPEGs (embed's job: enough to amortise "
                        "its set-up)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point; the fastest counts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="effnet-serve-bench-") as tmp:
        photos = make_photos(Path(tmp) / "photos", args.photos)
        lines = []
        for key in args.models:
            lines += bench_model(key, photos, Path(tmp), args.requests, args.rounds)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
