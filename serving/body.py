"""Request bodies: JSON only, bounded in size and nesting, decoded strictly into the route's type.

`BodyRequest` is the app's request class, so every handler's `data` comes through here:

- `Content-Type` must be `application/json` (415 otherwise);
- the body may not exceed the route's limit (413), checked on the declared length first and
  then on the bytes received;
- a client that disconnects mid-body is a 499 (nginx's code), never a 5xx; a body the
  connection's body timeout cut off (`serving/http_timeouts.py` flags the scope) is a 408;
- nesting deeper than `MAX_JSON_DEPTH` is a 400: decoders recurse, and a body of 100,000 `[`
  would otherwise end in a RecursionError;
- decoding is msgspec's strict mode into the handler's own type: `"4"` is not an integer.
  Litestar's own path converts non-strictly, so this is where strictness comes from; its
  result is the finished object, which Litestar's conversion then passes through unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import numpy as np
from litestar import Request
from litestar.exceptions import ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.types import Empty

from serving.errors import APIError, ClientDisconnected, bad_request, invalid_json, invalid_utf8
from serving.protocol.common import RequestBody

MAX_JSON_DEPTH = 64
BODY_TIMED_OUT = "tessera.body_timed_out"  # set in the scope's state when the body timeout closed the connection
JSON_MEDIA_TYPE = "application/json"

# A JSON string, written as an unrolled loop so that a multi-megabyte string is one fast scan.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN, _CLOSE = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1
_PATH = re.compile(r"^(.*) - at `\$\.?(.*)`$", re.DOTALL)


class BodyRequest(Request):
    async def stream(self) -> AsyncGenerator[bytes, None]:
        if self._body is not Empty:
            yield self._body
            yield b""
            return
        limit = self.route_handler.resolve_request_max_body_size() or math.inf
        if (self.content_length or 0) > limit:
            raise RequestEntityTooLarge
        received = 0
        while True:
            event = await self.receive()
            if event["type"] == "http.disconnect":
                raise _cut_off(self.scope)
            chunk = event.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise RequestEntityTooLarge
            if chunk:
                yield chunk
            if not event.get("more_body", False):
                break
        self.is_connected = False
        yield b""

    async def json(self) -> Any:
        if self._json is Empty:
            require_json(self.headers.get("content-type"))
            field = self.route_handler.parsed_data_field
            self._json = self._connection_state.json = decode_json_body(
                await self.body(), field.annotation if field is not None else Any)
        return self._json


def _cut_off(scope) -> APIError:
    if scope.get("state", {}).get(BODY_TIMED_OUT):
        return APIError(408, "the request body did not arrive within the server's body timeout",
                        code="request_timeout")
    return ClientDisconnected()


def require_json(content_type: str | None) -> None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        shown = repr(content_type) if content_type else "none"
        raise APIError(415, f"the request body must be sent as Content-Type: application/json (got {shown})",
                       code="unsupported_media_type")


def decode_json_body(body: bytes, target: Any = Any) -> Any:
    """`body` as `target`, strictly; 400s name what is wrong (and where, as `param`)."""
    if nesting_exceeds(body, MAX_JSON_DEPTH):
        raise bad_request(f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels",
                          code="too_deeply_nested")
    try:
        data = msgspec.json.decode(body, type=target, strict=True)
    except msgspec.ValidationError as e:
        raise _validation_exception(str(e)) from None
    except msgspec.DecodeError as e:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise invalid_utf8(bad) from None
        raise invalid_json(str(e)) from None
    except RecursionError:  # not reachable past the depth check; kept so that it can never be a 500
        raise bad_request("the request body nests too deeply", code="too_deeply_nested") from None
    if isinstance(data, RequestBody):
        for param, why in data.unsupported()[:1]:
            raise bad_request(why, param, "unsupported_parameter")
    return data


def nesting_exceeds(body: bytes, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` (brackets inside strings do not count)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # fewer openings than the limit: no need to look closer
    codes = np.frombuffer(_JSON_STRING.sub(b'""', body), np.uint8)
    depth = np.cumsum(_OPEN[codes] - _CLOSE[codes], dtype=np.int64)
    return bool(depth.size) and int(depth.max()) > limit


def _validation_exception(message: str) -> ValidationException:
    """msgspec's "Expected `int`, got `str` - at `$.messages[0].max_tokens`" in the form the app's
    validation handler reads (`serving/errors.py`): the path as the key, "data" for the whole body."""
    match = _PATH.match(message)
    text, key = (match.group(1), match.group(2)) if match else (message, "")
    return ValidationException(extra=[{"key": key or "data", "message": text}])
