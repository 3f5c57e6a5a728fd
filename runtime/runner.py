"""Turns a scheduled batch into padded arrays and runs one jitted step: forward + sampling.

Shapes are fixed per token bucket: tokens are padded to the smallest bucket that holds the
step, and the sequence rows number min(bucket, max_num_seqs), so the whole server compiles
one program per bucket (two when a request needs logit adjustments), all during `warm_up()`.
A step that computes a prompt's logprobs (`prompt_logprobs`) takes the logits of every token,
not only of the sampling rows: a third variant, compiled at its first use (warm_up does not
pay for what evaluation harnesses alone send).
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
from jaxtyping import Array, Int

from kernels.attention_work import WorkPlan, work_table
from kernels.ragged_paged_attention import plan_for
from models.forward import compute_logits
from models.kv_cache import AttentionMetadata, KVCache
from models.lora import LoraInputs, LoraStacks
from models.loader import LoadedModel
from runtime.adapters import AdapterManager
from runtime import kv_transfer
from runtime.backend import runs_per_device
from runtime.execution_plan import ExecutionPlan
from runtime.request import PENDING_TOKEN, Sequence
from runtime.outputs import TokenLogprob
from runtime.sampling import LogitAdjustments, PromptLogprobs, SampledTokens, SamplingInputs, prompt_logprobs, sample_tokens
from runtime.scheduler import SchedulerOutput
from runtime.step_inputs import NOT_ON_DEVICE, HostStepBuffers, StepLayout

log = logging.getLogger(__name__)
MIN_TOP_P = 1e-30  # a normal float32: keeps exactly the most likely token


def _per_device_bytes(x: jax.Array) -> int:
    return x.addressable_shards[0].data.nbytes


def _fields(adjustments: LogitAdjustments) -> tuple[jax.Array, ...]:
    return tuple(getattr(adjustments, f.name) for f in dataclasses.fields(adjustments))


def _step(
    graphdef: nnx.GraphDef,
    state_def,  # treedef of the model state
    state_leaves: list[jax.Array],
    kv_cache: KVCache,
    packed: Int[Array, " size"],
    previous_tokens: Int[Array, " max_rows"],
    adjustments: tuple[Array, ...] | None,  # LogitAdjustments' fields, in order
    lora_stacks: LoraStacks | None,
    prompt_targets: Int[Array, " tokens"] | None,
    *,
    layout: StepLayout,
    max_rows: int,
    attention: str,
    attention_mesh,
    summary_impl: str,
    lora_kernel: str | None,
) -> tuple[SampledTokens, Int[Array, " max_rows"], KVCache, PromptLogprobs | None]:
    """One step on the device. Tokens marked in `from_previous` are read from the previous
    step's drawn tokens (still on the device: overlapped scheduling); the drawn tokens come back
    twice, as the sampler's rows and padded to `max_rows` to feed the next step. With
    `prompt_targets` (each token's next prompt token, -1 for none) every token's logits are
    computed, the sampler takes its rows from them, and the targets' logprobs come back too."""
    f = layout.unpack(packed)
    on_device = f["from_previous"] != NOT_ON_DEVICE
    tokens = jnp.where(on_device, previous_tokens[jnp.where(on_device, f["from_previous"], 0)], f["tokens"])
    md = AttentionMetadata(f["slots"], f["block_tables"], f["context_lens"], f["query_start"], f["attention_work"],
                           backend=attention, mesh=attention_mesh)
    sampling = SamplingInputs(f["temperature"], f["top_p"], f["top_k"], f["min_p"], f["seeds"], f["sample_positions"])
    state = jax.tree.unflatten(state_def, state_leaves)
    lora = None if lora_stacks is None else LoraInputs(f["lora_slots"], lora_stacks, lora_kernel)
    prompt = None
    if prompt_targets is None:
        logits, kv_cache = compute_logits(graphdef, state, tokens, f["positions"], kv_cache, md, f["logits_indices"],
                                          lora)
    else:
        every = jnp.arange(layout.tokens, dtype=jnp.int32)
        all_logits, kv_cache = compute_logits(graphdef, state, tokens, f["positions"], kv_cache, md, every, lora)
        logits = all_logits[f["logits_indices"]]  # the very logits the sampler sees
        prompt = prompt_logprobs(all_logits, prompt_targets, summary_impl)
    adjust = None if adjustments is None else LogitAdjustments(*adjustments)
    sampled = sample_tokens(logits, sampling, adjust, summary_impl)
    next_tokens = jnp.zeros(max_rows, jnp.int32).at[: layout.rows].set(sampled.tokens)
    return sampled, next_tokens, kv_cache, prompt


@dataclasses.dataclass
class StepResult:
    tokens: dict[int, int]  # seq id -> drawn token, for chunks that sample
    logprobs: dict[int, tuple[float, list[int], list[float]]]  # seq id -> (chosen, top ids, top logprobs)
    seconds: float  # from dispatch to the tokens on the host
    wait_seconds: float = 0.0  # of those, the host blocked on the device
    # seq id -> (prompt token index, its logprob) for the prompt tokens this step scored
    prompt_logprobs: dict[int, list[tuple[int, TokenLogprob]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step whose tokens are still on the device."""

    batch: SchedulerOutput
    sampled: SampledTokens
    next_tokens: jax.Array  # drawn tokens by row, padded to max_num_seqs: the next step's input
    rows: dict[int, int]  # seq id -> row, for the chunks that sample
    dispatched_at: float
    prompt: PromptLogprobs | None = None
    prompt_chunks: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (chunk index, first token)


class Runner:
    def __init__(self, model: LoadedModel, plan: ExecutionPlan, num_blocks: int | None, block_size: int,
                 max_num_seqs: int, max_model_len: int, token_buckets: tuple[int, ...],
                 adapters: AdapterManager | None = None):
        """`num_blocks` None: no KV cache yet; the engine sizes it from the device's memory
        (`workspace_bytes`), then calls `allocate_cache`."""
        self.model = model
        # Adapter weights are step arguments (stacked slots), never constants: loading one
        # replaces arrays of the same shape and compiles nothing.
        self.adapters = adapters
        self.attention_backend = plan.attention
        kernel_per_device = runs_per_device(plan.attention) and model.mesh.size > 1
        self.attention_mesh = model.mesh if kernel_per_device else None
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.token_buckets = token_buckets
        self.vocab_size = model.cfg.vocab_size
        self.kv_cache = None if num_blocks is None else model.allocate_kv_cache(num_blocks, block_size)
        # The graph definition and the state's structure are bound once: a step call then
        # passes a flat list of arrays, and jit neither hashes the module graph nor walks the
        # NNX state each step (milliseconds of host time per step otherwise).
        self._state_leaves, state_def = jax.tree.flatten(model.state)
        self._state_def = state_def
        self._summary_impl = plan.sampling
        self._lora_kernel = plan.lora
        # (bucket, adjust, lora, prompt) programs compiled and run: re-run after a fault
        self._warmed: list[tuple[int, bool, bool, bool]] = []
        self._buffers = {b: HostStepBuffers(StepLayout(b, self.rows_for(b), self.max_blocks_per_seq,
                                                       self._attention_plan(b)))
                         for b in token_buckets}
        # What a step reads for tokens it takes from the device when the previous step drew none.
        self._no_previous = jnp.zeros(max_num_seqs, jnp.int32)
        self._jitted_step = self._jit_step()

    def _jit_step(self):
        """The whole step as one program: the packed host inputs arrive in one transfer, the
        previous step's tokens stay on the device, the cache is donated (updated in place), and
        nothing inside calls back to the host (tests/runtime/test_step_program.py reads its HLO)."""
        step = partial(_step, self.model.graphdef, self._state_def, max_rows=self.max_num_seqs,
                       attention=self.attention_backend, attention_mesh=self.attention_mesh,
                       summary_impl=self._summary_impl, lora_kernel=self._lora_kernel)
        return jax.jit(step, static_argnames=("layout",), donate_argnames=("kv_cache",))

    def allocate_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_cache = self.model.allocate_kv_cache(num_blocks, self.block_size)

    def lower_step(self, bucket: int, adjust: bool = False, lora: bool = False, prompt: bool = False,
                   kv_cache=None, platforms: tuple[str, ...] | None = None) -> jax.stages.Lowered:
        """The step program of one variant, lowered for an all-padding batch (nothing runs).
        `kv_cache`: arrays or jax.ShapeDtypeStruct leaves, default the runner's own; `platforms`:
        lower for others than the model's devices (("cuda",) on a CPU: the GPU program's StableHLO)."""
        args, layout = self._step_args(SchedulerOutput(), bucket, adjust, None, lora, prompt)
        if kv_cache is not None:
            args = (args[0], kv_cache, *args[2:])
        return self._jitted_step.trace(*args, layout=layout).lower(lowering_platforms=platforms)

    def workspace_bytes(self) -> int | None:
        """Device memory the largest step needs beyond the weights and the KV cache, per device:
        XLA's temporaries, the step's inputs and its outputs not aliased to the cache. Compiled
        once, on a probe cache of one sequence's pages (the cache is updated in place, so its
        size changes no temporary), for the costliest variant: the largest bucket with logit
        adjustments, adapters if served, and every token's logits (prompt logprobs). None where
        the backend gives no memory analysis."""
        pages, cfg = self.max_blocks_per_seq, self.model.cfg
        shape = (pages, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        sharding = self.model.kv_cache_sharding(pages, self.block_size)
        probe = [(jax.ShapeDtypeStruct(shape, self.model.dtype, sharding=sharding),) * 2 for _ in range(cfg.num_layers)]
        lowered = self.lower_step(self.token_buckets[-1], adjust=True, lora=self.adapters is not None, prompt=True,
                                  kv_cache=probe)
        stats = lowered.compile().memory_analysis()
        if stats is None:
            return None
        held = sum(_per_device_bytes(x) for x in self._state_leaves)
        if self.adapters is not None:
            held += sum(_per_device_bytes(x) for x in jax.tree.leaves(self.adapters.stacks))
        cache = 2 * cfg.num_layers * int(np.prod(sharding.shard_shape(shape))) * self.model.dtype.itemsize
        inputs = max(0, stats.argument_size_in_bytes - held - cache)
        outputs = max(0, stats.output_size_in_bytes - stats.alias_size_in_bytes)
        return stats.temp_size_in_bytes + inputs + outputs

    def _attention_plan(self, bucket: int) -> WorkPlan | None:
        """The Pallas kernel's work plan for a bucket: its table is built here once per step
        rather than in XLA by every layer. (Per device under tensor parallelism the query and
        KV heads both divide, so the group and the plan are the same.)"""
        if not self.attention_backend.startswith("pallas"):
            return None
        cfg = self.model.cfg
        return plan_for(bucket, self.rows_for(bucket), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        self.block_size, self.model.dtype)

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
        self._commit_no_previous()
        # With adapter slots, a step whose batch uses no adapter runs the program without the
        # LoRA products: base-model traffic pays nothing for them.
        lora_variants = (False, True) if self.adapters is not None else (False,)
        for bucket in self.token_buckets:
            for adjust in adjust_variants:
                for lora in lora_variants:
                    jax.block_until_ready(self._execute(SchedulerOutput(), bucket, adjust, None, lora)[0])
                    if (bucket, adjust, lora, False) not in self._warmed:
                        self._warmed.append((bucket, adjust, lora, False))
        return time.perf_counter() - started

    def _commit_no_previous(self) -> None:
        """Make the stand-in for "no previous step" an output of the step itself, so it is placed
        as every later previous-step input is (a fresh jnp array is not committed to a device,
        and jit would compile a second program for it)."""
        _, self._no_previous, _ = self._execute(SchedulerOutput(), self.token_buckets[0], False, None)

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
        self._commit_no_previous()
        for bucket, adjust, lora, prompt in self._warmed or [(self.token_buckets[0], False, False, False)]:
            jax.block_until_ready(self._execute(SchedulerOutput(), bucket, adjust, None, lora, prompt)[0])
        return time.perf_counter() - started

    def swap_weights(self, model: LoadedModel) -> None:
        """Serve `model`'s weights from the next step on. Its state must have the same structure,
        shapes and dtypes as the served one (runtime/model_reload.py checks), so every compiled
        step program is reused as it is."""
        leaves, state_def = jax.tree.flatten(model.state)
        if state_def != self._state_def:
            raise ValueError("the new weights are not laid out as the served ones")
        self.model, self._state_leaves = model, leaves

    # -- pages to and from the tiers below the device (runtime/kv_tiers.py) ------------------

    def read_pages(self, page_ids: list[int]) -> np.ndarray:
        return kv_transfer.read_pages(self.kv_cache, page_ids)

    def write_pages(self, page_ids: list[int], data: np.ndarray) -> None:
        self.kv_cache = kv_transfer.write_pages(self.kv_cache, page_ids, data)

    def warm_up_page_transfers(self) -> None:
        self.kv_cache = kv_transfer.warm_up(self.kv_cache)

    def run(self, out: SchedulerOutput) -> StepResult:
        """Dispatch and read back at once (no overlap)."""
        return self.collect(self.dispatch(out))

    def dispatch(self, out: SchedulerOutput, previous: InFlightStep | None = None) -> InFlightStep:
        """Start the step on the device and return without waiting for it. Tokens the scheduler
        left pending (PENDING_TOKEN) are the ones `previous` draws; they never visit the host."""
        adjust = any(c.samples and c.seq.request.params.needs_logit_adjustment for c in out.chunks)
        lora = self.adapters is not None and any(c.seq.request.adapter_id for c in out.chunks)
        prompt_chunks, at = [], 0
        for i, c in enumerate(out.chunks):
            if c.seq.needs_prompt_logits:
                prompt_chunks.append((i, at))
            at += c.num_tokens
        bucket = self.bucket_for(out.num_tokens)
        key = (bucket, adjust, lora, bool(prompt_chunks))
        sampled, next_tokens, prompt = self._execute(out, bucket, adjust, previous, lora, bool(prompt_chunks))
        if key not in self._warmed:  # a variant first compiled now: re-run after a fault too
            self._warmed.append(key)
        rows = {c.seq.seq_id: row for row, c in enumerate(out.chunks) if c.samples}
        return InFlightStep(out, sampled, next_tokens, rows, time.perf_counter(), prompt, prompt_chunks)

    def collect(self, step: InFlightStep) -> StepResult:
        """Read a dispatched step's tokens (and the logprobs asked for) back to the host."""
        waited = time.perf_counter()
        drawn, chosen, top_ids, top_lps = jax.device_get(
            (step.sampled.tokens, step.sampled.logprobs, step.sampled.top_ids, step.sampled.top_logprobs)
        )
        waited = time.perf_counter() - waited
        prompt = self._collect_prompt(step) if step.prompt is not None else {}
        tokens, logprobs = {}, {}
        for row, chunk in enumerate(step.batch.chunks):
            if not chunk.samples:
                continue
            sid = chunk.seq.seq_id
            tokens[sid] = int(drawn[row])
            if chunk.seq.request.params.logprobs is not None:
                n = chunk.seq.request.params.logprobs
                logprobs[sid] = (float(chosen[row]), top_ids[row, :n].tolist(), top_lps[row, :n].tolist())
        return StepResult(tokens, logprobs, time.perf_counter() - step.dispatched_at, waited, prompt)

    def _collect_prompt(self, step: InFlightStep) -> dict[int, list[tuple[int, TokenLogprob]]]:
        """The prompt tokens a step scored: the logits at position p give token p + 1's logprob."""
        p = step.prompt
        chosen, ranks, top_ids, top_lps = jax.device_get((p.logprobs, p.ranks, p.top_ids, p.top_logprobs))
        out = {}
        for index, at in step.prompt_chunks:
            chunk = step.batch.chunks[index]
            seq = chunk.seq
            n_top = seq.request.params.prompt_logprobs
            scored = []
            for k in range(chunk.num_tokens):
                target = chunk.start + k + 1
                if target >= seq.num_prompt_tokens:
                    break
                row = at + k
                top = tuple(zip(top_ids[row, :n_top].tolist(), top_lps[row, :n_top].tolist()))
                scored.append((target, TokenLogprob(seq.request.prompt_token_ids[target], float(chosen[row]), top,
                                                    int(ranks[row]))))
            out[seq.seq_id] = scored
        return out

    def _execute(self, out: SchedulerOutput, bucket: int, adjust: bool, previous: InFlightStep | None,
                 lora: bool = False, prompt: bool = False) -> tuple[SampledTokens, jax.Array, PromptLogprobs | None]:
        args, layout = self._step_args(out, bucket, adjust, previous, lora, prompt)
        # The packed buffer goes straight into the jitted call: one host-to-device copy.
        sampled, next_tokens, self.kv_cache, prompt_lps = self._jitted_step(*args, layout=layout)
        return sampled, next_tokens, prompt_lps

    def _step_args(self, out: SchedulerOutput, bucket: int, adjust: bool, previous: InFlightStep | None,
                   lora: bool, prompt: bool) -> tuple[tuple, StepLayout]:
        """The jitted step's positional arguments for `out`, and the bucket's static layout."""
        buffers = self._buffers[bucket]
        packed, f = buffers.next()
        tokens, positions, slots, from_previous = f["tokens"], f["positions"], f["slots"], f["from_previous"]
        block_tables, context_lens, query_start = f["block_tables"], f["context_lens"], f["query_start"]
        at = 0
        bs = self.block_size
        for row, chunk in enumerate(out.chunks):
            seq, n, start = chunk.seq, chunk.num_tokens, chunk.start
            table = seq.block_ids
            if n == 1:  # a decode: plain indexing, no temporary arrays
                tokens[at] = seq.token_ids[start]
                positions[at] = start
                slots[at] = table[start // bs] * bs + start % bs
            else:
                span = np.arange(start, start + n)
                tokens[at : at + n] = seq.token_ids[start : start + n]
                positions[at : at + n] = span
                slots[at : at + n] = np.asarray(table, np.int32)[span // bs] * bs + span % bs
            if tokens[at + n - 1] == PENDING_TOKEN:  # drawn by the step still on the device
                if previous is None or seq.seq_id not in previous.rows:
                    raise RuntimeError(f"sequence {seq.seq_id} waits on a token no step in flight draws")
                from_previous[at + n - 1] = previous.rows[seq.seq_id]
            block_tables[row, : len(table)] = table
            context_lens[row] = chunk.start + n
            at += n
            query_start[row + 1] = at
            f["logits_indices"][row] = at - 1
            p = seq.request.params
            # Values were checked to fit (runtime/request.py); a tiny top_p would round to 0 in
            # float32 and keep no token, so it is raised to the least that still keeps the top one.
            f["temperature"][row] = 0.0 if p.greedy else p.temperature
            f["top_p"][row], f["top_k"][row], f["min_p"][row] = max(p.top_p, MIN_TOP_P), p.top_k, p.min_p
            f["seeds"][row], f["sample_positions"][row] = seq.seed, seq.num_tokens
        query_start[len(out.chunks) + 1 :] = at
        if buffers.layout.attention is not None:
            f["attention_work"][...] = work_table(buffers.layout.attention, query_start, context_lens)
        # A tuple, not the dataclass: jax's AOT stages (lower_step) rebuild argument pytrees
        # with placeholders, which the dataclass's shape-checked constructor refuses in tests.
        adjustments = _fields(self._adjustments(out, buffers.layout.rows)) if adjust else None
        targets = self._prompt_targets(out, bucket) if prompt else None
        previous_tokens = self._no_previous if previous is None else previous.next_tokens
        lora_stacks = None
        if lora:
            at = 0
            for chunk in out.chunks:
                f["lora_slots"][at : at + chunk.num_tokens] = self.adapters.slot_of(chunk.seq.request.adapter_id)
                at += chunk.num_tokens
            lora_stacks = self.adapters.stacks
        args = (self._state_leaves, self.kv_cache, packed, previous_tokens, adjustments, lora_stacks, targets)
        return args, buffers.layout

    @staticmethod
    def _prompt_targets(out: SchedulerOutput, bucket: int) -> jax.Array:
        """Each token's next prompt token, for the sequences whose prompt logprobs are wanted."""
        targets = np.full(bucket, -1, np.int32)
        at = 0
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.needs_prompt_logits:
                end = min(chunk.end + 1, seq.num_prompt_tokens)
                following = seq.request.prompt_token_ids[chunk.start + 1 : end]
                targets[at : at + len(following)] = following
            at += chunk.num_tokens
        return jnp.asarray(targets)

    def _adjustments(self, out: SchedulerOutput, S: int) -> LogitAdjustments:
        V = self.vocab_size
        counts = np.zeros((S, V), np.int32)
        seen = np.zeros((S, V), np.bool_)
        banned = np.zeros((S, V), np.bool_)
        presence, frequency, repetition = np.zeros(S, np.float32), np.zeros(S, np.float32), np.ones(S, np.float32)
        allowed = np.full((S, (V + 31) // 32), -1, np.int32)  # every bit set: no grammar
        for row, chunk in enumerate(out.chunks):
            p = chunk.seq.request.params
            if not (chunk.samples and p.needs_logit_adjustment):
                continue
            seq: Sequence = chunk.seq
            if seq.num_pending_tokens:
                raise RuntimeError("penalties need every output token on the host; the engine reads them first")
            counts[row] = np.bincount(np.asarray(seq.output_token_ids, np.int64), minlength=V)[:V]
            seen[row, seq.token_ids] = True
            presence[row], frequency[row], repetition[row] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
            if seq.num_output_tokens < p.min_tokens:
                banned[row, list(seq.request.stop_ids_before_min_tokens)] = True
            if seq.grammar is not None:
                seq.grammar.fill_mask(allowed, row)
        return LogitAdjustments(
            jnp.asarray(counts), jnp.asarray(seen), jnp.asarray(banned),
            jnp.asarray(presence), jnp.asarray(frequency), jnp.asarray(repetition), jnp.asarray(allowed),
        )
