"""The playground's chat goes through the app's own /v1/chat/completions, in-process.

One ASGI call with the browser's credentials: the same guard, rate limits, guardrails, request
record, metrics and Live feed as any API client, and no second copy of the chat pipeline. The
response streams back chunk by chunk (httpx's ASGI transport would buffer it whole).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from litestar import Request

from serving.protocol.common import encode_json

CHAT_PATH = "/v1/chat/completions"
_END = object()


class ChatFailed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def stream_chat(request: Request, body: dict) -> AsyncIterator[dict]:
    """The JSON chunks of a streamed chat completion run as `request`'s caller."""
    payload = encode_json({**body, "stream": True})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k, v) for k, v in request.scope["headers"] if k in (b"authorization", b"user-agent")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": request.scope.get("scheme", "http"), "path": CHAT_PATH, "raw_path": CHAT_PATH.encode(),
             "query_string": b"", "root_path": "", "headers": headers, "client": request.scope.get("client"),
             "server": request.scope.get("server"), "state": {}}
    chunks: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False
    status = 500

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.put_nowait(message.get("body", b""))
            if not message.get("more_body", False):
                chunks.put_nowait(_END)

    async def run():
        try:
            await request.app(scope, receive, send)
        finally:
            chunks.put_nowait(_END)

    task = asyncio.ensure_future(run())
    try:
        buffer = b""
        first = await chunks.get()
        if status != 200:
            raise ChatFailed(status, _error_message(first if first is not _END else b""))
        item = first
        while item is not _END:
            buffer += item
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        return
                    parsed = json.loads(data)
                    if "error" in parsed:
                        raise ChatFailed(500, parsed["error"].get("message", "the stream failed"))
                    yield parsed
            item = await chunks.get()
    finally:
        gone.set()  # the chat handler sees the disconnect and aborts the engine request
        if not task.done():
            try:
                await asyncio.wait_for(task, 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the response is finished either way
                task.cancel()


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or "the request failed"
