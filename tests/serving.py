"""Helpers for the server tests: a real `effnet serve` subprocess on 127.0.0.1, and a gRPC client run in its own
process (kserve and tritonclient.grpc register the same proto symbols and cannot share one process; the test
process imports kserve for the unit tests)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

STARTUP_SECONDS = 240  # a cold start on a busy 2-core machine: imports, weights, engine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def base(self) -> str:
        return f"http://{self.url}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.base}/v2/health/ready", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metrics(self) -> str:
        return requests.get(f"{self.base}/metrics", timeout=10).text

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running_server(*arguments: str, startup_seconds: float = STARTUP_SECONDS):
    """`python -m effnet serve ARGUMENTS` on free 127.0.0.1 ports; stopped (SIGTERM, then SIGKILL) afterwards."""
    http_port, grpc_port = free_port(), free_port()
    log = Path(tempfile.mkstemp(prefix="effnet-serve-", suffix=".log")[1])
    command = [sys.executable, "-m", "effnet", "serve", *arguments, "--host", "127.0.0.1",
               "--port", str(http_port), "--grpc-port", str(grpc_port)]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(process, http_port, grpc_port, log)
    try:
        deadline = time.monotonic() + startup_seconds
        while not server.ready():
            if process.poll() is not None:
                raise RuntimeError(f"effnet serve exited with {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"effnet serve not ready after {startup_seconds} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        log.unlink(missing_ok=True)


_GRPC_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    url, model, inputs_path, outputs_json, out_path = sys.argv[1:6]
    data = np.load(inputs_path, allow_pickle=True)["images"]  # our own file: FP32 pixels or an object array of bytes
    client = grpcclient.InferenceServerClient(url)
    assert client.is_server_ready()
    tensor = grpcclient.InferInput("images", list(data.shape), "BYTES" if data.dtype == object else "FP32")
    tensor.set_data_from_numpy(data)
    wanted = [grpcclient.InferRequestedOutput(n, class_count=k) for n, k in json.loads(outputs_json)]
    try:
        result = client.infer(model, [tensor], outputs=wanted or None, client_timeout=120)
    except Exception as error:
        json.dump({"error": str(error)}, open(out_path + ".json", "w"))
        sys.exit(0)
    names = [o.name for o in result.get_response().outputs]
    np.savez(out_path, **{n: result.as_numpy(n) for n in names})
""")


def grpc_infer(url: str, model: str, images: np.ndarray, outputs=(), *, tmp: Path) -> dict:
    """tritonclient.grpc in a child process: {output name: array}, or {"error": message}."""
    tmp.mkdir(parents=True, exist_ok=True)
    inputs, out = tmp / "grpc_in.npz", tmp / "grpc_out.npz"
    np.savez(inputs, images=images)
    done = subprocess.run([sys.executable, "-c", _GRPC_CLIENT, url, model, str(inputs), json.dumps(list(outputs)),
                           str(out)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    if Path(str(out) + ".json").exists():
        return json.loads(Path(str(out) + ".json").read_text())
    with np.load(out, allow_pickle=True) as arrays:
        return {name: arrays[name] for name in arrays.files}
