"""/v1/responses with the official openai client: text and items as input, instructions,
streaming events, previous_response_id with store and store=false, text.format, refusals;
stored responses read back and deleted (GET and DELETE /v1/responses/{id}), per tenant."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serving.app import create_app
from serving.auth.access import build_access
from serving.config import ServerConfig
from tests.serving.conftest import MODEL_NAME, SERVER, assert_error, start_server

ADMIN_KEY = "responses-bootstrap-admin-key-0123456789abcdef"


def test_create_with_string_input_and_instructions(openai_client):
    out = openai_client.responses.create(model=MODEL_NAME, input="Tell me", instructions="Be brief.",
                                         max_output_tokens=6, temperature=0)
    assert out.object == "response" and out.id.startswith("resp_")
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    (message,) = out.output
    assert message.type == "message" and message.role == "assistant"
    assert out.output_text == message.content[0].text and out.output_text
    assert out.usage.output_tokens == 6 and out.usage.input_tokens > 0

    # The same as a chat completion of the same messages.
    chat = openai_client.chat.completions.create(
        model=MODEL_NAME, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me"}])
    assert chat.choices[0].message.content == out.output_text


def test_streaming_events_assemble_to_the_answer(openai_client):
    args = dict(model=MODEL_NAME, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
                max_output_tokens=8, temperature=0)
    whole = openai_client.responses.create(**args)
    events = list(openai_client.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text


def test_previous_response_id_continues_a_stored_conversation(openai_client, base_url):
    first = openai_client.responses.create(model=MODEL_NAME, input="One", max_output_tokens=4, temperature=0)
    second = openai_client.responses.create(model=MODEL_NAME, input="Two", previous_response_id=first.id,
                                            max_output_tokens=4, temperature=0)
    replayed = openai_client.responses.create(
        model=MODEL_NAME, max_output_tokens=4, temperature=0,
        input=[{"role": "user", "content": "One"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "Two"}])
    assert second.usage.input_tokens == replayed.usage.input_tokens and second.output_text == replayed.output_text

    unstored = openai_client.responses.create(model=MODEL_NAME, input="One", max_output_tokens=2, store=False)
    response = httpx.post(f"{base_url}/v1/responses", json={"input": "x", "previous_response_id": unstored.id})
    assert_error(response, 404, param="previous_response_id", code="response_not_found")


def test_text_format_json_schema(openai_client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = openai_client.responses.create(model=MODEL_NAME, input="json", max_output_tokens=20,
                                         text={"format": {"type": "json_schema", "name": "o", "schema": schema,
                                                          "strict": True}})
    assert isinstance(json.loads(out.output_text)["ok"], bool) and out.status == "completed"


@pytest.mark.parametrize("body, status, param", [
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input[0].content[0]"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format.type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}}, 400,
     "text.format"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 100000}, 400, "max_output_tokens"),
    ({"input": []}, 400, "input"),
    ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
])
def test_bad_responses_requests_get_openai_errors(base_url, body, status, param):
    assert_error(httpx.post(f"{base_url}/v1/responses", json=body), status, param=param)


# -- stored responses: GET and DELETE /v1/responses/{id} ----------------------------------------


def test_retrieve_answers_the_stored_response(openai_client):
    created = openai_client.responses.create(model=MODEL_NAME, input="Keep this", instructions="Be brief.",
                                             max_output_tokens=5, temperature=0, metadata={"k": "v"})
    got = openai_client.responses.retrieve(created.id)
    assert got.model_dump() == created.model_dump()
    assert got.output_text == created.output_text and got.metadata == {"k": "v"} and got.status == "incomplete"

    # A streamed response is kept in its final state, the one its last event carried.
    events = list(openai_client.responses.create(model=MODEL_NAME, input="Keep this too", max_output_tokens=5,
                                                 temperature=0, stream=True))
    final = events[-1].response
    streamed = openai_client.responses.retrieve(final.id)
    assert streamed.model_dump() == final.model_dump() and streamed.output_text


def test_delete_forgets_the_response(openai_client, base_url):
    created = openai_client.responses.create(model=MODEL_NAME, input="Forget me", max_output_tokens=2)
    response = httpx.delete(f"{base_url}/v1/responses/{created.id}")
    assert response.status_code == 200 and response.json() == {"id": created.id, "object": "response",
                                                               "deleted": True}
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.responses.retrieve(created.id)
    assert raised.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.delete(created.id)  # the second time: gone
    with pytest.raises(openai.NotFoundError):  # and it cannot be continued
        openai_client.responses.create(model=MODEL_NAME, input="x", previous_response_id=created.id)

    kept = openai_client.responses.create(model=MODEL_NAME, input="Delete me", max_output_tokens=2)
    assert openai_client.responses.delete(kept.id) is None  # the client's own delete: no body to read
    assert_error(httpx.get(f"{base_url}/v1/responses/{kept.id}"), 404, param=None, code="response_not_found")


def test_unstored_responses_cannot_be_retrieved_or_deleted(openai_client, base_url):
    unstored = openai_client.responses.create(model=MODEL_NAME, input="x", max_output_tokens=2, store=False)
    assert_error(httpx.get(f"{base_url}/v1/responses/{unstored.id}"), 404, param=None, code="response_not_found")
    assert_error(httpx.delete(f"{base_url}/v1/responses/{unstored.id}"), 404, param=None, code="response_not_found")


@pytest.mark.parametrize("query, param, code", [
    ("stream=true", "stream", "unsupported_parameter"),
    ("stream=maybe", "stream", None),
    ("include[]=message.output_text.logprobs", "include", "unsupported_parameter"),
    ("include=reasoning.encrypted_content", "include", "unsupported_parameter"),
    ("starting_after=x", "starting_after", None),
])
def test_bad_retrieve_queries_get_openai_errors(openai_client, base_url, query, param, code):
    created = openai_client.responses.create(model=MODEL_NAME, input="x", max_output_tokens=1)
    assert_error(httpx.get(f"{base_url}/v1/responses/{created.id}?{query}"), 400, param=param, code=code)
    # What only shapes a stream changes nothing without one, as at OpenAI.
    plain = httpx.get(f"{base_url}/v1/responses/{created.id}?stream=false&include_obfuscation=true&starting_after=3")
    assert plain.status_code == 200 and plain.json()["id"] == created.id


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("response_id", ["resp_unknown", "x" * 300, "resp_%20spaced"])
def test_unknown_ids_are_404s(base_url, method, response_id):
    assert_error(httpx.request(method, f"{base_url}/v1/responses/{response_id}"), 404, param=None,
                 code="response_not_found")


def test_other_methods_on_a_stored_response_are_405s(openai_client, base_url):
    created = openai_client.responses.create(model=MODEL_NAME, input="x", max_output_tokens=1)
    assert_error(httpx.put(f"{base_url}/v1/responses/{created.id}", json={}), 405)


def test_stored_responses_are_per_tenant(engine, tmp_path):
    """Another tenant's response is unknown to a caller (even an admin's key of another tenant):
    404, never its content, and it cannot delete it."""
    config = ServerConfig(**SERVER, auth="on", key_store=str(tmp_path / "keys.json"))
    live = start_server(create_app(engine, config, access=build_access(config, {"TESSERA_API_KEY": ADMIN_KEY})))
    try:
        acme, beta = (_key(live.url, tenant) for tenant in ("acme", "beta"))
        with openai.OpenAI(base_url=f"{live.url}/v1", api_key=acme, max_retries=0, timeout=60) as client:
            created = client.responses.create(model=MODEL_NAME, input="Mine", max_output_tokens=2)
            path = f"{live.url}/v1/responses/{created.id}"
            for key in (beta, ADMIN_KEY):  # the admin key's tenant is "default"
                headers = {"authorization": f"Bearer {key}"}
                assert_error(httpx.get(path, headers=headers), 404, code="response_not_found")
                assert_error(httpx.delete(path, headers=headers), 404, code="response_not_found")
                assert_error(httpx.post(f"{live.url}/v1/responses", headers=headers,
                                        json={"input": "x", "previous_response_id": created.id}), 404,
                             param="previous_response_id", code="response_not_found")
            assert client.responses.retrieve(created.id).output_text == created.output_text
            assert httpx.get(path).status_code == 401  # and nobody without credentials
            client.responses.delete(created.id)
    finally:
        live.stop()


def _key(url: str, tenant: str) -> str:
    response = httpx.post(f"{url}/admin/keys", json={"tenant": tenant, "scopes": ["generate"]},
                          headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 201, response.text
    return response.json()["key"]
