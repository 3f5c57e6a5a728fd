"""Bad input gets OpenAI's error body and a 4xx, never a 500, while a good stream beside it runs on."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.serving.conftest import MODEL_NAME, assert_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]

# (path, body, status, param, code): every case is sent as JSON unless the body is bytes.
CASES = [
    pytest.param(COMPLETIONS, b'{"prompt": "Hi", "max_tokens": 5', 400, None, "invalid_json", id="malformed-json"),
    pytest.param(CHAT, b'{"messages": [', 400, None, "invalid_json", id="malformed-json-chat"),
    pytest.param(COMPLETIONS, b"", 400, None, None, id="empty-body"),
    pytest.param(COMPLETIONS, b"[1, 2]", 400, None, None, id="body-not-an-object"),
    pytest.param(COMPLETIONS, b'{"prompt": "\xff\xfe bad bytes"}', 400, None, "invalid_utf8", id="invalid-utf8"),
    pytest.param(CHAT, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, None, "invalid_utf8",
                 id="invalid-utf8-chat"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "max_tokens": "five"}, 400, "max_tokens", None, id="wrong-type"),
    pytest.param(COMPLETIONS, {"prompt": 42}, 400, "prompt", None, id="wrong-type-prompt"),
    pytest.param(CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature", None, id="wrong-type-chat"),
    pytest.param(COMPLETIONS, {"max_tokens": 3}, 400, "prompt", None, id="missing-prompt"),
    pytest.param(COMPLETIONS, {"model": "gpt-4", "prompt": "Hi"}, 404, "model", "model_not_found", id="unknown-model"),
    pytest.param(CHAT, {"model": "nope", "messages": USER}, 404, "model", "model_not_found", id="unknown-model-chat"),
    pytest.param(COMPLETIONS, {"prompt": "word " * 200}, 400, "prompt", "context_length_exceeded",
                 id="prompt-over-context"),
    pytest.param(COMPLETIONS, {"prompt": list(range(1, 130))}, 400, "prompt", "context_length_exceeded",
                 id="token-prompt-over-context"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": "word " * 200}]}, 400, "messages",
                 "context_length_exceeded", id="messages-over-context"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "max_tokens": 500}, 400, "max_tokens", "context_length_exceeded",
                 id="max-tokens-over-context"),
    pytest.param(CHAT, {"messages": USER, "max_completion_tokens": 127}, 400, "max_completion_tokens",
                 "context_length_exceeded", id="max-completion-tokens-over-context"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", None, id="max-tokens-zero"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "logprobs": 21}, 400, "logprobs", None, id="logprobs-too-many"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "logprobs": -1}, 400, "logprobs", None, id="logprobs-negative"),
    pytest.param(CHAT, {"messages": USER, "logprobs": "yes"}, 400, "logprobs", None, id="chat-logprobs-not-bool"),
    pytest.param(CHAT, {"messages": USER, "top_logprobs": 3}, 400, "top_logprobs", None,
                 id="top-logprobs-without-logprobs"),
    pytest.param(CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 25}, 400, "top_logprobs", None,
                 id="top-logprobs-too-many"),
    pytest.param(CHAT, {"messages": []}, 400, "messages", None, id="empty-messages"),
    pytest.param(CHAT, {"messages": "Hi"}, 400, "messages", None, id="messages-not-a-list"),
    pytest.param(CHAT, {"messages": [{"content": "Hi"}]}, 400, "messages[0]", None, id="message-without-role"),
    pytest.param(CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role", None,
                 id="message-unknown-role"),
    pytest.param(CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content", None, id="message-no-content"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 400, "messages[0].content[0]", None, id="message-image-part"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content", None,
                 id="message-content-wrong-type"),
    pytest.param(CHAT, {"messages": [{"role": "developer", "content": "Hi"}]}, 400, "messages", None,
                 id="template-refuses-a-role"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "n": 99}, 400, "n", None, id="n-too-large"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "n": 8}, 400, "n", None, id="n-above-max-num-seqs"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "temperature": -1}, 400, "temperature", None, id="negative-temperature"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "top_p": 1.5}, 400, "top_p", None, id="top-p-out-of-range"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "stop": [str(i) for i in range(17)]}, 400, "stop", None,
                 id="too-many-stops"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "stop": ""}, 400, "stop", None, id="empty-stop"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids", None,
                 id="stop-token-outside-vocab"),
    pytest.param(COMPLETIONS, {"prompt": [1, 2, 10**6]}, 400, "prompt", None, id="prompt-token-outside-vocab"),
    pytest.param(COMPLETIONS, {"prompt": []}, 400, "prompt", None, id="empty-prompt-list"),
    pytest.param(COMPLETIONS, {"prompt": ["a", [1, 2]]}, 400, "prompt", None, id="mixed-prompt-list"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "min_tokens": 50, "max_tokens": 5}, 400, "min_tokens", None,
                 id="min-tokens-over-max"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "repetition_penalty": 0}, 400, "repetition_penalty", None,
                 id="repetition-penalty-zero"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported_parameter",
                 id="logit-bias"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "suffix": "end"}, 400, "suffix", "unsupported_parameter", id="suffix"),
    pytest.param(COMPLETIONS, {"prompt": "Hi", "best_of": 3}, 400, "best_of", "unsupported_parameter", id="best-of"),
    pytest.param(CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f g"}}]}, 400,
                 "tools[0].function.name", None, id="tools"),
    pytest.param(CHAT, {"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format.type",
                 None, id="response-format"),
    pytest.param("/tokenize", {"prompt": "a", "messages": USER}, 400, "prompt", None, id="tokenize-both"),
    pytest.param("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model", "model_not_found", id="tokenize-model"),
    pytest.param("/detokenize", {"tokens": [1, -5]}, 400, "tokens", None, id="detokenize-outside-vocab"),
    pytest.param("/detokenize", {"tokens": "abc"}, 400, "tokens", None, id="detokenize-wrong-type"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), CASES)
def test_bad_input_gets_an_openai_error(base_url, path, body, status, param, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(base_url + path, headers={"content-type": "application/json"}, timeout=30, **kwargs)
    assert_error(response, status, param=param, code=code)


def test_body_over_the_size_limit_is_413(base_url):
    body = json.dumps({"prompt": "x" * (70 * 1024)})
    response = httpx.post(base_url + COMPLETIONS, content=body, headers={"content-type": "application/json"})
    assert_error(response, 413, code="request_too_large")


def test_unknown_route_and_wrong_method(base_url):
    assert_error(httpx.get(base_url + "/v1/nothing"), 404, code="not_found")
    assert_error(httpx.get(base_url + COMPLETIONS), 405, code="method_not_allowed")


def test_a_good_stream_is_unaffected_by_bad_requests_beside_it(base_url, engine):
    from tests.serving.conftest import slow_engine

    body = {"model": MODEL_NAME, "prompt": "The scheduler frees", "max_tokens": 60, "temperature": 1.0, "seed": 77,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    reference = httpx.post(base_url + COMPLETIONS, json={**body, "stream": False}, timeout=60).json()
    events: list[str] = []

    def read_stream() -> None:
        with httpx.stream("POST", base_url + COMPLETIONS, json=body, timeout=60) as response:
            events.extend(line[6:] for line in response.iter_lines() if line.startswith("data: "))

    with slow_engine(engine, 0.01):
        reader = threading.Thread(target=read_stream)
        reader.start()
        statuses = []
        for case in CASES:
            path, bad, *_ = case.values
            kwargs = {"content": bad} if isinstance(bad, bytes) else {"json": bad}
            statuses.append(httpx.post(base_url + path, headers={"content-type": "application/json"}, timeout=30,
                                       **kwargs).status_code)
        reader.join(60)
    assert all(400 <= s < 500 for s in statuses)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == reference["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 60
