"""AsyncEngine is an EngineClient: each method of the protocol, through the protocol only."""

import asyncio
import contextlib
import time

import pytest

from runtime.async_engine import AsyncEngine
from runtime.block_manager import ROOT_KEY, BlockStored, block_key
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.engine_client import EngineClient, EngineHealth
from runtime.request import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]  # two full pages of 4


@pytest.fixture(scope="module")
def core(checkpoint):
    return Engine.from_model_dir(
        checkpoint("llama"), config=EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4, max_model_len=96,
                                                  max_num_batched_tokens=32, token_buckets=(4, 32), model_id="tiny")
    )


@pytest.fixture
def client(core):
    front = AsyncEngine(core)
    yield front
    front.shutdown()


async def _run(client: EngineClient, request):
    return [o async for o in client.stream(request)]


def test_async_engine_is_an_engine_client_with_the_models_facts(client, core):
    assert isinstance(client, EngineClient)
    assert client.model_id == "tiny"
    assert client.max_model_len == 96 and client.max_num_seqs == 4
    assert client.tokenizer is core.tokenizer
    assert client.generation_defaults == core.generation_defaults
    assert client.metrics is None


def test_make_request_checks_once_and_stream_does_not_check_again(client, core, monkeypatch):
    with pytest.raises(ValueError, match="prompt is empty"):
        client.make_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens=90 is too large"):
        client.make_request(PROMPT, SamplingParams(max_tokens=90))
    request = client.make_request(PROMPT, SamplingParams(max_tokens=4, **GREEDY), request_id="once")

    def checked_again(*args, **kwargs):
        raise AssertionError("stream() must not check the request again")

    monkeypatch.setattr(core, "make_request", checked_again)
    outputs = asyncio.run(_run(client, request))
    assert [o.request_id for o in outputs] == ["once"] * 4
    assert [o.finished for o in outputs] == [False, False, False, True]
    assert outputs[-1].outputs[0].finish_reason == "length"
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == 4


def test_abort_ends_the_stream_with_abort_and_frees_its_pages(client, core):
    async def run():
        request = client.make_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=80, **GREEDY), request_id="cut")
        outputs = []
        async for output in client.stream(request):
            outputs.append(output)
            if len(outputs) == 2:
                client.abort("cut")
        return outputs

    outputs = asyncio.run(run())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert len(outputs) < 80
    assert core.blocks.usage == 0.0


def test_stats_and_health_through_the_protocol(client, core):
    assert client.health() == EngineHealth(running=False, error=None)  # not started yet
    before = client.stats()
    asyncio.run(_run(client, client.make_request(PROMPT, SamplingParams(max_tokens=3, **GREEDY))))
    assert client.health() == EngineHealth(running=True, error=None)
    after = client.stats()
    assert after.generation_tokens - before.generation_tokens == 3
    assert after.prompt_tokens - before.prompt_tokens == len(PROMPT)
    assert (after.num_requests_running, after.num_requests_waiting, after.kv_cache_usage_perc) == (0, 0, 0.0)
    client.shutdown()
    assert client.health().running is False


def test_kv_events_are_drained_through_the_protocol(client, core):
    core.blocks.take_events()  # events of this module's earlier tests: not this test's subject
    salt = "kv-events-test"  # a prefix no earlier test cached, so both pages are stored anew

    async def run():
        async with contextlib.aclosing(client.kv_events()) as events:
            request = client.make_request(PROMPT, SamplingParams(max_tokens=5, **GREEDY), cache_salt=salt)
            outputs = await _run(client, request)
            seen = [await asyncio.wait_for(anext(events), 5) for _ in range(2)]
        return outputs, seen

    outputs, seen = asyncio.run(run())
    generated = tuple(t for o in outputs for t in o.outputs[0].token_ids)
    k0 = block_key(ROOT_KEY, PROMPT[:4], "tiny", "", salt)
    k1 = block_key(k0, PROMPT[4:], "tiny", "", salt)
    k2 = block_key(k1, generated[:4], "tiny", "", salt)
    # The prefill stores the prompt's two pages; the fourth decode fills the third page
    # (8 prompt + 4 fed-back tokens = 12 computed; the 5th sampled token is never computed).
    assert seen == [BlockStored((k0, k1), ROOT_KEY, tuple(PROMPT), 4), BlockStored((k2,), k1, generated[:4], 4)]
    assert core.blocks.take_events() == []  # the stream drained the ring


def test_request_timings_are_monotonic_until_the_edge_dates_them(client):
    started = time.monotonic()
    outputs = asyncio.run(_run(client, client.make_request(PROMPT, SamplingParams(max_tokens=3, **GREEDY))))
    timings = outputs[-1].timings
    assert started <= timings.arrival_time <= timings.first_token_time <= timings.finished_time <= time.monotonic()
    dated = timings.to_wall_clock()
    assert abs(dated.finished_time - time.time()) < 5.0  # a date now, not seconds since boot
    assert dated.e2e_seconds == pytest.approx(timings.e2e_seconds, abs=1e-6)
    assert dated.inter_token_seconds == pytest.approx(timings.inter_token_seconds, abs=1e-6)
    assert dated.arrival_time - timings.arrival_time == pytest.approx(time.time() - time.monotonic(), abs=1e-3)
    assert len(dated.token_times) == 3 and timings.token_times[0] >= started  # the original stays monotonic
