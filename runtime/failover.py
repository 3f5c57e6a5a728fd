"""Backend failover: when the accelerator's engine dies, small prompts go to the same model on the CPU.

`FailoverEngine` is an `EngineClient` over two engines: the primary (the accelerator) and a
CPU fallback (the same model, built at start when `keep_warm`, else on the first failure).
A monitor thread checks the primary's health every `check_interval_s`:

    accelerator --(primary engine dead: a step and its recovery probe failed)--> cpu_fallback
    cpu_fallback --(probe: cache and step rebuilt on the accelerator, all-padding steps run)--> accelerator

Requests in flight on the primary when it fails end as the engine ends them (an error output,
or EngineDeadError): none waits forever. While degraded, a prompt of at most
`max_prompt_tokens` runs on the fallback; a larger one is refused with `BackendDegradedError`
(503 with Retry-After at the API edge), before anything is queued. Requests the fallback
is running when the accelerator returns finish there; new ones go to the accelerator.

The mode is `mode` ("accelerator" or "cpu_fallback"), `tessera:backend_mode` (the fallback's
label is "cpu_fallback") and `tessera:backend_mode_changes_total`; the worker's etcd record
carries it too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from runtime.engine_client import EngineClient, EngineDeadError, EngineHealth, KVEvent
from runtime.outputs import RequestOutput
from runtime.request import Request, SamplingParams

log = logging.getLogger(__name__)

ACCELERATOR, CPU_FALLBACK = "accelerator", "cpu_fallback"


class BackendDegradedError(EngineDeadError):
    """The accelerator is out of service and this request is too large for the CPU fallback."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class FailoverConfig:
    max_prompt_tokens: int = 256
    """Largest prompt (tokens) served on the CPU while the accelerator is out; larger ones get 503."""
    keep_warm: bool = True
    """Build and warm the CPU engine at start (memory for a second copy of the weights); else on failure."""
    probe_interval_s: float = 10.0
    """Seconds between attempts to bring the accelerator back."""
    check_interval_s: float = 0.1
    """Seconds between health checks of the engine in service."""
    retry_after_s: int = 30
    """Retry-After of the 503 for prompts too large for the fallback."""

    def __post_init__(self):
        if self.max_prompt_tokens < 0 or self.probe_interval_s <= 0 or self.check_interval_s <= 0:
            raise ValueError("max_prompt_tokens must be >= 0 and the intervals > 0")


