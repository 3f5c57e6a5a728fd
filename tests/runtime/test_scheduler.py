"""Scheduler with a real BlockManager; the runner is simulated by `run_step`, which hands
`postprocess` a made-up token for every chunk that samples."""

import itertools
from collections import Counter

import pytest

from runtime.block_manager import BlockManager
from runtime.request import FinishReason, Request, SamplingParams, SequenceStatus
from runtime.scheduler import Scheduler, SchedulerLimits, SchedulerOutput

TOKEN = 7  # what the simulated model samples unless told otherwise


def make_scheduler(*, num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=1024,
                   chunked=True, prefix_caching=True) -> Scheduler:
    blocks = BlockManager(num_blocks, block_size, model_id="m", enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerLimits(max_num_seqs, budget, max_model_len, chunked), blocks)


_arrivals = itertools.count()
_prompt_bases = itertools.count(1000, 1000)


def make_request(request_id, prompt, *, max_tokens=4, priority=0, tenant="default", eos=(), **params) -> Request:
    if isinstance(prompt, int):  # a prompt of that many tokens, unique to this request
        base = next(_prompt_bases)
        prompt = [base + i for i in range(prompt)]
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, **params), priority=priority,
                   tenant=tenant, eos_token_ids=frozenset(eos), arrival_time=float(next(_arrivals)))


