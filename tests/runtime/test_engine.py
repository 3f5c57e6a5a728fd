"""The engine end to end on tiny random checkpoints, against transformers."""

import numpy as np
import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams
from tests.helpers.compiles import count_compiles
from tests.helpers.tiny_checkpoint import load_reference

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _engine(folder, **config) -> Engine:
    defaults = dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=32, token_buckets=(8, 32))
    return Engine.from_model_dir(folder, config=EngineConfig(**{**defaults, **config}))


def _hf_greedy(hf, prompt: list[int], new_tokens: int, **kw) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kw,
        )
    return out[0, len(prompt) :].tolist()


def _prompts(count: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 500, size=rng.randint(lo, hi)).tolist() for _ in range(count)]


@pytest.mark.parametrize("overlap", [False, True], ids=["series", "overlapped"])
def test_24_prompts_with_chunked_prefill_and_preemption_match_transformers(checkpoint, overlap):
    folder = checkpoint("llama")
    engine = _engine(folder, num_blocks=40, async_scheduling=overlap)  # 160 slots for 24 prompts of up to 60 + 12 tokens
    prompts = _prompts(24, seed=0)
    assert max(len(p) for p in prompts) > 32  # longer than the step budget: chunked
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=12, **GREEDY), request_id=f"r{i}")
    done = engine.run_to_completion()
    assert engine.scheduler.num_preemptions > 0
    hf = load_reference(folder)
    for i, p in enumerate(prompts):
        assert done[f"r{i}"][0].token_ids == _hf_greedy(hf, p, 12), f"prompt {i}"
    assert engine.blocks.usage == 0.0  # every page came back


def _sampled(engine: Engine, crowd: int) -> list[int]:
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    engine.add_request(_prompts(1, seed=5)[0], params, request_id="target")
    for i, p in enumerate(_prompts(crowd, seed=6)):
        other = SamplingParams(max_tokens=int(4 + i % 9), temperature=1.0 + i / 10, seed=i, ignore_eos=True)
        engine.add_request(p, other, request_id=f"other{i}")
    return engine.run_to_completion()["target"][0].token_ids


def test_seeded_request_is_the_same_alone_and_among_15_others_in_two_runs(checkpoint):
    folder = checkpoint("qwen2")
    first_alone = _sampled(_engine(folder, max_num_seqs=16, max_num_batched_tokens=64, token_buckets=(16, 64)), 0)
    for _ in range(2):
        engine = _engine(folder, max_num_seqs=16, max_num_batched_tokens=64, token_buckets=(16, 64))
        assert _sampled(engine, 0) == first_alone
        assert _sampled(engine, 15) == first_alone
    assert len(set(first_alone)) > 3  # really sampled, not a constant


def test_shared_prefix_computes_only_uncached_tokens(checkpoint):
    folder = checkpoint("llama")
    prefix = _prompts(1, seed=7, lo=12, hi=13)[0]  # 3 pages of 4 tokens
    first, second = prefix + [11, 12, 13], prefix + [21, 22]
    params = SamplingParams(max_tokens=5, **GREEDY)

    engine = _engine(folder)
    engine.add_request(first, params, request_id="first")
    engine.run_to_completion()
    computed_before = engine.counters.computed_tokens
    engine.add_request(second, params, request_id="second")
    cached = engine.run_to_completion()["second"][0].token_ids
    assert engine.scheduler.requests == {}
    assert engine.counters.computed_tokens - computed_before == (len(second) - 12) + (5 - 1)
    assert engine.blocks.stats.hits == 12
    assert engine.blocks.stats.queries == len(first) + len(second)

    cold = _engine(folder, enable_prefix_caching=False)
    cold.add_request(second, params, request_id="second")
    assert cold.run_to_completion()["second"][0].token_ids == cached
    assert cold.blocks.stats.hits == 0


def test_a_flooding_tenant_does_not_starve_another(checkpoint):
    engine = _engine(checkpoint("llama"), max_num_seqs=4)
    params = SamplingParams(max_tokens=8, **GREEDY)
    for i, p in enumerate(_prompts(50, seed=8, lo=4, hi=10)):
        engine.add_request(p, params, request_id=f"A{i}", tenant="A")
    engine.step()
    for i, p in enumerate(_prompts(2, seed=9, lo=4, hi=10)):
        engine.add_request(p, params, request_id=f"B{i}", tenant="B")
    finished_order = []
    while engine.has_unfinished():
        finished_order += [o.request_id for o in engine.step() if o.finished]
    a_finished = [r for r in finished_order if r.startswith("A")]
    tenth_a = finished_order.index(a_finished[9])
    assert finished_order.index("B0") < tenth_a and finished_order.index("B1") < tenth_a


