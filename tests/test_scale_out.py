"""The main job on Ray Data (effnet.scale_out) against real Ray: a one-node instance, a three-node cluster on this
machine, a driver killed mid-job and resumed, and a real local S3 server (moto) for sources and output.

Ray's start-up costs seconds, so each Ray lives for one test class (class-scoped fixtures; one Ray per process
at a time) and is shut down in the fixture's teardown even when a test fails.

Tolerance: the Ray job's embeddings equal the local job's within 1e-6 (absolute; Lite0's features are at most
~6). Both run engine="torch" with the same number of PyTorch threads: the thread count changes oneDNN's
summation order (measured: up to 7e-6 between 1 and 2 threads), the batch composition does not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # the test extra installs effnet[ray]: never skipped
import torch

import effnet
from effnet.embed import run
from effnet.errors import EffnetError
from effnet.pipeline import Sources
from effnet.pipeline.sinks import embedding_matrix, keys_of
from effnet.scale_out import OutputFolder, plan_for

from .test_pipeline_corpus import BAD, GOOD, build_corpus


ACTOR_THREADS = 1  # what plan_for gives a CPU model actor; the local reference runs with as many


@pytest.fixture(scope="module")
def model():
    return effnet.load("efficientnet_lite0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    build_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def local_rows(corpus, model, tmp_path_factory) -> pa.Table:
    """The local job's output file for the corpus (the reference), read back and sorted by path."""
    out = tmp_path_factory.mktemp("local") / "local.parquet"
    threads = torch.get_num_threads()
    torch.set_num_threads(ACTOR_THREADS)
    try:
        run("embed", [str(corpus)], model, engine="torch", batch_size=4, out=out)
    finally:
        torch.set_num_threads(threads)
    return pq.read_table(out).sort_by("path")


def folder_rows(out) -> pa.Table:
    folder = OutputFolder(str(out), None, None)
    tables = []
    for path in folder.files():
        with folder.filesystem.open_input_file(path) as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables).sort_by("path")


def assert_same_rows(ray_rows: pa.Table, reference: pa.Table, paths=None) -> None:
    """Same schema (with the settings metadata), same errors and sizes, embeddings within 1e-6."""
    assert ray_rows.schema.equals(reference.schema, check_metadata=True)
    expected_paths = paths or reference.column("path").to_pylist()
    assert ray_rows.column("path").to_pylist() == expected_paths
    for name in ("width", "height", "error", "size_bytes"):
        assert ray_rows.column(name).to_pylist() == reference.column(name).to_pylist(), name
    got, want = (embedding_matrix(t, 1280, np.float32) for t in (ray_rows, reference))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.nanmax(np.abs(got - want)) <= 1e-6


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_plan_keeps_the_pool_and_a_decode_task_within_the_cluster():
    for cpus in (0.5, 1, 2, 3, 4, 8, 64):
        for gpus in (0, 1, 4):
            if gpus > cpus:
                continue
            plan = plan_for({"CPU": cpus, "GPU": gpus})
            assert plan.actors >= 1 and plan.decode_cpus > 0
            assert plan.actors * plan.actor_cpus + plan.decode_cpus <= cpus + 1e-9, plan
            assert plan.actors * plan.actor_gpus <= gpus
            assert (plan.actor_gpus == 1) == (gpus >= 1)
            assert f"{plan.actors} model actor" in plan.describe()


