"""The `EngineClient` of one remote worker, over gRPC (serving/rpc/tessera.proto).

`connect()` does the handshake (Info): the model's facts, its request limits and its
tokenizer's files, so `make_request` checks and tokenizes here, exactly as the worker's engine
would, and a bad request is refused before anything is sent. `stream` runs one Generate call;
closing it early cancels the call, which aborts the request on the worker. A background task
polls Stats every `stats_interval_s`: `stats()` and `health()` answer from the latest poll,
and `stats_age_s` says how old it is.

Errors, as the protocol names them: INVALID_ARGUMENT and ALREADY_EXISTS are ValueError; a
worker that cannot be reached, or that drops a call before its last output, is
`WorkerLostError` (an `EngineDeadError`), which a gateway may retry elsewhere; a worker whose
accelerator is out refuses a prompt too large for its CPU with UNAVAILABLE and a
`retry-after-s` trailer: `WorkerDegradedError`, retried elsewhere too, the worker kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from runtime.engine_client import EngineDeadError, EngineHealth, EngineStepError, KVEvent
from runtime.outputs import RequestOutput
from runtime.request import Request, SamplingParams
from runtime.request_limits import RequestLimits, check_request
from serving.rpc import convert
from serving.rpc import tessera_pb2 as pb
from serving.rpc import tessera_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer
    from runtime.engine import EngineStats

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 2**20),  # the handshake carries the tokenizer's files
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


RETRY_AFTER_KEY = "retry-after-s"  # trailing metadata of a degraded worker's refusal


class WorkerLostError(EngineDeadError):
    """The worker could not be reached, or dropped the call before its last output."""


class WorkerDegradedError(WorkerLostError):
    """The worker's accelerator is out and the prompt too large for its CPU (it serves smaller
    ones): another worker may take it; else the client is told when to come back."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    options = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
    return grpc.aio.secure_channel(address, credentials, options=options)


