"""Slow clients are timed out: uvicorn's HTTP/1.1 protocol (h11) with header, body and idle timers.

uvicorn only times out idle keep-alive connections; a client that sends half a request line,
or a body one byte a minute, holds its connection (and a task) for ever. Each connection here
has one timer, for the phase it is in:

    idle     connected, or between keep-alive requests, no byte of a request yet   idle_timeout_s
    headers  from a request's first byte until its headers are complete            header_timeout_s
    body     from complete headers until the whole body has arrived                body_timeout_s

None runs while the app works on a request or streams its response. When one fires mid-request
the client gets a 408 in OpenAI's error body and the connection is closed; a body cut off this
way is marked in the request's scope, so the app logs the request as a 408, not a client
abort (serving/body.py).
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.body import BODY_TIMED_OUT

log = logging.getLogger(__name__)


def timed_h11_protocol(header_timeout_s: float, body_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's `http=` protocol class with these timeouts (the idle one is uvicorn's keep-alive)."""
    return type("TimedH11Protocol", (TimedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})


class TimedH11Protocol(H11Protocol):
    header_timeout_s = 10.0
    body_timeout_s = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._start("idle", self.timeout_keep_alive)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._phase in (None, "idle"):
            self._start("headers", self.header_timeout_s)  # the first byte of a request
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        self._stop()
        super().on_response_complete()  # arms uvicorn's keep-alive timer: the idle phase

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    # -- the one timer ------------------------------------------------------------------------

    def _follow(self) -> None:
        """Move to the phase h11 says the client is in."""
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase == "headers":
            self._start("body", self.body_timeout_s)
        elif state not in (h11.IDLE, h11.SEND_BODY) and self._phase in ("headers", "body"):
            self._stop()  # the request is complete: the app has it

    def _start(self, phase: str, seconds: float) -> None:
        self._stop()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None

    def _expired(self, phase: str, seconds: float) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        client = "%s:%d" % self.client if self.client else "?"
        if phase == "idle":
            self.transport.close()  # nothing was asked: nothing to answer
            return
        log.warning("closing the connection from %s: the request's %s did not arrive within %.1fs (408)",
                    client, phase, seconds)
        if phase == "body" and self.cycle is not None:
            self.scope["state"][BODY_TIMED_OUT] = True  # the app logs this request as a 408
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_timeout_response(phase, seconds))
        self.transport.close()


def _timeout_response(phase: str, seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request's {phase} did not arrive within {seconds:g} s",
                                 "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body
