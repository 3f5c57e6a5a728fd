"""Serving depends on the engine only through `EngineClient`.

The app runs here around a second, minimal implementation that streams fixed tokens (as a
remote worker's client would stand in for AsyncEngine); and no serving module reaches into
an engine's attributes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from litestar.testing import TestClient

from models.tokenizer import Tokenizer
from runtime.engine import EngineStats
from runtime.engine_client import EngineClient, EngineHealth
from runtime.outputs import CompletionOutput, RequestOutput
from runtime.request import Request, SamplingParams
from runtime.request_limits import RequestLimits
from serving.app import create_app
from serving.config import ServerConfig
from tests.serving.conftest import SERVER

SERVING = Path(__file__).resolve().parents[2] / "serving"
TOKENS = [5, 6, 7]


class FixedTokensEngine:
    """The smallest EngineClient: every request's sample gets TOKENS, one per output."""

    model_id, max_model_len, max_num_seqs, generation_defaults, metrics = "fixed", 64, 2, {}, None
    limits = RequestLimits(max_model_len=64, vocab_size=64, num_blocks=64, block_size=16, max_num_seqs=2,
                           max_num_batched_tokens=64, enable_chunked_prefill=True)

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.made: list[Request] = []
        self.streamed: list[Request] = []
        self.running, self.error = False, None

    def start(self) -> None:
        self.running = True

    def shutdown(self, timeout: float = 10.0) -> None:
        self.running = False

    def make_request(self, prompt, params: SamplingParams, request_id=None, **fields) -> Request:
        if 0 in prompt:
            raise ValueError("prompt holds token ids outside the vocabulary [1, 64)")
        self.made.append(Request(request_id or "fixed", list(prompt), params, **fields))
        return self.made[-1]

    async def stream(self, request: Request):
        self.streamed.append(request)
        tokens = TOKENS[: request.params.max_tokens]
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            sample = CompletionOutput(0, self.tokenizer.decode([token]), [token], None, "length" if last else None)
            yield RequestOutput(request.request_id, [sample], last, request.num_prompt_tokens, num_generated_tokens=i + 1)

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 0)

    def health(self) -> EngineHealth:
        return EngineHealth(self.running and self.error is None, self.error)

    async def kv_events(self):
        return
        yield


@pytest.fixture
def fake(tiny_model) -> FixedTokensEngine:
    engine = FixedTokensEngine(Tokenizer.from_dir(tiny_model))
    assert isinstance(engine, EngineClient)
    return engine


def test_completions_run_on_a_second_engine_client(fake):
    pieces = [fake.tokenizer.decode([t]) for t in TOKENS]
    text = "".join(pieces)
    assert all(pieces)  # three visible pieces: the joins below prove order and count
    with TestClient(create_app(fake, ServerConfig(**{**SERVER, "served_model_name": None}))) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "fixed"  # the client's model id
        body = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3}).json()
        streamed = client.post("/v1/completions", json={"prompt": [4, 5], "max_tokens": 2, "stream": True}).text
        ready = client.get("/ready").json()
    assert body["choices"][0]["text"] == text and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    chunks = [json.loads(line[6:]) for line in streamed.split("\n\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == pieces[0] + pieces[1]
    assert streamed.rstrip().endswith("data: [DONE]")
    assert ready["engine_running"] is True and ready["status"] == "ready"
    # Checked once: each request serving made is the very object the stream got.
    assert [r.prompt_token_ids for r in fake.streamed] == [[1, 2, 3], [4, 5]]
    assert all(a is b for a, b in zip(fake.made, fake.streamed, strict=True))


def test_the_clients_check_is_a_400_and_its_health_a_503(fake):
    with TestClient(create_app(fake, ServerConfig(**SERVER))) as client:
        bad = client.post("/v1/completions", json={"prompt": [1, 0, 2], "max_tokens": 3})
        fake.error = "EngineUnrecoverable('gone')"
        health = client.get("/health")
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "prompt" and "outside the vocabulary" in bad.json()["error"]["message"]
    assert fake.streamed == []  # nothing queued for a request that failed its check
    assert health.status_code == 503 and health.json()["reason"] == "EngineUnrecoverable('gone')"


def test_serving_never_reaches_into_an_engine():
    """The done-when grep of issue 16, and the in-process engine is built in one place only."""
    reaching = re.compile(r"engine\.engine|\._thread")
    offenders = [f"{p.relative_to(SERVING)}:{n}" for p in sorted(SERVING.rglob("*.py"))
                 for n, line in enumerate(p.read_text().splitlines(), 1) if reaching.search(line)]
    assert offenders == []
    importers = sorted(str(p.relative_to(SERVING)) for p in SERVING.rglob("*.py")
                       if "runtime.async_engine" in p.read_text())
    assert importers == ["server.py"]