class RemoteEngine:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 stats_interval_s: float = 0.5, server_name: str | None = None):
        self.address = address
        self.channel = open_channel(address, credentials, server_name)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.stats_interval_s = stats_interval_s
        self.info: pb.WorkerInfo | None = None
        self._tokenizer: Tokenizer | None = None
        self._limits: RequestLimits | None = None
        self._stats: pb.WorkerStats | None = None
        self._stats_time = float("-inf")  # monotonic time of the latest successful poll
        self._poll_error: str | None = "not polled yet"
        self._poller: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def connect(self, timeout: float = 10.0, tokenizer: Tokenizer | None = None) -> RemoteEngine:
        """The handshake. `tokenizer`: one already built from an equal worker (the gateway's)."""
        try:
            self.info = await self.stub.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise WorkerLostError(f"worker {self.address}: {e.code().name}: {e.details()}") from None
        self._limits = convert.limits_from_proto(self.info.limits)
        self._tokenizer = tokenizer or tokenizer_from_files(dict(self.info.tokenizer_files))
        await self.poll_stats()
        return self

    # -- what serving needs to know about the model (from the handshake) ---------------------

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def limits(self) -> RequestLimits:
        return self._limits

    @property
    def max_model_len(self) -> int:
        return self._limits.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self._limits.max_num_seqs

    @property
    def generation_defaults(self) -> dict:
        return json.loads(self.info.generation_defaults_json or "{}")

    @property
    def metrics(self) -> None:
        return None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_forever())

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._spawn(self.channel.close())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        await self.channel.close()

    # -- requests -----------------------------------------------------------------------------

    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                     **request_fields) -> Request:
        return checked_request(self._tokenizer, self._limits, prompt, params, request_id, **request_fields)

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        call = self.stub.Generate(convert.request_to_proto(request))
        finished = False
        try:
            async for message in call:
                output = convert.output_from_proto(message, request.arrival_time)
                if output.error is not None:
                    finished = True
                    raise EngineStepError(output.error)
                yield output
                if output.finished:
                    finished = True
                    return
            raise WorkerLostError(f"worker {self.address} ended the call before the last output")
        except grpc.aio.AioRpcError as e:
            finished = True
            raise rpc_error(e, self.address) from None
        finally:
            if not finished:
                call.cancel()  # the worker's handler is cancelled: it aborts the request

    def abort(self, request_id: str) -> None:
        self._spawn(self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=5.0))

    # -- state --------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        from runtime.engine import EngineStats

        from serving.worker import STATS_FIELDS

        s = self._stats
        return EngineStats(**{name: getattr(s, name) if s is not None else 0 for name in STATS_FIELDS})

    @property
    def worker_stats(self) -> pb.WorkerStats | None:
        """The latest poll's numbers as the worker sent them (with num_in_flight)."""
        return self._stats

    @property
    def stats_age_s(self) -> float:
        return time.monotonic() - self._stats_time

    def health(self) -> EngineHealth:
        if self._poll_error is not None:
            return EngineHealth(False, self._poll_error if self._stats is not None and not self._stats.running
                                else None)
        return EngineHealth(self._stats.running, self._stats.error or None)

    async def poll_stats(self) -> pb.WorkerStats | None:
        try:
            self._stats = await self.stub.Stats(pb.StatsRequest(), timeout=max(1.0, 2 * self.stats_interval_s))
            self._stats_time = time.monotonic()
            self._poll_error = None if self._stats.running else (self._stats.error or "engine not running")
            return self._stats
        except grpc.aio.AioRpcError as e:
            self._poll_error = f"{e.code().name}: {e.details()}"
            return None

    async def _poll_forever(self) -> None:
        while True:
            await self.poll_stats()
            await asyncio.sleep(self.stats_interval_s)

    async def kv_events(self) -> AsyncIterator[KVEvent]:
        try:
            async for batch in self.stub.KvEvents(pb.KvEventsRequest()):
                for message in batch.events:
                    yield convert.kv_event_from_proto(message)
        except grpc.aio.AioRpcError as e:
            raise rpc_error(e, self.address) from None

    def _spawn(self, coroutine) -> None:
        try:
            task = asyncio.ensure_future(coroutine)
        except RuntimeError:  # no running loop (shutdown after the loop closed)
            coroutine.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("worker %s: background call failed: %r", self.address, task.exception())


def checked_request(tokenizer: Tokenizer, limits: RequestLimits, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, priority: int = 0, tenant: str = "default", cache_salt: str = "",
                    trace_id: str = "") -> Request:
    """`make_request` of a client that holds a worker's tokenizer and limits: the worker's checks, here."""
    if lost := convert.local_only_params(params):
        raise ValueError(f"{lost[0]} is not supported through a remote worker yet")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    check_request(ids, params, limits)
    return Request(request_id=request_id or f"req-{uuid.uuid4().hex}", prompt_token_ids=ids, params=params,
                   priority=priority, tenant=tenant, cache_salt=cache_salt, trace_id=trace_id,
                   eos_token_ids=limits.eos_token_ids)


def rpc_error(e: grpc.aio.AioRpcError, address: str) -> Exception:
    code, details = e.code(), e.details() or ""
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
        return ValueError(details)
    retry_after = dict(e.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
    if code == grpc.StatusCode.UNAVAILABLE and retry_after is not None and retry_after.isdigit():
        return WorkerDegradedError(f"worker {address}: {details}", int(retry_after))
    return WorkerLostError(f"worker {address}: {code.name}: {details}")


def tokenizer_from_files(files: dict[str, bytes]) -> Tokenizer:
    """The worker's tokenizer, from the files its handshake carried."""
    from models.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="tessera-tokenizer-") as folder:
        for name, data in files.items():
            (Path(folder) / Path(name).name).write_bytes(data)
        return Tokenizer.from_dir(folder)


@contextlib.asynccontextmanager
async def remote_engine(address: str, **kwargs):
    """A connected RemoteEngine, closed on exit (tests, perf)."""
    engine = RemoteEngine(address, **kwargs)
    try:
        await engine.connect()
        engine.start()
        yield engine
    finally:
        await engine.close()
