"""The caller's tenant's guardrails around one generation request: input, output, stream, headers.

`RequestGuard.for_request` is None when the server has no guardrails (or the tenant's policy
lists none), so the handlers' unguarded path stays as it was. Every block becomes the app's
`APIError` (400 with the guardrail's code, 503 when a guardrail is down) carrying the report's
headers; inside a stream the same error is the stream's error event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from litestar import Request

from serving.guardrails import CallContext, GuardrailBlocked, GuardrailPipeline, GuardrailReport, StreamGuard
from serving.guardrails.http import as_api_error
from serving.middleware import request_record
from serving.state import ServerState


@dataclass
class RequestGuard:
    pipeline: GuardrailPipeline
    ctx: CallContext
    report: GuardrailReport

    @classmethod
    def for_request(cls, server: ServerState, request: Request, endpoint: str) -> RequestGuard | None:
        if server.guardrails is None:
            return None
        record = request_record(request.scope)
        pipeline = server.guardrails.for_tenant(record.tenant)  # the tenant the auth guard set
        if not pipeline.entries:
            return None
        ctx = CallContext(tenant=record.tenant, request_id=record.request_id, model=server.model_name,
                          endpoint=endpoint)
        return cls(pipeline, ctx, GuardrailReport())

    @property
    def checks_output(self) -> bool:
        return any(spec.output != "off" for spec, _ in self.pipeline.entries)

    def headers(self) -> dict[str, str]:
        """`x-tessera-guardrails` (and `x-tessera-guardrail-actions` once one acted)."""
        return self.report.headers()

    async def check_prompt(self, text: str, param: str) -> str:
        try:
            return await self.pipeline.acheck_input(text, self.ctx, self.report, param=param)
        except GuardrailBlocked as e:
            raise as_api_error(e, self.report) from None

    async def check_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        try:
            return await self.pipeline.acheck_messages(messages, self.ctx, self.report)
        except GuardrailBlocked as e:
            raise as_api_error(e, self.report) from None

    async def check_output(self, text: str) -> str:
        try:
            return await self.pipeline.acheck_output(text, self.ctx, self.report)
        except GuardrailBlocked as e:
            raise as_api_error(e, self.report) from None

    def streams(self, count: int) -> list[ChoiceStream]:
        """One stream guard per streamed choice (made before the response starts, so the
        headers name the output guardrails too)."""
        return [ChoiceStream(self.pipeline.stream(self.ctx, self.report)) for _ in range(count)]

    def refuse_logprobs(self, requested: bool, param: str = "logprobs") -> None:
        """Logprobs carry each token's text, unchecked: not with output guardrails."""
        if requested and self.checks_output:
            from serving.errors import bad_request

            error = bad_request("logprobs are not available while output guardrails are on: they would show the "
                                "completion's tokens before the guardrails check them", param, "unsupported_parameter")
            error.headers = self.headers()
            raise error


class ChoiceStream:
    """One choice's stream guard; `text(chunk, finished)` is what may be sent now (the guard's
    `finish()` runs with the choice's last chunk, before `[DONE]`)."""

    def __init__(self, guard: StreamGuard):
        self.guard = guard
        self.finished = False

    def text(self, chunk: str, finished: bool) -> str:
        try:
            out = self.guard.feed(chunk) if chunk else ""
            if finished and not self.finished:
                self.finished = True
                out += self.guard.finish()
            return out
        except GuardrailBlocked as e:
            raise as_api_error(e, self.guard.report) from None
