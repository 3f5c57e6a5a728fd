"""Structured output with the official openai client: JSON schemas, regex, choice, grammars,
OpenAI's and vLLM's fields, streamed and not, and the refusals."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.serving.conftest import MODEL_NAME, assert_error

S = {"type": "string", "maxLength": 6}
I = {"type": "integer", "minimum": -5, "maximum": 999}


def _object(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


# Nested objects, arrays, enums, bounded numbers, required and optional fields. Strings and
# arrays are bounded: a random model would otherwise write until max_tokens.
SCHEMAS = [
    _object({"name": S}),
    _object({"age": I}),
    _object({"ok": {"type": "boolean"}}),
    _object({"colour": {"enum": ["red", "green", "blue"]}}),
    _object({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    _object({"tags": {"type": "array", "items": S, "maxItems": 3}}),
    _object({"ids": {"type": "array", "items": I, "minItems": 1, "maxItems": 2}}),
    _object({"inner": _object({"x": I, "y": I})}),
    _object({"a": _object({"b": _object({"c": {"type": "boolean"}})})}),
    _object({"name": S, "age": I, "admin": {"type": "boolean"}}),
    _object({"name": S, "nick": S}, required=["name"]),
    _object({"kind": {"const": "point"}, "x": I}),
    _object({"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
    _object({"level": {"type": "integer", "enum": [1, 2, 3]}}),
    _object({"items": {"type": "array", "items": _object({"id": I, "ok": {"type": "boolean"}}), "maxItems": 2}}),
    _object({"when": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"}}),
    _object({"choice": {"anyOf": [I, {"type": "boolean"}]}}),
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 4},
    _object({"t": {"type": "number", "exclusiveMinimum": -1, "maximum": 10}, "u": {"enum": [True, None]}}),
    _object({"matrix": {"type": "array", "items": {"type": "array", "items": I, "maxItems": 2}, "maxItems": 2}}),
]


def _validate(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_twenty_json_schemas_always_parse_and_validate(base_url):
    async def one(client, i, schema):
        async with seats:  # the test server queues 12 requests at most
            out = await client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": f"record {i}"}], max_tokens=100, seed=i,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
            )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        _validate(choice.message.content, schema)

    seats = asyncio.Semaphore(8)

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
            await asyncio.gather(*(one(c, i, s) for i, s in enumerate(SCHEMAS)))

    asyncio.run(run())


def test_vllm_fields_regex_choice_and_grammar(openai_client):
    def complete(**extra):
        out = openai_client.completions.create(model=MODEL_NAME, prompt="The answer:", max_tokens=40, seed=3,
                                               extra_body=extra)
        return out.choices[0].text

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", complete(guided_regex=r"[0-9]{3}-[a-z]{2}"))
    assert complete(guided_choice=["yes", "no", "maybe"]) in ("yes", "no", "maybe")
    assert complete(structured_outputs={"choice": ["left", "right"]}) in ("left", "right")
    assert re.fullmatch(r"(ab)+c", complete(guided_grammar='start: ("ab")+ "c"'))
    assert re.fullmatch(r"x[0-9]", complete(structured_outputs={"grammar": 'root ::= "x" [0-9]'}))  # GBNF
    schema = SCHEMAS[9]
    _validate(complete(guided_json=schema), schema)
    _validate(complete(structured_outputs={"json": json.dumps(schema)}), schema)


def test_streamed_json_assembles_to_valid_output(openai_client):
    schema = SCHEMAS[14]
    chunks = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "list"}], max_tokens=100, seed=5, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "items", "schema": schema}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _validate(text, schema)


def test_json_object_gives_an_object_or_stops_at_the_length(openai_client):
    out = openai_client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "json"}],
                                                max_tokens=60, seed=1, response_format={"type": "json_object"})
    content = out.choices[0].message.content
    assert content.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                  "schema": {"if": {}, "type": "object"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": []}}}, "response_format.json_schema.schema"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs.xml"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_bad_structured_output_fields_are_400s(base_url, body, param):
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": USER, **body})
    assert_error(response, 400, param=param)


def test_a_non_strict_schema_ignores_what_it_cannot_enforce(openai_client):
    schema = {"type": "object", "if": {}, "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    out = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=30,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": False}})
    assert isinstance(json.loads(out.choices[0].message.content)["a"], bool)
