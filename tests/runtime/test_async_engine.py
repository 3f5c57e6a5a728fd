"""AsyncEngine: streams from a step loop on its own thread; a consumer that leaves aborts."""

import asyncio
import json
import logging

import pytest

from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams
from serving.cli import main

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def async_engine(checkpoint):
    engine = Engine.from_model_dir(
        checkpoint("llama"), config=EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4,
                                                  max_num_batched_tokens=32, token_buckets=(4, 32))
    )
    front = AsyncEngine(engine)
    yield front
    front.shutdown()


async def _collect(front, prompt, params, **kw):
    outputs = [o async for o in front.generate(prompt, params, **kw)]
    return outputs, [t for o in outputs for t in o.outputs[0].token_ids]


def test_concurrent_streams_equal_the_synchronous_engine(async_engine):
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300], [42] * 20]
    params = SamplingParams(max_tokens=7, **GREEDY)

    async def run_all():
        return await asyncio.gather(*[_collect(async_engine, p, params, request_id=f"s{i}") for i, p in enumerate(prompts)])

    results = asyncio.run(run_all())
    sync = async_engine.engine.__class__(async_engine.engine.model, async_engine.engine.tokenizer, async_engine.engine.config)
    for i, p in enumerate(prompts):
        sync.add_request(p, params, request_id=f"s{i}")
    expected = sync.run_to_completion()
    for i, (outputs, tokens) in enumerate(results):
        assert tokens == expected[f"s{i}"][0].token_ids
        assert len(outputs) == 7  # one output per token: streamed, not batched at the end
        assert [o.finished for o in outputs] == [False] * 6 + [True]


def test_a_consumer_that_leaves_aborts_its_request(async_engine):
    async def leave_early():
        stream = async_engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=200, **GREEDY), request_id="leaver")
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):  # the abort reaches the loop thread within a step
            if not async_engine.engine.has_unfinished():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(leave_early())
    assert async_engine.engine.blocks.usage == 0.0
    assert async_engine.num_in_flight == 0


def test_bad_request_raises_in_the_caller_and_others_continue(async_engine):
    async def run():
        good = asyncio.ensure_future(_collect(async_engine, [9, 8, 7], SamplingParams(max_tokens=5, **GREEDY)))
        with pytest.raises(ValueError, match="top_p=2.0"):
            SamplingParams(top_p=2.0)
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in async_engine.generate([], SamplingParams()):
                pass
        return await good

    outputs, tokens = asyncio.run(run())
    assert len(tokens) == 5 and outputs[-1].outputs[0].finish_reason == "length"


def test_prompts_file_runs_many_prompts_at_once(checkpoint, tmp_path, capsys, caplog, monkeypatch):
    folder = checkpoint("llama")
    lines = [
        {"id": "a", "prompt": "The server reads", "max_tokens": 5, "ignore_eos": True},
        {"id": "b", "prompt_token_ids": [5, 6, 7], "max_tokens": 3, "ignore_eos": True},
        {"prompt": "Paged attention", "max_tokens": 4, "ignore_eos": True, "n": 2, "temperature": 1.0, "seed": 3},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    # The plan's choices as flags, and a variable as the alias of one (TESSERA_CPU_LINEAR=0: --linear xla).
    monkeypatch.setenv("TESSERA_CPU_LINEAR", "0")
    with caplog.at_level(logging.INFO, logger="runtime.engine"):
        assert main(["generate", "--model", str(folder), "--prompts-file", str(path), "--attention", "reference"]) == 0
    assert "attention=reference linear=xla fused=true" in caplog.text
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["index"], len(r["token_ids"])) for r in rows] == [("a", 0, 5), ("b", 0, 3), ("3", 0, 4), ("3", 1, 4)]
    assert all(r["finish_reason"] == "length" for r in rows)


def test_prompts_file_error_names_the_line(checkpoint, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "x", "top_p": 3}\n')
    assert main(["generate", "--model", str(checkpoint("llama")), "--prompts-file", str(path)]) == 2
    assert "bad.jsonl:2: top_p=3 must be in (0, 1]" in capsys.readouterr().err
