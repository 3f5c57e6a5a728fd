"""Turns a scheduled batch into padded arrays and runs one jitted step: forward + sampling.

Shapes are fixed per token bucket: tokens are padded to the smallest bucket that holds the
step, and the sequence rows number min(bucket, max_num_seqs), so the whole server compiles
one program per bucket (two when a request needs logit adjustments), all during `warm_up()`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.forward import compute_logits
from models.kv_cache import AttentionMetadata, KVCache
from models.loader import LoadedModel
from runtime.backend import runs_per_device
from runtime.execution_plan import ExecutionPlan
from runtime.request import Sequence
from runtime.sampling import LogitAdjustments, SampledTokens, SamplingInputs, sample_tokens
from runtime.scheduler import SchedulerOutput

log = logging.getLogger(__name__)
MIN_TOP_P = 1e-30  # a normal float32: keeps exactly the most likely token


def _step(
    graphdef: nnx.GraphDef,
    state_def,  # treedef of the model state
    state_leaves: list[jax.Array],
    kv_cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    md: AttentionMetadata,
    logits_indices: jax.Array,
    sampling: SamplingInputs,
    adjustments: LogitAdjustments | None,
    *,
    summary_impl: str,
) -> tuple[SampledTokens, KVCache]:
    state = jax.tree.unflatten(state_def, state_leaves)
    logits, kv_cache = compute_logits(graphdef, state, tokens, positions, kv_cache, md, logits_indices)
    return sample_tokens(logits, sampling, adjustments, summary_impl), kv_cache


@dataclasses.dataclass
class StepResult:
    tokens: dict[int, int]  # seq id -> drawn token, for chunks that sample
    logprobs: dict[int, tuple[float, list[int], list[float]]]  # seq id -> (chosen, top ids, top logprobs)
    seconds: float


class Runner:
    def __init__(self, model: LoadedModel, plan: ExecutionPlan, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, token_buckets: tuple[int, ...]):
        self.model = model
        self.attention_backend = plan.attention
        kernel_per_device = runs_per_device(plan.attention) and model.mesh.size > 1
        self.attention_mesh = model.mesh if kernel_per_device else None
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.token_buckets = token_buckets
        self.vocab_size = model.cfg.vocab_size
        self.kv_cache = model.allocate_kv_cache(num_blocks, block_size)
        # The graph definition and the state's structure are bound once: a step call then
        # passes a flat list of arrays, and jit neither hashes the module graph nor walks the
        # NNX state each step (milliseconds of host time per step otherwise).
        self._state_leaves, state_def = jax.tree.flatten(model.state)
        self._state_def = state_def
        self._summary_impl = plan.sampling
        self._warmed: list[tuple[int, bool]] = []  # (bucket, adjust) programs warm_up compiled
        self._jitted_step = self._jit_step()

    def _jit_step(self):
        return jax.jit(partial(_step, self.model.graphdef, self._state_def, summary_impl=self._summary_impl),
                       donate_argnames=("kv_cache",))

    def bucket_for(self, num_tokens: int) -> int:
        for b in self.token_buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.token_buckets[-1]}")

    def rows_for(self, bucket: int) -> int:
        """Sequence rows of a bucket: a step of T tokens holds at most T sequences, so small
        (decode) steps do not pay for max_num_seqs rows of logits and sampling."""
        return min(bucket, self.max_num_seqs)

    def warm_up(self, adjust_variants: tuple[bool, ...] = (False, True)) -> float:
        """Compile every bucket, with and without logit adjustments, on an all-padding batch.
        (A benchmark that sends no penalties may skip the adjusted variant.)"""
        started = time.perf_counter()
        for bucket in self.token_buckets:
            for adjust in adjust_variants:
                jax.block_until_ready(self._execute(SchedulerOutput(), bucket, adjust))
                if (bucket, adjust) not in self._warmed:
                    self._warmed.append((bucket, adjust))
        return time.perf_counter() - started

    # -- after a fault (runtime/faults.py) ---------------------------------------------------

    def cache_intact(self) -> bool:
        """Whether the KV cache survived a failed step: a donated cache is deleted once the step
        was dispatched, and the outputs of a step that failed on the device cannot be read."""
        try:
            leaves = jax.tree.leaves(self.kv_cache)
            if any(leaf.is_deleted() for leaf in leaves):
                return False
            jax.block_until_ready(leaves)
            return True
        except Exception:  # noqa: BLE001 - an unreadable cache is the answer, not an error
            return False

    def reinitialise(self) -> float:
        """A new (zeroed) cache and a newly compiled step, then the programs warm_up had compiled
        run once on all-padding batches: the probe that the device works (raises if it does not),
        and steady serving still never compiles. Seconds taken."""
        started = time.perf_counter()
        self.kv_cache = None  # drop the old buffers before allocating the new ones
        self.kv_cache = self.model.allocate_kv_cache(self.num_blocks, self.block_size)
        self._jitted_step = self._jit_step()
        for bucket, adjust in self._warmed or [(self.token_buckets[0], False)]:
            jax.block_until_ready(self._execute(SchedulerOutput(), bucket, adjust))
        return time.perf_counter() - started

    def run(self, out: SchedulerOutput) -> StepResult:
        started = time.perf_counter()
        adjust = any(c.samples and c.seq.request.params.needs_logit_adjustment for c in out.chunks)
        sampled = self._execute(out, self.bucket_for(out.num_tokens), adjust)
        tokens, logprobs = {}, {}
        drawn, chosen, top_ids, top_lps = jax.device_get(
            (sampled.tokens, sampled.logprobs, sampled.top_ids, sampled.top_logprobs)
        )
        for row, chunk in enumerate(out.chunks):
            if not chunk.samples:
                continue
            sid = chunk.seq.seq_id
            tokens[sid] = int(drawn[row])
            if chunk.seq.request.params.logprobs is not None:
                n = chunk.seq.request.params.logprobs
                logprobs[sid] = (float(chosen[row]), top_ids[row, :n].tolist(), top_lps[row, :n].tolist())
        return StepResult(tokens, logprobs, time.perf_counter() - started)

    def _execute(self, out: SchedulerOutput, bucket: int, adjust: bool) -> SampledTokens:
        S = self.rows_for(bucket)
        tokens = np.zeros(bucket, np.int32)
        positions = np.zeros(bucket, np.int32)
        slots = np.full(bucket, -1, np.int32)
        block_tables = np.zeros((S, self.max_blocks_per_seq), np.int32)
        context_lens = np.zeros(S, np.int32)
        query_start = np.zeros(S + 1, np.int32)
        logits_indices = np.zeros(S, np.int32)
        temperature, top_p, min_p = np.zeros(S, np.float32), np.ones(S, np.float32), np.zeros(S, np.float32)
        top_k, seeds, sample_pos = np.zeros(S, np.int32), np.zeros(S, np.uint32), np.zeros(S, np.int32)
        at = 0
        for row, chunk in enumerate(out.chunks):
            seq, n = chunk.seq, chunk.num_tokens
            span = np.arange(chunk.start, chunk.start + n)
            table = np.asarray(seq.block_ids, np.int32)
            tokens[at : at + n] = seq.token_ids[chunk.start : chunk.start + n]
            positions[at : at + n] = span
            slots[at : at + n] = table[span // self.block_size] * self.block_size + span % self.block_size
            block_tables[row, : len(table)] = table
            context_lens[row] = chunk.start + n
            at += n
            query_start[row + 1] = at
            logits_indices[row] = at - 1
            p = seq.request.params
            # Values were checked to fit (runtime/request.py); a tiny top_p would round to 0 in
            # float32 and keep no token, so it is raised to the least that still keeps the top one.
            temperature[row] = 0.0 if p.greedy else p.temperature
            top_p[row], top_k[row], min_p[row] = max(p.top_p, MIN_TOP_P), p.top_k, p.min_p
            seeds[row], sample_pos[row] = seq.seed, seq.num_tokens
        query_start[len(out.chunks) + 1 :] = at
        # numpy arrays go straight into the jitted call, which copies them to the device.
        md = AttentionMetadata(
            slot_mapping=slots,
            block_tables=block_tables,
            context_lens=context_lens,
            query_start_loc=query_start,
            backend=self.attention_backend,
            mesh=self.attention_mesh,
        )
        sampling = SamplingInputs(temperature, top_p, top_k, min_p, seeds, sample_pos)
        adjustments = self._adjustments(out, S) if adjust else None
        sampled, self.kv_cache = self._jitted_step(
            self._state_leaves, self.kv_cache, tokens, positions, md, logits_indices, sampling, adjustments,
        )
        return sampled

    def _adjustments(self, out: SchedulerOutput, S: int) -> LogitAdjustments:
        V = self.vocab_size
        counts = np.zeros((S, V), np.int32)
        seen = np.zeros((S, V), np.bool_)
        banned = np.zeros((S, V), np.bool_)
        presence, frequency, repetition = np.zeros(S, np.float32), np.zeros(S, np.float32), np.ones(S, np.float32)
        for row, chunk in enumerate(out.chunks):
            p = chunk.seq.request.params
            if not (chunk.samples and p.needs_logit_adjustment):
                continue
            seq: Sequence = chunk.seq
            counts[row] = np.bincount(np.asarray(seq.output_token_ids, np.int64), minlength=V)[:V]
            seen[row, seq.token_ids] = True
            presence[row], frequency[row], repetition[row] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
            if seq.num_output_tokens < p.min_tokens:
                banned[row, list(seq.request.stop_ids_before_min_tokens)] = True
        return LogitAdjustments(
            jnp.asarray(counts), jnp.asarray(seen), jnp.asarray(banned),
            jnp.asarray(presence), jnp.asarray(frequency), jnp.asarray(repetition),
        )
