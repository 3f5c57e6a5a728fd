"""Glue for the HTTP layer: a blocked request as the app's `APIError`, and the report as headers.

    try:
        prompt = await pipeline.acheck_input(prompt, ctx, report)
    except GuardrailBlocked as e:
        raise as_api_error(e) from None   # 400 (503 when a guardrail is down), OpenAI's body

Raised inside a stream's event generator, the same `APIError` becomes the stream's error event.
"""

from __future__ import annotations

from serving.errors import APIError
from serving.guardrails.base import GuardrailBlocked
from serving.guardrails.pipeline import GuardrailReport


def as_api_error(blocked: GuardrailBlocked, report: GuardrailReport | None = None) -> APIError:
    headers = report.headers() if report is not None else {}
    return APIError(blocked.status, str(blocked), param=blocked.param, code=blocked.code, type=blocked.error_type,
                    headers=headers)
