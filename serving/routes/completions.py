"""POST /v1/completions: OpenAI's legacy completions, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from litestar import Controller, Request, Response, post

from runtime.outputs import TokenLogprob
from serving.auth.guard import needs
from serving.auth.principal import GENERATE
from serving.errors import APIError, bad_request
from serving.generation import Generation, sse_event
from serving.prompts import check_prompt_bytes, checked_ids, decode, encode_text
from serving.protocol.completions import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from serving.routes.guarded import ChoiceStream, RequestGuard
from serving.routes.common import ERROR_RESPONSES, sse_response, start_generation, tokenize_stage, usage_fields
from serving.sampling import sampling_params
from serving.state import ServerState

DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_PROMPTS = 32


class CompletionsController(Controller):
    path = "/v1/completions"
    tags = ["OpenAI"]
    opt = needs(GENERATE)

    @post(operation_id="createCompletion", status_code=200, responses=ERROR_RESPONSES,
          summary="Complete one or more prompts; `stream: true` answers with server-sent events")
    async def create(self, request: Request, data: CompletionRequest, server: ServerState) -> CompletionResponse:
        server.check_model(data.model)
        _refuse_unsupported(data)
        guard = RequestGuard.for_request(server, request, "completions")
        items = _prompt_items(data.prompt)
        if guard is not None:
            guard.refuse_logprobs(data.logprobs is not None)
            items = await _checked_items(server, guard, items, several=not _single_prompt(data.prompt))
        with tokenize_stage(request):
            prompts, texts = await _encode(server, items, several=not _single_prompt(data.prompt))
        params = sampling_params(data, max_tokens=data.max_tokens or DEFAULT_MAX_TOKENS, logprobs=data.logprobs,
                                 defaults=server.sampling_defaults)
        generation = start_generation(server, request, data, prompts, params, "prompt", "\n".join(texts))
        created, response_id = int(time.time()), f"cmpl-{generation.request_id}"
        echo = texts if data.echo else None
        if data.stream:
            streams = guard.streams(len(prompts) * data.n) if guard is not None else None
            return sse_response(generation, _events(server, generation, data, response_id, created, echo, streams),
                                headers=guard.headers() if guard is not None else None)
        choices = await generation.choices(request)
        texts_out = ["".join(c.text) for c in choices]
        if guard is not None:
            texts_out = [await guard.check_output(text) for text in texts_out]
        body = CompletionResponse(
            id=response_id, created=created, model=generation.record.model, usage=generation.usage(),
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=(echo[c.index // data.n] if echo else "") + text,
                    logprobs=_logprobs(server, c.logprobs, 0) if data.logprobs is not None else None,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                )
                for c, text in zip(choices, texts_out, strict=True)
            ],
        )
        return Response(body, headers=guard.headers()) if guard is not None else body


async def _events(server: ServerState, generation: Generation, data: CompletionRequest, response_id: str,
                  created: int, echo: list[str] | None,
                  streams: list[ChoiceStream] | None = None) -> AsyncIterator[bytes]:
    final_usage, every_chunk = usage_fields(data)
    offsets: dict[int, int] = {}  # text offset of each choice so far
    async for prompt_index, output in generation.outputs():
        for o in output.outputs:
            index = prompt_index * data.n + o.index
            text = o.text if streams is None else streams[index].text(o.text, o.finish_reason is not None)
            if index not in offsets:
                offsets[index] = 0
                if echo:
                    text = echo[prompt_index] + text
            if not text and o.finish_reason is None and not o.logprobs:
                continue  # text held back (a partial character or a possible stop string)
            logprobs = _logprobs(server, o.logprobs or [], offsets[index]) if data.logprobs is not None else None
            offsets[index] += len(text)
            choice = CompletionChoice(index, text, logprobs, o.finish_reason, o.stop_reason)
            yield sse_event(CompletionChunk(response_id, created, generation.record.model, [choice],
                                            generation.usage() if every_chunk else None))
    if final_usage:
        yield sse_event(CompletionChunk(response_id, created, generation.record.model, [], generation.usage()))


def _logprobs(server: ServerState, logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens, offsets = [], []
    for lp in logprobs:
        tokens.append(server.token_text(lp.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[
            {server.token_text(lp.token_id): lp.logprob} | {server.token_text(t): v for t, v in lp.top}
            for lp in logprobs
        ],
        text_offset=offsets,
    )


def _prompt_items(prompt) -> list[str | list[int]]:
    """Each prompt of a request: text, ids, a list of texts or a list of id lists (checked shapes)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        items: list = [prompt]
    elif all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        items = prompt
    else:
        raise bad_request("prompt must be a string, a list of token ids, a list of strings or a list of "
                          "token-id lists, not a mix", "prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts in one request, got {len(items)}", "prompt")
    return list(items)


def _single_prompt(prompt) -> bool:
    return isinstance(prompt, str) or all(isinstance(p, int) for p in prompt)


async def _checked_items(server: ServerState, guard: RequestGuard, items: list[str | list[int]],
                         several: bool) -> list[str | list[int]]:
    """Each prompt through the input guardrails before it is tokenized. Token-id prompts are
    detokenized for the check; they are kept as sent unless a guardrail rewrote the text,
    which is then tokenized like a text prompt."""
    checked: list[str | list[int]] = []
    for i, item in enumerate(items):
        param = f"prompt[{i}]" if several else "prompt"
        text = item if isinstance(item, str) else await _decode(server, item)
        new_text = await guard.check_prompt(text, param)
        checked.append(item if new_text == text else new_text)
    return checked


async def _encode(server: ServerState, items: list[str | list[int]],
                  several: bool) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt, off the event loop and within the prompt limits."""
    check_prompt_bytes(server, [p for p in items if isinstance(p, str)], "prompt")
    ids, texts = [], []
    for i, p in enumerate(items):
        param = f"prompt[{i}]" if several else "prompt"
        if isinstance(p, str):
            ids.append(await encode_text(server, p, param))
            texts.append(p)
        else:
            ids.append(await checked_ids(server, p, param))
            texts.append(await _decode(server, p))
    return ids, texts


async def _decode(server: ServerState, ids: list[int]) -> str:
    vocab = server.tokenizer.vocab_size
    try:
        return await decode(server, [t for t in ids if 0 <= t < vocab])
    except APIError:
        raise
    except Exception:  # noqa: BLE001 - ids outside the vocabulary are refused by the engine's check
        return ""


def _refuse_unsupported(data: CompletionRequest) -> None:
    if data.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
    if data.best_of is not None and data.best_of != data.n:
        raise bad_request("best_of must equal n (or be left out): Tessera does not rank samples", "best_of",
                          "unsupported_parameter")
    if data.echo and data.logprobs is not None:
        raise bad_request("echo with logprobs needs prompt logprobs, which Tessera does not compute",
                          "echo", "unsupported_parameter")
