"""POST /v1/completions: OpenAI's legacy completions, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
from litestar import Controller, Request, Response, post

from runtime.outputs import TokenLogprob
from serving.auth.guard import needs
from serving.auth.principal import GENERATE
from serving.errors import APIError, bad_request
from serving.generation import Generation, sse_event
from serving.prompt_logprobs import vllm_prompt_logprobs
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
from serving.structured import guided_decoding
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
        _check_max_tokens(data)
        guided, guided_param = guided_decoding(data)
        guard = RequestGuard.for_request(server, request, "completions")
        items = _prompt_items(data.prompt)
        if guard is not None:
            guard.refuse_logprobs(data.logprobs is not None or data.prompt_logprobs is not None)
            items = await _checked_items(server, guard, items, several=not _single_prompt(data.prompt))
        with tokenize_stage(request):
            prompts, texts = await _encode(server, items, several=not _single_prompt(data.prompt))
        # max_tokens=0 (echo only): the engine draws one token, which nobody sees.
        max_tokens = DEFAULT_MAX_TOKENS if data.max_tokens is None else max(data.max_tokens, 1)
        params = sampling_params(data, max_tokens=max_tokens, logprobs=data.logprobs,
                                 defaults=server.sampling_defaults,
                                 prompt_logprobs=data.logprobs if data.echo else None, guided=guided)
        generation = start_generation(server, request, data, prompts, params, "prompt", "\n".join(texts),
                                      guided_param)
        created, response_id = int(time.time()), f"cmpl-{generation.request_id}"
        echo = _Echo(prompts, texts) if data.echo else None
        if data.stream:
            streams = guard.streams(len(prompts) * data.n) if guard is not None else None
            return sse_response(generation, _events(server, generation, data, response_id, created, echo, streams),
                                headers=guard.headers() if guard is not None else None)
        choices = await generation.choices(request)
        only_prompt = data.max_tokens == 0
        texts_out = ["" if only_prompt else "".join(c.text) for c in choices]
        if guard is not None:
            texts_out = [await guard.check_output(text) for text in texts_out]
        body = CompletionResponse(
            id=response_id, created=created, model=generation.record.model, usage=_usage(generation, only_prompt),
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=(echo.texts[c.index // data.n] if echo else "") + text,
                    logprobs=_choice_logprobs(server, generation, data, c.index // data.n,
                                              [] if only_prompt else c.logprobs, True),
                    finish_reason="length" if only_prompt else c.finish_reason,
                    stop_reason=None if only_prompt else c.stop_reason,
                    prompt_logprobs=_vllm_prompt_logprobs(server, generation, data, c.index // data.n),
                )
                for c, text in zip(choices, texts_out, strict=True)
            ],
        )
        return Response(body, headers=guard.headers()) if guard is not None else body


class _Echo:
    """The prompts a request echoes: their ids (for the logprobs' tokens) and texts."""

    def __init__(self, ids: list[list[int]], texts: list[str]):
        self.ids, self.texts = ids, texts


def _usage(generation: Generation, only_prompt: bool):
    usage = generation.usage()
    if only_prompt:  # the token drawn to finish the prefill is not part of the answer
        usage = msgspec.structs.replace(usage, completion_tokens=0, total_tokens=usage.prompt_tokens)
    return usage


def _choice_logprobs(server: ServerState, generation: Generation, data: CompletionRequest, prompt_index: int,
                     logprobs: list[TokenLogprob], first: bool) -> CompletionLogprobs | None:
    """OpenAI's logprobs lists; with echo, the first piece of a choice starts with the prompt's."""
    if data.logprobs is None:
        return None
    entries: list[tuple[int, TokenLogprob | None]] = []
    if data.echo and first:
        prompt_ids = generation.prompts[prompt_index]
        prompt_lps = generation.prompt_logprobs.get(prompt_index) or [None] * len(prompt_ids)
        entries += zip(prompt_ids, prompt_lps, strict=True)
    entries += [(lp.token_id, lp) for lp in logprobs]
    return _logprobs(server, entries, 0, data.logprobs)


def _vllm_prompt_logprobs(server: ServerState, generation: Generation, data: CompletionRequest, prompt_index: int):
    if data.prompt_logprobs is None:
        return None
    return vllm_prompt_logprobs(server, generation.prompt_logprobs.get(prompt_index, []), data.prompt_logprobs)


async def _events(server: ServerState, generation: Generation, data: CompletionRequest, response_id: str,
                  created: int, echo: _Echo | None,
                  streams: list[ChoiceStream] | None = None) -> AsyncIterator[bytes]:
    final_usage, every_chunk = usage_fields(data)
    only_prompt = data.max_tokens == 0
    offsets: dict[int, int] = {}  # logprobs' text offset of each choice so far
    async for prompt_index, output in generation.outputs():
        for o in output.outputs:
            index = prompt_index * data.n + o.index
            text = o.text if streams is None else streams[index].text(o.text, o.finish_reason is not None)
            finish, stop, token_lps = o.finish_reason, o.stop_reason, o.logprobs or []
            if only_prompt:
                text, token_lps, stop = "", [], None
                finish = "length" if finish else None
            first = index not in offsets
            if first:
                offsets[index] = 0
                if echo:
                    text = echo.texts[prompt_index] + text
            if not text and finish is None and not token_lps:
                continue  # text held back (a partial character or a possible stop string)
            logprobs = _choice_logprobs(server, generation, data, prompt_index, token_lps, first)
            if logprobs is not None:  # offsets count token texts, as the whole answer's do
                logprobs.text_offset = [offsets[index] + at for at in logprobs.text_offset]
                offsets[index] += sum(len(t) for t in logprobs.tokens)
            choice = CompletionChoice(index, text, logprobs, finish, stop,
                                      _vllm_prompt_logprobs(server, generation, data, prompt_index) if first else None)
            yield sse_event(CompletionChunk(response_id, created, generation.record.model, [choice],
                                            _usage(generation, only_prompt) if every_chunk else None))
    if final_usage:
        yield sse_event(CompletionChunk(response_id, created, generation.record.model, [],
                                        _usage(generation, only_prompt)))


def _logprobs(server: ServerState, entries: list[tuple[int, TokenLogprob | None]], offset: int,
              top: int) -> CompletionLogprobs:
    """Entries are (token id, its logprob or None: the first prompt token has none)."""
    tokens, offsets = [], []
    for token_id, _ in entries:
        tokens.append(server.token_text(token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if lp is None else lp.logprob for _, lp in entries],
        top_logprobs=[
            None if lp is None else
            {server.token_text(lp.token_id): lp.logprob} | {server.token_text(t): v for t, v in lp.top[:top]}
            for _, lp in entries
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


def _check_max_tokens(data: CompletionRequest) -> None:
    """max_tokens 0 only with echo (unsupported fields were refused with the body: CompletionRequest.unsupported)."""
    if data.max_tokens == 0 and not data.echo:
        raise bad_request("max_tokens=0 needs echo=true (it returns the prompt alone)", "max_tokens")
