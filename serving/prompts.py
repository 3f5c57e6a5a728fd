"""Prompts to token ids for the handlers: off the event loop (serving/tokenizer_pool.py) and within
the per-request limits, in bytes before the work (`--max-prompt-bytes`) and in tokens after it
(`--max-prompt-tokens`). Both are 400 `prompt_too_large` naming the field."""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from models.chat_template import ChatTemplateError
from serving.errors import APIError, bad_request
from serving.state import ServerState
from serving.tokenizer_pool import TokenizerUnavailable

LIST_SLICE = 65_536


def check_prompt_bytes(server: ServerState, texts: Sequence[str], param: str) -> None:
    limit = server.config.max_prompt_bytes
    chars = sum(len(t) for t in texts)
    if chars * 4 <= limit:  # UTF-8 takes at most 4 bytes a character: no need to encode
        return
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if size > limit:
        raise bad_request(f"the prompt is {size} bytes; this server takes at most {limit} (--max-prompt-bytes)",
                          param, "prompt_too_large")


def check_prompt_tokens(server: ServerState, count: int, param: str) -> None:
    limit = server.config.max_prompt_tokens
    if limit is not None and count > limit:
        raise bad_request(f"the prompt is {count} tokens; this server takes at most {limit} "
                          "(--max-prompt-tokens)", param, "prompt_too_large")


async def checked_ids(server: ServerState, ids: array | Sequence[int], param: str) -> list[int]:
    """The ids as a list, once their count is within --max-prompt-tokens. A worker's array is
    made a list a slice at a time, handing the event loop back in between (a million ids take
    ~40 ms in one piece)."""
    check_prompt_tokens(server, len(ids), param)
    if not isinstance(ids, array):
        return list(ids)
    out: list[int] = []
    for start in range(0, len(ids), LIST_SLICE):
        out += ids[start:start + LIST_SLICE].tolist()
        if start + LIST_SLICE < len(ids):
            await asyncio.sleep(0)
    return out


async def encode_text(server: ServerState, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    check_prompt_bytes(server, [text], param)
    ids = await _pooled(server.tokenizer_pool.encode(text, add_special_tokens))
    return await checked_ids(server, ids, param)


async def render_chat(server: ServerState, plain: list[dict], add_generation_prompt: bool,
                      template_kwargs: Mapping[str, Any] | None, param: str = "messages") -> tuple[str, list[int]]:
    """The chat template's text and ids; ill-formed messages are a 400 naming the messages."""
    check_prompt_bytes(server, [m["content"] for m in plain if isinstance(m.get("content"), str)], param)
    try:
        text, ids = await _pooled(server.tokenizer_pool.render_chat(plain, add_generation_prompt, template_kwargs))
    except ChatTemplateError as e:
        raise bad_request(f"the chat template refused the messages: {e}", param) from None
    except TypeError as e:  # a template kwarg that collides with the template's own arguments
        raise bad_request(f"chat_template_kwargs: {e}", "chat_template_kwargs") from None
    return text, await checked_ids(server, ids, param)


async def decode(server: ServerState, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return await _pooled(server.tokenizer_pool.decode(ids, skip_special_tokens))


async def token_texts(server: ServerState, ids: Sequence[int]) -> list[str]:
    return await _pooled(server.tokenizer_pool.token_texts(ids))


async def _pooled(work):
    try:
        return await work
    except TokenizerUnavailable as e:
        raise APIError(503, f"{e}; retry the request", code="tokenizer_unavailable",
                       headers={"retry-after": "1"}) from None
