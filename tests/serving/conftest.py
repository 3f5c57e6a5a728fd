"""One tiny engine and one real server on loopback for the serving tests, shared by every module.

The engine is small and compiled for two token buckets, so warm-up takes seconds; the server
is uvicorn in a thread (the same code `tessera serve` runs), on a port the OS picks. Tests
that need other settings (queue size, drain) build another app around the same engine.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from runtime.async_engine import AsyncEngine
from runtime.compile_cache import enable_compilation_cache
from runtime.config import EngineConfig
from runtime.engine import Engine
from serving import observability
from serving.app import create_app
from serving.config import ServerConfig
from serving.server import DrainingServer, make_server

MODEL_NAME = "tiny-llama"
# Small enough that warm-up is quick, large enough for n > 1 and a few concurrent streams.
ENGINE = dict(block_size=16, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128,
              token_buckets=(8, 64))
SERVER = dict(served_model_name=MODEL_NAME, max_queue=8, max_body_bytes=64 * 1024, drain_timeout_s=10.0)


@dataclass
class LiveServer:
    url: str
    server: DrainingServer
    thread: threading.Thread

    @property
    def state(self):
        return self.server.state

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_server(app) -> LiveServer:
    """uvicorn in a thread on a free loopback port; returns once it accepts connections."""
    state = app.state["server"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, state, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", server, thread)


@pytest.fixture(scope="session")
def tiny_model(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="session")
def engine(tiny_model) -> Iterator[AsyncEngine]:
    enable_compilation_cache()  # the tests' temporary cache: `tessera serve` subprocesses reuse the programs
    core = Engine.from_model_dir(tiny_model, config=EngineConfig(**ENGINE, model_id=MODEL_NAME))
    core.warm_up()
    front = AsyncEngine(core, metrics=observability.make_metrics(MODEL_NAME, core))
    yield front
    front.shutdown()


@pytest.fixture(scope="session")
def log_stream() -> Iterator[io.StringIO]:
    """Every log line of the serving tests (JSON, prompts redacted), as `tessera serve` writes them."""
    from ops.logging import configure_logging, reset_logging

    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream)
    yield stream
    reset_logging()


@pytest.fixture(scope="session")
def live(engine, log_stream) -> Iterator[LiveServer]:
    running = start_server(create_app(engine, ServerConfig(**SERVER)))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def base_url(live) -> str:
    return live.url


@pytest.fixture
def openai_client(base_url):
    import openai

    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@contextmanager
def slow_engine(engine: AsyncEngine, seconds_per_step: float = 0.02) -> Iterator[None]:
    """Every engine step takes at least this long, so requests stay in flight long enough to act on."""
    core = engine.engine
    original = core.step

    def slow_step():
        time.sleep(seconds_per_step)
        return original()

    core.step = slow_step
    try:
        yield
    finally:
        del core.step


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def assert_error(response, status: int, *, param=..., code=..., message_has: str | None = None) -> dict:
    """The response is OpenAI's error body with this status (and param/code when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 429 else error["type"])
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    if message_has is not None:
        assert message_has in error["message"], error
    return error
