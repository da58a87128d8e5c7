"""`effnet serve [MODEL...] --port P [--grpc-port G]`: the KServe SDK's `ModelServer` with one `EffnetModel` per
served name, speaking TF Serving's V1 REST API and the Open Inference Protocol (V2) over REST and gRPC.

    effnet serve                                    # the bundled Lite0 as "efficientnet_lite0", on :8080 and :8081
    effnet serve b2=./my_b2_module lite=efficientnet_lite0 --port 9000 --grpc-port 9001
    effnet serve --replicas 2                       # the same model class as a Ray Serve deployment

Cores are split deliberately between decoding and the engine (`split_cores`). SIGTERM drains: uvicorn stops
accepting, waits for the requests in flight (up to --grace-period), then the SDK stops gRPC with the same grace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys

import click

DEFAULT_MODEL = "efficientnet_lite0"


def split_cores(cores: int, decode_threads: int | None, engine_threads: int | None,
                torch_engine: bool = True) -> tuple[int, int]:
    """(decode threads, PyTorch intra-op threads) for a machine with `cores` cores.

    Beside a torch engine, decoding gets a quarter of the cores (at least 1) and PyTorch the rest, so the two
    never run more threads than there are cores: eager PyTorch's OpenMP threads wait for each other at every
    operator, and one of them preempted by a decode thread stalls them all (on 2 cores eager B2 fell from 14 to
    7 img/s with a decoder beside it). OpenVINO and ONNX Runtime run fixed thread counts (one stream per core)
    that held up beside decoders in the same measurement, so beside them decoding gets a thread per core, as
    `effnet embed` gives its decode workers (on 2 cores, B2 @ 260 served as JPEGs reached 70 % of `effnet embed`
    with one decode thread, benchmarks/serve.py).
    """
    decode = decode_threads or (max(1, cores // 4) if torch_engine else cores)
    engine = engine_threads or max(1, cores - (max(1, cores // 4) if decode_threads is None else decode))
    return decode, engine


@contextlib.contextmanager
def _own_argv():
    """kserve.model_server parses sys.argv when imported (its own --flags); keep ours away from it (argparse would
    read our --timeout as an abbreviation of its --timeout-keep-alive)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def model_specs(models: tuple[str, ...]) -> list[tuple[str | None, str]]:
    """MODEL or NAME=MODEL -> (NAME or None, MODEL); no MODEL: the bundled Lite0."""
    specs = []
    for text in models or (DEFAULT_MODEL,):
        name, sep, source = text.partition("=")
        if sep and name and source and "/" not in name and os.sep not in name:
            specs.append((name, source))
        else:
            specs.append((None, text))
    return specs


def _engine_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--engine-option")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    return key, int(value) if value.lstrip("-").isdigit() else value


@click.command("serve")
@click.argument("models", nargs=-1)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="HTTP port (V1 and V2 REST, /metrics).")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8081, show_default=True, help="V2 gRPC port; 0: no gRPC.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on (both ports).")
@click.option("--engine", type=click.Choice(["auto", "torch", "torch-compile", "onnxruntime", "openvino"]), default="auto", show_default=True,
              help="What runs each model; auto times the installed engines once at start-up (cached).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8", "auto"]), default="fp32", show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per engine call.")
@click.option("--max-batch-delay-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Opt-in: how long a short batch waits for more requests before an idle engine runs it "
                   "(0: at once; batches form from requests that arrive while the engine is busy).")
