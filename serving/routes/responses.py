"""/v1/responses: OpenAI's Responses API over the chat pipeline; stored responses read back and deleted.

The input (a string or items) becomes chat messages, `instructions` a system message first,
function tools and `text.format` the chat endpoint's tools and structured output; the answer is
a `response` object whose output holds a message and/or function calls. Streaming sends the
events the openai client reads (`response.created`, `response.output_item.added`,
`response.output_text.delta`, `response.function_call_arguments.delta`, ..., `response.completed`).
`GET /v1/responses/{id}` answers a stored response's object as create answered it (its final
state when streamed); `DELETE` forgets it. Both see only the caller's tenant's responses.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post

from serving.auth.guard import needs
from serving.auth.principal import GENERATE
from serving.errors import APIError, bad_request
from serving.generation import Generation
from serving.middleware import request_record
from serving.prompts import render_chat
from serving.protocol.chat import ChatCompletionRequest
from serving.protocol.common import encode_json
from serving.protocol.responses import ResponseDeleted, ResponsesRequest
from serving.response_store import StoredResponse
from serving.routes.common import ERROR_RESPONSES, sse_response, start_generation, tokenize_stage
from serving.routes.chat import plain_messages
from serving.routes.guarded import ChoiceStream, RequestGuard
from serving.sampling import sampling_params
from serving.state import ServerState
from serving.structured import guided_decoding
from serving.tools import ToolCall, ToolPlan, check_tool_turns, template_inputs, tool_plan

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesController(Controller):
    path = "/v1/responses"
    tags = ["OpenAI"]
    opt = needs(GENERATE)

    @post(operation_id="createResponse", status_code=200, responses=ERROR_RESPONSES,
          summary="OpenAI's Responses API; `stream: true` answers with its server-sent events")
    async def create(self, request: Request, data: ResponsesRequest, server: ServerState) -> dict:
        server.check_model(data.model)
        tenant = request_record(request.scope).tenant
        history: list[dict] = []
        if data.previous_response_id is not None:
            history = _stored(server, tenant, data.previous_response_id, "previous_response_id").messages
        turns = history + _input_messages(data.input)
        chat = _as_chat(data, ([{"role": "system", "content": data.instructions}] if data.instructions else []) + turns)
        template = server.tokenizer.chat_template
        plan = tool_plan(chat.tools, chat.tool_choice, chat.parallel_tool_calls, template)
        guided, guided_param = guided_decoding(chat)
        guided_param = guided_param and "text.format"
        if plan is not None and plan.forced:
            if guided is not None:
                raise bad_request(f"text.format cannot be combined with tool_choice {plan.choice!r}", "text.format")
            guided, guided_param = plan.guided(), "tools"
        plain = plain_messages(chat.messages)
        check_tool_turns(plain)
        guard = RequestGuard.for_request(server, request, "chat")
        if guard is not None:
            plain = await guard.check_messages(plain)  # before the template and the tokenizer
        messages, tool_kwargs = template_inputs(plain, plan, template)
        with tokenize_stage(request):
            text, ids = await render_chat(server, messages, True, tool_kwargs, param="input")
        max_tokens = data.max_output_tokens or max(server.max_model_len - len(ids), 1)
        params = sampling_params(chat, max_tokens=max_tokens, logprobs=None, defaults=server.sampling_defaults,
                                 guided=guided)
        try:
            generation = start_generation(server, request, chat, [ids], params, "input", text, guided_param)
        except APIError as e:
            if e.param == "max_tokens":
                e.param = "max_output_tokens"
            raise
        shell = _Shell(data, f"resp_{generation.request_id}", int(time.time()))
        if data.stream:
            stream = guard.streams(1)[0] if guard is not None else None
            return sse_response(generation, _events(server, generation, shell, plan, turns, tenant, stream),
                                headers=guard.headers() if guard is not None else None)
        (choice,) = await generation.choices(request)
        answer = "".join(choice.text)
        if guard is not None:
            answer = await guard.check_output(answer)
        output = _output_items(answer, plan)
        body = shell.body("completed" if choice.finish_reason != "length" else "incomplete", output, _usage(generation))
        _remember(server, data, tenant, shell.id, turns, output, body)
        return Response(body, headers=guard.headers()) if guard is not None else body


    @get("/{response_id:str}", operation_id="getResponse", responses=ERROR_RESPONSES,
         summary="A stored response, as its create call answered it")
    async def retrieve(self, request: Request, response_id: str, server: ServerState) -> dict:
        _refuse_retrieve_options(request)
        return _stored(server, request_record(request.scope).tenant, response_id, None).body

    @delete("/{response_id:str}", operation_id="deleteResponse", status_code=200, responses=ERROR_RESPONSES,
            summary="Forget a stored response: it can no longer be retrieved or continued")
    async def remove(self, request: Request, response_id: str, server: ServerState) -> ResponseDeleted:
        tenant = request_record(request.scope).tenant
        _stored(server, tenant, response_id, None)  # 404 when unknown
        server.responses.delete(tenant, response_id)
        return ResponseDeleted(response_id)


class _Shell:
    """The response object's fixed fields."""

    def __init__(self, data: ResponsesRequest, response_id: str, created: int):
        self.data, self.id, self.created = data, response_id, created

    def body(self, status: str, output: list[dict], usage: dict | None) -> dict:
        data = self.data
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": data.model or "", "output": output, "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": data.instructions, "max_output_tokens": data.max_output_tokens,
            "temperature": data.temperature, "top_p": data.top_p, "parallel_tool_calls": data.parallel_tool_calls
            is not False, "tool_choice": data.tool_choice or "auto", "tools": data.tools or [],
            "text": data.text or {"format": {"type": "text"}}, "previous_response_id": data.previous_response_id,
            "store": data.store, "metadata": data.metadata or {}, "user": data.user, "truncation": "disabled",
        }


