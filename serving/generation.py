"""One API request's run through the engine: an engine request per prompt, outputs merged.

The checks run once, before anything is queued (so bad input is a 4xx before a stream
starts): `check` keeps the engine requests it made, and `outputs` streams those very ones;
a consumer that stops (a client that went away) closes the engine streams, which aborts
their requests before the engine's next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from litestar import Request

from runtime.adapters import AdapterNotFound
from runtime.engine_client import EngineDeadError, EngineStepError
from runtime.failover import BackendDegradedError
from runtime.outputs import RequestOutput, TokenLogprob
from runtime.request import Request as EngineRequest
from runtime.request import SamplingParams
from runtime.structured import GrammarError
from serving.errors import APIError, ClientDisconnected, bad_request, from_engine_error
from serving.protocol.common import PromptTokensDetails, Usage, encode_json
from serving.records import RequestRecord
from serving.state import ServerState, model_not_found

T = TypeVar("T")
DONE_EVENT = b"data: [DONE]\n\n"
_END = object()


def sse_event(payload) -> bytes:
    return b"data: " + encode_json(payload) + b"\n\n"


@dataclass
class Choice:
    """A choice's output accumulated over the steps."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Generation:
    server: ServerState
    prompts: list[list[int]]
    params: SamplingParams
    record: RequestRecord
    request_id: str
    engine_fields: dict = field(default_factory=dict)
    num_cached_tokens: int = 0
    requests: list[EngineRequest] = field(default_factory=list)
    """One checked engine request per prompt, made by `check`."""
    guided_param: str | None = None
    """The field that asked for structured output: named when its grammar cannot be compiled."""
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)
    """By prompt index, once the engine has given them (params.prompt_logprobs)."""

    def check(self, prompt_param: str) -> None:
        """The engine's own checks (context length, vocabulary, n...), as 400s, before queueing."""
        engine = self.server.engine
        try:
            self.requests = [engine.make_request(ids, self.params, request_id=f"{self.request_id}-{i}",
                                                 **self.engine_fields) for i, ids in enumerate(self.prompts)]
        except GrammarError as e:
            raise bad_request(str(e), self.guided_param) from None
        except ValueError as e:
            raise from_engine_error(e, prompt_param) from None
        except AdapterNotFound as e:  # unloaded since the model name was checked
            raise model_not_found(str(e), self.server.model_name) from None
        except BackendDegradedError as e:  # the accelerator is out and this prompt is too large for the CPU
            raise APIError(503, str(e), code="backend_degraded", headers={"Retry-After": str(e.retry_after_s)}) from None

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def usage(self) -> Usage:
        completion = self.record.completion_tokens
        return Usage(self.num_prompt_tokens, completion, self.num_prompt_tokens + completion,
                     PromptTokensDetails(self.num_cached_tokens))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine makes them; the record follows along."""
        engine = self.server.engine
        streams = [engine.stream(request) for request in self.requests]
        source = _merge(streams) if len(streams) > 1 else _indexed(streams[0])
        try:
            async for prompt_index, output in source:
                self.record.note_tokens(sum(len(o.token_ids) for o in output.outputs))
                if prompt_index == 0:  # the logs and /debug keep the first choice's text
                    self.record.add_completion_text([o.text for o in output.outputs if o.index == 0])
                self.record.finish_reasons += [o.finish_reason for o in output.outputs if o.finish_reason]
                if output.prompt_logprobs is not None:
                    self.prompt_logprobs[prompt_index] = output.prompt_logprobs
                if output.finished:
                    self.num_cached_tokens += output.num_cached_tokens
                    timings = getattr(output, "timings", None)
                    if timings is not None:
                        self.record.engine_timings.append(timings)
                yield prompt_index, output
        except ValueError as e:
            raise from_engine_error(e) from None
        except EngineStepError as e:
            # The engine failed this request (and its step's others) and carries on; no retry, as
            # the same input could fail again. The id finds the engine's log and audit lines.
            raise APIError(500, f"{e}; request id {self.record.request_id}", code="engine_error") from None
        except BackendDegradedError as e:  # a gateway whose workers' accelerators are out: too large for their CPUs
            raise APIError(503, str(e), code="backend_degraded", headers={"Retry-After": str(e.retry_after_s)}) from None
        except EngineDeadError as e:
            raise APIError(503, f"the engine has stopped: {e}", code="engine_dead") from None
        finally:
            # Closing an unfinished engine stream aborts its request (no await suspends here,
            # so this runs even inside a cancelled scope).
            await source.aclose()
            if len(streams) == 1:
                await streams[0].aclose()

    async def choices(self, request: Request) -> list[Choice]:
        """Run to the end (non-streaming); a client that disconnects cancels the run."""
        n = self.params.n
        choices = {i: Choice(i) for i in range(len(self.prompts) * n)}

        async def run() -> None:
            async for prompt_index, output in self.outputs():
                for o in output.outputs:
                    choice = choices[prompt_index * n + o.index]
                    choice.text.append(o.text)
                    choice.token_ids += o.token_ids
                    choice.logprobs += o.logprobs or []
                    choice.finish_reason, choice.stop_reason = o.finish_reason, o.stop_reason

        await until_disconnected(request, run())
        return [choices[i] for i in sorted(choices)]


async def _indexed(stream) -> AsyncIterator[tuple[int, RequestOutput]]:
    async for output in stream:
        yield 0, output


async def _merge(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine streams as they come; cancelling the pumps aborts them."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, _END))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (the body is already read)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