def test_no_compilation_after_warm_up(checkpoint):
    engine = _engine(checkpoint("qwen3"), num_blocks=64)
    engine.warm_up()
    mixes = [
        SamplingParams(max_tokens=6, **GREEDY),
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(max_tokens=7, temperature=1.0, top_k=5, min_p=0.05, logprobs=5, seed=2),
        SamplingParams(max_tokens=5, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, seed=3),
        SamplingParams(max_tokens=8, min_tokens=4, n=2, seed=4),
    ]
    with count_compiles() as compiles:
        for i, p in enumerate(_prompts(12, seed=10, lo=2, hi=50)):
            engine.add_request(p, mixes[i % len(mixes)], request_id=f"r{i}")
        engine.run_to_completion()
    assert engine.counters.steps > 10
    assert compiles() == 0


@pytest.mark.parametrize(
    "prompt_len, params, message",
    [
        (256, dict(max_tokens=1), "prompt has 256 tokens; the model's context is 256 tokens"),
        (10, dict(max_tokens=250), "max_tokens=250 is too large"),
        (10, dict(max_tokens=0), "max_tokens=0 must be an integer >= 1"),
        (10, dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (10, dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (10, dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
        (10, dict(logprobs=21), r"logprobs=21 must be in \[0, 20\]"),
        (10, dict(n=17), r"n=17 must be an integer in \[1, 16\]"),
        (10, dict(n=9), "n=9 is larger than max_num_seqs=8"),
        (10, dict(stop_token_ids=(5, 520)), r"stop_token_ids=\[520\] are outside the vocabulary \[0, 520\)"),
        (0, dict(), "prompt is empty"),
    ],
)
def test_bad_parameters_are_refused_and_a_good_request_is_unaffected(checkpoint, prompt_len, params, message):
    folder = checkpoint("llama")
    engine = _engine(folder)
    good_prompt = _prompts(1, seed=11)[0]
    engine.add_request(good_prompt, SamplingParams(max_tokens=6, **GREEDY), request_id="good")
    while not (first := engine.step()):
        pass  # the good request is mid-flight (prompt computed, first token out) when the bad one arrives
    with pytest.raises(ValueError, match=message):
        engine.add_request([7] * prompt_len, SamplingParams(**params), request_id="bad")
    done = engine.run_to_completion()
    tokens = first[0].outputs[0].token_ids + done["good"][0].token_ids
    assert tokens == _hf_greedy(load_reference(folder), good_prompt, 6)
    assert "bad" not in done


@pytest.fixture(scope="module", params=[False, True], ids=["series", "overlapped"])
def llama_engine(checkpoint, request):
    return _engine(checkpoint("llama"), num_blocks=128, async_scheduling=request.param)


def _run(engine: Engine, prompt, **params):
    engine.add_request(prompt, SamplingParams(**params), request_id="x")
    return engine.run_to_completion()["x"]


def test_stop_strings_end_the_text_and_are_left_out(llama_engine):
    prompt = llama_engine.tokenizer.encode("The server reads a request")
    full = _run(llama_engine, prompt, max_tokens=24, **GREEDY)[0]
    stop = full.text[10:13]
    assert full.text.find(stop) == 10
    cut = _run(llama_engine, prompt, max_tokens=24, stop=(stop, "never appears"), **GREEDY)[0]
    assert cut.text == full.text[:10]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = _run(llama_engine, prompt, max_tokens=24, stop=(stop,), include_stop_str_in_output=True, **GREEDY)[0]
    assert kept.text == full.text[:13]


def test_stop_token_ids_and_min_tokens(llama_engine):
    prompt = _prompts(1, seed=12)[0]
    greedy = _run(llama_engine, prompt, max_tokens=10, **GREEDY)[0].token_ids
    stop_token = greedy[2]
    out = _run(llama_engine, prompt, max_tokens=10, stop_token_ids=(stop_token,), **GREEDY)[0]
    assert out.token_ids == greedy[: greedy.index(stop_token) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)
    # min_tokens bans the stop token until 6 tokens exist: the output differs from greedy there.
    late = _run(llama_engine, prompt, max_tokens=10, stop_token_ids=(stop_token,), min_tokens=6, **GREEDY)[0]
    assert len(late.token_ids) >= 6 and stop_token not in late.token_ids[:6]
    assert late.finish_reason in ("stop", "length")


def test_logprobs_match_transformers(llama_engine, checkpoint):
    prompt = _prompts(1, seed=13)[0]
    out = _run(llama_engine, prompt, max_tokens=4, logprobs=5, **GREEDY)[0]
    hf = load_reference(checkpoint("llama"))
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1).numpy()
    for i, lp in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == out.token_ids[i] == int(row.argmax())
        np.testing.assert_allclose(lp.logprob, row[lp.token_id], atol=1e-4)
        assert [t for t, _ in lp.top] == np.argsort(-row)[:5].tolist()
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:5], atol=1e-4)


