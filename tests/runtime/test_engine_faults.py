"""Faults inside an engine step (runtime/faults.py): the step's requests fail, others go on; a
fault that took the KV cache rebuilds the cache and the compiled step; one the engine cannot
recover from raises EngineUnrecoverable. Injected with the test-only switch, with steps in
series and overlapped (where a step's outputs come back one step() call later)."""

import pytest

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.faults import EngineUnrecoverable, FaultInjector
from runtime.request import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module", params=[False, True], ids=["series", "overlapped"])
def engine(checkpoint, request):
    # One seat: a second request waits outside the step that faults.
    config = EngineConfig(block_size=16, num_blocks=32, max_num_seqs=1, max_num_batched_tokens=16,
                          max_model_len=128, token_buckets=(16,), model_id="faults", async_scheduling=request.param)
    engine = Engine.from_model_dir(checkpoint("llama"), config=config)
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def reference(engine) -> list[int]:
    request = engine.add_request(PROMPT, GREEDY)
    return engine.run_to_completion()[request.request_id][0].token_ids


def _step_until_an_error(engine) -> list:
    """Step until an output carries an error (with overlap it may come a step() later)."""
    outputs = []
    while not any(o.error for o in outputs):
        assert engine.has_unfinished()
        outputs += engine.step()
    return outputs


def test_a_failed_step_fails_only_its_own_requests(engine, reference):
    running = engine.add_request([7, 8, 9], GREEDY, trace_id="http-running")
    waiting = engine.add_request(PROMPT, GREEDY)
    engine.step()
    engine.faults.arm("step")
    outputs = _step_until_an_error(engine)
    failed = [o for o in outputs if o.error]
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in failed] == [
        (running.request_id, True, "error")]
    assert failed[0].error == "the engine step computing this request failed (InjectedFault)"
    assert {o.request_id for o in outputs} == {running.request_id}
    assert engine.counters.step_faults == 1 and engine.counters.reinitialisations == 0
    assert engine.run_to_completion()[waiting.request_id][0].token_ids == reference
    assert engine.blocks.num_free_blocks == 32 and not engine.has_unfinished()


def test_a_fault_that_took_the_cache_reinitialises_the_engine(engine, reference):
    doomed = engine.add_request(PROMPT, GREEDY)
    engine.faults.arm("device")
    [failed] = _step_until_an_error(engine)
    assert (failed.request_id, failed.error is not None) == (doomed.request_id, True)
    assert engine.counters.reinitialisations == 1 and engine.runner.cache_intact()
    after = engine.add_request(PROMPT, GREEDY)
    assert engine.run_to_completion()[after.request_id][0].token_ids == reference
    assert engine.stats().engine_step_faults == 2 and engine.stats().engine_reinitialisations == 1


def test_a_step_that_fails_when_read_back_fails_its_requests_and_undoes_the_next(engine, reference):
    """With overlap the step after the failed one is already dispatched: its sequences are
    recomputed, and the request that was only in it loses nothing."""
    doomed = engine.add_request(PROMPT, GREEDY)
    engine.step()
    engine.faults.arm("readback")
    later = engine.add_request(PROMPT, GREEDY)
    [failed] = _step_until_an_error(engine)
    assert (failed.request_id, failed.outputs[0].finish_reason) == (doomed.request_id, "error")
    assert engine.run_to_completion()[later.request_id][0].token_ids == reference
    assert engine.blocks.num_free_blocks == 32 and not engine.has_unfinished()
    assert engine.stats().engine_step_faults == 3


def test_the_switch_is_off_unless_the_process_turned_it_on():
    with pytest.raises(RuntimeError, match="TESSERA_FAULT_INJECTION=1"):
        FaultInjector(enabled=False).arm("step")


def test_a_fault_the_engine_cannot_recover_from_is_unrecoverable(engine):
    """Last in this module: the engine stays dead."""
    engine.add_request(PROMPT, GREEDY)
    engine.faults.arm("dead")
    with pytest.raises(EngineUnrecoverable, match="could not be reinitialised"):
        engine.step()


def test_a_request_only_in_the_undone_step_is_recomputed_exactly(checkpoint, reference):
    """Overlapped, two seats: step N computes A, step N+1 (in flight when N fails on read-back)
    also admits B. A fails; B is recomputed and its output is the fault-free one."""
    config = EngineConfig(block_size=16, num_blocks=32, max_num_seqs=2, max_num_batched_tokens=16,
                          max_model_len=128, token_buckets=(16,), model_id="faults-2", async_scheduling=True)
    engine = Engine.from_model_dir(checkpoint("llama"), config=config)
    a = engine.add_request([7, 8, 9], GREEDY)
    assert engine.step() == []  # dispatched, nothing read back yet
    b = engine.add_request(PROMPT, GREEDY)
    engine.faults.arm("readback")
    [failed] = engine.step()  # dispatches A's decode and B's prompt, then reads A's prompt step back
    assert (failed.request_id, failed.outputs[0].finish_reason) == (a.request_id, "error")
    b_seq = b.sequences[0]
    assert (b_seq.num_computed_tokens, b_seq.num_preemptions, b_seq.token_ids) == (0, 1, PROMPT)
    assert engine.run_to_completion()[b.request_id][0].token_ids == reference
    assert engine.blocks.num_free_blocks == 32 and not engine.has_unfinished()
