"""Tool calling: the request's `tools` and `tool_choice`, the prompt's tool turns, and tool calls
parsed from (or forced onto) the model's output.

- `required` and a named function are enforced with structured output (runtime/structured.py):
  a named function's output is its arguments object; `required` writes a JSON array of
  `{"name", "arguments"}` (one item unless `parallel_tool_calls`).
- `auto` lets the model write freely; tool calls are parsed from the text in the format of the
  model's chat template: Hermes/Qwen `<tool_call>{...}</tool_call>` (also Tessera's format for
  templates that know no tools, such as the demo model's), Llama 3.1+ JSON
  (`{"name", "parameters"}`, optionally after `<|python_tag|>`, `;`-separated), Mistral
  `[TOOL_CALLS][...]`.
- A template that renders tools itself (it mentions `tools`) gets them, and assistant turns'
  `tool_calls` with their arguments as objects (what Llama's and Qwen's templates expect). Any
  other template gets Tessera's rendering: the tool list in the system message, assistant calls
  as `<tool_call>` blocks and tool results as `<tool_response>` blocks in `tool` turns.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.structured import GuidedDecoding
from serving.errors import bad_request

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # `required` with parallel calls: a bound, so a model cannot list calls forever


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass
class ToolPlan:
    tools: list[dict]  # the functions: {"name", "description", "parameters"}
    choice: str  # "none", "auto", "required" or a function's name
    parallel: bool
    parser: str  # "hermes", "llama3_json" or "mistral"

    @property
    def forced(self) -> bool:
        return self.choice not in ("none", "auto")

    @property
    def named(self) -> str | None:
        return self.choice if self.forced and self.choice != "required" else None

    def guided(self) -> GuidedDecoding | None:
        if self.named is not None:
            return GuidedDecoding("json", json.dumps(self._parameters(self.named)))
        if self.choice == "required":
            item = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                                 "arguments": t.get("parameters") or {"type": "object"}},
                               "required": ["name", "arguments"], "additionalProperties": False}
                              for t in self.tools]}
            schema = {"type": "array", "items": item, "minItems": 1,
                      "maxItems": MAX_PARALLEL_CALLS if self.parallel else 1}
            return GuidedDecoding("json", json.dumps(schema))
        return None

    def _parameters(self, name: str) -> dict:
        tool = next(t for t in self.tools if t["name"] == name)
        return tool.get("parameters") or {"type": "object"}

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output."""
        if self.choice == "none":
            return text, []
        if self.named is not None:
            return None, [ToolCall(self.named, text)]
        if self.choice == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return text, []  # cut off by max_tokens: not a call
            return None, [ToolCall(i["name"], json.dumps(i["arguments"], ensure_ascii=False)) for i in items]
        content, calls = PARSERS[self.parser](text)
        known = {t["name"] for t in self.tools}
        if any(c.name not in known for c in calls):
            return text, []
        return content, calls


# -- parsing the model's own format (tool_choice auto) ------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    calls = []
    for body in _HERMES.findall(text):
        call = _call(body, ("arguments", "parameters"))
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    content = text[: text.find("<tool_call>")].strip()
    return content or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in _split_objects(body):
        call = _call(part, ("parameters", "arguments"))
        if call is None:
            return text, []
        calls.append(call)
    return None, calls


def parse_mistral(text: str) -> tuple[str | None, list[ToolCall]]:
    at = text.find("[TOOL_CALLS]")
    if at < 0:
        return text, []
    try:
        items = json.loads(text[at + len("[TOOL_CALLS]"):].strip())
    except ValueError:
        return text, []
    items = items if isinstance(items, list) else [items]
    calls = [_call(json.dumps(i), ("arguments", "parameters")) for i in items]
    if not calls or None in calls:
        return text, []
    return text[:at].strip() or None, calls


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral}


