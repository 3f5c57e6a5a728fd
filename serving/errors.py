"""OpenAI's error body for every failure, with the right status.

Handlers turn Litestar's own exceptions (validation, size limit, routing) and the engine's
ValueErrors into `{"error": {"message", "type", "param", "code"}}`. Bad input is never a
500; a 500 means a bug, and its message says no more than that.
"""

from __future__ import annotations

import logging
import re

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException

from serving.protocol.common import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
_CODE_BY_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(Exception):
    """An error answered with OpenAI's body; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):  # noqa: A002
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorDetail(self.message, self.type, self.param, self.code))

    def to_response(self) -> Response:
        return Response(self.body(), status_code=self.status, headers=self.headers, media_type=MediaType.JSON)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class ClientDisconnected(APIError):
    """The client left before its response was ready (499, nginx's word for it): logged, never a 5xx."""

    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_closed_request")


def invalid_json(detail: str) -> APIError:
    return bad_request(f"the request body is not valid JSON: {detail}", code="invalid_json")


def invalid_utf8(exc: UnicodeDecodeError) -> APIError:
    return bad_request(f"the request body is not valid UTF-8: {exc.reason} at byte {exc.start}", code="invalid_utf8")


_FIELD_AT_START = re.compile(r"^([a-z_]+)=")
_MISSING_FIELD = re.compile(r"^Object missing required field `(\w+)`")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(.+)`$", re.DOTALL)
_CONTEXT_MESSAGES = ("prompt has", "max_tokens=", "prompt plus max_tokens")


def from_engine_error(error: ValueError, prompt_param: str = "prompt") -> APIError:
    """The engine's checks raise ValueError naming the field; keep that field as `param`."""
    message = str(error)
    if message.startswith("prompt"):
        param = prompt_param
    else:
        match = _FIELD_AT_START.match(message)
        param = match.group(1) if match else None
    code = "context_length_exceeded" if message.startswith(_CONTEXT_MESSAGES) else None
    return bad_request(message, param, code)


# -- handlers ---------------------------------------------------------------------------------


def _api_error(_: Request, exc: APIError) -> Response:
    return exc.to_response()


def _validation_error(_: Request, exc: ValidationException) -> Response:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    key, message = first.get("key"), first.get("message")
    if key == "data" and message == "'data'":  # Litestar's words for an empty body
        return bad_request("the request body is empty; expected a JSON object").to_response()
    unknown = _UNKNOWN_FIELD.match(message or "")
    if unknown:  # a field no endpoint of Tessera knows: named, never ignored
        param = f"{key}.{unknown.group(1)}" if key and key != "data" else unknown.group(1)
        return bad_request(f"unrecognized request field `{param}`: Tessera does not support it", param,
                           "unsupported_parameter").to_response()
    missing = _MISSING_FIELD.match(message or "")
    if key == "data" and missing:
        return bad_request(f"{missing.group(1)} is required", param=missing.group(1)).to_response()
    if key == "data":  # the body is JSON but not an object
        return bad_request(f"the request body must be a JSON object: {message}").to_response()
    if key:
        return bad_request(f"{message} at `{key}`", param=key).to_response()
    return bad_request(exc.detail or "invalid request").to_response()


def _http_error(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    # Litestar's 400 for a body msgspec cannot decode. Bodies decode in serving/body.py, which
    # names bad UTF-8 itself; this is for any path that reaches Litestar's own decoder.
    if isinstance(exc.__cause__, SerializationException):
        return invalid_json(exc.detail).to_response()
    message = {
        404: "no such route",
        413: "the request body is larger than the server's limit",
    }.get(status, exc.detail)
    error = APIError(status, message, code=_CODE_BY_STATUS.get(status))
    error.headers = dict(exc.headers or {})
    return error.to_response()


def _invalid_utf8(_: Request, exc: UnicodeDecodeError) -> Response:
    return invalid_utf8(exc).to_response()


def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, "internal server error", code="internal_error").to_response()


EXCEPTION_HANDLERS = {
    APIError: _api_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    UnicodeDecodeError: _invalid_utf8,
    Exception: _unexpected,
}
