"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from litestar import Controller, Request, Response, post

from runtime.outputs import TokenLogprob
from serving.errors import APIError, bad_request
from serving.auth.guard import needs
from serving.auth.principal import GENERATE
from serving.generation import Generation, sse_event
from serving.prompt_logprobs import vllm_prompt_logprobs
from serving.prompts import render_chat
from serving.protocol.chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionPromptChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatLogprobToken,
    ChatLogprobTop,
    ChatMessage,
    ChatResponseMessage,
)
from serving.routes.guarded import ChoiceStream, RequestGuard
from serving.routes.common import ERROR_RESPONSES, sse_response, start_generation, tokenize_stage, usage_fields
from serving.sampling import sampling_params
from serving.structured import guided_decoding
from serving.tools import ToolCall, ToolPlan, check_tool_turns, template_inputs, tool_plan
from serving.state import ServerState


class ChatController(Controller):
    path = "/v1/chat/completions"
    tags = ["OpenAI"]
    opt = needs(GENERATE)

    @post(operation_id="createChatCompletion", status_code=200, responses=ERROR_RESPONSES,
          summary="Answer a conversation; `stream: true` answers with server-sent events")
    async def create(self, request: Request, data: ChatCompletionRequest, server: ServerState) -> ChatCompletionResponse:
        server.check_model(data.model)
        _check_logprob_fields(data)
        guided, guided_param = guided_decoding(data)
        template = server.tokenizer.chat_template
        plan = tool_plan(data.tools, data.tool_choice, data.parallel_tool_calls, template)
        if plan is not None and plan.forced:
            if guided is not None:
                raise bad_request(f"{guided_param} cannot be combined with tool_choice {plan.choice!r}", guided_param)
            guided, guided_param = plan.guided(), "tools"
        plain = plain_messages(data.messages)
        check_tool_turns(plain)
        guard = RequestGuard.for_request(server, request, "chat")
        if guard is not None:
            guard.refuse_logprobs(bool(data.logprobs) or data.prompt_logprobs is not None)
            plain = await guard.check_messages(plain)  # before the template and the tokenizer
        messages, tool_kwargs = template_inputs(plain, plan, template)
        with tokenize_stage(request):
            text, ids = await render_chat(server, messages, data.add_generation_prompt,
                                          {**(data.chat_template_kwargs or {}), **tool_kwargs})
        requested = data.max_completion_tokens or data.max_tokens
        max_tokens = requested or max(server.max_model_len - len(ids), 1)  # vLLM's default: the rest of the context
        top = (data.top_logprobs or 0) if data.logprobs else None
        params = sampling_params(data, max_tokens=max_tokens, logprobs=top, defaults=server.sampling_defaults,
                                 guided=guided)
        try:
            generation = start_generation(server, request, data, [ids], params, "messages", text, guided_param)
        except APIError as e:
            if e.param == "max_tokens" and data.max_completion_tokens is not None:
                e.param = "max_completion_tokens"  # name the field the client sent
            raise
        created, response_id = int(time.time()), f"chatcmpl-{generation.request_id}"
        if data.stream:
            streams = guard.streams(data.n) if guard is not None else None
            return sse_response(generation, _events(server, generation, data, response_id, created, streams, plan),
                                headers=guard.headers() if guard is not None else None)
        choices = await generation.choices(request)
        contents = ["".join(c.text) for c in choices]
        if guard is not None:
            contents = [await guard.check_output(content) for content in contents]
        answers = [_answer(plan, content, c.finish_reason) for c, content in zip(choices, contents, strict=True)]
        body = ChatCompletionResponse(
            id=response_id, created=created, model=generation.record.model, usage=generation.usage(),
            choices=[
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=_logprobs(server, c.logprobs, top) if top is not None else None,
                    finish_reason=finish, stop_reason=c.stop_reason,
                )
                for c, (message, finish) in zip(choices, answers, strict=True)
            ],
            prompt_logprobs=None if data.prompt_logprobs is None else
            vllm_prompt_logprobs(server, generation.prompt_logprobs.get(0, []), data.prompt_logprobs),
        )
        return Response(body, headers=guard.headers()) if guard is not None else body


def _answer(plan: ToolPlan | None, content: str, finish: str | None) -> tuple[ChatResponseMessage, str | None]:
    """The message and finish reason of a finished choice, its tool calls parsed out."""
    if plan is None or plan.choice == "none":
        return ChatResponseMessage(content=content), finish
    text, calls = plan.calls(content)
    if not calls:
        return ChatResponseMessage(content=text), finish
    # A forced function ends as "stop", as OpenAI's do; calls the model chose end as "tool_calls".
    reason = finish if plan.named is not None or finish != "stop" else "tool_calls"
    return ChatResponseMessage(content=text, tool_calls=[c.as_openai() for c in calls]), reason


