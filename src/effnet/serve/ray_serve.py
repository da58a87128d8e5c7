"""`effnet serve --replicas N`: each model as a Ray Serve deployment of N replicas of the same `EffnetModel`,
behind the same KServe `ModelServer`, through the SDK's Ray integration (`kserve.ray.RayModel`, `kserve[ray]`).

The server process parses requests (the SDK's REST/gRPC layers) and hands the parsed request to the deployment's
handle; Ray Serve routes it to a replica, which decodes, batches and runs the engine as the in-process server does.
Replication, placement and routing are Ray's; nothing here is home-made. Each replica reserves
`cores / replicas` CPUs on the local cluster (or one on a cluster joined by address) and splits them between
decoding and its engine as the in-process server does. Per-model metrics live in the replicas' processes
(Ray's metrics export), not in this server's /metrics.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

from ..engines import machine
from .command import split_cores
from .model import EffnetModel, ServeSettings

OBJECT_STORE_BYTES = 256 * 2**20  # a local cluster's object store: requests and responses, not weights


class ReplicaModel(EffnetModel):
    """An EffnetModel that loads itself when Ray Serve constructs the replica, on its share of `cores`."""

    def __init__(self, name: str, source: str, settings: ServeSettings, cores: int):
        super().__init__(name, source, settings)
        self.load()
        decode, _ = split_cores(cores, None, None, self.engine_.name.startswith("torch"))
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(decode, thread_name_prefix="effnet-decode")


def deploy(served, settings: ServeSettings, replicas: int, address: str | None = None) -> list:
    """Start (or join) Ray, run one deployment per (name, source, network) and return the SDK's RayModel wrappers."""
    import ray
    from kserve.ray import RayModel
    from ray import serve

    if address:
        ray.init(address=address)
        cpus = 1.0
    else:
        ray.init(num_cpus=machine().cores, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False)
        cpus = machine().cores / replicas
    serve.start(proxy_location="Disabled")  # requests come through our ModelServer, not Ray's HTTP proxy
    _, engine_threads = split_cores(max(1, int(cpus)), None, None)
    replica_settings = dataclasses.replace(settings, engine_threads=engine_threads)
    wrappers = []
    for name, source, _ in served:
        deployment = serve.deployment(ReplicaModel, name=name, num_replicas=replicas,
                                      ray_actor_options={"num_cpus": cpus})
        handle = serve.run(deployment.bind(name, source, replica_settings, max(1, int(cpus))), name=name,
                           route_prefix=None)
        model = RayModel(name, handle=handle)
        model.load()
        wrappers.append(model)
    return wrappers


def shut_down(names=(), joined: bool = False) -> None:
    """Remove our deployments from a cluster we joined; stop a local cluster we started (with its replicas)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if joined:
        for name in names:
            serve.delete(name)
    ray.shutdown()
