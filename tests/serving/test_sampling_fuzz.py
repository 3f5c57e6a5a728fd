"""Every sampling field with extreme values, through HTTP and through the engine's own API: never a
5xx (a refusal is a 4xx naming the field, or a ValueError per request), the engine never dies, and
a normal request after each case still gets the exact greedy answer it got before. (The issue's
case: `top_k: 2147483648` overflowed an int32 array inside a step and killed the engine.)"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtime.request import SamplingParams
from tests.serving.conftest import MODEL_NAME

HUGE_INTS = list(range(10_000))  # ~50 KB of JSON: under the test server's 64 KiB body limit
EXTREMES = [0, -1, 1, 2**31 - 1, 2**31, -(2**31) - 1, 2**32, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30,
            0.5, -0.5, 1e-300, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), -0.0,
            True, "4", "", "x" * 2000, None, [], [0], HUGE_INTS, ["x"] * 2000, [[1]], {"a": 1}]
# Sampling fields of the engine, OpenAI's and vLLM's, as the two endpoints name them.
COMMON = ["n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
          "min_p", "min_tokens", "stop_token_ids", "repetition_penalty", "priority", "ignore_eos",
          "include_stop_str_in_output", "skip_special_tokens", "cache_salt", "user", "logit_bias", "stream"]
COMPLETION_ONLY = ["max_tokens", "logprobs", "best_of", "echo", "prompt"]
CHAT_ONLY = ["max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "chat_template_kwargs"]
ENGINE_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "logprobs", "n"]
NORMAL = {"model": MODEL_NAME, "prompt": "The scheduler frees", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
EXAMPLES = 60  # per API: ~25 s for both on the 2-core development machine

extreme = st.sampled_from(EXTREMES)


def _normal_text(base_url: str) -> str:
    response = httpx.post(base_url + "/v1/completions", json=NORMAL, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(base_url) -> str:
    return _normal_text(base_url)


@st.composite
def http_cases(draw) -> tuple[str, dict]:
    chat = draw(st.booleans())
    names = draw(st.lists(st.sampled_from(COMMON + (CHAT_ONLY if chat else COMPLETION_ONLY)), min_size=1,
                          max_size=3, unique=True))
    body = {"model": MODEL_NAME, **({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4}
                                    if chat else {"prompt": "Hi", "max_tokens": 4})}
    body |= {name: draw(extreme) for name in names}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(case=http_cases())
@example(case=("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "top_k": 2**31, "stream": True}))  # the issue's
@example(case=("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "top_k": 10**12}))
@example(case=("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_k": 2**31}))
def test_extreme_sampling_fields_over_http(base_url, engine, reference, case):
    path, body = case
    content = json.dumps(body).encode()  # NaN and Infinity go out as Python writes them: invalid JSON
    response = httpx.post(base_url + path, content=content, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code < 500, f"{body!r:.300} -> {response.status_code} {response.text[:300]}"
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    elif body.get("stream") is True:
        assert "data: [DONE]" in response.text and '"error"' not in response.text, response.text[:300]
    assert engine.error is None
    assert _normal_text(base_url) == reference


@st.composite
def engine_cases(draw) -> dict:
    names = draw(st.lists(st.sampled_from(ENGINE_FIELDS), min_size=1, max_size=3, unique=True))
    fields = {name: draw(extreme) for name in names}
    for name in ("stop", "stop_token_ids"):  # SamplingParams takes tuples
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return fields


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(fields=engine_cases())
@example(fields={"top_k": 2**31})
@example(fields={"temperature": 1e308})
@example(fields={"repetition_penalty": 1e-300})
def test_extreme_sampling_fields_through_the_engine_api(engine, reference, fields):
    async def run(prompt, params: SamplingParams) -> list:
        return [out async for out in engine.generate(prompt, params)]

    try:
        params = SamplingParams(**{"max_tokens": 4, **fields})
        outputs = asyncio.run(run([1, 2, 3, 4], params))
    except ValueError as refused:  # per request, naming the field
        assert any(str(refused).startswith(name) or f"{name}=" in str(refused) for name in (*fields, "prompt")), (
            fields, refused)
    else:
        assert outputs[-1].finished and outputs[-1].error is None, fields
    assert engine.error is None
    normal = asyncio.run(run("The scheduler frees", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    assert "".join(o.text for out in normal for o in out.outputs) == reference