def test_repetition_penalty_matches_transformers(llama_engine, checkpoint):
    prompt = _prompts(1, seed=14)[0]
    out = _run(llama_engine, prompt, max_tokens=12, repetition_penalty=1.3, **GREEDY)[0]
    assert out.token_ids == _hf_greedy(load_reference(checkpoint("llama")), prompt, 12, repetition_penalty=1.3)
    assert out.token_ids != _run(llama_engine, prompt, max_tokens=12, **GREEDY)[0].token_ids


def test_n_samples_share_the_prompt(llama_engine):
    prompt = _prompts(1, seed=15, lo=40, hi=41)[0]  # 10 pages of 4
    computed = llama_engine.counters.computed_tokens
    out = _run(llama_engine, prompt, max_tokens=6, temperature=1.0, seed=3, n=3, ignore_eos=True)
    assert sorted(out) == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.values()}) == 3
    # Sample 0 computes the prompt; samples 1 and 2 reuse its 9 full pages (36 tokens) and
    # recompute only the last 4 prompt tokens.
    assert llama_engine.counters.computed_tokens - computed == 40 + 2 * 4 + 3 * 5


def test_mixed_workload_with_aborts_is_the_same_in_series_and_overlapped(checkpoint):
    """Stop strings, stop tokens, EOS, max_tokens, n > 1, penalties and aborts mid stream, all in
    one batch: every request's tokens, text and finish reason match between the two modes."""
    folder = checkpoint("llama")
    prompts = _prompts(10, seed=21)
    runs = []
    for overlap in (False, True):
        engine = _engine(folder, num_blocks=60, async_scheduling=overlap)
        mixes = [
            dict(max_tokens=9, **GREEDY),
            dict(max_tokens=12, temperature=0.0, stop_token_ids=(25,)),
            dict(max_tokens=7, temperature=0.7, seed=5, n=3, ignore_eos=True),
            dict(max_tokens=10, temperature=0.0, stop=("e",), ignore_eos=True),
            dict(max_tokens=8, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
        ]
        engine.add_request(prompts[0][:5], SamplingParams(max_tokens=30, **GREEDY), request_id="aborted")
        for i, p in enumerate(prompts):
            engine.add_request(p, SamplingParams(**mixes[i % len(mixes)]), request_id=f"r{i}")
        seen: dict[tuple[str, int], list] = {}
        while engine.has_unfinished():
            for out in engine.step():
                for o in out.outputs:
                    seen.setdefault((out.request_id, o.index), []).append((o.token_ids, o.text, o.finish_reason))
            if len(seen.get(("aborted", 0), ())) == 3:  # its client goes away after 3 tokens
                for o in engine.abort("aborted").outputs:
                    seen[("aborted", 0)].append((o.token_ids, o.text, o.finish_reason))
        runs.append({key: ([t for ts, _, _ in parts for t in ts], "".join(x for _, x, _ in parts), parts[-1][2])
                     for key, parts in seen.items()})
    series, overlapped = runs
    assert overlapped == series
    assert sorted({reason for _, _, reason in series.values()}) == ["abort", "length", "stop"]
    assert len(series[("aborted", 0)][0]) == 3
    assert len(series[("r2", 0)][0]) == 7 and len({tuple(series[("r2", i)][0]) for i in range(3)}) == 3


def test_abort_frees_the_pages(llama_engine):
    llama_engine.add_request(_prompts(1, seed=16)[0], SamplingParams(max_tokens=50, **GREEDY), request_id="gone")
    llama_engine.step()
    assert llama_engine.blocks.usage > 0
    out = llama_engine.abort("gone")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert llama_engine.blocks.usage == 0.0 and not llama_engine.has_unfinished()
    assert llama_engine.abort("gone") is None