def _usage(generation: Generation) -> dict:
    u = generation.usage()
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "input_tokens_details": {"cached_tokens": generation.num_cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call: ToolCall, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def _output_items(text: str, plan: ToolPlan | None) -> list[dict]:
    content, calls = (text, []) if plan is None else plan.calls(text)
    items = [_message_item(content)] if content or not calls else []
    return items + [_call_item(c) for c in calls]


def _remember(server: ServerState, data: ResponsesRequest, tenant: str, response_id: str, turns: list[dict],
              output: list[dict], body: dict) -> None:
    if not data.store:
        return
    server.responses.put(tenant, response_id, StoredResponse(turns + _input_messages(output), body))


def _stored(server: ServerState, tenant: str, response_id: str, param: str | None) -> StoredResponse:
    stored = server.responses.get(tenant, response_id)
    if stored is None:
        raise APIError(404, f"no stored response {response_id[:64]!r} (responses made with store=false, deleted, "
                       "or pushed out of this server's bounded store are not kept)", param=param,
                       code="response_not_found")
    return stored


async def _events(server: ServerState, generation: Generation, shell: _Shell, plan: ToolPlan | None,
                  turns: list[dict], tenant: str, guarded: ChoiceStream | None = None) -> AsyncIterator[bytes]:
    sequence = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal sequence
        sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + encode_json({"type": kind, "sequence_number": sequence - 1,
                                                                       **fields}) + b"\n\n"

    yield event("response.created", response=shell.body("in_progress", [], None))
    yield event("response.in_progress", response=shell.body("in_progress", [], None))
    streaming_text = plan is None or plan.choice == "none"
    message = _message_item("", "in_progress") if streaming_text else None
    if message is not None:
        yield event("response.output_item.added", output_index=0, item=message)
        yield event("response.content_part.added", item_id=message["id"], output_index=0, content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []})
    pieces: list[str] = []
    finish = None
    async for _, output in generation.outputs():
        for o in output.outputs:
            piece = o.text if guarded is None else guarded.text(o.text, o.finish_reason is not None)
            pieces.append(piece)
            finish = o.finish_reason or finish
            if message is not None and piece:
                yield event("response.output_text.delta", item_id=message["id"], output_index=0, content_index=0,
                            delta=piece, logprobs=[])
    text = "".join(pieces)
    if message is not None:
        output = [_message_item(text)]
        output[0]["id"] = message["id"]
        yield event("response.output_text.done", item_id=message["id"], output_index=0, content_index=0, text=text,
                    logprobs=[])
        yield event("response.content_part.done", item_id=message["id"], output_index=0, content_index=0,
                    part=output[0]["content"][0])
        yield event("response.output_item.done", output_index=0, item=output[0])
    else:  # tool calling: the items once the text is complete (the whole arguments in one delta)
        output = _output_items(text, plan)
        for index, item in enumerate(output):
            yield event("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress"} | ({"arguments": ""} if "arguments" in item else
                                                                  {"content": []}))
            if item["type"] == "function_call":
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=item["arguments"])
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=item["arguments"], name=item["name"])
            else:
                part = item["content"][0]
                yield event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part={**part, "text": ""})
                yield event("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                            delta=part["text"], logprobs=[])
                yield event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[])
                yield event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part)
            yield event("response.output_item.done", output_index=index, item=item)
    status = "incomplete" if finish == "length" else "completed"
    body = shell.body(status, output, _usage(generation))
    _remember(server, shell.data, tenant, shell.id, turns, output, body)
    yield event(f"response.{status}", response=body)