def run_step(sched: Scheduler, token=TOKEN) -> SchedulerOutput:
    out = sched.schedule()
    sched.postprocess(out, {c.seq.seq_id: token for c in out.chunks if c.samples})
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(request id[/sample], start, tokens) per chunk, in batch order."""
    def name(s):
        return s.request.request_id + (f"/{s.index}" if s.request.params.n > 1 else "")
    return [(name(c.seq), c.start, c.num_tokens) for c in out.chunks]


def ref_counts(sched: Scheduler, block_ids) -> list[int]:
    return [sched.blocks._blocks[b].ref_count for b in block_ids]


# -- budget and chunking -------------------------------------------------------------------


def test_long_prompt_is_chunked_to_the_budget():
    sched = make_scheduler(budget=16)
    request = make_request("long", 40)
    sched.add_request(request)
    steps = [chunks(run_step(sched)) for _ in range(4)]
    assert steps == [[("long", 0, 16)], [("long", 16, 16)], [("long", 32, 8)], [("long", 40, 1)]]
    seq = request.sequences[0]
    assert seq.output_token_ids == [TOKEN, TOKEN]  # the first token comes with the last chunk
    assert seq.num_computed_tokens == 41


def test_decodes_go_first_and_the_budget_is_never_exceeded():
    sched = make_scheduler(budget=16)
    for rid in ("d1", "d2"):
        sched.add_request(make_request(rid, 3, max_tokens=10))
    assert chunks(run_step(sched)) == [("d1", 0, 3), ("d2", 0, 3)]
    sched.add_request(make_request("p", 30))
    assert chunks(run_step(sched)) == [("d1", 3, 1), ("d2", 3, 1), ("p", 0, 14)]
    assert chunks(run_step(sched)) == [("d1", 4, 1), ("d2", 4, 1), ("p", 14, 14)]
    out = run_step(sched)
    assert chunks(out) == [("d1", 5, 1), ("d2", 5, 1), ("p", 28, 2)]
    assert out.num_tokens == 4


def test_decodes_beyond_the_budget_wait():
    sched = make_scheduler(budget=3, max_num_seqs=4)
    for rid in ("a", "b", "c", "d"):
        sched.add_request(make_request(rid, [5], max_tokens=5))
    assert chunks(run_step(sched)) == [("a", 0, 1), ("b", 0, 1), ("c", 0, 1)]
    assert chunks(run_step(sched)) == [("a", 1, 1), ("b", 1, 1), ("c", 1, 1)]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(budget=16, chunked=False)
    sched.add_request(make_request("a", 10))
    sched.add_request(make_request("b", 10))
    assert chunks(run_step(sched)) == [("a", 0, 10)]
    assert chunks(run_step(sched)) == [("a", 10, 1), ("b", 0, 10)]


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    for rid in ("a", "b", "c"):
        sched.add_request(make_request(rid, 3, max_tokens=2))
    assert chunks(run_step(sched)) == [("a", 0, 3), ("b", 0, 3)]
    assert [s.request.request_id for s in sched.waiting] == ["c"]
    assert chunks(run_step(sched)) == [("a", 3, 1), ("b", 3, 1)]  # both finish (2 tokens)
    assert sched.running == []
    assert chunks(run_step(sched)) == [("c", 0, 3)]


# -- preemption ------------------------------------------------------------------------------


def test_preemption_by_recompute_when_pages_run_out():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=32)
    a = make_request("a", 7, max_tokens=4)
    b = make_request("b", 7, max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    (sa,), (sb,) = a.sequences, b.sequences
    assert chunks(run_step(sched)) == [("a", 0, 7), ("b", 0, 7)]  # 2 pages each: the pool is full
    assert chunks(run_step(sched)) == [("a", 7, 1), ("b", 7, 1)]  # 8 tokens still fit in 2 pages

    out = run_step(sched)  # a's 9th token needs a third page: b, the latest arrival, gives its pages up
    assert chunks(out) == [("a", 8, 1)]
    assert out.preempted == [sb]
    assert sb.status is SequenceStatus.PREEMPTED
    assert (sb.num_computed_tokens, sb.block_ids, sb.num_preemptions) == (0, [], 1)
    assert sb.output_token_ids == [TOKEN, TOKEN]  # kept: recomputed, not thrown away
    assert sched.num_preemptions == 1
    assert sched.waiting == [sb] and sched.running == [sa]
    assert len(sa.block_ids) == 3

    out = run_step(sched)  # a finishes; b does not fit yet
    assert chunks(out) == [("a", 9, 1)]
    assert sa.finish_reason is FinishReason.LENGTH
    # b comes back: its first page is still in the prefix cache, the rest is recomputed,
    # generated tokens included, and the last chunk samples its third token.
    out = run_step(sched)
    assert chunks(out) == [("b", 4, 5)]
    assert sb.status is SequenceStatus.RUNNING
    assert sb.output_token_ids == [TOKEN] * 3
    assert sb.num_computed_tokens == 9
    assert chunks(run_step(sched)) == [("b", 9, 1)]
    assert sb.finish_reason is FinishReason.LENGTH
    assert sched.blocks.num_free_blocks == 4


def test_the_least_important_running_sequence_is_preempted():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=32)
    low = make_request("low", 7, priority=5)  # arrives first, but matters less
    high = make_request("high", 7, priority=0)
    sched.add_request(low)
    sched.add_request(high)
    assert chunks(run_step(sched)) == [("high", 0, 7), ("low", 0, 7)]
    run_step(sched)
    out = run_step(sched)
    assert chunks(out) == [("high", 8, 1)]
    assert out.preempted == low.sequences
    assert low.sequences[0].num_preemptions == 1


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_least_important():
    sched = make_scheduler(num_blocks=2, block_size=4, budget=32, max_num_seqs=2)
    a = make_request("a", 4, max_tokens=8)
    b = make_request("b", 4, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)  # one page each, 5 tokens each: both need a second page
    out = run_step(sched)
    assert chunks(out) == [("a", 4, 1)]
    assert out.preempted == b.sequences
    assert sched.blocks.num_free_blocks == 0


# -- priority and fairness -------------------------------------------------------------------


def test_lower_priority_value_is_admitted_first():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("later", 3, priority=1))
    sched.add_request(make_request("urgent", 3, priority=0))
    sched.add_request(make_request("normal", 3, priority=1))
    order = []
    while sched.num_unfinished:
        for rid, start, _ in chunks(run_step(sched)):
            if start == 0:
                order.append(rid)
    assert order == ["urgent", "later", "normal"]


def test_seats_alternate_between_tenants_within_one_step():
    sched = make_scheduler(max_num_seqs=4)
    for rid in ("a0", "a1", "a2"):
        sched.add_request(make_request(rid, 3, tenant="A"))
    for rid in ("b0", "b1"):
        sched.add_request(make_request(rid, 3, tenant="B"))
    assert [rid for rid, _, _ in chunks(run_step(sched))] == ["a0", "b0", "a1", "b1"]


@pytest.mark.parametrize("arrival_step", [0, 1, 2, 3, 4])
def test_a_tenant_arriving_behind_a_large_backlog_is_served_promptly(arrival_step):
    sched = make_scheduler(num_blocks=256, max_num_seqs=4, budget=64)
    a_requests = [make_request(f"a{i}", 4, tenant="A", max_tokens=4) for i in range(50)]
    for r in a_requests:
        sched.add_request(r)
    for _ in range(arrival_step):
        run_step(sched)
    started = {r.request_id for r in a_requests if r.sequences[0].status is not SequenceStatus.WAITING}
    b_requests = [make_request(f"b{i}", 4, tenant="B", max_tokens=4) for i in range(2)]
    for r in b_requests:
        sched.add_request(r)

    admitted_at, finished_at, step = {}, {}, arrival_step
    while sched.num_unfinished:
        out = run_step(sched)
        step += 1
        assert len(sched.running) <= 4
        for c in out.chunks:
            admitted_at.setdefault(c.seq.request.request_id, step)
        for r in a_requests + b_requests:
            if r.is_finished:
                finished_at.setdefault(r.request_id, step)
    # b0 takes a seat at once (from A, by preemption if all are taken); b1 gets a seat no
    # later than any of A's backlog, at the latest when A's running requests finish.
    assert admitted_at["b0"] == arrival_step + 1
    assert admitted_at["b1"] <= min(admitted_at[r.request_id] for r in a_requests if r.request_id not in started)
    assert admitted_at["b1"] <= arrival_step + 4
    assert max(finished_at["b0"], finished_at["b1"]) < finished_at["a9"]
    assert all(r.sequences[0].output_token_ids == [TOKEN] * 4 for r in a_requests + b_requests)


def test_tenants_share_the_prefill_budget():
    sched = make_scheduler(budget=64, max_num_seqs=4, num_blocks=128)
    sched.add_request(make_request("a", 100, tenant="A"))
    sched.add_request(make_request("b", 100, tenant="B"))
    assert chunks(run_step(sched)) == [("a", 0, 32), ("b", 0, 32)]
    assert chunks(run_step(sched)) == [("a", 32, 32), ("b", 32, 32)]


def test_a_tenant_with_more_prompts_gets_no_more_of_the_prefill_budget():
    sched = make_scheduler(budget=64, max_num_seqs=4, num_blocks=128)
    sched.add_request(make_request("a1", 100, tenant="A"))
    sched.add_request(make_request("a2", 100, tenant="A"))
    sched.add_request(make_request("b", 20, tenant="B"))
    out = run_step(sched)
    per_tenant = Counter()
    for c in out.chunks:
        per_tenant[c.seq.request.tenant] += c.num_tokens
    assert per_tenant == {"A": 32, "B": 20}
    assert chunks(out) == [("a1", 0, 32), ("b", 0, 20)]
    # B is decoding now: A's prompts share what is left of the budget.
    assert chunks(run_step(sched)) == [("b", 20, 1), ("a1", 32, 63)]


def test_a_tenant_that_cannot_be_seated_does_not_shrink_the_prefill_share():
    sched = make_scheduler(budget=64, max_num_seqs=1, num_blocks=128)
    sched.add_request(make_request("a", 200, tenant="A"))
    assert chunks(run_step(sched)) == [("a", 0, 64)]
    sched.add_request(make_request("b", 100, tenant="B"))  # no seat for it until a finishes
    assert chunks(run_step(sched)) == [("a", 64, 64)]


# -- abort -----------------------------------------------------------------------------------


def test_abort_a_waiting_request():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("run", 3))
    waiting = make_request("wait", 3)
    sched.add_request(waiting)
    run_step(sched)
    assert sched.abort("wait") is waiting
    assert sched.waiting == []
    assert "wait" not in sched.requests
    assert waiting.sequences[0].finish_reason is FinishReason.ABORT
    assert sched.abort("wait") is None
    assert sched.abort("never-seen") is None


def test_abort_a_running_request_frees_its_pages():
    sched = make_scheduler(num_blocks=8)
    request = make_request("r", 10)
    sched.add_request(request)
    run_step(sched)
    assert sched.blocks.num_free_blocks == 5
    out = sched.schedule()  # the step is "running" when the client goes away
    sched.abort("r")
    seq = request.sequences[0]
    assert (seq.status, seq.finish_reason, seq.block_ids) == (SequenceStatus.FINISHED, FinishReason.ABORT, [])
    assert sched.running == [] and sched.requests == {}
    assert sched.blocks.num_free_blocks == 8
    assert sched.postprocess(out, {seq.seq_id: TOKEN}) == []  # the late result is dropped
    assert seq.output_token_ids == [TOKEN]


# -- finishing -------------------------------------------------------------------------------


def run_to_end(sched, request, tokens) -> list[int]:
    tokens = iter(tokens)
    while not request.is_finished:
        run_step(sched, next(tokens))
    return request.sequences[0].output_token_ids


def test_max_tokens_finishes_with_length():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=3)
    sched.add_request(request)
    assert run_to_end(sched, request, [5, 6, 7, 8]) == [5, 6, 7]
    seq = request.sequences[0]
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.LENGTH, None)
    assert sched.num_unfinished == 0 and sched.blocks.num_free_blocks == 64


def test_eos_stops_unless_ignored():
    sched = make_scheduler()
    stops = make_request("stops", 3, max_tokens=5, eos=(2,))
    ignores = make_request("ignores", 3, max_tokens=5, eos=(2,), ignore_eos=True)
    sched.add_request(stops)
    sched.add_request(ignores)
    for token in (5, 2, 2, 2, 2):
        run_step(sched, token)
    assert stops.sequences[0].output_token_ids == [5, 2]
    assert (stops.sequences[0].finish_reason, stops.sequences[0].stop_reason) == (FinishReason.STOP, None)
    assert ignores.sequences[0].output_token_ids == [5, 2, 2, 2, 2]
    assert ignores.sequences[0].finish_reason is FinishReason.LENGTH


def test_stop_token_ids_stop_with_the_token_as_reason():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=8, stop_token_ids=(9, 11))
    sched.add_request(request)
    assert run_to_end(sched, request, [5, 11, 9]) == [5, 11]
    seq = request.sequences[0]
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.STOP, 11)


def test_min_tokens_suppresses_stops_until_reached():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=8, min_tokens=3, eos=(2,), stop_token_ids=(9,))
    sched.add_request(request)
    assert run_to_end(sched, request, [2, 9, 2, 5]) == [2, 9, 2]
    assert request.sequences[0].finish_reason is FinishReason.STOP


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=8)
    request = make_request("r", 6, max_tokens=16)
    sched.add_request(request)
    assert run_to_end(sched, request, [5] * 16) == [5, 5]
    assert request.sequences[0].finish_reason is FinishReason.LENGTH


def test_finish_from_outside_records_the_stop_string():
    sched = make_scheduler()
    request = make_request("r", 3, max_tokens=8)
    sched.add_request(request)
    run_step(sched)
    seq = request.sequences[0]
    sched.finish(seq, FinishReason.STOP, "###")
    assert (seq.finish_reason, seq.stop_reason) == (FinishReason.STOP, "###")
    assert sched.num_unfinished == 0 and sched.requests == {}


# -- parallel samples and the prefix cache ---------------------------------------------------


def test_parallel_samples_share_the_prompt_pages():
    sched = make_scheduler(block_size=4, budget=64)
    request = make_request("r", 10, max_tokens=3, n=3)
    sched.add_request(request)
    s0, s1, s2 = request.sequences

    assert chunks(run_step(sched)) == [("r/0", 0, 10)]  # samples 1 and 2 wait for the prompt
    assert sched.waiting == [s1, s2]

    out = run_step(sched)  # both find the prompt's two full pages and compute the partial third
    assert chunks(out) == [("r/0", 10, 1), ("r/1", 8, 2), ("r/2", 8, 2)]
    assert s1.block_ids[:2] == s2.block_ids[:2] == s0.block_ids[:2]
    assert ref_counts(sched, s0.block_ids[:2]) == [3, 3]
    assert len({s0.block_ids[2], s1.block_ids[2], s2.block_ids[2]}) == 3
    assert [s.num_cached_tokens for s in request.sequences] == [0, 8, 8]
    assert (sched.blocks.stats.queries, sched.blocks.stats.hits) == (30, 16)

    while not request.is_finished:
        run_step(sched)
    assert [s.num_output_tokens for s in request.sequences] == [3, 3, 3]
    assert sched.blocks.num_free_blocks == 64


def test_a_prefix_cache_hit_starts_the_first_chunk_at_the_cached_tokens():
    sched = make_scheduler(block_size=4, budget=64)
    prompt = list(range(100, 112))
    first = make_request("first", prompt, max_tokens=1)
    sched.add_request(first)
    run_step(sched)
    assert first.is_finished

    same_start = make_request("same-start", prompt[:8] + [1, 2, 3, 4, 5], max_tokens=1)
    same = make_request("same", prompt, max_tokens=1)
    sched.add_request(same_start)
    sched.add_request(same)
    out = run_step(sched)
    assert chunks(out) == [("same-start", 8, 5), ("same", 8, 4)]  # 12 tokens: the last block is redone
    assert same_start.sequences[0].num_cached_tokens == 8
    assert (sched.blocks.stats.queries, sched.blocks.stats.hits) == (12 + 13 + 12, 16)


def test_no_hits_with_prefix_caching_off():
    sched = make_scheduler(block_size=4, budget=64, prefix_caching=False)
    prompt = list(range(100, 112))
    for rid in ("first", "second"):
        request = make_request(rid, prompt, max_tokens=1)
        sched.add_request(request)
        assert chunks(run_step(sched)) == [(rid, 0, 12)]
    assert sched.blocks.stats.hits == 0


def test_duplicate_request_id_is_refused():
    sched = make_scheduler()
    sched.add_request(make_request("r", 3))
    with pytest.raises(ValueError, match="request_id='r' is already in use"):
        sched.add_request(make_request("r", 3))


def test_requeue_running_preempts_every_running_sequence_and_frees_every_page():
    """What the engine does when a fault took the KV cache: everything running is recomputed."""
    sched = make_scheduler(num_blocks=16)
    for name in ("a", "b"):
        sched.add_request(make_request(name, 6))
    run_step(sched)
    assert [s.status for s in sched.running] == [SequenceStatus.RUNNING] * 2
    assert sched.requeue_running() == 2
    assert sched.running == [] and [s.status for s in sched.waiting] == [SequenceStatus.PREEMPTED] * 2
    assert [s.num_computed_tokens for s in sched.waiting] == [0, 0] and sched.blocks.num_free_blocks == 16
    assert sched.blocks.reset_prefix_cache()  # the engine forgets the lost pages' keys next: none is in use
    assert chunks(run_step(sched)) == [("a", 0, 7), ("b", 0, 7)]  # prompt and sampled token, recomputed
