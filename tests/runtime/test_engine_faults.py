"""Faults inside an engine step (runtime/faults.py): the step's requests fail, others go on; a
fault that took the KV cache rebuilds the cache and the compiled step; one the engine cannot
recover from raises EngineUnrecoverable. Injected with the test-only switch."""

import pytest

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.faults import EngineUnrecoverable, FaultInjector
from runtime.request import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def engine(checkpoint):
    # One seat: a second request waits outside the step that faults.
    config = EngineConfig(block_size=16, num_blocks=32, max_num_seqs=1, max_num_batched_tokens=16,
                          max_model_len=128, token_buckets=(16,), model_id="faults")
    engine = Engine.from_model_dir(checkpoint("llama"), config=config)
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def reference(engine) -> list[int]:
    request = engine.add_request(PROMPT, GREEDY)
    return engine.run_to_completion()[request.request_id][0].token_ids


def test_a_failed_step_fails_only_its_own_requests(engine, reference):
    running = engine.add_request([7, 8, 9], GREEDY, trace_id="http-running")
    waiting = engine.add_request(PROMPT, GREEDY)
    assert [o.request_id for o in engine.step()] == [running.request_id]
    engine.faults.arm("step")
    failed = engine.step()
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in failed] == [
        (running.request_id, True, "error")]
    assert failed[0].error == "the engine step computing this request failed (InjectedFault)"
    assert engine.counters.step_faults == 1 and engine.counters.reinitialisations == 0
    assert engine.run_to_completion()[waiting.request_id][0].token_ids == reference
    assert engine.blocks.num_free_blocks == 32 and not engine.has_unfinished()


def test_a_fault_that_took_the_cache_reinitialises_the_engine(engine, reference):
    doomed = engine.add_request(PROMPT, GREEDY)
    engine.faults.arm("device")
    [failed] = engine.step()
    assert (failed.request_id, failed.error is not None) == (doomed.request_id, True)
    assert engine.counters.reinitialisations == 1 and engine.runner.cache_intact()
    after = engine.add_request(PROMPT, GREEDY)
    assert engine.run_to_completion()[after.request_id][0].token_ids == reference
    assert engine.stats().engine_step_faults == 2 and engine.stats().engine_reinitialisations == 1


def test_the_switch_is_off_unless_the_process_turned_it_on():
    with pytest.raises(RuntimeError, match="TESSERA_FAULT_INJECTION=1"):
        FaultInjector(enabled=False).arm("step")


def test_a_fault_the_engine_cannot_recover_from_is_unrecoverable(engine):
    """Last in this module: the engine stays dead."""
    engine.add_request(PROMPT, GREEDY)
    engine.faults.arm("dead")
    with pytest.raises(EngineUnrecoverable, match="could not be reinitialised"):
        engine.step()