@click.option("--max-queue-images", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images waiting per model before new requests get 503 + Retry-After.")
@click.option("--max-request-images", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-request-bytes", type=click.IntRange(min=1024), default=64 * 2**20, show_default=True,
              help="Largest request body (413 above it; also the gRPC message limit).")
@click.option("--timeout", type=click.FloatRange(min=0.001), default=30.0, show_default=True,
              help="Seconds a request may wait for its result (504 after).")
@click.option("--decode-threads", type=click.IntRange(min=1), help="[default: a quarter of the cores, at least 1]")
@click.option("--engine-threads", type=click.IntRange(min=1), help="PyTorch intra-op threads [default: the other cores].")
@click.option("--engine-option", "engine_options", multiple=True, metavar="KEY=VALUE",
              help="An engine keyword (docs/engines.md), e.g. fold_batch_norm=false, threads=2; repeatable.")
@click.option("--grace-period", type=click.IntRange(min=0), default=30, show_default=True,
              help="Seconds SIGTERM waits for requests in flight.")
@click.option("--log-requests", is_flag=True,
              help="Log a line per request (uvicorn's access log, the SDK's timings). Off: /metrics counts them.")
@click.option("--replicas", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run each model as a Ray Serve deployment of N replicas (pip install 'effnet[ray]'); 0: in-process.")
@click.option("--ray-address", default=None, help="Ray cluster to join [default: $RAY_ADDRESS, or start a local one].")
def serve_command(models, port, grpc_port, host, engine, precision, max_batch_size, max_batch_delay_ms,
                  max_queue_images, max_request_images, max_request_bytes, timeout, decode_threads, engine_threads,
                  engine_options, grace_period, log_requests, replicas, ray_address) -> None:
    """Serve effnet modules over TF Serving's REST API (V1) and the Open Inference Protocol (V2, REST + gRPC).

    MODELS: names, hub handles, weights files or effnet module folders (as `classify -m`), each served under its
    spec name, or NAME=MODEL. Default: the bundled efficientnet_lite0.
    """
    with _own_argv():
        try:
            import kserve  # noqa: F401
        except ImportError:
            raise click.ClickException("the server needs the KServe SDK: pip install 'effnet[serve]'") from None
    import effnet
    from ..engines import machine
    from .model import EffnetModel, ServeSettings

    _, engine_count = split_cores(machine().cores, decode_threads, engine_threads)
    settings = ServeSettings(engine=engine, precision=precision, max_batch_images=max_batch_size,
                             max_delay=max_batch_delay_ms / 1000, max_queue_images=max_queue_images,
                             max_request_images=max_request_images, timeout=timeout, engine_threads=engine_count,
                             engine_options=tuple(_engine_option(text) for text in engine_options))
    served, seen = [], set()
    for name, source in model_specs(models):
        try:
            network = effnet.load(source)
        except effnet.EffnetError as error:
            raise click.ClickException(f"{source}: {error}") from None
        name = name or network.spec.name
        if name in seen:
            raise click.ClickException(f"two models would be served as {name!r}; name them: NAME=MODEL")
        seen.add(name)
        served.append((name, source, network))
    if replicas:
        from .ray_serve import deploy
        ray_address = ray_address or os.environ.get("RAY_ADDRESS")
        instances = deploy(served, settings, replicas, address=ray_address)
    else:
        instances = []
        for name, _, network in served:
            instance = EffnetModel(name, network, settings)
            instance.load()
            click.echo(f"serving {instance.description}", err=True)
            instances.append(instance)
        # One decode pool for all models, sized once the engines are known (split_cores).
        uses_torch = any(instance.engine_.name.startswith("torch") for instance in instances)
        decode, _ = split_cores(machine().cores, decode_threads, engine_threads, uses_torch)
        pool = concurrent.futures.ThreadPoolExecutor(decode, thread_name_prefix="effnet-decode")
        for instance in instances:
            instance.decode_pool = pool
        click.echo(f"cores: {machine().cores}; decode threads: {decode}; torch engine threads: {engine_count}"
                   f"{'' if uses_torch else ' (unused: no torch engine)'}", err=True)
    server = _server(host, port, grpc_port, max_request_bytes, grace_period, request_logs=log_requests)
    if not log_requests:
        _quiet_request_logs()
    from kserve.model_server import app
    from .app import install
    install(app, max_request_bytes, [name for name, _, _ in served], server.dataplane, server.model_repository_extension)
    try:
        server.start(instances)
    finally:
        if replicas:
            from .ray_serve import shut_down
            shut_down([name for name, _, _ in served], joined=bool(ray_address))


def _quiet_request_logs() -> None:
    """Drop the SDK's per-request lines: uvicorn's access log and the timing middleware's two lines (TF Serving
    logs none; `_server` also leaves out that middleware and uvicorn's access-log call, since the lines are all
    they make). Three lines to stderr cost 0.4-0.5 ms a request on 2 cores, a tenth of a Lite0 request at
    concurrency 1; /metrics keeps the counts and latencies. Called after the SDK configured logging (it does so
    once, in ModelServer's constructor; uvicorn is told not to)."""
    import logging

    from kserve.logging import trace_logger

    for quiet in (logging.getLogger("uvicorn.access"), trace_logger):
        quiet.setLevel(logging.WARNING)


def _run_event_loop(main) -> None:
    """asyncio.run, on uvloop where it is installed (uvicorn[standard], a kserve dependency, brings it). uvicorn
    picks uvloop itself when it makes the loop, but the SDK's start() makes a plain asyncio one. On 2 cores uvloop
    took 0.2-0.4 ms off a Lite0 request at concurrency 1 (two servers, requests alternating between them)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _server(host: str, port: int, grpc_port: int, max_request_bytes: int, grace_period: int,
            request_logs: bool = True):
    """The SDK's ModelServer, listening on `host` (it binds 0.0.0.0 / [::] unconditionally); without
    `request_logs`, without uvicorn's access log and the SDK's timing middleware (see _quiet_request_logs)."""
    with _own_argv():
        from kserve import ModelServer
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
        from kserve.protocol.grpc import server as grpc_server
        from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
        from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
        from kserve.protocol.grpc.servicer import InferenceServicer
        from kserve.protocol.rest.server import RESTServer

    class GRPCServer(grpc_server.GRPCServer):
        async def start(self, max_workers):
            # The SDK's start() with our listen address (it hard-codes "[::]:port").
            servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = grpc_server.aio.server(
                concurrent.futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[("grpc.max_send_message_length", max_request_bytes),
                         ("grpc.max_receive_message_length", max_request_bytes)])
            add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            self._server.add_insecure_port(f"{host}:{self._port}")
            await self._server.start()
            await self._server.wait_for_termination()

    class RESTServer_(RESTServer):
        def _add_middlewares(self, app):
            # The SDK adds one middleware here, timing_asgi's, whose only output is two log lines a request (and
            # an access logger when configured, which we never do). Without those lines it is ~14 us of Python a
            # request for nothing (in-process, engine stubbed: 178 -> 164 us).
            if request_logs:
                super()._add_middlewares(app)

    class ModelServer_(ModelServer):
        def start(self, models) -> None:
            # The SDK's start() for one REST worker, with our host.
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer_(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                            self.http_port, grace_period=self.grace_period,
                                            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive)
            self._rest_server.config.host = host
            self._rest_server.config.access_log = request_logs  # off: uvicorn skips the line's arguments too
            self.servers.append(self._rest_server.start())
            if self.enable_grpc:
                self._grpc_server = GRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                               kwargs={}, grace_period=self.grace_period)
                self.servers.append(self._grpc_server.start(self.max_threads))
            self.setup_event_loop()
            self.register_signal_handler()
            _run_event_loop(self._serve())

    return ModelServer_(http_port=port, grpc_port=grpc_port or 8081, enable_grpc=bool(grpc_port),
                        grace_period=grace_period, enable_latency_logging=False)
