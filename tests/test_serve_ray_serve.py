"""`effnet serve --replicas 2`: the same EffnetModel as a 2-replica Ray Serve deployment on a local Ray cluster
(2 CPUs, a 256 MB object store: ray_serve.OBJECT_STORE_BYTES), behind the same KServe server, answering a
tritonclient request. The cluster is the server's own and stops with it (SIGTERM from the fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

import effnet
from effnet.engines import machine
from effnet.serve.command import split_cores
from tests.serving import running_server
from tests.test_serve_command import EXACT, LITE, assert_close, pixels, reference


@pytest.mark.slow
def test_a_two_replica_ray_serve_deployment_answers_tritonclient():
    lite = effnet.load(LITE).eval()
    images = pixels(2, seed=11)
    replica_threads = split_cores(max(1, int(machine().cores / 2)), None, None)[1]  # as ray_serve.deploy splits
    want = reference(lite, images, replica_threads)
    with running_server(*EXACT, "--replicas", "2") as server:
        client = httpclient.InferenceServerClient(server.url, network_timeout=120)
        tensor = httpclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        result = client.infer(LITE, [tensor])
        assert_close({n: result.as_numpy(n) for n in want}, want)
        bad = requests.post(f"{server.base}/v1/models/{LITE}:predict", json={"instances": []}, timeout=60)
        assert bad.status_code == 400 and "empty batch" in bad.json()["error"]  # a replica's BadInput stays a 400