def _input_messages(value: str | list[dict[str, Any]]) -> list[dict]:
    """Input items (or a response's output items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text_of(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise bad_request(f"input item type {str(kind)[:40]!r} is not supported (message, function_call, "
                              "function_call_output)", f"input[{i}].type", "unsupported_parameter")
    return messages


def _text_of(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param} must be text or a list of text parts", param)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            raise bad_request(f"only text parts are supported, got {str(kind)[:40]!r}", f"{param}[{j}]",
                              "unsupported_parameter")
        texts.append(part["text"])
    return "".join(texts)


def _as_chat(data: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """The chat endpoint's request for the same thing (its checks name the chat fields, so the
    Responses names are checked here first)."""
    body: dict[str, Any] = {"model": data.model, "messages": messages, "temperature": data.temperature,
                            "top_p": data.top_p, "user": data.user, "parallel_tool_calls": data.parallel_tool_calls}
    if data.tools is not None:
        body["tools"] = [_chat_tool(i, t) for i, t in enumerate(data.tools)]
    if data.tool_choice is not None:
        choice = data.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        body["tool_choice"] = choice
    if data.text is not None:
        body["response_format"] = _chat_format(data.text)
    try:
        return msgspec.convert(body, ChatCompletionRequest)
    except msgspec.ValidationError as e:
        raise bad_request(f"input: {e}", "input") from None


def _chat_tool(index: int, tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise bad_request(f"only function tools are supported, got {str(kind)[:40]!r}", f"tools[{index}].type",
                          "unsupported_parameter")
    function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
    return {"type": "function", "function": function}


def _chat_format(text: dict) -> dict:
    fmt = text.get("format", {"type": "text"})
    if not isinstance(fmt, dict):
        raise bad_request("text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    if fmt.get("type") in ("text", "json_object"):
        return {"type": fmt["type"]}
    raise bad_request("text.format.type must be text, json_object or json_schema", "text.format.type")


def _refuse_retrieve_options(request: Request) -> None:
    """GET's query: `stream=true` (replaying a background response's events) and `include` (extra
    output such as logprobs or encrypted reasoning) are refused by name; `include_obfuscation` and
    `starting_after` only shape a stream, so without one they change nothing, as at OpenAI."""
    query = request.query_params
    stream = query.get("stream")
    if stream is not None:
        if stream.lower() not in ("true", "false"):
            raise bad_request(f"stream must be true or false, got {stream[:20]!r}", "stream")
        if stream.lower() == "true":
            raise bad_request("streaming a stored response is not supported (there are no background responses)",
                              "stream", "unsupported_parameter")
    included = query.getall("include", []) + query.getall("include[]", [])
    if included:
        raise bad_request(f"include is not supported, got {included[0][:60]!r}", "include", "unsupported_parameter")
    after = query.get("starting_after")
    if after is not None and not after.isdigit():
        raise bad_request(f"starting_after must be a sequence number, got {after[:20]!r}", "starting_after")
