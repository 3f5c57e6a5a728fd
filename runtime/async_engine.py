"""An asyncio front for the engine, whose step loop runs on its own thread: the in-process
`EngineClient` (runtime/engine_client.py).

Requests are checked in the caller's task by `make_request` (so a bad one raises there, at
once) and handed, checked, to the loop thread through a queue; outputs come back to each
request's asyncio queue.
A consumer that stops iterating (a client that went away) aborts its request, and its pages
are freed before the next step.

With `metrics` (an `ops.metrics.TesseraMetrics`), the loop thread reports the engine's
stats after each step and after commands change the queues, and each finished request's
timings (aborted ones too, as "abort"). A failing metrics call is logged, never fatal.

A step that fails fails only its own requests (`EngineStepError` in their consumers); the
loop carries on. Only a fault the engine cannot recover from stops the loop: every waiting
consumer gets `EngineDeadError`, and so does every later request (`/health` turns 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ops.audit import audit_event
from runtime.adapters import AdapterManager, AdapterVersion
from runtime.engine import Engine, EngineStats
from runtime.engine_client import EngineDeadError, EngineHealth, EngineStepError, KVEvent
from runtime.outputs import RequestOutput
from runtime.request import Request, SamplingParams
from runtime.request_limits import RequestLimits

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer
    from ops.metrics import TesseraMetrics

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStepError"]  # the errors' home is engine_client

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05, metrics: TesseraMetrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # Snapshot taken on the loop thread: the scheduler's lists are not safe to read from another.
        self._stats: EngineStats | None = None
        self._kv_listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # guarded by _lock

    # -- what serving needs to know about the model ---------------------------------------

    @property
    def model_id(self) -> str:
        return self.engine.config.model_id

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.config.max_num_seqs

    @property
    def generation_defaults(self) -> dict:
        return self.engine.generation_defaults

    @property
    def limits(self) -> RequestLimits:
        return self.engine.limits

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tessera-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001 - closing the tiers must not stop the shutdown
            log.exception("closing the engine failed")

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def health(self) -> EngineHealth:
        thread = self._thread
        running = self.error is None and thread is not None and thread.is_alive()
        return EngineHealth(running, None if self.error is None else repr(self.error))

    def stats(self) -> EngineStats:
        # Before the loop has run there is no other thread to race with.
        return self._stats if self._stats is not None else self.engine.stats()

    # -- requests -------------------------------------------------------------------------

    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                     **request_fields) -> Request:
        # Engine.make_request reads only settings fixed at build time: safe from the caller's thread.
        return self.engine.make_request(prompt, params, request_id=request_id, **request_fields)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        **request_fields,
    ) -> AsyncIterator[RequestOutput]:
        """make_request then stream, for callers that hold no request yet (tests, perf, the CLI)."""
        request = self.make_request(prompt, params, request_id=request_id, **request_fields)
        async with contextlib.aclosing(self.stream(request)) as outputs:  # closing early aborts at once
            async for output in outputs:
                yield output

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Yield the checked request's outputs as steps produce them; the last one has finished=True."""
        if self.error is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.error!r}")
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request_id={request.request_id!r} is already in use")
            self._streams[request.request_id] = (asyncio.get_running_loop(), stream)
        self.start()
        self._send(("add", request))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop has stopped: {item!r}") from item
                if item.error is not None:
                    finished = True  # the engine has already dropped it
                    raise EngineStepError(item.error)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._send(("abort", request.request_id))
            with self._lock:
                self._streams.pop(request.request_id, None)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    # -- adapters and the base model (runtime/adapters.py, runtime/model_reload.py) ---------

    @property
    def adapters(self) -> AdapterManager | None:
        """The adapter registry (thread-safe), or None when the engine serves no adapters."""
        return self.engine.adapters

    async def load_adapter(self, name: str, path: str) -> AdapterVersion:
        """Read and check off the event loop; the engine copies it to a slot when a step needs it."""
        if self.engine.adapters is None:
            raise ValueError("this server serves no LoRA adapters (start it with --max-loras)")
        return await asyncio.to_thread(self.engine.adapters.load, name, path)

    def unload_adapter(self, name: str) -> AdapterVersion:
        if self.engine.adapters is None:
            raise ValueError("this server serves no LoRA adapters (start it with --max-loras)")
        return self.engine.adapters.unload(name)

    @property
    def model_version(self) -> int:
        return self.engine.model_version

    async def reload_model(self, model_dir: str, drain_timeout_s: float = 120.0) -> tuple[int, float, float]:
        """Load `model_dir` beside the served model, then switch between steps once every started
        request has finished (new ones wait in the queue). (version, load seconds, switch seconds);
        raises ModelReloadError, or TimeoutError when the batch did not drain in time (the old
        model still serves either way)."""
        from runtime.model_reload import ModelSwitch, prepare_model

        started = time.perf_counter()
        model = await asyncio.to_thread(prepare_model, self.engine.model, model_dir, self.engine.tokenizer.max_token_id,
                                        self.engine.model_dir or None)
        loaded = time.perf_counter()
        switch = ModelSwitch(model, str(model_dir))
        self.start()
        self._send(("switch", switch))
        try:
            version = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(switch.future)), drain_timeout_s)
        except TimeoutError:
            if switch.future.cancel() is False and not switch.future.cancelled():  # the switch had begun
                version = await asyncio.wrap_future(switch.future)
                return version, loaded - started, time.perf_counter() - loaded
            self._send(("cancel_switch", switch))
            raise TimeoutError(f"the running requests did not finish within {drain_timeout_s:.0f}s; "
                               "the old model still serves") from None
        return version, loaded - started, time.perf_counter() - loaded

    async def kv_events(self) -> AsyncIterator[KVEvent]:
        """The block manager's events, drained as the loop thread signals that a step ran."""
        wake = asyncio.Event()
        listener = (asyncio.get_running_loop(), wake)
        with self._lock:
            self._kv_listeners.append(listener)
        try:
            while True:
                for event in self.engine.blocks.take_events():
                    yield event
                if self.error is not None:
                    raise EngineDeadError(f"the engine loop has stopped: {self.error!r}")
                await wake.wait()
                wake.clear()  # before the next take: a signal after it is not lost, its events are taken
        finally:
            with self._lock:
                self._kv_listeners.remove(listener)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- the loop thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._apply_commands():
                    self._report_step(0)  # the queues changed: gauges must not wait for a step
                if not self.engine.has_unfinished():
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    if self._stats is not None and self._stats.kv_tier_pending_writes != self.engine.pending_tier_writes:
                        self._report_step(0)  # the disk tier committed while idle: its gauges must not wait for a step
                    continue
                outputs = self.engine.step()
                # The snapshot first: a consumer that reads stats() after its last output sees this step.
                self._report_step(self.engine.counters.last_step_tokens)
                for output in outputs:
                    self._deliver(output.request_id, output)
                    self._report_finished(output)
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear of it
            log.exception("engine loop failed; the engine is dead")
            audit_event("engine.fault", "failure", actor="system", object=f"model:{self.engine.config.model_id}",
                        kind="dead", reason=type(e).__name__)
            self.error = e
            with self._lock:
                request_ids = list(self._streams)
            for request_id in request_ids:
                self._deliver(request_id, e)
            self._wake_kv_listeners()

    def _apply_commands(self) -> int:
        applied = 0
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return applied
            applied += 1
            if kind == "add":
                request: Request = arg
                try:
                    self.engine.add(request)
                except ValueError as e:  # e.g. an id still in use: only this request fails
                    self._deliver(request.request_id, e)
                except Exception as e:  # noqa: BLE001 - a bug met by one request fails that request
                    log.exception("adding request %s failed", request.request_id)
                    self._deliver(request.request_id, RuntimeError(f"the engine could not add the request: {e!r}"))
            elif kind == "switch":
                try:
                    self.engine.begin_model_switch(arg)
                except Exception as e:  # noqa: BLE001 - the caller hears why; serving goes on
                    arg.fail(e)
            elif kind == "cancel_switch":
                self.engine.cancel_model_switch(arg)
            elif kind == "abort":
                try:
                    output = self.engine.abort(arg)
                except Exception:  # noqa: BLE001 - a failed abort must not stop the loop for everyone
                    log.exception("aborting request %s failed", arg)
                    continue
                if output is not None:
                    self._deliver(arg, output)
                    self._report_finished(output, "abort")

    def _report_step(self, step_tokens: int) -> None:
        self._stats = self.engine.stats()
        self._wake_kv_listeners()
        if self.metrics is not None:
            try:
                self.metrics.on_step(self._stats, step_tokens)
            except Exception:  # noqa: BLE001 - metrics must never stop serving
                log.exception("metrics: on_step failed")

    def _wake_kv_listeners(self) -> None:
        with self._lock:
            listeners = list(self._kv_listeners)
        for loop, wake in listeners:
            with contextlib.suppress(RuntimeError):  # its event loop has closed
                loop.call_soon_threadsafe(wake.set)

    def _report_finished(self, output: RequestOutput, reason: str | None = None) -> None:
        if self.metrics is not None and output.finished:
            if output.error is not None:
                reason = "error"
            try:
                self.metrics.on_request_finished(output.timings, reason or output.timings.finished_reason or "abort")
            except Exception:  # noqa: BLE001
                log.exception("metrics: on_request_finished failed")

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)
