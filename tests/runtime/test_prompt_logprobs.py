"""Prompt logprobs (vLLM's `prompt_logprobs`) from the prefill pass, against transformers."""

import numpy as np
import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.outputs import RequestOutput
from runtime.request import SamplingParams
from tests.helpers.tiny_checkpoint import load_reference

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(checkpoint):
    # An 8-token budget splits a 21-token prompt into three chunks; overlapped scheduling (the
    # default) is the harder case: the prompt's last chunk samples a token that stays on the device.
    config = EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=8, token_buckets=(8,),
                          num_blocks=64)
    return Engine.from_model_dir(checkpoint("llama"), config=config)


@pytest.fixture(scope="module")
def reference(checkpoint):
    hf = load_reference(checkpoint("llama"))

    def log_softmax(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1).numpy()

    return log_softmax


def _outputs(engine: Engine, request_id: str, prompt: list[int], **params) -> list[RequestOutput]:
    engine.add_request(prompt, SamplingParams(**params), request_id=request_id)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def _prompt_logprobs(outputs: list[RequestOutput]):
    given = [o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None]
    assert len(given) == 1, "prompt logprobs come once"
    return given[0]


PROMPT = np.random.RandomState(7).randint(0, 500, size=21).tolist()


def _check_against(reference, prompt, lps, top: int) -> None:
    ref = reference(prompt)
    assert lps[0] is None and len(lps) == len(prompt)
    for j in range(1, len(prompt)):
        row = ref[j - 1]
        lp = lps[j]
        assert lp.token_id == prompt[j]
        np.testing.assert_allclose(lp.logprob, row[prompt[j]], atol=1e-3)
        assert lp.rank == 1 + int((row > row[prompt[j]]).sum())
        assert [t for t, _ in lp.top] == np.argsort(-row, kind="stable")[:top].tolist()
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:top], atol=1e-3)


def test_chunked_prompt_logprobs_match_transformers(engine, reference):
    outputs = _outputs(engine, "a", PROMPT, max_tokens=3, prompt_logprobs=3, logprobs=1, **GREEDY)
    _check_against(reference, PROMPT, _prompt_logprobs(outputs), top=3)
    # The sampled tokens are the same as without prompt logprobs: the sampler saw the same logits.
    plain = _outputs(engine, "b", PROMPT, max_tokens=3, **GREEDY)
    assert [t for o in outputs for c in o.outputs for t in c.token_ids] == \
           [t for o in plain for c in o.outputs for t in c.token_ids]


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(engine, reference):
    prompt = PROMPT[:13] + [5, 6, 7]
    _outputs(engine, "warm", prompt, max_tokens=1, **GREEDY)  # its full pages enter the prefix cache
    queries, hits = engine.blocks.stats.queries, engine.blocks.stats.hits
    outputs = _outputs(engine, "again", prompt, max_tokens=2, prompt_logprobs=0, n=2, **GREEDY)
    _check_against(reference, prompt, _prompt_logprobs(outputs), top=0)
    stats = engine.blocks.stats
    # Sample 0 skipped the cache (it needs every logit); sample 1 reused sample 0's pages.
    assert stats.queries - queries == 2 * len(prompt) and stats.hits - hits == 12
    assert outputs[-1].finished and not engine._prompt_logprobs


def test_prompt_logprobs_are_checked():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
