"""The audit log: one JSON line per security-relevant event, to a rotating file, stdout and a SIEM.

    audit_event("key.create", "success", actor="key:3f9a1c", tenant="acme", key_id="7d2e90",
                object="key:7d2e90", request_id=rid, source="10.0.0.7", scopes=["generate"])

Every line has the same fields: `time` (ISO 8601, UTC), `type` ("audit"), `action`,
`outcome` ("success", "failure", "denied"), `actor`, `tenant`, `key_id`, `object`,
`request_id`, `source`; then the event's own details. Actions are dotted nouns and verbs:
`auth.failure`, `authz.denied`, `key.create`, `key.revoke`, `model.load`, `model.unload`,
`adapter.load`, `adapter.unload`, `config.load`, `config.change`, `admin.*`.

An audit line never carries a secret or user text: detail keys that name one (`key`,
`token`, `secret`, `password`, `authorization`, `prompt`, `messages`, ...) are replaced by
`[redacted]` whatever the caller passed, and a key id is never the key.

Sinks (`configure_audit`): a file rotated by size (created 0600), stdout, and an HTTP
endpoint that receives batches of lines as `application/x-ndjson` from a background thread
(a full queue drops lines and counts them; a failed POST is retried, then dropped and
logged). With no sink configured, lines go to the process log (logger `tessera.audit`).
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, Any

from ops.private_files import PrivateRotatingFileHandler

log = logging.getLogger(__name__)
AUDIT_LOGGER = "tessera.audit"
OUTCOMES = ("success", "failure", "denied")
FIELDS = ("time", "type", "action", "outcome", "actor", "tenant", "key_id", "object", "request_id", "source")
# Substrings of detail names whose values are never written (secrets and user text).
_SECRET_WORDS = ("key", "token", "secret", "password", "authorization", "credential", "cookie", "prompt",
                 "message", "completion", "content", "text")
_SAFE_DETAILS = frozenset({"scopes", "reason", "method", "path", "status", "expires_at", "model", "adapter",
                           "changes", "settings", "kind", "issuer", "subject", "scope", "required_scope"})
REDACTED = "[redacted]"


class _FileSink:
    """A size-rotated file whose files are created mode 0600."""

    def __init__(self, path: str, max_bytes: int, backup_count: int, kms: Any = None):
        self.handler = PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backup_count,
                                                   encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        if kms is not None:  # rotated files are sealed under KMS data keys: F.1.enc, F.2.enc, ...
            from ops.kms import attach_file_encryption

            attach_file_encryption(self.handler, kms)

    def write(self, line: str) -> None:
        self.handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))

    def close(self) -> None:
        self.handler.close()


class _StreamSink:
    def __init__(self, stream: IO[str] | None):
        self.stream = stream
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        stream = self.stream or sys.stdout  # looked up late: tests and daemons swap sys.stdout
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def close(self) -> None:
        pass


class _LogSink:
    """The process log, when no audit sink is configured."""

    def write(self, line: str) -> None:
        logging.getLogger(AUDIT_LOGGER).info(line)

    def close(self) -> None:
        pass


class HttpSink:
    """Ships lines to a SIEM's HTTP collector in batches, off the request path."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None, *, batch_size: int = 100,
                 flush_interval_s: float = 1.0, max_queue: int = 10_000, retries: int = 3, timeout_s: float = 5.0):
        import httpx

        self.url, self.batch_size, self.flush_interval_s, self.retries = url, batch_size, flush_interval_s, retries
        self.dropped = 0
        self.sent = 0
        self._queue: queue.Queue[str | None] = queue.Queue(max_queue)
        self._client = httpx.Client(timeout=timeout_s, headers={"content-type": "application/x-ndjson",
                                                                **(headers or {})})
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="audit-http", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        try:
            self._idle.clear()
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued line was sent or dropped; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.wait(0.05):
                return True
        return False

    def close(self) -> None:
        self.flush(5.0)
        self._queue.put(None)
        self._thread.join(5.0)
        self._client.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.flush_interval_s
            while len(batch) < self.batch_size:
                try:
                    line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if line is None:
                    self._post(batch)
                    return
                batch.append(line)
            self._post(batch)
            if self._queue.empty():
                self._idle.set()

    def _post(self, batch: list[str]) -> None:
        body = ("\n".join(batch) + "\n").encode()
        for attempt in range(self.retries):
            try:
                response = self._client.post(self.url, content=body)
                if response.status_code < 300:
                    self.sent += len(batch)
                    return
                error = f"HTTP {response.status_code}"
            except Exception as e:  # noqa: BLE001 - any transport failure is retried, then dropped
                error = repr(e)
            time.sleep(min(0.2 * 2**attempt, 2.0))
        self.dropped += len(batch)
        log.error("audit: %d lines not delivered to %s (%s)", len(batch), self.url, error)


_sinks: list[Any] = [_LogSink()]
_lock = threading.Lock()


def configure_audit(*, file: str | None = None, max_bytes: int = 100 * 2**20, backup_count: int = 10,
                    stdout: bool = False, stream: IO[str] | None = None, http_url: str | None = None,
                    http_headers: Mapping[str, str] | None = None, encrypt_rotated_with: Any = None) -> None:
    """Replace the audit sinks. `stream` writes to that stream (stdout when `stdout`); with none
    of file, stdout, stream and http_url, lines go to the process log. `encrypt_rotated_with`, an
    `ops.kms` provider, encrypts the file sink's rotated files at rest (`ops.kms.decrypt_file` opens them)."""
    sinks: list[Any] = []
    if file:
        sinks.append(_FileSink(file, max_bytes, backup_count, encrypt_rotated_with))
    if stdout or stream is not None:
        sinks.append(_StreamSink(stream))
    if http_url:
        sinks.append(HttpSink(http_url, http_headers))
    _replace_sinks(sinks or [_LogSink()])


def reset_audit() -> None:
    """Back to the process log (closing file and HTTP sinks)."""
    _replace_sinks([_LogSink()])


def flush_audit(timeout_s: float = 10.0) -> bool:
    return all(s.flush(timeout_s) for s in list(_sinks) if isinstance(s, HttpSink))


def _replace_sinks(sinks: list[Any]) -> None:
    global _sinks
    with _lock:
        old, _sinks = _sinks, sinks
    for sink in old:
        sink.close()


def audit_event(action: str, outcome: str, *, actor: str | None = None, tenant: str | None = None,
                key_id: str | None = None, object: str | None = None, request_id: str | None = None,  # noqa: A002
                source: str | None = None, **details: Any) -> dict[str, Any]:
    """Write one audit line to every sink; returns the line's fields. Never raises on a sink's failure."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome={outcome!r} must be one of {', '.join(OUTCOMES)}")
    event: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "type": "audit", "action": action, "outcome": outcome, "actor": actor, "tenant": tenant,
        "key_id": key_id, "object": object, "request_id": request_id, "source": source,
    }
    for name, value in details.items():
        if name in FIELDS:
            raise ValueError(f"{name} is a standard audit field; pass it by its keyword")
        event[name] = REDACTED if _is_secret(name) and value is not None else value
    line = json.dumps(event, ensure_ascii=False, default=str, separators=(",", ":"))
    for sink in list(_sinks):
        try:
            sink.write(line)
        except Exception:  # noqa: BLE001 - auditing never fails the action it records
            log.exception("audit sink %s failed", type(sink).__name__)
    return event


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered not in _SAFE_DETAILS and any(word in lowered for word in _SECRET_WORDS)
