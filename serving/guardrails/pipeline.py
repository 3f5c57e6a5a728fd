"""Running a tenant's guardrails over a request: input, output, and a stream chunk by chunk."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from serving.guardrails.base import (
    SEVERITY, Action, CallContext, Guardrail, GuardrailBlocked, GuardrailUnavailable, Verdict,
)
from serving.guardrails.policy import GuardrailPolicy, GuardrailSpec, TenantPolicy, build_guardrail

log = logging.getLogger(__name__)
NO_CONTEXT = CallContext()  # frozen: safe as a shared default
HEADER = "x-tessera-guardrails"  # the guardrails applied to the request, by name
ACTIONS_HEADER = "x-tessera-guardrail-actions"  # those that acted: name=flag|redact


@dataclasses.dataclass
class GuardrailReport:
    """Which guardrails ran on a request and the strongest thing each did (pass < flag < redact < block)."""

    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)
    findings: dict[str, set[str]] = dataclasses.field(default_factory=dict)

    def applied(self, names: Sequence[str]) -> None:
        for name in names:
            self.outcomes.setdefault(name, "pass")

    def record(self, name: str, verdict: Verdict) -> None:
        outcome = "pass" if verdict.action is Action.ALLOW else verdict.action.value
        if SEVERITY[outcome] >= SEVERITY[self.outcomes.get(name, "pass")]:
            self.outcomes[name] = outcome
        if verdict.findings:
            self.findings.setdefault(name, set()).update(verdict.findings)

    def header_value(self) -> str:
        return ",".join(self.outcomes)

    def actions_header_value(self) -> str | None:
        acted = [f"{name}={outcome}" for name, outcome in self.outcomes.items() if outcome != "pass"]
        return ",".join(acted) or None

    def headers(self) -> dict[str, str]:
        out = {HEADER: self.header_value()} if self.outcomes else {}
        actions = self.actions_header_value()
        return out | ({ACTIONS_HEADER: actions} if actions else {})


def _configured(verdict: Verdict, action: str | None) -> Verdict:
    """The policy's action for a stage overrides what the guardrail chose, when it found something.
    `redact` from a guardrail that offers no replacement text blocks."""
    if verdict.action is Action.ALLOW or action is None:
        return verdict
    if action == "redact" and verdict.text is None:
        action = "block"
    return dataclasses.replace(verdict, action=Action(action))


class GuardrailPipeline:
    """One tenant's guardrails, in policy order. Each stage's redactions feed the next guardrail."""

    def __init__(self, entries: Sequence[tuple[GuardrailSpec, Guardrail]], *,
                 input_roles: Sequence[str] | None = None, stream_overlap: int | None = None):
        self.entries = tuple(entries)
        self.input_roles = tuple(input_roles) if input_roles is not None else None
        self.stream_overlap = stream_overlap

    @classmethod
    def from_policy(cls, policy: TenantPolicy) -> GuardrailPipeline:
        return cls([(spec, build_guardrail(spec)) for spec in policy.guardrails], input_roles=policy.input_roles,
                   stream_overlap=policy.stream_overlap)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec, _ in self.entries)

    @property
    def blocking_io(self) -> bool:
        return any(g.blocking_io for _, g in self.entries)

    def _stage(self, stage: str) -> list[tuple[GuardrailSpec, Guardrail]]:
        return [(s, g) for s, g in self.entries if getattr(s, stage) != "off"]

    def _run(self, stage: str, text: str, ctx: CallContext, report: GuardrailReport, param: str | None) -> str:
        for spec, guardrail in self._stage(stage):
            method = guardrail.pre_call if stage == "input" else guardrail.post_call
            verdict = _call(spec, method, (text, ctx), stage, report, param)
            text = _apply(spec, _configured(verdict, getattr(spec, stage)), text, stage, report, param)
        return text

    # -- the request ------------------------------------------------------------------------------

    def check_input(self, text: str, ctx: CallContext = NO_CONTEXT, report: GuardrailReport | None = None,
                    *, param: str | None = "prompt") -> str:
        """The prompt to use (redacted or as given); raises GuardrailBlocked."""
        report = report if report is not None else GuardrailReport()
        report.applied([s.name for s, _ in self._stage("input")])
        return self._run("input", text, ctx, report, param)

    def check_messages(self, messages: Sequence[Mapping[str, Any]], ctx: CallContext = NO_CONTEXT,
                       report: GuardrailReport | None = None) -> list[dict[str, Any]]:
        """Chat messages (OpenAI's dicts, content a string or a list of parts) with every checked
        text replaced by its checked form; the input is not changed."""
        report = report if report is not None else GuardrailReport()
        report.applied([s.name for s, _ in self._stage("input")])
        out = []
        for i, message in enumerate(messages):
            message, role = dict(message), message.get("role")
            content = message.get("content")
            if self.input_roles is not None and role not in self.input_roles:
                out.append(message)
                continue
            message_ctx = dataclasses.replace(ctx, role=role)
            if isinstance(content, str):
                message["content"] = self._run("input", content, message_ctx, report, f"messages[{i}].content")
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                        part = {**part, "text": self._run("input", part["text"], message_ctx, report,
                                                          f"messages[{i}].content")}
                    parts.append(part)
                message["content"] = parts
            out.append(message)
        return out

    def check_output(self, text: str, ctx: CallContext = NO_CONTEXT, report: GuardrailReport | None = None) -> str:
        """A complete (non-streamed) output to return; raises GuardrailBlocked."""
        report = report if report is not None else GuardrailReport()
        report.applied([s.name for s, _ in self._stage("output")])
        return self._run("output", text, ctx, report, None)

    def stream(self, ctx: CallContext = NO_CONTEXT, report: GuardrailReport | None = None) -> StreamGuard:
        """A checker for one streamed output (one per choice when n > 1)."""
        return StreamGuard(self, ctx, report if report is not None else GuardrailReport())

    # -- async entry points: a worker thread when a guardrail does network calls --------------------

    async def acheck_input(self, text: str, ctx: CallContext = NO_CONTEXT, report: GuardrailReport | None = None,
                           *, param: str | None = "prompt") -> str:
        return await self._maybe_thread(self.check_input, text, ctx, report, param=param)

    async def acheck_messages(self, messages, ctx: CallContext = NO_CONTEXT,
                              report: GuardrailReport | None = None) -> list[dict[str, Any]]:
        return await self._maybe_thread(self.check_messages, messages, ctx, report)

    async def acheck_output(self, text: str, ctx: CallContext = NO_CONTEXT,
                            report: GuardrailReport | None = None) -> str:
        return await self._maybe_thread(self.check_output, text, ctx, report)

    async def _maybe_thread(self, fn, *args, **kwargs):
        if not self.blocking_io:
            return fn(*args, **kwargs)
        import functools

        import anyio

        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _call(spec: GuardrailSpec, method, args: tuple, stage: str, report: GuardrailReport, param: str | None) -> Verdict:
    """A guardrail's check; its own failure fails closed (503) and names it, never a bare 500."""
    try:
        return method(*args)
    except GuardrailBlocked as e:
        e.param = e.param or param
        report.record(spec.name, Verdict.block(e.reason))
        raise
    except Exception as e:
        log.exception("guardrail %s failed", spec.name)
        report.record(spec.name, Verdict.block("failed"))
        raise GuardrailUnavailable(spec.name, f"the guardrail failed ({type(e).__name__})", stage=stage,
                                   param=param) from e


def _apply(spec: GuardrailSpec, verdict: Verdict, text: str, stage: str, report: GuardrailReport,
           param: str | None) -> str:
    report.record(spec.name, verdict)
    if verdict.action is Action.BLOCK:
        raise GuardrailBlocked(spec.name, verdict.reason or "blocked by policy", code=verdict.code, stage=stage,
                               param=param, labels=verdict.labels)
    if verdict.action is Action.REDACT and verdict.text is not None:
        return verdict.text
    return text


class StreamGuard:
    """Checks a streamed output: `feed(chunk)` returns the text that may be sent now, holding back
    the last `overlap` characters so the next chunk is checked together with them; `finish()`
    returns the rest once the final window (and any end-of-stream check) passed.
    A block raises GuardrailBlocked (stage "output"): end the stream with an error event."""

    def __init__(self, pipeline: GuardrailPipeline, ctx: CallContext, report: GuardrailReport):
        entries = pipeline._stage("output")
        self.per_chunk = [(s, g) for s, g in entries if g.checks_stream]
        self.at_end = [(s, g) for s, g in entries if not g.checks_stream]
        needed = max((g.stream_overlap for _, g in self.per_chunk), default=0)
        self.overlap = pipeline.stream_overlap if pipeline.stream_overlap is not None else needed
        self.ctx, self.report = ctx, report
        self.held = ""
        self.sent: list[str] | None = [] if self.at_end else None
        report.applied([s.name for s, _ in entries])

    def feed(self, chunk: str) -> str:
        window = self._check(self.held + chunk, final=False)
        cut = _token_boundary(window, max(len(window) - self.overlap, 0), self.overlap) if self.overlap else len(window)
        self.held = window[cut:]
        return self._sending(window[:cut])

    def finish(self) -> str:
        tail, self.held = self._check(self.held, final=True), ""
        if self.at_end:
            whole = "".join(self.sent or ()) + tail
            for spec, guardrail in self.at_end:
                verdict = _configured(_call(spec, guardrail.post_call, (whole, self.ctx), "output", self.report,
                                            None), spec.output)
                if verdict.action is Action.REDACT:  # already sent: all that is left is to report it
                    verdict = dataclasses.replace(verdict, action=Action.FLAG)
                _apply(spec, verdict, whole, "output", self.report, None)
        return self._sending(tail)

    def _check(self, window: str, *, final: bool) -> str:
        for spec, guardrail in self.per_chunk:
            verdict = _configured(_call(spec, guardrail.stream_chunk, (window, self.ctx, final), "output",
                                        self.report, None), spec.output)
            window = _apply(spec, verdict, window, "output", self.report, None)
        return window

    def _sending(self, text: str) -> str:
        if self.sent is not None and text:
            self.sent.append(text)
        return text


def _token_boundary(window: str, cut: int, limit: int) -> int:
    """Move a cut left (at most `limit`) to just before a token that starts after whitespace and
    is not a number, so the held tail never begins inside an address or a run of digit groups:
    the next check sees each such token whole, with its left context."""
    lowest = max(cut - limit, 0)
    for i in range(cut, lowest, -1):
        if window[i - 1].isspace() and not (window[i].isdigit() or window[i] in "+("):
            return i
    return lowest


class Guardrails:
    """The server's guardrails: a policy, and each tenant's pipeline built once (at start-up, so
    a bad policy fails there)."""

    def __init__(self, policy: GuardrailPolicy | Mapping[str, Any] | None = None):
        if policy is None:
            policy = GuardrailPolicy()
        elif isinstance(policy, Mapping):
            policy = GuardrailPolicy.from_dict(policy)
        self.policy = policy
        self._default = GuardrailPipeline.from_policy(policy.default)
        self._tenants = {name: GuardrailPipeline.from_policy(p) for name, p in policy.tenants.items()}

    @classmethod
    def from_setting(cls, value: str | None) -> Guardrails | None:
        """A `--guardrails` value: a JSON or TOML file, or inline JSON; None when unset."""
        if not value:
            return None
        if value.lstrip().startswith("{"):
            import json

            return cls(GuardrailPolicy.from_dict(json.loads(value)))
        return cls(GuardrailPolicy.from_file(Path(value)))

    def for_tenant(self, tenant: str | None) -> GuardrailPipeline:
        return self._tenants.get(tenant or "", self._default)
