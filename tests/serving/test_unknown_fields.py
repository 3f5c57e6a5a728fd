"""Fields Tessera does not serve are a 400 naming them, never silently ignored; the harmless
OpenAI fields clients and agent frameworks send (tags, tiers, a replayed assistant message's
extra keys) are accepted and change nothing in what is generated."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.conftest import MODEL_NAME, assert_error

USER = [{"role": "user", "content": "Tell me a story."}]


def post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + path, json=body, timeout=60)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "temprature": 0.5}, "temprature"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi", "contnet": "x"}], "max_tokens": 2},
     "messages[0].contnet"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stream": True,
                              "stream_options": {"include_usage": True, "usage_every": 2}}, "stream_options.usage_every"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "bad_words": ["the"]}, "bad_words"),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 2, "max_completion_tokens": 2}, "max_completion_tokens"),
    ("/tokenize", {"prompt": "Hi", "truncate": True}, "truncate"),
    ("/detokenize", {"tokens": [1, 2], "skip_special": True}, "skip_special"),
])
def test_an_unknown_field_is_named(base_url, path, body, param):
    error = assert_error(post(base_url, path, body), 400, param=param, code="unsupported_parameter")
    assert f"`{param}`" in error["message"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": USER, "store": True}, "store"),
    ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": USER, "verbosity": "low"}, "verbosity"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None,
                                            "function_call": {"name": "f", "arguments": "{}"}}, *USER]},
     "messages[0].function_call"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi", "audio": {"id": "a1"}}]},
     "messages[0].audio"),
    ("/v1/responses", {"input": "Hi", "include": ["message.output_text.logprobs"]}, "include"),
    ("/v1/responses", {"input": "Hi", "conversation": "conv_1"}, "conversation"),
    ("/v1/responses", {"input": "Hi", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ("/v1/responses", {"input": "Hi", "max_tool_calls": 2}, "max_tool_calls"),
])
def test_a_known_field_tessera_cannot_serve_is_refused_with_the_reason(base_url, path, body, param):
    error = assert_error(post(base_url, path, body), 400, param=param, code="unsupported_parameter")
    assert "not supported" in error["message"]


def test_a_tier_other_than_the_usual_is_refused(base_url):
    assert_error(post(base_url, "/v1/chat/completions", {"messages": USER, "service_tier": "flex"}), 400,
                 param="service_tier")


def test_harmless_openai_fields_are_accepted_and_change_nothing(openai_client):
    plain = openai_client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=8, temperature=0)
    first = plain.choices[0].message
    # A conversation replayed as the openai client dumps its own message, tagged as frameworks tag it.
    history = [*USER, first.model_dump(), {"role": "user", "content": "Go on."}]
    assert {"refusal", "annotations", "audio", "function_call"} <= set(history[1])
    tagged = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=history, max_tokens=8, temperature=0, metadata={"team": "search"},
        service_tier="auto", store=False, user="u-1", prompt_cache_key="conv-9",
        extra_body={"safety_identifier": "hash-1"})
    untagged = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=[*USER, {"role": "assistant", "content": first.content},
                                {"role": "user", "content": "Go on."}], max_tokens=8, temperature=0)
    assert tagged.choices[0].message.content == untagged.choices[0].message.content
    assert tagged.usage.prompt_tokens == untagged.usage.prompt_tokens


def test_the_openai_client_sees_the_field_named(openai_client):
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, extra_body={"length_penalty": 1.2})
    assert refused.value.body["param"] == "length_penalty"
    assert refused.value.body["code"] == "unsupported_parameter"
