"""`tessera worker` in its own process, driven through the gRPC `EngineClient` (serving/remote_engine.py)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.block_manager import ROOT_KEY, BlockStored, block_key
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.engine_client import EngineClient
from runtime.request import Request, SamplingParams
from serving.default_model import resolve_model
from serving.remote_engine import RemoteEngine, WorkerLostError, remote_engine
from serving.worker import channel_credentials
from tests.helpers.certs import make_certs
from tests.helpers.cluster import WORKER_ENV, start_worker

PROMPTS = ["Once upon a time", "The little dog ran to the", "She opened the door and saw"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def worker():
    handle = start_worker(None)  # the demo model
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def local_engine() -> Engine:
    """The same model and settings in this process: the reference outputs."""
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_blocks=128,
                          token_buckets=(8, 64), model_id="demo")
    return Engine.from_model_dir(resolve_model(None), config=config)


def run(coroutine):
    return asyncio.run(coroutine)


async def _collect(engine: EngineClient, request: Request) -> tuple[list[int], str, list]:
    tokens, text, logprobs, finish = [], "", [], None
    async for output in engine.stream(request):
        out = output.outputs[0]
        tokens += out.token_ids
        text += out.text
        logprobs += out.logprobs or []
        finish = out.finish_reason
    return tokens, text, finish, logprobs


def test_the_handshake_gives_the_models_facts_and_tokenizer(worker, local_engine):
    async def go():
        async with remote_engine(worker.address) as remote:
            assert isinstance(remote, EngineClient)
            assert remote.model_id == "demo" and remote.max_model_len == 256 and remote.max_num_seqs == 8
            limits = remote.limits
            assert (limits.vocab_size, limits.num_blocks, limits.block_size) == (4096, 128, 16)
            assert limits.eos_token_ids == frozenset({4093, 4095})
            assert remote.tokenizer.encode(PROMPTS[1]) == local_engine.tokenizer.encode(PROMPTS[1])
            assert remote.generation_defaults == local_engine.generation_defaults
            assert remote.health().running and remote.health().error is None

    run(go())


def test_greedy_outputs_and_logprobs_match_the_in_process_engine(worker, local_engine):
    expected = {}
    for i, prompt in enumerate(PROMPTS):
        local_engine.add_request(prompt, SamplingParams(**{**_fields(GREEDY), "logprobs": 2}), request_id=str(i))
    done = local_engine.run_to_completion()
    for i in range(len(PROMPTS)):
        expected[i] = done[str(i)][0]

    async def go():
        async with remote_engine(worker.address) as remote:
            params = SamplingParams(**{**_fields(GREEDY), "logprobs": 2})
            requests = [remote.make_request(p, params, request_id=f"g{i}") for i, p in enumerate(PROMPTS)]
            return await asyncio.gather(*(_collect(remote, r) for r in requests))

    results = run(go())
    for i, (tokens, text, finish, logprobs) in enumerate(results):
        assert tokens == expected[i].token_ids and len(tokens) == 12
        assert text == expected[i].text and finish == "length"
        assert [lp.token_id for lp in logprobs] == tokens
        assert all(len(lp.top) == 2 for lp in logprobs)
        assert logprobs[0].logprob == pytest.approx(expected[i].logprobs[0].logprob, abs=1e-4)


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def test_bad_requests_are_refused_with_the_engines_message(worker, local_engine):
    async def go():
        async with remote_engine(worker.address) as remote:
            too_long = SamplingParams(max_tokens=255)
            with pytest.raises(ValueError) as remote_error:
                remote.make_request(PROMPTS[0], too_long)
            with pytest.raises(ValueError) as local_error:
                local_engine.make_request(PROMPTS[0], too_long)
            assert str(remote_error.value) == str(local_error.value)
            assert "max_tokens=255 is too large" in str(remote_error.value)
            # Past the client's check (a hand-made request): the worker's own check answers INVALID_ARGUMENT.
            sneaky = Request("sneaky", [5, 99999], SamplingParams(max_tokens=2))
            with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 4096\)"):
                async for _ in remote.stream(sneaky):
                    pass

    run(go())


def test_closing_the_stream_aborts_the_request_on_the_worker(worker):
    async def go():
        async with remote_engine(worker.address) as remote:
            request = remote.make_request(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
            async with contextlib.aclosing(remote.stream(request)) as outputs:
                async for output in outputs:
                    assert output.outputs[0].token_ids
                    break
            for _ in range(40):  # the worker frees it within a few steps
                stats = await remote.poll_stats()
                if stats.num_requests_running == 0 and stats.num_in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert stats.num_requests_running == 0 and stats.num_requests_waiting == 0
            assert stats.num_in_flight == 0 and stats.kv_cache_usage_perc == 0.0
            assert stats.generation_tokens < 150  # stopped long before its 200 tokens

    run(go())


def test_kv_events_carry_the_chained_keys_of_the_prompts_blocks(worker):
    async def go():
        async with remote_engine(worker.address) as remote:
            events = remote.kv_events()
            first = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0)
            ids = list(range(100, 140))  # 40 tokens: two full blocks of 16
            request = remote.make_request(ids, SamplingParams(max_tokens=1, temperature=0), cache_salt="kv-test")
            await _collect(remote, request)
            seen: list[bytes] = []
            event = await asyncio.wait_for(first, 10)
            while True:
                if isinstance(event, BlockStored):
                    seen += event.keys
                key1 = block_key(ROOT_KEY, ids[:16], "demo", "", "kv-test")
                if block_key(key1, ids[16:32], "demo", "", "kv-test") in seen:
                    break
                event = await asyncio.wait_for(anext(events), 10)
            await events.aclose()
            assert key1 in seen

    run(go())


def test_the_standard_health_service_reports_serving(worker):
    async def go():
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tessera.v1.Worker"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

    run(go())


def test_a_dead_worker_is_a_worker_lost_error(worker):
    async def go():
        remote = RemoteEngine("127.0.0.1:1")  # nothing listens there
        with pytest.raises(WorkerLostError, match="DEADLINE_EXCEEDED"):  # it waited for the worker
            await remote.connect(timeout=1)
        await remote.close()

    run(go())


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path):
    certs = make_certs(tmp_path)
    handle = start_worker(None, env={"TESSERA_GRPC_TLS_CERT": certs["server_cert"],
                                     "TESSERA_GRPC_TLS_KEY": certs["server_key"], "TESSERA_GRPC_TLS_CA": certs["ca"],
                                     "TESSERA_WARM_UP": "false"})
    try:
        async def go():
            good = channel_credentials(certs["ca"], certs["client_cert"], certs["client_key"])
            async with remote_engine(handle.address, credentials=good) as remote:
                request = remote.make_request(PROMPTS[0], GREEDY)
                tokens, *_ = await _collect(remote, request)
                assert len(tokens) == 12
            anonymous = channel_credentials(certs["ca"], None, None)
            stranger = RemoteEngine(handle.address, credentials=anonymous)
            with pytest.raises(WorkerLostError):
                await stranger.connect(timeout=3)
            await stranger.close()
            plaintext = RemoteEngine(handle.address)
            with pytest.raises(WorkerLostError):
                await plaintext.connect(timeout=3)
            await plaintext.close()

        run(go())
    finally:
        handle.stop()
