"""JSON logs through structlog: one access line per request, user text redacted, rotation, sampling.

`configure_logging` routes structlog and the standard library's `logging` (jax, Litestar,
the engine's `logging.getLogger` calls) through one handler on the root logger: JSON lines
(or console text), to stderr or to a file that rotates at a size limit.

User text never reaches a log unless prompt logging is switched on: `access_log` replaces
its prompt and completion with `[redacted, N chars]` itself (so it is safe whatever else
configures structlog), and a processor does the same for the fields in `TEXT_FIELDS` of
every other structlog event. Code that logs user text must use those keys.

Access lines are sampled per tenant by a hash of the request id, so a request is either
logged or not wherever it is seen; errors (status >= 400) are always logged.
"""

from __future__ import annotations

import hashlib
import json as jsonlib
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import IO, Any

import structlog

from ops.private_files import PrivateRotatingFileHandler

ACCESS_LOGGER = "tessera.access"
TEXT_FIELDS = frozenset({"prompt", "completion", "messages", "prompt_text", "completion_text"})
_REDACTED = re.compile(r"\[redacted, \d+ chars\]")


@dataclass
class _Settings:
    log_prompts: bool = False
    tenant_sample_ratios: dict[str, float] = field(default_factory=dict)
    default_sample_ratio: float = 1.0


_settings = _Settings()
_handler: logging.Handler | None = None  # the one configure_logging put on the root logger
_root_level_before: int | None = None


def redact(text: Any) -> str:
    """`[redacted, N chars]`: what a log keeps of user text (N counts characters of text, or
    of the JSON form of messages)."""
    if not isinstance(text, str):
        text = jsonlib.dumps(text, ensure_ascii=False, default=str)
    return f"[redacted, {len(text)} chars]"


def _redact_text_fields(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _settings.log_prompts:
        return event
    for key in TEXT_FIELDS.intersection(event):
        value = event[key]
        if value is not None and not (isinstance(value, str) and _REDACTED.fullmatch(value)):
            event[key] = redact(value)
    return event


def configure_logging(
    level: str | int = "INFO",
    *,
    json: bool = True,
    log_file: str | None = None,
    max_bytes: int = 50 * 2**20,
    backup_count: int = 5,
    log_prompts: bool = False,
    tenant_sample_ratios: dict[str, float] | None = None,
    default_sample_ratio: float = 1.0,
    stream: IO[str] | None = None,
) -> None:
    """Set up logging for the process; calling it again replaces the previous set-up.

    `log_file` rotates when the next line would take it past `max_bytes`, keeping
    `backup_count` old files (`F.1` newest). Without it, lines go to `stream` (stderr).
    """
    global _settings
    ratios = dict(tenant_sample_ratios or {})
    for name, ratio in {**ratios, "default_sample_ratio": default_sample_ratio}.items():
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sample ratio for {name!r} is {ratio}; it must be in [0, 1]")
    _settings = _Settings(log_prompts, ratios, default_sample_ratio)

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_text_fields,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    if log_file:
        handler: logging.Handler = PrivateRotatingFileHandler(  # 0600, as the audit file
            log_file, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    # Standard-library records go through the same processors, then the same renderer.
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    _install_root_handler(handler, level)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def _install_root_handler(handler: logging.Handler | None, level: str | int | None) -> None:
    """Put `handler` on the root logger in place of ours from before (None: take ours off and
    restore the root level found at the first install). Handlers of others stay."""
    global _handler, _root_level_before
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    elif handler is not None:
        _root_level_before = root.level
    _handler = handler
    if handler is None:
        if _root_level_before is not None:
            root.setLevel(_root_level_before)
        return
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def reset_logging() -> None:
    """Undo configure_logging: its handler leaves the root logger, structlog and the
    redaction and sampling settings go back to their defaults."""
    global _settings
    _install_root_handler(None, None)
    structlog.reset_defaults()
    _settings = _Settings()


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)


def sample_ratio(tenant: str) -> float:
    return _settings.tenant_sample_ratios.get(tenant, _settings.default_sample_ratio)


def is_sampled(request_id: str, tenant: str) -> bool:
    """Whether a successful request's access line is kept: a fixed draw from the request id."""
    draw = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little") / 2**64
    return draw < sample_ratio(tenant)


def access_log(
    *,
    request_id: str,
    tenant: str,
    method: str,
    path: str,
    status: int,
    prompt_tokens: int,
    completion_tokens: int,
    ttft_s: float | None,
    e2e_s: float | None,
    prompt: str | None = None,
    completion: str | None = None,
    **extra: Any,
) -> bool:
    """Write one access line (event "access", logger `tessera.access`); False if sampled out."""
    if status < 400 and not is_sampled(request_id, tenant):
        return False
    fields: dict[str, Any] = dict(
        request_id=request_id, tenant=tenant, method=method, path=path, status=status,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, ttft_s=ttft_s, e2e_s=e2e_s, **extra,
    )
    for key, text in (("prompt", prompt), ("completion", completion)):
        if text is not None:
            fields[key] = text
    structlog.get_logger(ACCESS_LOGGER).info("access", **_redact_text_fields(None, "info", fields))
    return True
