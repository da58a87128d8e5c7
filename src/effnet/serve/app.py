"""What the server adds to the SDK's FastAPI app (`kserve.model_server.app`), and why: only what the SDK lacks.

Checked against kserve 0.21's source (model_server.py, protocol/rest/, errors.py):
- Request-size limit: the SDK and uvicorn read any body whole into memory; there is no limit. `BodyLimit` answers
  413 from the Content-Length header before reading, and stops a chunked body as soon as it passes the limit.
  (gRPC has its own: the SDK's `grpc_max_receive_message_length`, set to the same limit.)
- 503 + Retry-After for a full queue and 504 for a request timeout: the SDK maps unknown exceptions to 500.
  Handlers for our `QueueFull` and `RequestTimeout` give the right codes. 400 for bad input is the SDK's own
  (`InvalidInput`, which `BadInput` extends), 404 for an unknown model too.
- V2 REST bodies, JSON or with the binary tensor extension, are read by our `v2_infer` route (registered before
  the SDK's, so it takes the path) and handed to the SDK's own V2 endpoint as a ready `InferRequest`. Two SDK
  gaps made this necessary, each shown by a test with tritonclient's HTTP client: (1) a BYTES tensor in binary
  form is turned into JSON strings by `InferRequest.from_bytes`, which fails with 500 on any byte that is not
  UTF-8, i.e. on every JPEG; (2) tritonclient sends a JSON body with no Content-Type, which the SDK's route then
  takes for a binary body and refuses (400, "the 'inference-header-content-length' header is missing").
  `read_v2_request` only splits the body at the lengths the header gives and keeps binary tensors as raw bytes,
  which the SDK's `InferInput.as_numpy` decodes; `read_body` first reads the body so that those tensors start
  aligned (numpy's passes over a misaligned FP32 image were ~1.5-3x slower).
- Responses by status code: the SDK's Prometheus histograms time the model's steps but count no responses, and
  none of its errors. `ResponseCounter` counts every inference response by model, protocol and code.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve.protocol.rest.v2_endpoints import V2Endpoints
from starlette.routing import Route

from .batching import QueueFull
from .inputs import BadInput
from .metrics import RESPONSES
from .model import RequestTimeout

RETRY_AFTER_SECONDS = 1
ALIGNMENT = 64  # bytes: a cache line, and every SIMD width numpy uses
# /v1/models/NAME:predict and /v2/models/NAME[/versions/V]/infer: the inference routes, by protocol
_ROUTES = (("v1", re.compile(r"^/v1/models/([^/:]+):predict$")),
           ("v2", re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")))


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, without reading them whole."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(f"the request body of {int(length):,} bytes", self.limit)(scope, receive, send)
        seen, answered = 0, False

        async def limited_receive():
            # A streamed body over the limit: answer 413 now and tell the app the client is gone, so it stops.
            nonlocal seen, answered
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                if not answered:
                    answered = True
                    await _too_large("the streamed request body", self.limit)(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not answered:  # the app's own answer to the "disconnect" goes nowhere
                await send(message)

        return await self.app(scope, limited_receive, guarded_send)


class ResponseCounter:
    """ASGI middleware: count inference responses by model, protocol and status code."""

    def __init__(self, app, model_names):
        self.app = app
        self.known = set(model_names)

    async def __call__(self, scope, receive, send):
        route = _route(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        code = HTTPStatus.INTERNAL_SERVER_ERROR  # what the SDK's outermost handler makes of an escaping error

        async def counting_send(message):
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            return await self.app(scope, receive, counting_send)
        finally:
            protocol, name = route
            name = name if name in self.known else "(unknown)"  # bounded label values
            RESPONSES.labels(name, protocol, str(int(code))).inc()


def _route(path: str) -> tuple[str, str] | None:
    for protocol, pattern in _ROUTES:
        match = pattern.match(path)
        if match:
            return protocol, match.group(1)
    return None


def read_v2_request(body: bytes | memoryview, json_length: int | None, model_name: str) -> InferRequest:
    """A V2 REST body -> InferRequest: a JSON header of `json_length` bytes (all of it when None), then the binary
    tensors, in input order, each `parameters.binary_data_size` bytes long."""
    json_length = len(body) if json_length is None else json_length
    if not 0 <= json_length <= len(body):
        raise BadInput(f"Inference-Header-Content-Length {json_length} does not fit a body of {len(body)} bytes")
    try:
        header = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as error:
        raise BadInput(f"the request is not valid JSON: {error}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise BadInput('the request must be a JSON object with a list of "inputs"')
    inputs, raw, offset, view = [], [], json_length, memoryview(body)
    for index, spec in enumerate(header["inputs"]):
        if not isinstance(spec, dict) or not {"name", "shape", "datatype"} <= set(spec):
            raise BadInput(f'inputs[{index}] needs "name", "shape" and "datatype"')
        name, parameters = spec["name"], spec.get("parameters") or {}
        if not isinstance(spec["shape"], list) or not all(isinstance(d, int) and d >= 0 for d in spec["shape"]):
            raise BadInput(f'input "{name}": "shape" must be a list of non-negative integers, got {spec["shape"]!r}')
        tensor = InferInput(name, spec["shape"], spec["datatype"], parameters=parameters)
        if "data" in spec:
            tensor.data = spec["data"]
            raw.append(None)
        elif "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise BadInput(f'input "{name}": binary_data_size {size!r} runs past the end of the body')
            # Numeric tensors are read in place (np.frombuffer); BYTES elements must come out as bytes
            raw.append(bytes(view[offset:offset + size]) if spec["datatype"] == "BYTES" else view[offset:offset + size])
            offset += size
        else:
            raise BadInput(f'input "{name}" has neither "data" nor parameters.binary_data_size')
        inputs.append(tensor)
    outputs = header.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, dict) and "name" in o for o in outputs)):
        raise BadInput('"outputs" must be a list of {"name": ...} objects')
    request = InferRequest(model_name, inputs, request_id=header.get("id"), parameters=header.get("parameters"),
                           request_outputs=[RequestedOutput(o["name"], o.get("parameters")) for o in outputs]
                           if outputs else None)
    for tensor, data in zip(inputs, raw):
        if data is not None:
            tensor._raw_data = data  # what the SDK's own InferRequest(raw_inputs=...) sets; as_numpy() reads it
    return request


async def read_body(request: Request, tensors_at: int) -> memoryview | bytes:
    """The request body, read into a buffer placed so that byte `tensors_at` (where the V2 binary tensors begin,
    after the JSON header) sits on a 64-byte boundary. Starlette's own join puts it anywhere, and numpy reads a
    misaligned float32 tensor slower: on a 600 KB image out of cache, the range check 74 vs 27 us and the NHWC ->
    NCHW copy the engine makes 126 vs 86 us. Same cost otherwise: one copy of each chunk, as the join makes. A body
    with no Content-Length (chunked) is read as Starlette reads it."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return await request.body()
    size = int(declared)  # BodyLimit has refused one over the limit; uvicorn ends the body at this length
    storage = np.empty(size + ALIGNMENT, np.uint8)
    start = -(storage.ctypes.data + tensors_at) % ALIGNMENT
    body, filled = storage[start:start + size], 0
    async for chunk in request.stream():
        if filled + len(chunk) > size:
            raise BadInput(f"the body is longer than its Content-Length of {size} bytes")
        body[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
        filled += len(chunk)
    return memoryview(body[:filled])


def _too_large(what: str, limit: int) -> JSONResponse:
    return JSONResponse({"error": f"{what} is over the limit of {limit:,} bytes (--max-request-bytes); send fewer "
                                  "or smaller images per request"},
                        status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def install(app: FastAPI, max_request_bytes: int, model_names, dataplane, repository_extension) -> None:
    """Add our route, middleware and exception handlers to the SDK's app (before the server starts)."""
    endpoints = V2Endpoints(dataplane, repository_extension)
    json_response = app.router.default_response_class  # the SDK's ORJSONResponse; FastAPI wraps its own default
    json_response = getattr(json_response, "value", json_response)

    async def v2_infer(raw_request: Request) -> Response:
        # A plain Starlette route, not FastAPI's: FastAPI's per-request dependency solving and response handling
        # for these three parameters cost ~25 us of Python a request (in-process, the engine stubbed: 163 -> 137
        # us), which on 2 cores beside the engine's threads doubles. What FastAPI did with the SDK's answer is
        # done here the same way: its Response as it is (binary outputs), else its JSON through FastAPI's
        # encoder and the app's response class, with the headers the SDK set.
        model_name = raw_request.path_params["model_name"]
        length = raw_request.headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
        if length is not None and not length.isdigit():
            raise BadInput(f"{INFERENCE_CONTENT_LENGTH_HEADER} must be a number of bytes, not {length!r}")
        json_length = None if length is None else int(length)
        request = read_v2_request(await read_body(raw_request, json_length or 0), json_length, model_name)
        raw_response = Response()  # as FastAPI makes it for an endpoint: no length, filled in by the SDK
        del raw_response.headers["content-length"]
        answer = await endpoints.infer(raw_request, raw_response, model_name, request)
        if isinstance(answer, Response):
            return answer
        response = json_response(jsonable_encoder(answer))
        response.headers.raw.extend(raw_response.headers.raw)
        return response

    # First, so it takes the path before the SDK's own V2 route (registered later, when the server starts).
    app.router.routes.insert(0, Route("/v2/models/{model_name}/infer", v2_infer, methods=["POST"]))

    app.add_middleware(ResponseCounter, model_names=model_names)
    app.add_middleware(BodyLimit, limit=max_request_bytes)  # outermost: before anything reads the body

    @app.exception_handler(QueueFull)
    async def queue_full(_, error):
        return JSONResponse({"error": str(error)}, status_code=HTTPStatus.SERVICE_UNAVAILABLE,
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(RequestTimeout)
    async def request_timeout(_, error):
        return JSONResponse({"error": str(error)}, status_code=HTTPStatus.GATEWAY_TIMEOUT)
