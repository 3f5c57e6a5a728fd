"""Pieces the generation endpoints share: starting a run, SSE framing, the OpenAPI error responses."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from litestar import Request
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Stream

from runtime.request import SamplingParams
from serving.errors import APIError
from serving.generation import DONE_EVENT, Generation, sse_event
from serving.middleware import request_record
from serving.protocol.common import ErrorResponse, SamplingFields
from serving.sampling import engine_fields
from serving.state import ServerState

ERROR_RESPONSES = {
    status: ResponseSpec(ErrorResponse, description=description)
    for status, description in (
        (400, "Bad input: malformed JSON, wrong types, out-of-range or unsupported fields, over the context"),
        (401, "No valid credentials (missing, unknown, revoked or expired key; invalid token)"),
        (403, "The credentials lack the route's scope"),
        (404, "Unknown model"),
        (413, "Body over the size limit"),
        (429, "Queue full or rate limit reached; see Retry-After"),
        (503, "Shutting down, or the engine has stopped"),
    )
}


def start_generation(server: ServerState, request: Request, data: SamplingFields, prompts: list[list[int]],
                     params: SamplingParams, prompt_param: str, prompt_text: str | None,
                     guided_param: str | None = None) -> Generation:
    """Check everything, then take a seat in the queue (429 when full)."""
    record = request_record(request.scope)
    adapter = server.adapter_for(data.model)
    record.model, record.user = adapter or server.model_name, data.user
    record.prompt_tokens = sum(len(p) for p in prompts)
    record.set_prompt_text(prompt_text)
    # The caller's tenant (set by the auth guard); the HTTP request id names it in engine logs and audit lines.
    fields = engine_fields(data) | {"tenant": record.tenant, "trace_id": record.request_id}
    if adapter:
        fields["adapter"] = adapter
    generation = Generation(server, prompts, params, record, uuid.uuid4().hex, fields, guided_param=guided_param)
    generation.check(prompt_param)
    record.ticket = server.admission.acquire()
    server.in_flight.add(generation)
    return generation


@contextmanager
def tokenize_stage(request: Request) -> Iterator[None]:
    """Marks the tokenize stage (wall clock) on the request's record, for its trace."""
    record = request_record(request.scope)
    record.tokenize_start = time.time()
    try:
        yield
    finally:
        record.tokenize_end = time.time()


def sse_response(generation: Generation, events: AsyncIterator[bytes],
                 headers: dict[str, str] | None = None) -> Stream:
    # The header, not media_type: Litestar lets the handler's JSON media type win over a Stream's.
    return Stream(_sse_body(generation, events), media_type="text/event-stream",
                  headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                           "x-accel-buffering": "no", **(headers or {})})


async def _sse_body(generation: Generation, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The events, then `[DONE]`; an error after the stream began is sent as an error event."""
    try:
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield sse_event(e.body())
        yield DONE_EVENT
    except asyncio.CancelledError:
        generation.record.disconnected = True
        raise
    finally:
        generation.record.release()


def usage_fields(data: SamplingFields) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage in every chunk)."""
    options = data.stream_options
    if options is None:
        return False, False
    return options.include_usage or options.continuous_usage_stats, options.continuous_usage_stats
