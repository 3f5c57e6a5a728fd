"""Bodies as the JSON endpoints take them: Content-Type application/json or 415, strict JSON
types (no "4" for an integer), a nesting limit instead of a RecursionError, and the answers
that were there before (invalid UTF-8, malformed JSON) unchanged."""

from __future__ import annotations

import httpx
import pytest

from serving.app import create_app
from serving.body import MAX_JSON_DEPTH, nesting_exceeds
from serving.config import ServerConfig
from tests.serving.conftest import SERVER, assert_error, start_server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def post(base_url: str, path: str, body: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(base_url + path, content=body, headers=headers, timeout=30)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None],
                         ids=["text", "form", "none"])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, "/tokenize"])
def test_json_endpoints_want_application_json(base_url, path, content_type):
    body = {COMPLETIONS: b'{"prompt": "Hi", "max_tokens": 1}',
            CHAT: b'{"max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}'}.get(path, b'{"prompt": "Hi"}')
    error = assert_error(post(base_url, path, body, content_type), 415, code="unsupported_media_type")
    assert "Content-Type: application/json" in error["message"]
    assert post(base_url, path, body, "application/json; charset=utf-8").status_code == 200


@pytest.mark.parametrize(("path", "body", "param"), [
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": "4"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "Hi", "n": True}, "n"),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": 4.0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "Hi", "seed": "7"}, "seed"),
    (COMPLETIONS, {"prompt": "Hi", "temperature": "0.5"}, "temperature"),
    (COMPLETIONS, {"prompt": "Hi", "stream": "false"}, "stream"),
    (CHAT, {"messages": USER, "logprobs": 1}, "logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "name": 5}]}, "messages[0].name"),
    ("/detokenize", {"tokens": ["1", "2"]}, "tokens[0]"),
], ids=["str-for-int", "bool-for-int", "float-for-int", "str-seed", "str-for-float", "str-for-bool",
        "int-for-bool", "nested", "detokenize"])
def test_no_type_is_coerced(base_url, path, body, param):
    assert_error(httpx.post(base_url + path, json=body, timeout=30), 400, param=param)


@pytest.fixture(scope="module")
def default_limit_url(engine, log_stream):
    """The default 4 MiB body limit (the shared test server takes 64 KiB)."""
    live = start_server(create_app(engine, ServerConfig(**{**SERVER, "max_body_bytes": 4 * 2**20})))
    yield live.url
    live.stop()


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_100000_open_brackets_are_a_400(default_limit_url, path):
    error = assert_error(post(default_limit_url, path, b"[" * 100_000), 400, code="too_deeply_nested")
    assert str(MAX_JSON_DEPTH) in error["message"]


def test_deep_nesting_inside_a_free_form_field_is_a_400(base_url):
    deep = b"[" * 5000 + b"]" * 5000
    body = b'{"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"x": ' + deep + b"}}"
    assert_error(post(base_url, CHAT, body), 400, code="too_deeply_nested")
    just_under = b"[" * (MAX_JSON_DEPTH - 3) + b"]" * (MAX_JSON_DEPTH - 3)  # the body and kwargs nest 2 more
    body = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "chat_template_kwargs": {"x": ' + (
        just_under + b"}}")
    assert post(base_url, CHAT, body).status_code == 200


def test_brackets_inside_strings_are_text_not_nesting(base_url):
    response = httpx.post(base_url + "/tokenize", json={"prompt": "[{" * 5000 + '"\\"[' * 100}, timeout=30)
    assert response.status_code == 200 and response.json()["count"] > 0
    assert not nesting_exceeds(b'["' + b"[" * 1000 + b'\\"' + b"{" * 1000 + b'"]', 2)
    assert nesting_exceeds(b'{"a": [[["x"]]]}', 3) and not nesting_exceeds(b'{"a": [[["x"]]]}', 4)


def test_earlier_answers_are_unchanged(base_url):
    assert_error(post(base_url, COMPLETIONS, b'{"prompt": "\xff\xfe"}'), 400, code="invalid_utf8")
    assert_error(post(base_url, COMPLETIONS, b'{"prompt": "Hi",'), 400, code="invalid_json")
    assert_error(post(base_url, COMPLETIONS, b'{"prompt": NaN}'), 400, code="invalid_json")
    assert_error(post(base_url, COMPLETIONS, b""), 400)
    assert_error(post(base_url, COMPLETIONS, b"x" * (70 * 1024)), 413, code="request_too_large")
