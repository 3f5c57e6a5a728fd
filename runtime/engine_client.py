"""The one interface `serving/` has to an engine, wherever the engine runs.

`AsyncEngine` (runtime/async_engine.py) implements it in-process; a gRPC client of a remote
worker implements it next. Serving reads nothing else of an engine: what it needs to know
about the model is here as properties, so a remote client can answer them from the worker's
handshake instead of from live attributes.

A request is checked once, by `make_request` (ValueError naming the field, before anything
is queued: a bad prompt is a 4xx before a stream starts); `stream` takes that checked request
as it is and does not check it again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from runtime.block_manager import AllBlocksCleared, BlockRemoved, BlockStored
from runtime.outputs import RequestOutput
from runtime.request import Request, SamplingParams
from runtime.request_limits import RequestLimits

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer
    from runtime.engine import EngineStats

KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
"""What the block manager reports about prefix-cache keys (runtime/block_manager.py)."""


class EngineDeadError(RuntimeError):
    """The step loop failed; requests in flight cannot finish."""


class EngineStepError(RuntimeError):
    """The engine step computing this request failed; the engine itself carries on."""


@dataclass(frozen=True, slots=True)
class EngineHealth:
    running: bool  # the loop is started and alive: requests can make progress
    error: str | None = None  # repr of the fault that stopped the engine for good; None while it lives
    mode: str = "accelerator"  # or "cpu_fallback" while the accelerator is out (runtime/failover.py)


@runtime_checkable
class EngineClient(Protocol):
    # -- what serving needs to know about the model (fixed once the engine is built) ------

    @property
    def model_id(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def max_num_seqs(self) -> int: ...

    @property
    def limits(self) -> RequestLimits:
        """What a request must fit (context, vocabulary, cache pages, batch): a remote client
        checks requests against the worker's limits before sending them."""
        ...

    @property
    def generation_defaults(self) -> dict:
        """The model's generation_config.json sampling fields ({} when it has none)."""
        ...

    @property
    def metrics(self) -> Any | None:
        """The `ops.metrics.TesseraMetrics` the engine reports to, for /metrics; None: no metrics."""
        ...

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...

    # -- requests -------------------------------------------------------------------------

    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                     **request_fields) -> Request:
        """A checked request, not yet queued. Raises ValueError naming the bad field."""
        ...

    def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue a request from `make_request` and yield its outputs; the last has finished=True.
        Closing the stream before then aborts the request. Raises EngineStepError when its step
        failed, EngineDeadError when the engine has stopped, ValueError for an id in use."""
        ...

    def abort(self, request_id: str) -> None: ...

    # -- state ----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """The latest snapshot (queues, KV cache usage, token counts)."""
        ...

    def health(self) -> EngineHealth: ...

    def kv_events(self) -> AsyncIterator[KVEvent]:
        """The block manager's events as they happen, for one consumer (they are drained).
        Events made while nobody listens wait in the engine's bounded ring (max_kv_events)."""
        ...
