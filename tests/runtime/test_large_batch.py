"""256 sequences in one batch: the scheduler seats them all, the runner's buckets hold their rows,
and every request's greedy tokens are the ones transformers generates for it alone."""

import numpy as np
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams
from tests.helpers.tiny_checkpoint import load_reference

CONCURRENT, NEW = 256, 5


def test_256_concurrent_short_requests_run_together_and_match_transformers(checkpoint):
    folder = checkpoint("llama")
    engine = Engine.from_model_dir(folder, config=EngineConfig(
        block_size=16, num_blocks=CONCURRENT, max_num_seqs=CONCURRENT, max_num_batched_tokens=512,
        token_buckets=(CONCURRENT, 512), enable_prefix_caching=False))
    assert engine.runner.rows_for(CONCURRENT) == CONCURRENT  # a decode step of 256 tokens has a row for each
    rng = np.random.RandomState(23)
    prompts = [rng.randint(0, 500, size=rng.randint(3, 9)).tolist() for _ in range(CONCURRENT)]
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True), request_id=f"r{i}")
    done, most_running, decode_steps_of_all = {f"r{i}": [] for i in range(CONCURRENT)}, 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] += out.outputs[0].token_ids  # each step's new tokens
        running = len(engine.scheduler.running)
        most_running = max(most_running, running)
        decode_steps_of_all += engine.counters.last_step_tokens == CONCURRENT and running == CONCURRENT
    assert most_running == CONCURRENT
    # Prompts arrive over the first steps (a 512-token budget), so only the middle of the run is
    # a decode for all 256 at once; it happens.
    assert decode_steps_of_all >= 1
    hf = load_reference(folder)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
        assert done[f"r{i}"] == want[0, len(p):].tolist(), f"request {i}"
    assert engine.blocks.usage == 0.0
