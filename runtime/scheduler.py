"""Which tokens each engine step computes. Plain Python: no jax here.

Each step has a token budget and a number of seats (sequences). Running sequences go
first: every decode costs one token, then unfinished prompts continue in chunks. Waiting
sequences are admitted with whatever budget is left, after their cached prefix is taken
from the block manager. When the pool runs out of pages, the least important running
sequence is preempted: its pages are freed and it is recomputed later.

Fairness between tenants: a tenant's prefill chunks are capped at an equal share of the
step's prefill budget while another tenant also has prompt work, admission favours the
tenant with the fewest running sequences, and a tenant holding more than its share of
seats gives one up (by preemption) to a tenant that has none.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.block_manager import BlockManager
from runtime.request import PENDING_TOKEN, FinishReason, Request, Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token computed this step (= seq.num_computed_tokens when scheduled)
    num_tokens: int
    # Fixed when scheduled (the sequence grows once the step is dispatched):
    samples: bool = field(init=False)  # reaches the sequence's last token, so a new one is drawn
    epoch: int = field(init=False)  # the sequence's preemption count: a later preemption voids the chunk's pages

    def __post_init__(self):
        object.__setattr__(self, "samples", self.start + self.num_tokens == self.seq.num_tokens)
        object.__setattr__(self, "epoch", self.seq.num_preemptions)

    @property
    def end(self) -> int:
        """One past the chunk's last token: where the token it draws goes."""
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager):
        self.limits = limits
        self.blocks = block_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # The engine's say on admission beyond pages and seats (adapter slots, a model switch
        # draining the batch): (sequence, running) -> may it start now.
        self.admission_gate: Callable[[Sequence, list[Sequence]], bool] | None = None

    # -- intake ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.extend(request.sequences)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Request | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.sequences:
            if not seq.is_finished:
                self._finish(seq, reason)
        return request

    def requeue_running(self) -> int:
        """Preempt every running sequence (recomputed later); the KV cache is being replaced."""
        running = list(self.running)
        for seq in running:
            self._preempt(seq)
        return len(running)

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        """End a sequence from outside (a stop string found in its text)."""
        if not seq.is_finished:
            self._finish(seq, reason, stop_reason)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._make_room_for_starved_tenants(out)
        budget = self.limits.max_num_batched_tokens
        self.running.sort(key=lambda s: s.priority_key)

        # Decodes first: one token each, they keep streams flowing.
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_tokens - seq.num_computed_tokens != 1:
                continue
            if self._ends_with_pending_token(seq):
                continue  # finished once its pending token is read: nothing more to compute
            if budget < 1:
                break
            if self._reserve(seq, 1, out):
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
                budget -= 1

        # Then prompt work: running prompts continue, then waiting sequences are admitted.
        scheduled = {c.seq.seq_id for c in out.chunks}
        prefilling = [s for s in self.running if s.seq_id not in scheduled and s.status is SequenceStatus.RUNNING
                      and not s.num_pending_tokens]
        tenant_cap = self._prefill_share(budget, prefilling)
        spent: Counter[str] = Counter()
        for seq in prefilling:
            if budget < 1:
                break
            n = self._chunk_size(seq, budget, tenant_cap, spent)
            if n and self._reserve(seq, n, out):
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
                spent[seq.request.tenant] += n
        budget = self._admit(out, budget, tenant_cap, spent)
        return out

    def _reserve(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Pages for `num_new` more tokens of a running sequence, preempting others if need be."""
        while not self.blocks.allocate(seq, seq.num_computed_tokens + num_new):
            victim = self._preemption_victim(exclude={c.seq.seq_id for c in out.chunks})
            if victim is None or victim is seq:
                self._preempt(seq, out)
                return False
            self._preempt(victim, out)
        return True

    def _preemption_victim(self, exclude: set[int]) -> Sequence | None:
        candidates = [s for s in self.running if s.seq_id not in exclude]
        return max(candidates, key=lambda s: s.priority_key) if candidates else None

    def _preempt(self, seq: Sequence, out: SchedulerOutput | None = None) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = seq.num_written_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.append(seq)
        if out is not None:
            out.preempted.append(seq)

    def _prefill_share(self, budget: int, prefilling: list[Sequence]) -> int:
        tenants = {s.request.tenant for s in prefilling}
        if len(self.running) < self.limits.max_num_seqs:  # else no waiting tenant gets a seat this step
            tenants |= {s.request.tenant for s in self.waiting if self._may_admit(s)}
        return max(budget // max(len(tenants), 1), 1)

    def _chunk_size(self, seq: Sequence, budget: int, tenant_cap: int, spent: Counter) -> int:
        remaining = seq.num_tokens - seq.num_computed_tokens
        if not self.limits.enable_chunked_prefill:
            return remaining if remaining <= budget else 0
        allowance = min(budget, max(tenant_cap - spent[seq.request.tenant], 0))
        return min(remaining, allowance)

    def _ends_with_pending_token(self, seq: Sequence) -> bool:
        """Whether the token still on the device is the sequence's last by length."""
        if not seq.num_pending_tokens:
            return False
        drawn = seq.num_tokens - seq.num_prompt_tokens
        return drawn >= seq.request.params.max_tokens or seq.num_tokens >= self.limits.max_model_len

    def _may_admit(self, seq: Sequence) -> bool:
        if seq.num_pending_tokens:
            return False  # preempted with a token still on the device: recomputed once it is read
        # Later samples wait until sample 0's prompt pages are written and cached, then reuse them.
        first = seq.request.sequences[0]
        return seq.index == 0 or first.is_finished or first.num_written_tokens >= seq.num_prompt_tokens

    def _admission_order(self) -> list[Sequence]:
        load = Counter(s.request.tenant for s in self.running)
        return sorted(
            (s for s in self.waiting if self._may_admit(s)),
            key=lambda s: (s.request.priority, load[s.request.tenant], s.priority_key),
        )

    def _admit(self, out: SchedulerOutput, budget: int, tenant_cap: int, spent: Counter) -> int:
        load = Counter(s.request.tenant for s in self.running)
        candidates = self._admission_order()
        while candidates:
            if budget < 1 or len(self.running) >= self.limits.max_num_seqs:
                break
            # Each seat goes to the tenant with the fewest running sequences now, counting
            # the seats handed out earlier in this step.
            seq = min(candidates, key=lambda s: (s.request.priority, load[s.request.tenant], s.priority_key))
            candidates.remove(seq)
            if self.admission_gate is not None and not self.admission_gate(seq, self.running):
                continue
            cached = [] if seq.needs_prompt_logits else self.blocks.find_cached_prefix(seq)
            num_cached = len(cached) * self.blocks.block_size
            seq.num_computed_tokens = num_cached
            n = self._chunk_size(seq, budget, tenant_cap, spent)
            if n == 0 or not self.blocks.allocate(seq, num_cached + n, cached):
                seq.num_computed_tokens = 0
                continue  # a smaller sequence behind it may still fit
            if seq.status is SequenceStatus.WAITING:
                self.blocks.record_lookup(seq.num_tokens, num_cached)
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.waiting.remove(seq)
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, num_cached, n))
            budget -= n
            spent[seq.request.tenant] += n
            load[seq.request.tenant] += 1
        return budget

    def _make_room_for_starved_tenants(self, out: SchedulerOutput) -> None:
        """While every seat is taken, a waiting tenant with no running sequence gets one from
        the tenant holding the most, if that tenant's newest sequence is no more important."""
        if len(self.running) < self.limits.max_num_seqs:
            return
        load = Counter(s.request.tenant for s in self.running)
        for seq in self._admission_order():
            if load[seq.request.tenant] > 0 or len(self.running) < self.limits.max_num_seqs:
                continue
            rich = max(load, key=lambda t: load[t])
            if load[rich] <= 1:
                return
            victim = max((s for s in self.running if s.request.tenant == rich), key=lambda s: s.priority_key)
            if victim.request.priority < seq.request.priority:
                continue
            self._preempt(victim, out)
            load[rich] -= 1
            load[seq.request.tenant] += 1  # reserved: admission will seat it this step

    # -- after the step -------------------------------------------------------------------
    #
    # dispatched: commit(out)     the chunks count as computed, sampling ones get a pending token
    # read back:  complete(out, tokens)   pages written and cached, pending tokens get their values
    # lost:       rollback(out)   a dispatched step that will never be read back is undone
    #
    # Without overlap the two follow each other; with it the next step is scheduled in between.

    def commit(self, out: SchedulerOutput) -> None:
        """The step was dispatched: plan the next one as if it had run."""
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens = chunk.end
            if chunk.samples:
                seq.token_ids.append(PENDING_TOKEN)
                seq.num_pending_tokens += 1

    def complete(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[tuple[Sequence, int]]:
        """The step was read back: cache the pages it wrote and give its drawn tokens (seq id ->
        token) their values. Returns (sequence, token) for each sequence that got one, finished
        ones included; a sequence that finished meanwhile (a stop found in an earlier token, an
        abort) gets nothing from this step."""
        grown = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue
            if seq.num_preemptions == chunk.epoch:  # its pages still hold what this step wrote
                seq.num_written_tokens = max(seq.num_written_tokens, chunk.end)
                self.blocks.cache_full_blocks(seq, chunk.end)
            if not chunk.samples:
                continue
            token = sampled[seq.seq_id]
            assert seq.token_ids[chunk.end] == PENDING_TOKEN, "tokens are read back in the order they were drawn"
            seq.token_ids[chunk.end] = token
            seq.num_pending_tokens -= 1
            grown.append((seq, token))
            if seq.request.first_token_time is None:
                seq.request.first_token_time = time.monotonic()
            self._check_finished(seq, token)
        return grown

    def postprocess(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """commit then complete, for a step run in series: the sequences that got a token."""
        self.commit(out)
        return [seq for seq, _ in self.complete(out, sampled)]

    def rollback(self, out: SchedulerOutput) -> None:
        """A dispatched step will never be read back (the one before it failed): drop its pending
        tokens and recompute its sequences later, as its pages may not hold what it wrote."""
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue
            if chunk.samples and seq.num_pending_tokens:
                assert seq.token_ids[-1] == PENDING_TOKEN and seq.num_tokens == chunk.end + 1
                seq.token_ids.pop()
                seq.num_pending_tokens -= 1
            if seq.status is SequenceStatus.RUNNING and seq.num_preemptions == chunk.epoch:
                self._preempt(seq)

    def _check_finished(self, seq: Sequence, token: int) -> None:
        """After `token` was read back; counts are of tokens known on the host."""
        params = seq.request.params
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return self._finish(seq, FinishReason.STOP, token)
            if token in seq.request.eos_token_ids and not params.ignore_eos:
                return self._finish(seq, FinishReason.STOP)
        if (seq.num_output_tokens >= params.max_tokens
                or seq.num_prompt_tokens + seq.num_output_tokens >= self.limits.max_model_len):
            self._finish(seq, FinishReason.LENGTH)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        if seq.num_pending_tokens:  # drawn after the end: never emitted
            del seq.token_ids[-seq.num_pending_tokens :]
            seq.num_pending_tokens = 0
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.request.is_finished:
            self.requests.pop(seq.request.request_id, None)
