"""serving/coalesce.py: outputs that queued up are merged; nothing waits; errors and closing pass through."""

from __future__ import annotations

import asyncio

import pytest

from runtime.outputs import CompletionOutput, RequestOutput, TokenLogprob
from serving.coalesce import coalesced, merge_outputs


def out(tokens: list[int], text: str, finished: bool = False, generated: int = 0, **sample) -> RequestOutput:
    return RequestOutput("r", [CompletionOutput(0, text, tokens, **sample)], finished, 3,
                         num_generated_tokens=generated)


def test_merge_joins_text_tokens_and_logprobs_and_takes_the_later_counts():
    a = out([5], "a", generated=1, logprobs=[TokenLogprob(5, -0.5, ())])
    b = out([6, 7], "bc", finished=True, generated=3, logprobs=[TokenLogprob(6, -1.0, ()), TokenLogprob(7, -2.0, ())],
            finish_reason="length")
    merged = merge_outputs(a, b)
    assert merged.outputs[0].text == "abc"
    assert merged.outputs[0].token_ids == [5, 6, 7]
    assert [lp.logprob for lp in merged.outputs[0].logprobs] == [-0.5, -1.0, -2.0]
    assert (merged.finished, merged.num_generated_tokens, merged.outputs[0].finish_reason) == (True, 3, "length")
    assert a.outputs[0].token_ids == [5] and a.outputs[0].text == "a"  # inputs untouched


def test_merge_keeps_samples_apart_by_index():
    a = RequestOutput("r", [CompletionOutput(0, "x", [1]), CompletionOutput(1, "y", [2])], False, 3)
    b = RequestOutput("r", [CompletionOutput(1, "z", [3])], False, 3)
    merged = merge_outputs(a, b)
    assert [(o.index, o.text, o.token_ids) for o in merged.outputs] == [(0, "x", [1]), (1, "yz", [2, 3])]


def test_a_consumer_that_keeps_up_sees_every_output_alone_and_a_slow_one_gets_them_merged():
    async def engine(n: int):
        for i in range(n):
            yield out([i], str(i), finished=i == n - 1, generated=i + 1)
            await asyncio.sleep(0)

    async def run(slow: bool):
        seen = []
        async for o in coalesced(engine(6)):
            seen.append(o.outputs[0].token_ids)
            if slow:
                await asyncio.sleep(0.01)  # the engine made all the rest meanwhile
        return seen

    assert asyncio.run(run(False)) == [[0], [1], [2], [3], [4], [5]]
    assert asyncio.run(run(True)) == [[0], [1, 2, 3, 4, 5]]


def test_an_error_arrives_after_the_outputs_before_it():
    async def engine():
        yield out([1], "a")
        yield out([2], "b")
        raise RuntimeError("worker lost")

    async def run():
        seen = []
        with pytest.raises(RuntimeError, match="worker lost"):
            async for o in coalesced(engine()):
                seen += o.outputs[0].token_ids
        return seen

    assert asyncio.run(run()) == [1, 2]


def test_closing_early_closes_the_engine_stream():
    closed = []

    async def engine():
        try:
            for i in range(100):
                yield out([i], "x")
                await asyncio.sleep(0.001)
        finally:
            closed.append(True)  # AsyncEngine/RemoteEngine abort the request here

    async def run():
        stream = coalesced(engine())
        first = await stream.__anext__()
        await stream.aclose()
        return first.outputs[0].token_ids

    assert asyncio.run(run()) == [0]
    assert closed == [True]
