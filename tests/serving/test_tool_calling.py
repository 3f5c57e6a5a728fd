"""Tool calling with the official openai client: required and named choices give arguments valid
against the tool's schema, streamed deltas assemble to the same calls, a full round trip (call,
tool message, answer) renders through the chat template; the parsers of the families' formats;
the refusals."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from serving.app import create_app
from serving.config import ServerConfig
from serving.tools import parse_hermes, parse_llama3_json, parse_mistral, template_inputs, tool_plan
from tests.helpers.tool_templates import LLAMA_STYLE, QWEN_STYLE
from tests.serving.conftest import ENGINE, MODEL_NAME, SERVER, assert_error, start_server


@pytest.fixture(scope="module")
def base_url(checkpoint):
    """The tools' description makes prompts of ~700 tokens with the tiny tokenizer: a server with a
    longer context than the shared one (compiled on first use, not warmed up)."""
    folder = checkpoint("llama", max_position_embeddings=1024)
    core = Engine.from_model_dir(folder, config=EngineConfig(
        **{**ENGINE, "max_model_len": 1024, "num_blocks": 160}, model_id=MODEL_NAME))
    engine = AsyncEngine(core)
    live = start_server(create_app(engine, ServerConfig(**SERVER)))
    yield live.url
    live.stop()
    engine.shutdown()


@pytest.fixture
def openai_client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 5}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(4))
def test_required_and_named_give_valid_arguments(openai_client, seed):
    out = openai_client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required",
                                                max_tokens=80, seed=seed, parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)

    named = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=80, seed=seed,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and named.choices[0].finish_reason == "stop"
    _check_calls([call])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_call_deltas_assemble_to_the_same_call(openai_client, tool_choice):
    args = dict(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=80, seed=9,
                parallel_tool_calls=False)
    whole = openai_client.chat.completions.create(**args).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    for chunk in openai_client.chat.completions.create(**args, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
            call["id"] = call["id"] or delta.id
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)


def test_a_full_round_trip_renders_through_the_demo_style_template(openai_client):
    first = openai_client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS,
                                                  tool_choice="required", max_tokens=80, seed=1,
                                                  parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    conversation = USER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "rain"})},
    ]
    answer = openai_client.chat.completions.create(model=MODEL_NAME, messages=conversation, tools=TOOLS,
                                                   max_tokens=8, seed=1)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens


def test_tool_turns_render_for_llama_and_qwen_style_templates():
    plan = tool_plan(TOOLS, "auto", None, "{{ tools }} {{ message.tool_calls }} <|python_tag|>")
    assert plan.parser == "llama3_json"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    plain = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "content": "12:00", "tool_call_id": "call_1"}]
    messages, extra = template_inputs(plain, plan, "{{ tools }} {{ message.tool_calls }}")
    # A template that renders tools gets them, and arguments as objects (as Llama's and Qwen's expect).
    assert extra["tools"][0]["function"]["name"] == "get_weather"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}
    # Any other template: Tessera's rendering, tools in the system turn, calls and results as blocks.
    messages, extra = template_inputs(plain, plan, "{{ message.content }}")
    assert extra == {} and messages[0]["role"] == "system" and "<tools>" in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert messages[3] == {"role": "tool", "content": "<tool_response>\n12:00\n</tool_response>"}


def test_parsers_of_the_families_formats():
    content, calls = parse_hermes('Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
                                  '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    assert content == "Let me check." and [json.loads(c.arguments)["zone"] for c in calls] == ["UTC", "CET"]
    content, calls = parse_llama3_json('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; '
                                       '{"name": "get_weather", "parameters": {"city": "Lima", "days": 2}}')
    assert content is None and [c.name for c in calls] == ["get_time", "get_weather"]
    content, calls = parse_mistral('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]')
    assert content is None and calls[0].arguments == '{"zone": "UTC"}'
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_llama3_json('{"not": "a call"}') == ('{"not": "a call"}', [])
    # auto: a call naming an unknown tool is left as text
    plan = tool_plan(TOOLS, "auto", None, None)
    assert plan.calls('<tool_call>{"name": "rm", "arguments": {}}</tool_call>')[1] == []


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f"}}]}]},
     "messages[1].tool_calls[0]"),
    ({"messages": USER + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
])
def test_bad_tool_fields_are_400s(base_url, body, param):
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": USER, **body})
    assert_error(response, 400, param=param)


def test_responses_api_function_call_round_trip(openai_client):
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    first = openai_client.responses.create(model=MODEL_NAME, input="Weather in Lima?", tools=tools,
                                           tool_choice="required", parallel_tool_calls=False, max_output_tokens=80)
    (call,) = [item for item in first.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    events = list(openai_client.responses.create(model=MODEL_NAME, input="Weather in Lima?", tools=tools,
                                                 tool_choice="required", parallel_tool_calls=False,
                                                 max_output_tokens=80, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(deltas) and events[-1].type == "response.completed"
    answer = openai_client.responses.create(
        model=MODEL_NAME, previous_response_id=first.id, tools=tools, max_output_tokens=4,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"forecast": "sun"}'}])
    assert answer.output and answer.usage.input_tokens > first.usage.input_tokens


@pytest.mark.parametrize("template, parser, model_says", [
    (QWEN_STYLE, "hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'),
    (LLAMA_STYLE, "llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}'),
])
def test_round_trip_through_qwen_and_llama_style_templates(template, parser, model_says):
    from models.chat_template import render_chat_template

    plan = tool_plan(TOOLS, "auto", None, template)
    assert plan.parser == parser
    # The model's call is parsed from its own format...
    content, (call,) = plan.calls(model_says)
    assert content is None and (call.name, json.loads(call.arguments)) == ("get_time", {"zone": "CET"})
    # ...and replayed with the tool's result through the same template.
    plain = USER + [{"role": "assistant", "content": None, "tool_calls": [call.as_openai()]},
                    {"role": "tool", "content": "09:00", "tool_call_id": call.id}]
    messages, extra = template_inputs(plain, plan, template)
    text = render_chat_template(template, messages, add_generation_prompt=True, **extra)
    assert '"name": "get_weather"' in text  # the tools are listed
    assert '{"name": "get_time", ' in text and '{"zone": "CET"}' in text  # the call, arguments as an object
    assert "09:00" in text and text.index("09:00") > text.index('"zone": "CET"')
