"""A full tool round trip over HTTP with the official openai client against checkpoints whose chat
templates lay out tools themselves: one in Llama 3.1's shape, one in Qwen 2.5's (Hermes
`<tool_call>`), tests/helpers/tool_templates.py.

Each checkpoint is built as the other tests build theirs (transformers' save_pretrained, a
trained tokenizer) with the template written into its tokenizer_config.json. The round trip:
the model is made to call a tool (`tool_choice` required, then a named function), the client
sends back the assistant's call and the tool's result, and the model answers. The prompt that
Tessera builds for each leg is checked token for token against transformers'
`apply_chat_template` of the same conversation (the ids come back through vLLM's
`prompt_logprobs`), and the greedy answer against transformers' own greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
import transformers

from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from serving.app import create_app
from serving.config import ServerConfig
from tests.helpers.tiny_checkpoint import build_checkpoint, load_reference
from tests.helpers.tool_templates import LLAMA_STYLE, QWEN_STYLE
from tests.serving.conftest import ENGINE, SERVER, start_server

NAME = "tool-model"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
# Every field given, in the order Tessera passes a function to the template (name, description,
# parameters), so transformers renders the same tool list from this very list.
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Clock", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]
ANSWER_TOKENS = 6
CONTEXT = 2048  # the tool lists take ~900 tokens with the tiny tokenizer


class Served:
    """A server for one checkpoint, and transformers' tokenizer and model of that checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = load_reference(folder)
        core = Engine.from_model_dir(folder, config=EngineConfig(
            **{**ENGINE, "max_model_len": CONTEXT, "num_blocks": 2 * CONTEXT // ENGINE["block_size"] + 8}, model_id=NAME))
        self.engine = AsyncEngine(core)
        self.live = start_server(create_app(self.engine, ServerConfig(**{**SERVER, "served_model_name": NAME})))
        self.client = openai.OpenAI(base_url=f"{self.live.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def close(self) -> None:
        self.client.close()
        self.live.stop()
        self.engine.shutdown()

    def reference_ids(self, messages: list[dict]) -> list[int]:
        """transformers' rendering of the conversation (calls' arguments as objects, as the
        templates expect), tokenized as transformers does it."""
        text = self.tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def greedy(self, ids: list[int], count: int) -> str:
        tokens = list(ids)
        with torch.no_grad():
            for _ in range(count):
                tokens.append(int(self.model(torch.tensor([tokens])).logits[0, -1].argmax()))
        return self.tokenizer.decode(tokens[len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module", params=["llama31", "qwen25"])
def served(request, tmp_path_factory):
    arch, template = {"llama31": ("llama", LLAMA_STYLE), "qwen25": ("qwen2", QWEN_STYLE)}[request.param]
    folder = build_checkpoint(tmp_path_factory.mktemp(request.param), arch, max_position_embeddings=CONTEXT)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": template}, indent=2))
    server = Served(folder)
    yield server
    server.close()


def _prompt_ids(response) -> list[int]:
    """The prompt's token ids from vLLM's `prompt_logprobs: 0` (one entry per position after the first)."""
    entries = response.model_extra["prompt_logprobs"]
    assert entries[0] is None and all(len(e) == 1 for e in entries[1:])
    return [int(next(iter(e))) for e in entries[1:]]


def _native(call) -> dict:
    """An OpenAI tool call as transformers' templates take it: arguments as an object."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_call_tool_message_and_answer(served, tool_choice):
    client = served.client
    # 1. The call. Its prompt is the template's own tool list and the user's question.
    first = client.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, tool_choice=tool_choice,
                                           parallel_tool_calls=False, max_tokens=60, seed=3,
                                           extra_body={"prompt_logprobs": 0})
    reference = served.reference_ids(USER)
    assert first.usage.prompt_tokens == len(reference) and _prompt_ids(first) == reference[1:]
    (call,) = first.choices[0].message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    if tool_choice != "required":
        assert call.function.name == "get_time" and first.choices[0].finish_reason == "stop"
    else:
        assert first.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])

    # 2. The tool's result goes back with the assistant's call, as the openai client sends them.
    result = json.dumps({"forecast": "rain", "celsius": 11} if call.function.name == "get_weather" else
                        {"time": "09:00"})
    conversation = USER + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                           {"role": "tool", "tool_call_id": call.id, "content": result}]
    answer = client.chat.completions.create(model=NAME, messages=conversation, tools=TOOLS, max_tokens=ANSWER_TOKENS,
                                            temperature=0, extra_body={"prompt_logprobs": 0, "ignore_eos": True})

    # 3. The answer's prompt is transformers' rendering of the same conversation, token for token
    #    (the call written in the template's own format, the result where the template puts it)...
    reference = served.reference_ids(USER + [{"role": "assistant", "tool_calls": [_native(call)]},
                                             {"role": "tool", "tool_call_id": call.id, "content": result}])
    assert answer.usage.prompt_tokens == len(reference) and _prompt_ids(answer) == reference[1:]
    rendered = served.tokenizer.decode(reference)
    assert rendered.index("What is the weather") < rendered.rindex(call.function.name) < rendered.index(result)
    # ...and the answer is the model's greedy continuation of it.
    (choice,) = answer.choices
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == ANSWER_TOKENS
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.message.content == served.greedy(reference, ANSWER_TOKENS)


def test_responses_round_trip(served):
    """The same through /v1/responses: a function_call output item, then its function_call_output
    continuing the stored response."""
    client = served.client
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    first = client.responses.create(model=NAME, input=USER[0]["content"], tools=tools, tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=60)
    (call,) = [item for item in first.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert first.usage.input_tokens == len(served.reference_ids(USER))
    result = json.dumps({"ok": True})
    answer = client.responses.create(model=NAME, previous_response_id=first.id, tools=tools,
                                     max_output_tokens=ANSWER_TOKENS, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": result}])
    native = {"id": call.call_id, "type": "function",
              "function": {"name": call.name, "arguments": json.loads(call.arguments)}}
    reference = served.reference_ids(USER + [{"role": "assistant", "tool_calls": [native]},
                                             {"role": "tool", "tool_call_id": call.call_id, "content": result}])
    assert answer.usage.input_tokens == len(reference)
    assert answer.output_text == served.greedy(reference, answer.usage.output_tokens)