def test_cli_ray_option_takes_an_optional_address(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import importlib

    from effnet.cli import main

    seen = []

    def capture(task, sources, model, **options):
        seen.append(options["ray"])
        raise EffnetError("stopped by the test")

    monkeypatch.setattr(importlib.import_module("effnet.embed"), "run", capture)  # the module, not the verb
    runner = CliRunner()
    for arguments, expected in ((["--ray"], "local"), (["--ray", "head:6379"], "head:6379"),
                                (["--ray=auto"], "auto"), ([], None)):
        result = runner.invoke(main, ["embed", "photos/", "-o", str(tmp_path / "out"), *arguments])
        assert result.exit_code == 1 and "stopped by the test" in result.output, result.output
        assert seen.pop() == expected
    result = runner.invoke(main, ["embed", "photos/", "-o", str(tmp_path)])  # a folder, without --ray
    assert result.exit_code == 2 and "is a folder" in result.output


def test_rows_written_twice_are_kept_once(local_rows, tmp_path):
    """Should Ray recompute rows in another grouping than it first wrote them, the job keeps one copy of each."""
    from pyarrow.fs import LocalFileSystem

    from effnet.scale_out import _FolderSink, _verify
    from effnet.pipeline import Item

    folder = OutputFolder(str(tmp_path / "out"), local_rows.schema, json.loads(local_rows.schema.metadata[b"effnet"]))
    folder.prepare(overwrite=False)
    sink = _FolderSink(LocalFileSystem(), folder.root, folder.schema)
    sink.write([local_rows.slice(0, 10), local_rows.slice(5, 12)], None)  # rows 5-9 twice
    assert len(folder.files()) == 2 and sum(len(p) for p in folder.keys().values()) == local_rows.num_rows + 5
    items = [Item(*key) for key in keys_of(local_rows)]
    summary = _verify(folder, items)
    assert summary.rows == local_rows.num_rows and summary.failed == len(BAD)
    rows = folder_rows(tmp_path / "out")
    assert keys_of(rows) == keys_of(local_rows)  # each once (both sorted by path)
    assert rows.equals(local_rows)


class TestOneNode:
    """`ray.init(num_cpus=2)`: the result, the library verbs, S3, and a driver killed and resumed."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def one_node(cls):
        if ray.is_initialized():  # one Ray per process: another module's should have stopped
            ray.shutdown()
        ray.init(num_cpus=2, object_store_memory=300_000_000, include_dashboard=False, log_to_driver=False)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()

    def test_rows_equal_the_local_job(self, corpus, model, local_rows, tmp_path):
        report = run("embed", [str(corpus)], model, engine="torch", batch_size=4, ray="local", out=tmp_path / "out")
        inputs = len(GOOD) + len(BAD)
        assert (report.inputs, report.resumed, report.processed) == (inputs, 0, inputs)
        assert report.summary.failed == len(BAD)
        assert_same_rows(folder_rows(tmp_path / "out"), local_rows)

        again = run("embed", [str(corpus)], model, engine="torch", ray="local", out=tmp_path / "out")
        assert (again.resumed, again.processed, again.summary.rows) == (inputs, 0, inputs)  # nothing recomputed
        with pytest.raises(EffnetError, match="other settings"):  # another task's rows never join these
            run("classify", [str(corpus)], model, engine="torch", ray="local", out=tmp_path / "out")

    def test_library_verb_returns_rows_in_input_order(self, corpus, model):
        order = [str(corpus / name) for name in ("truncated.jpg", "chelsea.jpg", "coffee.png", "empty.jpg")]
        table = effnet.classify(order, model, top_k=3, engine="torch", errors="keep", ray="local")
        assert table.column("path").to_pylist() == order
        assert table.column("labels")[1].as_py()[0] in ("tiger cat", "tabby", "Egyptian cat")
        assert table.column("labels")[2].as_py()[0] == "espresso"
        assert [e is None for e in table.column("error").to_pylist()] == [False, True, True, False]

    def test_decoder_warnings_come_back_to_the_driver(self, model, tmp_path):
        from PIL import Image

        from .conftest import photo

        warns = tmp_path / "in" / "bad_exif.jpg"
        warns.parent.mkdir()
        ifd_cut_short = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00"  # 5 entries, 4 bytes of one
        Image.fromarray(photo("chelsea")).save(warns, exif=ifd_cut_short)
        Image.fromarray(photo("coffee")).save(tmp_path / "in" / "coffee.jpg")
        local = run("embed", [str(warns.parent)], model, engine="torch")
        remote = run("embed", [str(warns.parent)], model, engine="torch", ray="local", out=tmp_path / "out")
        assert remote.warnings == local.warnings and [p for p, _ in local.warnings] == [str(warns)]

    def test_s3_source_and_output_give_the_rows_of_local_files(self, corpus, model, local_rows, monkeypatch):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            environment = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
            for name, value in environment.items():
                monkeypatch.setenv(name, value)
            import boto3

            client = boto3.client("s3")
            deadline = time.monotonic() + 30
            while True:  # the server is up when it answers
                try:
                    client.create_bucket(Bucket="photos")
                    break
                except Exception:  # noqa: BLE001 - connection refused while it starts
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            names = sorted(p.name for p in corpus.iterdir())
            for name in names:
                client.put_object(Bucket="photos", Key=f"in/{name}", Body=(corpus / name).read_bytes())

            report = run("embed", ["s3://photos/in/"], model, engine="torch", batch_size=4, ray="local",
                         out="s3://photos/out/")
            assert report.processed == len(names) and report.summary.failed == len(BAD)
            rows = folder_rows("s3://photos/out/")
            expected = [f"s3://photos/in/{Path(p).name}" for p in local_rows.column("path").to_pylist()]
            # the same rows but for the modification time, which is the upload's
            assert_same_rows(rows.drop_columns(["mtime_ns"]), local_rows.drop_columns(["mtime_ns"]), paths=expected)
            listed = client.list_objects_v2(Bucket="photos", Prefix="out/")["Contents"]
            files = [o["Key"] for o in listed if not o["Key"].endswith("/")]  # "out/": the folder's marker
            assert files and all(Path(key).name.startswith("part-") for key in files)
        finally:
            server.terminate()
            server.wait(timeout=30)

    def test_driver_killed_mid_job_then_resumed_computes_each_input_once(self, one_node, tmp_path):
        from PIL import Image

        from .conftest import photo

        photos = tmp_path / "photos"
        photos.mkdir()
        base = [Image.fromarray(photo(n)).convert("RGB") for n in ("chelsea", "coffee", "astronaut", "rocket")]
        for index in range(96):  # distinct files (crops), small enough to decode fast, many enough to kill mid-way
            image = base[index % 4]
            image.crop((index % 24, 0, image.width - 24 + index % 24, image.height)).save(photos / f"{index:03d}.jpg")
        out = tmp_path / "out"
        command = [sys.executable, "-m", "effnet.cli", "embed", str(photos), "-o", str(out), "--engine", "torch",
                   "--batch-size", "2", "--ray", one_node]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not list(out.glob("part-*.parquet")) and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert child.poll() is None, "the job ended before it could be killed: " + child.stderr.read().decode()
            os.killpg(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            child.stderr.close()

        inputs = {item.key for item in Sources([str(photos)])()}
        before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
        finished = set(keys_of(folder_rows(out)))
        assert 0 < len(finished) < len(inputs)

        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        summary = [line for line in again.stderr.splitlines() if line.startswith("embedded")][-1]
        assert f"({len(inputs) - len(finished)} this run, {len(finished)} resumed;" in summary

        after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
        assert all(after.get(name) == mtime for name, mtime in before.items())  # finished files untouched
        rows = folder_rows(out)
        assert sorted(keys_of(rows)) == sorted(inputs)  # every input exactly once
        new_files = [out / name for name in after if name not in before]
        recomputed = {key for file in new_files for key in keys_of(pq.read_table(file))}
        assert recomputed.isdisjoint(finished) and len(recomputed) == len(inputs) - len(finished)
        assert rows.column("error").null_count == rows.num_rows


class TestCluster:
    """A head and two worker nodes with one CPU each, on this machine."""

    @pytest.fixture(scope="class")
    @classmethod
    def cluster(cls):
        from ray.cluster_utils import Cluster

        if ray.is_initialized():
            ray.shutdown()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20,
                                                                "include_dashboard": False})
        try:
            workers = [cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20) for _ in range(2)]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            yield cluster, workers
        finally:
            ray.shutdown()
            cluster.shutdown()

    def test_worker_node_removed_mid_job_costs_no_rows(self, cluster, corpus, model, local_rows, tmp_path):
        cluster, workers = cluster
        photos = tmp_path / "photos"
        photos.mkdir()
        for copy in range(4):  # the corpus four times: enough batches to be mid-job when the node goes
            for name in GOOD + list(BAD):
                (photos / f"{copy}-{name}").write_bytes((corpus / name).read_bytes())
        out = tmp_path / "out"
        outcome: dict = {}

        def job():
            try:
                outcome["report"] = run("embed", [str(photos)], model, engine="torch", batch_size=2,
                                        ray=cluster.address, out=out)
            except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread below
                outcome["error"] = error

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        deadline = time.monotonic() + 180
        while not list(out.glob("part-*.parquet")) and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert thread.is_alive(), f"the job ended before a node could be removed: {outcome}"
        victim = _node_to_remove(workers)
        cluster.remove_node(victim)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the job did not finish after losing a node"
        if "error" in outcome:
            raise outcome["error"]
        report = outcome["report"]
        assert report.processed == 4 * (len(GOOD) + len(BAD)) and report.summary.failed == 4 * len(BAD)
        rows = folder_rows(out)
        assert sorted(rows.column("path").to_pylist()) == sorted(str(p) for p in photos.iterdir())  # each once
        first_copy = rows.filter(pa.compute.starts_with(rows.column("path"), str(photos / "0-")))
        reference_paths = [str(photos / f"0-{Path(p).name}") for p in local_rows.column("path").to_pylist()]
        assert_same_rows(first_copy, local_rows, paths=reference_paths)  # same name order: sorted alike


def _node_to_remove(workers):
    """A worker node this driver is not attached to, preferring the one that hosts the model actor (removing it
    kills the actor, which Ray restarts elsewhere)."""
    attached = ray._private.worker.global_worker.node._raylet_socket_name
    candidates = [node for node in workers if node._raylet_socket_name != attached]
    hosts = {actor["Address"]["NodeID"] for actor in ray._private.state.actors().values()
             if "_ModelActor" in actor.get("ActorClassName", "") and actor.get("State") == "ALIVE"}
    return next((node for node in candidates if node.node_id in hosts), candidates[0])
