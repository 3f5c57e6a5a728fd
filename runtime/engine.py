"""The engine: requests in, one scheduled and computed step at a time, outputs out.

In series (`async_scheduling` off), each step():

    schedule N -> dispatch N, commit -> read N back, complete -> text, stops -> outputs of N

Overlapped (on, the default): the host plans and dispatches step N+1 before it reads step N
back, so the device has the next step queued while the host detokenizes and streams; N's
drawn tokens feed N+1 on the device (runtime/runner.py) and reach the host one step late:

    schedule N+1 -> dispatch N+1, commit -> read N back, complete -> text, stops -> outputs of N

A sequence that N finishes (EOS, stop string, max_tokens, abort) drops its token from N+1.
Penalties and grammars (structured output) need every output token on the host, so while such
a request runs, the step in flight is read back before the next is planned
(runtime/scheduler.py has the commit/complete/rollback shape).

A step that raises fails its own requests (outputs with `error` set) and the engine carries
on; a fault that took the KV cache with it reinitialises the runner (runtime/faults.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from models.config import generation_defaults
from models.loader import LoadedModel, lay_out, load_model
from models.sharding import make_mesh
from models.tokenizer import Tokenizer
from ops.audit import audit_event
from ops.startup import timeline
from runtime.adapters import AdapterManager
from runtime.backend import backend_mode
from runtime.block_manager import BlockManager
from runtime.config import EngineConfig
from runtime.execution_plan import ExecutionPlan, choose_plan
from runtime.faults import EngineUnrecoverable, FaultInjector
from runtime import kv_memory
from runtime.kv_tiers import KvTiers, StoredBlock, TierStats
from runtime.outputs import CompletionOutput, RequestOutput, RequestTimings, SequenceText, TokenLogprob
from runtime.request import FinishReason, Request, SamplingParams, Sequence, SequenceStatus
from runtime.request_limits import RequestLimits, check_request
from runtime.runner import InFlightStep, Runner
from runtime.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from runtime.structured import GrammarCompiler

log = logging.getLogger(__name__)
_request_ids = itertools.count()


def device_memory_stats(mesh) -> list[dict | None]:
    """jax's allocator statistics of each device of the mesh (None on the CPU)."""
    return [device.memory_stats() for device in mesh.devices.flat]


@dataclass
class EngineCounters:
    """Running totals for metrics and tests."""

    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of requests whose prefill is done (counted at their first token, as vLLM)
    computed_tokens: int = 0  # tokens run through the model (prefill chunks + decodes)
    generation_tokens: int = 0
    finished_requests: int = 0
    step_seconds: float = 0.0  # dispatch to read-back, summed over steps
    engine_seconds: float = 0.0  # wall time inside step() calls that had work
    device_wait_seconds: float = 0.0  # of it, the host blocked reading tokens back: the rest is host time
    last_step_tokens: int = 0  # tokens computed by the latest step (0 when it had nothing to do)
    step_faults: int = 0  # steps that raised; their requests failed
    reinitialisations: int = 0  # faults that took the KV cache with them (cache and step rebuilt)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for metrics: gauges of now, and cumulative counts (token counts, as vLLM)."""

    num_requests_running: int  # requests with a sample in the running batch
    num_requests_waiting: int  # requests with no sample running (queued or preempted)
    kv_cache_usage_perc: float  # 0..1, blocks held by sequences (cached free blocks count as free)
    kv_cache_fragmentation_ratio: float  # allocated but unused slots / allocated slots, running sequences
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, found there
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    iteration_tokens: int  # tokens computed by the latest step
    steps: int
    engine_step_faults: int = 0
    engine_reinitialisations: int = 0
    kv_events_dropped: int = 0  # KV events no consumer took before the ring (max_kv_events) overflowed
    max_lora: int = 0  # adapter slots; 0: no adapters served
    running_lora_adapters: str = ""  # comma-separated adapter names, as vLLM's lora_requests_info labels
    waiting_lora_adapters: str = ""
    lora_adapter_hits: int = 0
    lora_adapter_misses: int = 0
    lora_adapter_loads: int = 0
    lora_adapter_evictions: int = 0
    lora_adapter_load_seconds: float = 0.0
    kv_tiers: tuple[tuple[str, TierStats], ...] = ()  # (tier name, copy of its figures) below the device
    kv_tier_pending_writes: int = 0  # blocks queued for the disk tier, not yet committed