class FailoverEngine:
    """`recover(primary)` brings a dead primary back (raises while the device still fails) and
    returns the started engine to use; `build_fallback()` returns the started CPU engine."""

    def __init__(self, primary: EngineClient, build_fallback: Callable[[], EngineClient],
                 recover: Callable[[EngineClient], EngineClient], config: FailoverConfig | None = None,
                 accelerator_label: str = "gpu"):
        self.config = config or FailoverConfig()
        self._primary, self._build_fallback, self._recover = primary, build_fallback, recover
        self._fallback: EngineClient | None = None
        self._accelerator_label = accelerator_label
        self.mode = ACCELERATOR
        self.mode_changes: list[tuple[float, str]] = []  # (monotonic time, new mode)
        self._stopping = threading.Event()
        self._last_probe = 0.0
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- what serving needs to know: the primary's (the fallback serves the same model) ---------

    @property
    def model_id(self) -> str:
        return self._primary.model_id

    @property
    def tokenizer(self):
        return self._primary.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._primary.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self._primary.max_num_seqs

    @property
    def limits(self):
        return self._primary.limits

    @property
    def generation_defaults(self) -> dict:
        return self._primary.generation_defaults

    @property
    def metrics(self) -> Any | None:
        return self._primary.metrics

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._primary.start()
        if self.config.keep_warm:
            self._ensure_fallback()
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="tessera-failover", daemon=True)
            self._monitor.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout)
        for engine in (self._primary, self._fallback):
            if engine is not None:
                engine.shutdown(timeout)

    # -- requests -------------------------------------------------------------------------------

    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                     **request_fields) -> Request:
        request = self._primary.make_request(prompt, params, request_id, **request_fields)
        self._engine_for(request)  # refuse now (503) rather than after the response has started
        return request

    def _engine_for(self, request: Request) -> EngineClient:
        if self.mode == ACCELERATOR:
            return self._primary
        if request.num_prompt_tokens > self.config.max_prompt_tokens:
            raise BackendDegradedError(
                f"the accelerator is out of service; prompts over {self.config.max_prompt_tokens} tokens are "
                f"refused until it returns (this one has {request.num_prompt_tokens})", self.config.retry_after_s)
        fallback = self._fallback
        if fallback is None:
            raise BackendDegradedError("the accelerator is out of service and the CPU engine is starting", 5)
        return fallback

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        async for output in self._engine_for(request).stream(request):
            yield output

    def abort(self, request_id: str) -> None:
        for engine in (self._primary, self._fallback):
            if engine is not None:
                engine.abort(request_id)

    # -- state ----------------------------------------------------------------------------------

    def stats(self):
        return (self._fallback if self.mode == CPU_FALLBACK and self._fallback else self._primary).stats()

    def health(self) -> EngineHealth:
        if self.mode == CPU_FALLBACK:
            fallback = self._fallback.health() if self._fallback is not None else EngineHealth(False, "starting")
            return EngineHealth(fallback.running, fallback.error, CPU_FALLBACK)  # degraded but serving: alive
        return self._primary.health()

    def kv_events(self) -> AsyncIterator[KVEvent]:
        return self._primary.kv_events()

    # -- the monitor thread ---------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.wait(self.config.check_interval_s):
            try:
                if self.mode == ACCELERATOR and not self._primary.health().running:
                    self._set_mode(CPU_FALLBACK, f"the accelerator's engine stopped: {self._primary.health().error}")
                    self._ensure_fallback()
                elif self.mode == CPU_FALLBACK and time.monotonic() - self._last_probe >= self.config.probe_interval_s:
                    self._probe()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one failure
                log.exception("failover monitor: check failed")

    def _ensure_fallback(self) -> None:
        with self._lock:
            if self._fallback is None:
                started = time.perf_counter()
                fallback = self._build_fallback()
                fallback.start()
                self._fallback = fallback
                log.warning("CPU fallback engine ready in %.1fs", time.perf_counter() - started)

    def _probe(self) -> None:
        self._last_probe = time.monotonic()
        try:
            primary = self._recover(self._primary)
        except Exception as e:  # noqa: BLE001 - the device still fails: stay degraded
            log.warning("accelerator probe failed (%s: %s); serving small prompts on the CPU", type(e).__name__, e)
            return
        self._primary = primary
        self._set_mode(ACCELERATOR, "the accelerator passed its probe")

    def _set_mode(self, mode: str, reason: str) -> None:
        self.mode = mode
        self.mode_changes.append((time.monotonic(), mode))
        log.warning("backend mode: %s (%s)", mode, reason)
        metrics = self._primary.metrics
        if metrics is not None and hasattr(metrics, "note_backend_mode"):
            metrics.note_backend_mode(self._accelerator_label if mode == ACCELERATOR else CPU_FALLBACK)


def recover_async_engine(primary) -> EngineClient:
    """Bring a dead in-process engine (runtime/async_engine.py) back: its requests forgotten, its
    cache and step rebuilt and probed on the device (raises while the device still fails), then
    a new loop around it. The old loop's thread has ended; its streams were told."""
    from runtime.async_engine import AsyncEngine

    core = primary.engine
    seconds = core.recover()
    fresh = AsyncEngine(core, metrics=primary.metrics)
    fresh.start()
    log.warning("accelerator engine recovered in %.1fs", seconds)
    return fresh
