"""Shared fixtures: a velocity field with a known Jacobian, the tiny SD3-architecture DiT, and a stub
OpenAI-compatible server for the VLM judge."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from flowbp_ops.backbones.schedules import get_schedule

torch.set_num_threads(2)


class LinearField(torch.nn.Module):
    """``v_θ(x, σ, c) = M x + σ·b + c``: Jacobian ``∂v/∂x = M`` everywhere; θ = (M, b)."""

    def __init__(self, dim: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.M = torch.nn.Parameter(0.5 * torch.randn(dim, dim, generator=g))
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, x, sigma, cond):
        return x @ self.M.T + sigma[:, None] * self.b + cond


class CountingField:
    """Wraps a velocity function and counts the calls made with gradient enabled."""

    def __init__(self, fn):
        self.fn, self.grad_calls, self.calls = fn, 0, 0

    def __call__(self, x, sigma, cond):
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled())
        return self.fn(x, sigma, cond)


@pytest.fixture
def linear_field():
    return LinearField()


def sd35_sigmas(n: int) -> np.ndarray:
    return get_schedule("sd35").sigmas(n)


@pytest.fixture(scope="session")
def tiny_dit():
    from flowbp_ops.backbones.sd3 import tiny_sd3_transformer

    return tiny_sd3_transformer(0)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A smoke-sized default world (seconds to build): the real code path, not a usable model."""
    from flowbp_ops.world.build import WorldConfig, build_world

    out = tmp_path_factory.mktemp("w") / "world"
    build_world(out, WorldConfig.smoke())
    return out


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on 127.0.0.1, with dummy credentials."""
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL_S3"]
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    import uuid

    from flowbp_ops.storage import s3_client

    s3, bucket = s3_client(), f"b-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_endpoint):
    """A real MLflow tracking server on 127.0.0.1 with its artifacts on the S3 endpoint."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    import uuid
    from pathlib import Path

    from flowbp_ops.storage import s3_client

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3_client().create_bucket(Bucket=bucket)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path_factory.mktemp("mlflow") / "server.db"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
                             f"s3://{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 60 s")
    yield url, bucket
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


# --------------------------------------------------------------------------------------------
# A stub OpenAI-compatible server
# --------------------------------------------------------------------------------------------

class Stub:
    """Records every request; ``script`` is a queue of (status, body, headers) to answer with,
    and once it is empty ``reply(prompt_text)`` builds a 200 chat completion."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple[int, str, dict]] = []
        self.reply = lambda text: "Alignment Score: 4\nQuality Score: 3"
        self.lock = threading.Lock()


@pytest.fixture
def stub():
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with state.lock:
                state.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                scripted = state.script.pop(0) if state.script else None
            if scripted is None:
                if self.path != "/v1/chat/completions":
                    scripted = (404, json.dumps({"error": {"message": f"no route {self.path}"}}), {})
                else:
                    msg = json.loads(body)["messages"][0]["content"]
                    text = next(p["text"] for p in msg if p["type"] == "text")
                    content = state.reply(text)
                    scripted = (200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                          "content": content}}]}), {})
            status, payload, headers = scripted
            data = payload.encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()
