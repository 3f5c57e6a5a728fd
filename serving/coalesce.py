"""One request's outputs, with those that queued up while the consumer was busy merged into one.

The worker and the gateway each pass every output on (a gRPC message, an SSE chunk) at a cost
per output, not per token: ~0.5 ms of Python and a loopback write each, measured on the 2-core
development machine (perf/results/gateway_overhead_cpu.md). When that work falls behind the
engine's steps, one output per step per stream would queue without bound and slow everything
down; merged, a consumer that lags sends fewer, larger outputs and catches up. A consumer that
keeps up sees every output alone, as before (no added delay: nothing waits for a second output).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from runtime.outputs import CompletionOutput, RequestOutput

_END = object()


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """`first` followed by `later` as one output: each sample's text, tokens and logprobs joined;
    counts, timings, finish and error from `later` (they are cumulative or final)."""
    samples = {o.index: CompletionOutput(o.index, o.text, list(o.token_ids),
                                         None if o.logprobs is None else list(o.logprobs),
                                         o.finish_reason, o.stop_reason) for o in first.outputs}
    for o in later.outputs:
        sample = samples.get(o.index)
        if sample is None:
            samples[o.index] = o
            continue
        sample.text += o.text
        sample.token_ids += o.token_ids
        if o.logprobs is not None:
            sample.logprobs = (sample.logprobs or []) + o.logprobs
        sample.finish_reason, sample.stop_reason = o.finish_reason, o.stop_reason
    return RequestOutput(later.request_id, [samples[i] for i in sorted(samples)], later.finished,
                         later.num_prompt_tokens, later.num_cached_tokens, later.num_generated_tokens,
                         later.metrics, later.timings, later.error)


async def coalesced(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """`outputs`, read ahead by a task; what is already waiting when the consumer asks is merged.
    Errors reach the consumer after the outputs before them. Closing this closes `outputs`
    (for an engine stream: the request is aborted)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for output in outputs:
                queue.put_nowait(output)
            queue.put_nowait(_END)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, in order
            queue.put_nowait(e)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            item = await queue.get()
            while isinstance(item, RequestOutput) and not item.finished and not queue.empty():
                following = queue._queue[0]  # noqa: SLF001 - peek: an error or the end is not merged
                if not isinstance(following, RequestOutput):
                    break
                item = merge_outputs(item, queue.get_nowait())
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finished:
                return
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await outputs.aclose()