class Engine:
    def __init__(self, model: LoadedModel, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.plan: ExecutionPlan = choose_plan(config, model.cfg, model.dtype, model.mesh)
        log.info("execution plan: %s", self.plan)
        # A model in the checkpoint layout is laid out here, and its arrays stay on the device until
        # the caller lets go, after the KV cache was sized: `served_layout` first frees them sooner.
        self.model, self.tokenizer = lay_out(model, self.plan.weights), tokenizer
        self.max_model_len = min(config.max_model_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
        # With tensor parallelism the stacks are replicated: XLA splits the products as it
        # splits the weights they add to (runtime/backend.py keeps the kernels to one device).
        replicated = NamedSharding(model.mesh, PartitionSpec()) if model.mesh.size > 1 else None
        self.adapters = (AdapterManager(model.cfg, config.max_loras, config.max_lora_rank, model.dtype, replicated)
                         if config.max_loras else None)
        # The cache is allocated once its size is known: from the device's memory, that needs the
        # weights and adapter slots in place and the step's workspace (runtime/kv_memory.py).
        self.runner = Runner(
            self.model, self.plan, None, config.block_size, config.max_num_seqs, self.max_model_len,
            config.resolved_token_buckets(), self.adapters,
        )
        num_blocks = config.num_blocks or self._blocks_for_memory(config)
        self.runner.allocate_cache(num_blocks)
        self.blocks = BlockManager(num_blocks, config.block_size, config.model_id, config.enable_prefix_caching,
                                   max_events=config.max_kv_events)
        limits = SchedulerLimits(
            config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, config.enable_chunked_prefill
        )
        self.scheduler = Scheduler(limits, self.blocks)
        self.scheduler.admission_gate = self._may_start
        self.model_version = 1  # counts base model switches (runtime/model_reload.py)
        self.model_dir = ""
        self._pending_switch = None  # a ModelSwitch waiting for the batch to drain
        self.eos_token_ids = tokenizer.eos_token_ids | frozenset(model.cfg.eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer.to_json(), model.cfg.vocab_size, self.eos_token_ids)
        self.counters = EngineCounters()
        self._texts: dict[int, SequenceText] = {}
        self._timings: dict[str, RequestTimings] = {}  # of unfinished requests, by id
        # Sample 0's prompt logprobs by prompt position, filled as prefill chunks are read back and
        # handed out with its first token (a recompute after preemption writes the same values).
        self._prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self.generation_defaults: dict = {}  # the model's generation_config.json sampling fields
        self.faults = FaultInjector()  # test-only; off unless TESSERA_FAULT_INJECTION=1
        self._in_flight: InFlightStep | None = None  # overlapped: dispatched, not yet read back
        timeline.mark("engine build")
        self.kv_tiers = self._open_kv_tiers(config, model)

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, dtype: str = "float32", config: EngineConfig | None = None, tensor_parallel: int = 1,
        devices: list | None = None,
    ) -> Engine:
        """`devices`: where the model runs (default: jax's default backend's); the CPU fallback
        (runtime/failover.py) passes jax.devices("cpu")."""
        tokenizer = Tokenizer.from_dir(model_dir)
        config = config or EngineConfig()
        config.model_id = config.model_id or str(Path(model_dir).name)
        model = load_model(model_dir, dtype, mesh=make_mesh(tensor_parallel, devices), max_token_id=tokenizer.max_token_id)
        timeline.mark("model load")
        model = cls.served_layout(model, config)
        engine = cls(model, tokenizer, config)
        engine.generation_defaults = generation_defaults(model_dir)
        engine.model_dir = str(model_dir)
        return engine

    @staticmethod
    def served_layout(model: LoadedModel, config: EngineConfig) -> LoadedModel:
        """`model` laid out as the engine would serve it. Laid out before the engine is made, the
        caller can drop the checkpoint layout's arrays (`model = Engine.served_layout(model, c)`)
        before the KV cache is sized from the device's free memory."""
        return lay_out(model, choose_plan(config, model.cfg, model.dtype, model.mesh).weights)

    def _open_kv_tiers(self, config: EngineConfig, model: LoadedModel) -> KvTiers | None:
        """The tiers below the device, their blocks re-advertised as KV events. Their digest covers
        the model's and the page's dtype and size, so pages of another layout are never loaded."""
        if config.kv_tiers is None or not config.enable_prefix_caching:
            return None
        layout = f"{config.kv_tiers.model_digest}\0{model.dtype}\0{config.block_size}\0{config.model_id}"
        tiers = KvTiers(dataclasses.replace(config.kv_tiers, model_digest=hashlib.sha256(layout.encode()).hexdigest()))
        self.blocks.tier = tiers
        tiers.on_removed.append(self.blocks.note_tier_removed)
        for block in tiers.restored:
            self.blocks.note_tier_stored(block.key, block.parent, block.token_ids)
        log.info("KV tiers: %d blocks restored from %s", len(tiers.restored), config.kv_tiers.disk_dir)
        timeline.mark("KV tier restore")
        return tiers

    def close(self) -> None:
        """Flush the tiers below the device (their queued writes) and close them."""
        if self.kv_tiers is not None:
            self.kv_tiers.close()

    @property
    def limits(self) -> RequestLimits:
        """What a request must fit; a remote client gets them in the worker's handshake."""
        config = self.config
        return RequestLimits(self.max_model_len, self.model.cfg.vocab_size, self.blocks.num_blocks,
                             config.block_size, config.max_num_seqs, config.max_num_batched_tokens,
                             config.enable_chunked_prefill, frozenset(self.eos_token_ids))

    def _blocks_for_memory(self, config: EngineConfig) -> int:
        cfg = self.model.cfg
        if config.gpu_memory_utilization is not None:
            blocks = self._blocks_for_device_memory(config.gpu_memory_utilization)
            if blocks is not None:
                return blocks
        per_block = 2 * cfg.num_layers * config.block_size * cfg.num_kv_heads * cfg.head_dim * self.model.dtype.itemsize
        enough = config.max_num_seqs * -(-self.max_model_len // config.block_size)
        return max(1, min(config.kv_cache_memory_bytes // per_block, enough))

    def _blocks_for_device_memory(self, utilization: float) -> int | None:
        """Pages that fill what `utilization` of each device leaves after weights and the step's
        workspace (runtime/kv_memory.py); None where a device reports no memory (the CPU)."""
        fraction = kv_memory.pool_fraction()
        memories = [kv_memory.device_memory(stats, fraction) for stats in device_memory_stats(self.model.mesh)]
        if any(m is None for m in memories):
            log.info("gpu_memory_utilization: the device reports no memory; the KV cache keeps kv_cache_memory_bytes")
            return None
        started = time.perf_counter()
        workspace = self.runner.workspace_bytes()
        if workspace is None:
            log.warning("gpu_memory_utilization: no memory analysis of the step; the KV cache keeps kv_cache_memory_bytes")
            return None
        cfg, bs = self.model.cfg, self.config.block_size
        page = (1, bs, cfg.num_kv_heads, cfg.head_dim)
        per_block = 2 * cfg.num_layers * int(np.prod(self.model.kv_cache_sharding(1, bs).shard_shape(page))) \
            * self.model.dtype.itemsize  # on one device: a tensor-parallel cache splits its heads
        budget = min(kv_memory.kv_cache_budget(m, utilization, workspace) for m in memories)
        memory = min(memories, key=lambda m: m.limit)
        if utilization > memory.fraction:
            log.warning("gpu_memory_utilization=%s: jax's pool holds %.2f GiB of the device's %.2f GiB (%s=%s); set it "
                        "before jax starts to grant more", utilization, memory.limit / 2**30, memory.total / 2**30,
                        kv_memory.POOL_FRACTION_VARIABLE, fraction)
        if budget < per_block:
            raise ValueError(
                f"gpu_memory_utilization={utilization} leaves no room for the KV cache: of "
                f"{memory.granted(utilization) / 2**30:.2f} GiB, {memory.in_use / 2**30:.2f} GiB are "
                f"in use (weights) and the largest step needs {workspace / 2**30:.2f} GiB; raise it, or lower "
                f"max_num_batched_tokens")
        blocks = budget // per_block
        log.info("KV cache: %d pages (%.2f GiB per device) from gpu_memory_utilization=%s: %.2f GiB in use, "
                 "step workspace %.2f GiB (measured in %.1fs)", blocks, blocks * per_block / 2**30, utilization,
                 memory.in_use / 2**30, workspace / 2**30, time.perf_counter() - started)
        return blocks

    def stats(self) -> EngineStats:
        running = {s.request.request_id for s in self.scheduler.running}
        waiting = {s.request.request_id for s in self.scheduler.waiting} - running
        prefix = self.blocks.stats
        return EngineStats(
            **self._adapter_stats(),
            num_requests_running=len(running),
            num_requests_waiting=len(waiting),
            kv_cache_usage_perc=self.blocks.usage,
            kv_cache_fragmentation_ratio=self.blocks.fragmentation(self.scheduler.running),
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.counters.prompt_tokens,
            generation_tokens=self.counters.generation_tokens,
            iteration_tokens=self.counters.last_step_tokens,
            steps=self.counters.steps,
            engine_step_faults=self.counters.step_faults,
            engine_reinitialisations=self.counters.reinitialisations,
            kv_events_dropped=self.blocks.num_events_dropped,
            kv_tiers=tuple((name, dataclasses.replace(t)) for name, t in self.kv_tiers.stats().items())
            if self.kv_tiers else (),
            kv_tier_pending_writes=self.pending_tier_writes,
        )

    @property
    def pending_tier_writes(self) -> int:
        """Blocks queued for the disk tier, not yet committed (its writer thread commits them)."""
        return self.kv_tiers.disk.num_pending_writes if self.kv_tiers else 0

    def _adapter_stats(self) -> dict:
        if self.adapters is None:
            return {}
        c = self.adapters.counters

        def names(seqs) -> str:
            return ",".join(sorted({s.request.adapter_id.rpartition("@")[0] for s in seqs} - {""}))

        return dict(max_lora=self.adapters.max_loras, running_lora_adapters=names(self.scheduler.running),
                    waiting_lora_adapters=names(self.scheduler.waiting), lora_adapter_hits=c.hits,
                    lora_adapter_misses=c.misses, lora_adapter_loads=c.loads, lora_adapter_evictions=c.evictions,
                    lora_adapter_load_seconds=c.load_seconds)

    def cache_config_info(self) -> dict[str, str]:
        """Labels of the `cache_config_info` metric (vLLM's names where it has them)."""
        return {
            "block_size": str(self.config.block_size),
            "num_gpu_blocks": str(self.blocks.num_blocks),
            "enable_prefix_caching": str(self.config.enable_prefix_caching),
            "cache_dtype": str(self.model.dtype),
            "prefix_caching_hash_algo": "sha256",
        }

    def backend_mode(self) -> str:
        """The `backend` label of the `backend_mode` metric (runtime/backend.py)."""
        return backend_mode(self.plan.platform, self.plan.attention)

    def warm_up(self) -> float:
        seconds = self.runner.warm_up()
        timeline.mark("warm-up: token buckets")
        if self.kv_tiers is not None:
            self.runner.warm_up_page_transfers()
            timeline.mark("warm-up: page transfers")
        log.info("compiled %d token buckets in %.1fs", len(self.runner.token_buckets), seconds)
        return seconds

    # -- requests -------------------------------------------------------------------------

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        tenant: str = "default",
        cache_salt: str = "",
        trace_id: str = "",
        adapter: str = "",
    ) -> Request:
        """A checked request, not yet queued. Raises ValueError naming the bad field, and
        runtime.adapters.AdapterNotFound for an adapter that is not loaded."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_request(ids, params, self.limits)
        if params.guided is not None:
            self.grammars.check(params.guided)  # compiled once; a bad spec is this request's ValueError
        adapter_id = ""
        if adapter:
            if self.adapters is None:
                raise ValueError("this server serves no LoRA adapters (start it with --max-loras)")
            adapter_id = self.adapters.resolve(adapter)  # bound to today's version for its whole life
        return Request(
            request_id=request_id or f"req-{next(_request_ids)}",
            prompt_token_ids=ids,
            params=params,
            priority=priority,
            tenant=tenant,
            cache_salt=cache_salt,
            trace_id=trace_id,
            adapter_id=adapter_id,
            eos_token_ids=self.eos_token_ids,
        )

    def add(self, request: Request) -> None:
        self.scheduler.add_request(request)
        if self.adapters is not None:
            self.adapters.note_request(request.adapter_id)
        # One clock: timings are monotonic like Request.arrival_time (the API edge converts).
        self._timings[request.request_id] = RequestTimings(request.arrival_time, num_prompt_tokens=request.num_prompt_tokens)
        for seq in request.sequences:
            self._texts[seq.seq_id] = SequenceText(self.tokenizer, seq)
            if request.params.guided is not None:
                seq.grammar = self.grammars.start(request.params.guided)
        if request.params.prompt_logprobs is not None:
            self._prompt_logprobs[request.sequences[0].seq_id] = [None] * request.num_prompt_tokens

    def add_request(self, prompt: str | list[int], params: SamplingParams, **kwargs) -> Request:
        request = self.make_request(prompt, params, **kwargs)
        self.add(request)
        return request

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> RequestOutput | None:
        request = self.scheduler.abort(request_id, reason)
        if request is None:
            return None
        self._prompt_logprobs.pop(request.sequences[0].seq_id, None)
        outputs = [
            CompletionOutput(s.index, self._texts.pop(s.seq_id).finish() if s.seq_id in self._texts else "", [],
                             None, reason.value)
            for s in request.sequences
        ]
        return self._request_output(request, outputs)

    def has_unfinished(self) -> bool:
        """Work to step for: queued or running sequences, or a step in flight whose tokens someone
        still waits for (one that only aborted sequences wait on is read back with the next)."""
        flight = self._in_flight
        return self.scheduler.num_unfinished > 0 or self._pending_switch is not None or (
            flight is not None and any(not c.seq.is_finished for c in flight.batch.chunks))

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        waited = self.counters.device_wait_seconds
        if self._pending_switch is not None and self._drained():
            return self._switch_model()
        outputs = self._step_overlapped() if self.config.async_scheduling else self._step_in_series()
        if self.counters.last_step_tokens or outputs:
            self.counters.engine_seconds += time.perf_counter() - started
        else:  # an idle call: not part of any step's host time
            self.counters.device_wait_seconds = waited
        self.counters.finished_requests += sum(o.finished for o in outputs)
        return outputs

    def _step_in_series(self) -> list[RequestOutput]:
        batch = self._schedule()
        if batch.is_empty:
            return []
        try:
            return self._read_back(self._dispatch(batch, None))
        except Exception as error:  # noqa: BLE001 - a step's fault is its requests' failure, not the engine's
            return self._fail_step(batch, error)

    def _step_overlapped(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and _needs_host_tokens(previous):
            outputs += self._settle(previous, None)
            previous = None
        batch = self._schedule()
        if not batch.is_empty:
            try:
                self._in_flight = self._dispatch(batch, previous)
            except Exception as error:  # noqa: BLE001 - as in series; the step before it is still good
                if previous is not None:
                    outputs += self._settle(previous, None)
                return outputs + self._fail_step(batch, error)
        if previous is not None:
            outputs += self._settle(previous, self._in_flight)
        return outputs

    def _schedule(self) -> SchedulerOutput:
        batch = self.scheduler.schedule()
        self.counters.last_step_tokens = batch.num_tokens
        if not batch.is_empty:
            self._note_scheduled(batch, time.monotonic())
        return batch

    def _dispatch(self, batch: SchedulerOutput, previous: InFlightStep | None) -> InFlightStep:
        self.faults.before_step(self.runner.kv_cache)
        if self.adapters is not None:
            if self.adapters.has_retired:
                self.adapters.sweep({r.adapter_id for r in self.scheduler.requests.values()})
            self.adapters.activate({c.seq.request.adapter_id for c in batch.chunks})
        loads = self.blocks.take_pending_loads()
        if loads:  # pages found in a tier below: on the device before the step that reads them
            self.runner.write_pages(list(loads), np.stack(list(loads.values())))
        flight = self.runner.dispatch(batch, previous)
        self.scheduler.commit(batch)
        return flight

    def _settle(self, flight: InFlightStep, successor: InFlightStep | None) -> list[RequestOutput]:
        """Read a step back; if that fails, fail its requests and undo the step dispatched after
        it (which read its tokens on the device)."""
        try:
            return self._read_back(flight)
        except Exception as error:  # noqa: BLE001 - a step's fault is its requests' failure
            if successor is not None:
                self.scheduler.rollback(successor.batch)
                self._in_flight = None
            return self._fail_step(flight.batch, error)

    def _read_back(self, flight: InFlightStep) -> list[RequestOutput]:
        self.faults.before_readback()
        result = self.runner.collect(flight)
        batch = flight.batch
        grown = self.scheduler.complete(batch, result.tokens)
        if self.kv_tiers is not None:
            self._save_to_tiers()
        self.counters.steps += 1
        self.counters.computed_tokens += batch.num_tokens
        self.counters.generation_tokens += len(grown)
        self.counters.step_seconds += result.seconds
        self.counters.device_wait_seconds += result.wait_seconds

        for seq_id, scored in result.prompt_logprobs.items():
            slots = self._prompt_logprobs.get(seq_id)
            for position, logprob in scored if slots is not None else ():
                slots[position] = logprob

        by_request: dict[str, tuple[Request, list[CompletionOutput]]] = {}
        prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}
        for seq, token in grown:
            if seq.grammar is not None:
                self._advance_grammar(seq, token)
            out = self._sample_output(seq, token, result.logprobs.get(seq.seq_id))
            by_request.setdefault(seq.request.request_id, (seq.request, []))[1].append(out)
            if seq.seq_id in self._prompt_logprobs:  # sample 0's first token: its prompt is done
                prompt_logprobs[seq.request.request_id] = self._prompt_logprobs.pop(seq.seq_id)
        now = time.monotonic()
        for request, _ in by_request.values():
            self._note_tokens(request, now)
        return [self._request_output(request, outs, prompt_logprobs.get(request.request_id))
                for request, outs in by_request.values()]

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """A drawn token moves the sample's grammar on; a complete grammar ends the sample."""
        if not seq.grammar.consume(token) and not seq.is_finished:
            log.warning("sequence %d drew token %d its grammar does not allow (%s)", seq.seq_id, token,
                        seq.grammar.error or "rejected")
        if seq.grammar.is_finished and not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP)

    # -- admission: adapter slots and a model switch ---------------------------------------

    def _may_start(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Whether the scheduler may start `seq` now. While a model switch waits, only requests
        that already began on the served weights run (so each finishes on one version); the
        running batch never needs more adapters than there are slots."""
        request = seq.request
        if self._pending_switch is not None and all(s.status is SequenceStatus.WAITING for s in request.sequences):
            return False
        if self.adapters is None or not request.adapter_id:
            return True
        active = {s.request.adapter_id for s in running} - {""}
        return request.adapter_id in active or len(active) < self.adapters.max_loras

    def _drained(self) -> bool:
        """No request that began on the served weights is unfinished (queued ones never started)."""
        return all(s.status is SequenceStatus.WAITING for r in self.scheduler.requests.values() for s in r.sequences)

    def begin_model_switch(self, switch) -> None:
        """Loop thread: hold new requests back, let the running ones finish, then switch
        (`_switch_model`, at the start of the step that finds the batch empty)."""
        if self._pending_switch is not None:
            raise RuntimeError("a model switch is already waiting")
        self._pending_switch = switch

    def cancel_model_switch(self, switch) -> bool:
        if self._pending_switch is not switch:
            return False
        self._pending_switch = None
        return True

    def _switch_model(self) -> list[RequestOutput]:
        outputs = []
        if self._in_flight is not None:  # only finished sequences wait on it: read it back first
            flight, self._in_flight = self._in_flight, None
            outputs = self._settle(flight, None)
        switch, self._pending_switch = self._pending_switch, None
        if not switch.begin():  # the caller timed out and cancelled it
            return outputs
        try:
            self.runner.swap_weights(switch.model)
        except Exception as e:  # noqa: BLE001 - reported to the caller; the served model stays
            switch.fail(e)
            return outputs
        self.model = switch.model
        self.model_version += 1
        # Cached pages hold the old weights' keys and values: forget them, and key new pages
        # apart from them in any case (model_id is part of every block key).
        self.blocks.reset_prefix_cache()
        self.blocks.model_id = f"{self.config.model_id}@v{self.model_version}"
        self.model_dir = switch.model_dir
        switch.done(self.model_version)
        return outputs

    def _save_to_tiers(self) -> None:
        """Copy the pages `complete` just cached to the tiers below (write-through)."""
        blocks = self.blocks.take_blocks_to_save()
        if not blocks:
            return
        pages = self.runner.read_pages([page for _, page in blocks])
        for (stored, _), data in zip(blocks, pages):
            self.kv_tiers.save(StoredBlock(stored.keys[0], stored.parent_key, stored.token_ids), data)

    # -- faults ---------------------------------------------------------------------------

    def recover(self) -> float:
        """After the engine died (EngineUnrecoverable; runtime/failover.py): forget every request,
        then rebuild the cache and step and probe the device (raises while it still fails)."""
        for request_id in list(self.scheduler.requests):
            self.abort(request_id, FinishReason.ERROR)
        self._in_flight = None
        self.blocks.reset_prefix_cache()
        self.faults.before_probe()
        return self.runner.reinitialise()

    def _fail_step(self, batch: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """Fail the requests this step was computing; rebuild the cache and step if the fault
        took the cache with it. Raises EngineUnrecoverable when even that fails."""
        self.counters.step_faults += 1
        requests = list({c.seq.request.request_id: c.seq.request for c in batch.chunks}.values())
        log.error("engine step failed (%s: %s); failing requests %s", type(error).__name__, error,
                  ", ".join(_named(r) for r in requests), exc_info=error)
        outputs = []
        for request in requests:
            output = self.abort(request.request_id, FinishReason.ERROR)
            if output is not None:
                output.error = f"the engine step computing this request failed ({type(error).__name__})"
                outputs.append(output)
            self._audit_fault("step", "failure", type(error).__name__, request)
        if not self.runner.cache_intact():
            self._reinitialise(error)
        return outputs

    def _reinitialise(self, cause: Exception) -> None:
        self.counters.reinitialisations += 1
        requeued = self.scheduler.requeue_running()  # their pages are gone: recomputed from their tokens
        cleared = self.blocks.reset_prefix_cache()
        assert cleared, "every page is free once the running sequences are requeued"
        log.error("engine reinitialising after %s: new KV cache and compiled step; %d running sequences "
                  "requeued", type(cause).__name__, requeued)
        try:
            self.faults.before_probe()
            seconds = self.runner.reinitialise()
        except Exception as e:  # noqa: BLE001 - reported as the engine's death, below
            self._audit_fault("reinitialise", "failure", type(e).__name__)
            raise EngineUnrecoverable(f"the engine could not be reinitialised after {type(cause).__name__}: "
                                      f"{type(e).__name__}: {e}") from e
        self._audit_fault("reinitialise", "success", type(cause).__name__)
        log.warning("engine reinitialised in %.1fs", seconds)

    def _audit_fault(self, kind: str, outcome: str, reason: str, request: Request | None = None) -> None:
        audit_event("engine.fault", outcome, actor="system", object=f"model:{self.config.model_id}",
                    tenant=request.tenant if request else None,
                    request_id=(request.trace_id or request.request_id) if request else None,
                    engine_request_id=request.request_id if request else None, kind=kind, reason=reason)

    def _note_scheduled(self, batch: SchedulerOutput, now: float) -> None:
        for chunk in batch.chunks:
            timings = self._timings.get(chunk.seq.request.request_id)
            if timings is not None and timings.first_scheduled_time is None:
                timings.first_scheduled_time = now

    def _note_tokens(self, request: Request, now: float) -> None:
        timings = self._timings.get(request.request_id)
        if timings is None:
            return
        if timings.first_token_time is None:
            timings.first_token_time = now
            self.counters.prompt_tokens += request.num_prompt_tokens
        timings.last_token_time = now
        timings.token_times.append(now)

    def _sample_output(self, seq: Sequence, token: int, logprob) -> CompletionOutput:
        text_state = self._texts[seq.seq_id]
        started = time.perf_counter()
        text, stop = text_state.add(token)
        if stop is not None and not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP, stop)
        if seq.is_finished:
            if stop is None:
                text += text_state.finish()
            del self._texts[seq.seq_id]
        timings = self._timings.get(seq.request.request_id)
        if timings is not None:
            timings.detokenize_seconds += time.perf_counter() - started
        logprobs = None
        if logprob is not None:
            chosen, top_ids, top_lps = logprob
            logprobs = [TokenLogprob(token, chosen, tuple(zip(top_ids, top_lps)))]
        return CompletionOutput(
            seq.index, text, [token], logprobs,
            seq.finish_reason.value if seq.finish_reason else None, seq.stop_reason,
        )

    def _request_output(self, request: Request, outputs: list[CompletionOutput],
                        prompt_logprobs: list[TokenLogprob | None] | None = None) -> RequestOutput:
        now = time.monotonic()
        metrics = {"arrival_time": request.arrival_time}
        if request.first_token_time is not None:
            metrics["first_token_time"] = request.first_token_time
        if request.is_finished:
            metrics["finished_time"] = now
        timings = self._timings.get(request.request_id) or RequestTimings(num_prompt_tokens=request.num_prompt_tokens)
        timings.num_cached_tokens = request.sequences[0].num_cached_tokens
        timings.num_generation_tokens = sum(s.num_output_tokens for s in request.sequences)
        timings.num_preemptions = sum(s.num_preemptions for s in request.sequences)
        if request.is_finished:
            timings.finished_time = now
            reason = request.sequences[0].finish_reason
            timings.finished_reason = reason.value if reason else None
            self._timings.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            outputs=outputs,
            finished=request.is_finished,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=timings.num_cached_tokens,
            num_generated_tokens=timings.num_generation_tokens,
            metrics=metrics,
            timings=timings,
            prompt_logprobs=prompt_logprobs,
        )

    # -- convenience ----------------------------------------------------------------------

    def run_to_completion(self) -> dict[str, dict[int, CompletionOutput]]:
        """Step until idle; the accumulated output of every sample, by request id and index."""
        done: dict[str, dict[int, CompletionOutput]] = {}
        while self.has_unfinished():
            for out in self.step():
                merged = done.setdefault(out.request_id, {})
                for o in out.outputs:
                    acc = merged.setdefault(o.index, CompletionOutput(o.index, "", [], [] if o.logprobs else None))
                    acc.text += o.text
                    acc.token_ids += o.token_ids
                    if o.logprobs:
                        acc.logprobs = (acc.logprobs or []) + o.logprobs
                    acc.finish_reason, acc.stop_reason = o.finish_reason, o.stop_reason
        return done


def _needs_host_tokens(flight: InFlightStep) -> bool:
    """Whether a sequence of the step in flight needs its drawn tokens on the host before it can
    be scheduled again (penalties count every output token; a grammar's mask follows them)."""
    return any(c.samples and c.seq.request.params.needs_logit_adjustment and not c.seq.is_finished
               for c in flight.batch.chunks)


def _named(request: Request) -> str:
    return f"{request.request_id} (request id {request.trace_id})" if request.trace_id else request.request_id
