"""The plugin interface: `Guardrail` with `pre_call`, `post_call` and `stream_chunk`, returning a `Verdict`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Action(StrEnum):
    ALLOW = "allow"  # nothing found
    FLAG = "flag"  # found, let through, reported
    REDACT = "redact"  # let through with `Verdict.text` in place of the text
    BLOCK = "block"  # refuse: the request gets a 400 (input) or the stream ends with an error (output)


# The order in which outcomes win when one guardrail acts on several texts of a request.
SEVERITY = {"pass": 0, "flag": 1, "redact": 2, "block": 3}


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action = Action.ALLOW
    text: str | None = None  # the text to use instead, with REDACT
    reason: str | None = None  # why, for the error message and logs; never quotes the user's text
    code: str | None = None  # the error code when blocking; default `guardrail_<name>`
    labels: Mapping[str, float] = field(default_factory=dict)  # scores behind the decision
    findings: tuple[str, ...] = ()  # what was found, e.g. ("email", "card")

    @classmethod
    def allow(cls) -> Verdict:
        return cls()

    @classmethod
    def flag(cls, reason: str, **kw) -> Verdict:
        return cls(Action.FLAG, reason=reason, **kw)

    @classmethod
    def redact(cls, text: str, reason: str, **kw) -> Verdict:
        return cls(Action.REDACT, text=text, reason=reason, **kw)

    @classmethod
    def block(cls, reason: str, **kw) -> Verdict:
        return cls(Action.BLOCK, reason=reason, **kw)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who and what a check is for; guardrails may use it (e.g. per-model rules), never mutate it."""

    tenant: str = "default"
    request_id: str | None = None
    model: str | None = None
    endpoint: str | None = None
    role: str | None = None  # the chat role of the message being checked, when there is one


class Guardrail:
    """A policy check. Subclass it and override what you check; every method is optional.

    - `pre_call(text, ctx)`: a prompt or one message's text, before the model sees it.
    - `post_call(text, ctx)`: a whole completion, before it is returned.
    - `stream_chunk(window, ctx, final)`: while streaming. `window` is the text not sent yet:
      the held-back tail of the previous chunks plus the new chunk. The pipeline sends all but
      the last `stream_overlap` characters of what you return and shows you that tail again
      with the next chunk, so a pattern split across chunks is seen whole; `final` is True for
      the last window. The default runs `post_call` on the window.

    `checks_stream = False` means "run post_call once on the complete streamed text at the end"
    (for a slow classifier); by then the text was sent, so only a block (ending the stream with
    an error) or a flag is possible. `blocking_io = True` makes the async entry points run the
    pipeline in a worker thread (network calls).
    """

    name: str = "guardrail"
    stream_overlap: int = 0
    checks_stream: bool = True
    blocking_io: bool = False

    def pre_call(self, text: str, ctx: CallContext) -> Verdict:
        return Verdict()

    def post_call(self, text: str, ctx: CallContext) -> Verdict:
        return Verdict()

    def stream_chunk(self, window: str, ctx: CallContext, final: bool) -> Verdict:
        return self.post_call(window, ctx)


class GuardrailBlocked(Exception):
    """A guardrail refused the request or its output. The app answers `status` with OpenAI's
    error body (`error_body()`); the message names the guardrail and reason, never the text."""

    def __init__(self, guardrail: str, reason: str, *, code: str | None = None, stage: str = "input",
                 status: int = 400, param: str | None = None, labels: Mapping[str, float] | None = None):
        self.guardrail, self.reason, self.stage, self.status, self.param = guardrail, reason, stage, status, param
        self.code = code or f"guardrail_{guardrail}"
        self.labels = dict(labels or {})
        where = "the request" if stage == "input" else "the response"
        super().__init__(f"{where} was blocked by guardrail '{guardrail}': {reason}")

    @property
    def error_type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "service_unavailable"

    def error_body(self) -> dict:
        return {"error": {"message": str(self), "type": self.error_type, "param": self.param, "code": self.code}}


class GuardrailUnavailable(GuardrailBlocked):
    """A guardrail could not decide (its classifier is down) and fails closed: 503."""

    def __init__(self, guardrail: str, reason: str, *, stage: str = "input", param: str | None = None):
        super().__init__(guardrail, reason, code="guardrail_unavailable", stage=stage, status=503, param=param)
