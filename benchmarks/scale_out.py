"""The main job on one machine, local pipeline vs `--ray` (Ray Data, one node), on the same 12-MP JPEGs and model.

    python benchmarks/scale_out.py [--photos 72] [--folder /tmp/effnet-12mp] [--model efficientnet_lite0]

Photos: scikit-image's sample photos upscaled (bicubic) to 4000x3000 and saved as JPEG (quality 90), made once
into --folder. Each path runs --rounds times, interleaved (local, ray, local, ray ...) so that a neighbour's load
on a shared machine hits both alike, on two job sizes: the first third of the photos (a manifest) and all of
them. The table gives the median wall time of each, the end-to-end rate of the big job (start-up included: the
conservative ratio), and the rate from the two sizes:

    marginal img/s = (big - small images) / (time of big - time of small)

which is what a long job sees once it is running; the intercept is the fixed start-up (Ray: worker processes that
import PyTorch, the model actors that build their engines). Both paths run engine="torch" (fp32), batch 16,
and write Parquet (the local job one file, Ray a folder). Ray: `ray.init(num_cpus=<cores>)` once, outside the
timings, as an existing cluster would be.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "colorwheel", "camera", "coins")  # real photos that ship with scikit-image (no download)
WIDTH, HEIGHT = 4000, 3000


def make_photos(folder: Path, count: int) -> list[Path]:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo-{index:03d}.jpg"
        if not path.exists():
            name = SAMPLES[index % len(SAMPLES)]
            pixels = getattr(skimage.data, name)()
            image = Image.fromarray(pixels).convert("RGB")
            if index // len(SAMPLES) % 2:  # a second pass of the samples is mirrored, so no two files are equal
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=72)
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "effnet-12mp"))
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--object-store", type=float, default=1e9, help="Ray object store bytes")
    arguments = parser.parse_args()

    import ray
    import torch

    import effnet
    from effnet.embed import run

    paths = make_photos(Path(arguments.folder), arguments.photos)
    work = Path(tempfile.mkdtemp(prefix="effnet-scale-out-"))
    small = work / "small.txt"
    small.write_text("".join(f"{p}\n" for p in paths[: len(paths) // 3]))
    jobs = {"small": ([str(small)], len(paths) // 3), "big": ([arguments.folder], len(paths))}
    model = effnet.load(arguments.model)
    cores = os.cpu_count() or 1
    tick = time.perf_counter()
    ray.init(num_cpus=cores, object_store_memory=int(arguments.object_store), include_dashboard=False,
             log_to_driver=False)
    ray_start = time.perf_counter() - tick
    print(f"{len(paths)} JPEGs of {WIDTH}x{HEIGHT} in {arguments.folder}; {arguments.model}, engine torch fp32, "
          f"batch {arguments.batch_size}; {cores} cores; torch threads {torch.get_num_threads()}; "
          f"ray.init {ray_start:.1f} s (not counted)", flush=True)

    def timed(path: str, job: str) -> float:
        sources, count = jobs[job]
        out = work / f"{path}-{job}" if path == "ray" else work / f"{path}-{job}.parquet"
        report = run("embed", sources, model, out=str(out), engine="torch", batch_size=arguments.batch_size,
                     overwrite=True, ray="local" if path == "ray" else None, progress=False)
        assert report.processed == count and report.summary.failed == 0, report
        if path == "ray":
            ray_rows = ray.data.read_parquet(str(out)).count()
            assert ray_rows == count, ray_rows
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
        return report.seconds

    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(arguments.rounds):
        for job in ("small", "big"):
            for path in ("local", "ray"):
                seconds.setdefault((path, job), []).append(timed(path, job))
                print(f"  {path:5s} {job:5s} {jobs[job][1]:3d} images  {seconds[path, job][-1]:6.2f} s", flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    extra = jobs["big"][1] - jobs["small"][1]
    print()
    print("| path            | small job (s) | big job (s) | end-to-end img/s (big) | marginal img/s | start-up (s) |")
    print("|-----------------|---------------|-------------|------------------------|----------------|--------------|")
    rates = {}
    for path, label in (("local", "local job"), ("ray", "--ray, one node")):
        small_s, big_s = float(np.median(seconds[path, "small"])), float(np.median(seconds[path, "big"]))
        rate = extra / (big_s - small_s)
        rates[path] = rate
        intercept = small_s - jobs["small"][1] / rate
        print(f"| {label:15s} | {small_s:13.2f} | {big_s:11.2f} | {jobs['big'][1] / big_s:22.2f} | {rate:14.2f} | "
              f"{intercept:12.2f} |")
    print(f"\nmarginal throughput, ray / local: {rates['ray'] / rates['local']:.2f} "
          f"(goal >= 0.85); end-to-end on the big job: "
          f"{np.median(seconds['local', 'big']) / np.median(seconds['ray', 'big']):.2f}")
    print(f"median of {arguments.rounds} per cell; the machine may be shared with other jobs: ratios measured side by "
          "side are what count")


if __name__ == "__main__":
    sys.exit(main())