def _call(body: str, argument_keys: tuple[str, ...]) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[k] for k in argument_keys if k in value), {})
    if isinstance(arguments, str):
        return ToolCall(value["name"], arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _split_objects(body: str) -> list[str]:
    """`{...}; {...}` (Llama's parallel calls) into the objects' texts."""
    decoder, parts, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            _, end = decoder.raw_decode(body, at)
        except ValueError:
            return [body]
        parts.append(body[at:end])
        at = end
        while at < len(body) and body[at] in " \n\t;":
            at += 1
    return parts


def parser_for(template: str | None) -> str:
    template = template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def renders_tools(template: str | None) -> bool:
    """Whether the chat template lays out tools and tool calls itself."""
    return bool(template) and "tools" in template and "tool_calls" in template


# -- the request ------------------------------------------------------------------------------


def tool_plan(tools: list[dict] | None, tool_choice, parallel: bool | None, template: str | None) -> ToolPlan | None:
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    functions = [_function(i, t) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    choice = _choice(tool_choice, names)
    return ToolPlan(functions, choice, True if parallel is None else parallel, parser_for(template))


def _function(index: int, tool) -> dict:
    param = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(f'{param} must be {{"type": "function", "function": {{...}}}}', param)
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(f"{param}.function.name must be 1-64 letters, digits, _ or -", f"{param}.function.name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{param}.function.description must be a string", f"{param}.function.description")
    out = {"name": name, "description": description or "", "parameters": parameters or {"type": "object"}}
    return out


def _choice(tool_choice, names: list[str]) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto", "required"):
            return tool_choice
        raise bad_request("tool_choice must be none, auto, required or a named function", "tool_choice")
    function = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request('tool_choice must be {"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in names:
        raise bad_request(f"tool_choice names {name[:64]!r}, which is not among the tools", "tool_choice")
    return name


# -- the prompt -------------------------------------------------------------------------------


def template_inputs(plain: list[dict], plan: ToolPlan | None, template: str | None) -> tuple[list[dict], dict]:
    """The messages and extra template variables for a conversation that may hold tool turns."""
    has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in plain)
    if plan is None and not has_tool_turns:
        return plain, {}
    if renders_tools(template):
        messages = [_native(m) for m in plain]
        return messages, ({"tools": [{"type": "function", "function": f} for f in plan.tools]} if plan else {})
    messages = [_tessera(m) for m in plain]
    if plan is not None and plan.choice != "none":
        note = _tools_note(plan.tools)
        if messages and messages[0]["role"] in ("system", "developer"):
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
        else:
            messages.insert(0, {"role": "system", "content": note})
    return messages, {}


def _native(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    native = []
    for call in calls:
        function = dict(call["function"])
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass  # kept as the client's text
        native.append({**call, "function": function})
    return {**message, "content": message.get("content") or "", "tool_calls": native}


def _tessera(message: dict) -> dict:
    if message["role"] == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    blocks = []
    for call in calls:
        try:
            arguments = json.loads(call["function"]["arguments"])
        except ValueError:
            arguments = call["function"]["arguments"]
        blocks.append("<tool_call>\n" + json.dumps({"name": call["function"]["name"], "arguments": arguments},
                                                   ensure_ascii=False) + "\n</tool_call>")
    content = "\n".join(filter(None, [message.get("content") or "", *blocks]))
    return {"role": "assistant", "content": content}


def _tools_note(functions: list[dict]) -> str:
    listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return ("# Tools\n\nThese functions can be called; their signatures are inside <tools></tools>:\n"
            f"<tools>\n{listed}\n</tools>\n\nTo call one, answer with a JSON object holding its name and "
            'arguments inside <tool_call></tool_call>:\n<tool_call>\n{"name": <name>, "arguments": <object>}\n'
            "</tool_call>")


def check_tool_turns(plain: list[dict]) -> None:
    """Assistant `tool_calls` must be OpenAI's shape; `tool` turns need `tool_call_id` and content."""
    for i, message in enumerate(plain):
        for j, call in enumerate(message.get("tool_calls") or []):
            param = f"messages[{i}].tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments"), str)):
                raise bad_request(f'{param} must be {{"id", "type": "function", "function": {{"name", '
                                  f'"arguments": a JSON string}}}}', param)
        if message["role"] == "tool":
            if not message.get("tool_call_id"):
                raise bad_request(f"messages[{i}] (tool) needs tool_call_id", f"messages[{i}].tool_call_id")
            if not isinstance(message.get("content"), str):
                raise bad_request(f"messages[{i}] (tool) needs text content", f"messages[{i}].content")


