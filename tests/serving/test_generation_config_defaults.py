"""A request without temperature/top_p/top_k samples with the model's generation_config.json
defaults (vLLM's default), and what the request gives wins."""

from __future__ import annotations

import json

import httpx
import pytest

from models.config import generation_defaults
from serving.default_model import DEMO_MODEL
from serving.protocol.completions import CompletionRequest
from serving.sampling import sampling_params


def test_the_demo_models_generation_config_gives_the_defaults():
    if not (DEMO_MODEL / "generation_config.json").is_file():
        pytest.skip("no demo model")
    assert generation_defaults(DEMO_MODEL) == {"temperature": 0.8, "top_p": 0.95}


def test_only_sampling_numbers_are_taken(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": "0.9", "max_new_tokens": 99, "min_p": True}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_k": 20}
    assert generation_defaults(tmp_path / "absent") == {}


def test_request_fields_win_over_the_models_defaults():
    defaults = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1}
    params = sampling_params(CompletionRequest(prompt="x"), max_tokens=4, logprobs=None, defaults=defaults)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.8, 0.95, 40, 1.1)
    given = CompletionRequest(prompt="x", temperature=0.0, top_p=0.5, top_k=-1, repetition_penalty=1.0)
    params = sampling_params(given, max_tokens=4, logprobs=None, defaults=defaults)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.0, 0.5, 0, 1.0)
    bare = sampling_params(CompletionRequest(prompt="x"), max_tokens=4, logprobs=None)
    assert (bare.temperature, bare.top_p, bare.top_k) == (1.0, 1.0, 0)  # no generation_config: OpenAI's


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_the_server_samples_with_the_models_defaults(base_url, engine, monkeypatch, path):
    seen = []
    make_request = engine.engine.make_request

    def spy(prompt, params, **kwargs):
        seen.append(params)
        return make_request(prompt, params, **kwargs)

    monkeypatch.setattr(engine.engine, "make_request", spy)
    monkeypatch.setattr(engine.engine, "generation_defaults", {"temperature": 0.8, "top_p": 0.95})
    body = {"max_tokens": 2, **({"prompt": "Pages"} if path == "/v1/completions" else
                                {"messages": [{"role": "user", "content": "Hi"}]})}
    assert httpx.post(base_url + path, json=body, timeout=60).status_code == 200
    assert httpx.post(base_url + path, json={**body, "temperature": 0.2}, timeout=60).status_code == 200
    assert [(p.temperature, p.top_p) for p in seen[:1]] == [(0.8, 0.95)]
    assert (seen[-1].temperature, seen[-1].top_p) == (0.2, 0.95)
