"""/v1/responses with the official openai client: text and items as input, instructions,
streaming events, previous_response_id with store and store=false, text.format, refusals."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serving.conftest import MODEL_NAME, assert_error


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