async def _events(server: ServerState, generation: Generation, data: ChatCompletionRequest, response_id: str,
                  created: int, streams: list[ChoiceStream] | None = None,
                  plan: ToolPlan | None = None) -> AsyncIterator[bytes]:
    final_usage, every_chunk = usage_fields(data)
    top = (data.top_logprobs or 0) if data.logprobs else None
    model = generation.record.model
    prompt_pending = data.prompt_logprobs is not None

    def chunk(choices: list[ChatChunkChoice]) -> bytes:
        nonlocal prompt_pending
        usage = generation.usage() if every_chunk else None
        # vLLM's prompt_logprobs ride on the first chunk sent once the engine has given them
        # (they come with the first token; the role chunks go out before).
        if prompt_pending and 0 in generation.prompt_logprobs:
            prompt_pending = False
            return sse_event(ChatCompletionPromptChunk(
                response_id, created, model, choices, usage,
                prompt_logprobs=vllm_prompt_logprobs(server, generation.prompt_logprobs[0], data.prompt_logprobs)))
        return sse_event(ChatCompletionChunk(response_id, created, model, choices, usage))

    for index in range(data.n):  # the role first, as OpenAI does
        yield chunk([ChatChunkChoice(index, ChatDelta(role="assistant", content=""))])
    calling = plan is not None and plan.choice != "none"
    held: dict[int, list[str]] = {}  # tool calling: each choice's text so far
    async for _, output in generation.outputs():
        for o in output.outputs:
            text = o.text if streams is None else streams[o.index].text(o.text, o.finish_reason is not None)
            if calling:
                for delta, finish in _tool_deltas(plan, held.setdefault(o.index, []), text, o.finish_reason):
                    yield chunk([ChatChunkChoice(o.index, delta, None, finish, o.stop_reason if finish else None)])
                continue
            if not text and o.finish_reason is None and not o.logprobs:
                continue  # text held back (a partial character, a possible stop string, a guardrail's window)
            logprobs = _logprobs(server, o.logprobs or [], top) if top is not None else None
            delta = ChatDelta(content=text) if text or o.finish_reason is None else ChatDelta()
            yield chunk([ChatChunkChoice(o.index, delta, logprobs, o.finish_reason, o.stop_reason)])
    if final_usage:
        yield sse_event(ChatCompletionChunk(response_id, created, model, [], generation.usage()))


def _tool_deltas(plan: ToolPlan, held: list[str], text: str, finish: str | None):
    """Streamed tool calls, as OpenAI sends them: a named function's arguments as they come (its
    first delta carries the call's id and name); otherwise the text is held to the end, then each
    call is one delta (or the text is content when it holds none)."""
    first = not held
    held.append(text)
    if plan.named is not None:
        call = {"index": 0, "function": {"arguments": text}}
        if first:
            call = ToolCall(plan.named, text).as_openai(index=0)
        if text or first:
            yield ChatDelta(tool_calls=[call]), None
        if finish is not None:
            yield ChatDelta(), finish
        return
    if finish is None:
        return
    message, reason = _answer(plan, "".join(held), finish)
    if message.tool_calls:
        if message.content:
            yield ChatDelta(content=message.content), None
        for index, call in enumerate(message.tool_calls):
            yield ChatDelta(tool_calls=[{"index": index, **call}]), None
    elif message.content:
        yield ChatDelta(content=message.content), None
    yield ChatDelta(), reason


def plain_messages(messages: list[ChatMessage]) -> list[dict]:
    return [_plain_message(i, m) for i, m in enumerate(messages)]


def _plain_message(index: int, message: ChatMessage) -> dict:
    content = message.content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"only text content parts are supported, got type {part.type!r}",
                                  f"messages[{index}].content[{j}]")
            parts.append(part.text)
        content = "".join(parts)
    if content is None and not (message.role == "assistant" and message.tool_calls):
        raise bad_request(f"messages[{index}] ({message.role}) has no content", f"messages[{index}].content")
    plain = {"role": message.role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id"):
        if getattr(message, key) is not None:
            plain[key] = getattr(message, key)
    return plain


def _logprobs(server: ServerState, logprobs: list[TokenLogprob], top: int) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> ChatLogprobTop:
        text = server.token_text(token_id)
        return ChatLogprobTop(text, logprob, list(text.encode()))

    content = []
    for lp in logprobs:
        chosen = entry(lp.token_id, lp.logprob)
        content.append(ChatLogprobToken(chosen.token, chosen.logprob, chosen.bytes,
                                        [entry(t, v) for t, v in lp.top[:top]]))
    return ChatLogprobs(content)


def _check_logprob_fields(data: ChatCompletionRequest) -> None:
    """Fields that contradict each other (unsupported ones were refused with the body: ChatCompletionRequest.unsupported)."""
    if data.top_logprobs is not None and not data.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
