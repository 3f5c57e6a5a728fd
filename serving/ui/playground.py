"""The Playground: chat with the served model, streamed into the page, saved as a transcript;
and the transcripts as JSON for `tessera transcripts list|show`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from litestar import Controller, Request, Response, get, post
from litestar.response import Stream

from serving.auth.guard import needs, principal_of
from serving.auth.principal import GENERATE, READ
from serving.errors import APIError
from serving.ui.internal import ChatFailed, stream_chat
from serving.ui.monitor import sse_stream
from serving.ui.render import fragment, page, render, sse
from serving.ui.security import session_of
from serving.ui.transcripts import TranscriptNotFound, conversation

MAX_MESSAGE_CHARS = 32_000
# (form field, type, lowest, highest): the sampling fields the page offers, checked here so that
# a bad value is named on the page; the chat endpoint checks them again.
SAMPLING_FIELDS = (("temperature", float, 0.0, 2.0), ("top_p", float, 0.0, 1.0), ("max_tokens", int, 1, 4096),
                   ("seed", int, 0, 2**63 - 1))


@dataclass
class PendingTurn:
    transcript_id: str
    messages: list[dict]  # what the model sees
    sampling: dict


def _owner(request: Request) -> tuple[str, str]:
    principal = principal_of(request)
    return principal.tenant, principal.subject


def _store(request: Request):
    return request.app.state["ui"].transcripts


def read_own(request: Request, transcript_id: str) -> list[dict]:
    try:
        return _store(request).read(*_owner(request), transcript_id)
    except TranscriptNotFound:
        raise APIError(404, f"you have no transcript {transcript_id!r}", param="transcript",
                       code="transcript_not_found") from None


def parse_sampling(form) -> dict:
    body = {}
    for name, kind, low, high in SAMPLING_FIELDS:
        text = str(form.get(name) or "").strip()
        if not text:
            continue
        try:
            value = kind(text)
        except ValueError:
            raise APIError(400, f"{name} must be a{'n integer' if kind is int else ' number'}, got {text[:20]!r}",
                           param=name) from None
        if not low <= value <= high:
            raise APIError(400, f"{name} must be between {low} and {high}, got {value}", param=name)
        body[name] = value
    return body


class PlaygroundController(Controller):
    path = "/ui/playground"
    tags = ["Admin UI"]
    include_in_schema = False
    opt = needs(GENERATE)

    @get(operation_id="uiPlayground")
    async def playground(self, request: Request, transcript: str | None = None) -> Response:
        messages = read_own(request, transcript) if transcript else []
        server = request.app.state["server"]
        return page(request, "playground.html", transcript_id=transcript or "",
                    messages=[m for m in messages if m["role"] != "event"],
                    transcripts=_store(request).list(*_owner(request)), models=[server.model_name],
                    defaults={"temperature": 0.7, "top_p": 1.0, "max_tokens": 128})

    @post("/turns", operation_id="uiPlaygroundTurn", status_code=200)
    async def turn(self, request: Request) -> Response:
        form = await request.form()
        text = str(form.get("message") or "")
        if not text.strip():
            raise APIError(400, "type a message first", param="message")
        if len(text) > MAX_MESSAGE_CHARS:
            raise APIError(400, f"a message may hold {MAX_MESSAGE_CHARS} characters", param="message")
        server = request.app.state["server"]
        model = str(form.get("model") or server.model_name)
        server.check_model(model)
        sampling = {"model": model, **parse_sampling(form)}
        store, owner = _store(request), _owner(request)
        transcript_id = str(form.get("transcript") or "")
        history = read_own(request, transcript_id) if transcript_id else []
        if not transcript_id:
            transcript_id = store.create(*owner)
            system = str(form.get("system") or "").strip()
            if system:
                history.append({"role": "system", "content": system})
                store.append(*owner, transcript_id, history[-1])
        user = {"role": "user", "content": text}
        store.append(*owner, transcript_id, user)
        turn_id = session_of(request).put_pending(PendingTurn(transcript_id, conversation(history + [user]), sampling))
        return fragment("turn.html", turn_id=turn_id, transcript_id=transcript_id, user=text)

    @get("/turns/{turn_id:str}/stream", operation_id="uiPlaygroundStream")
    async def stream(self, request: Request, turn_id: str) -> Stream:
        turn = session_of(request).pending.pop(turn_id, None)
        if not isinstance(turn, PendingTurn):
            raise APIError(404, "this turn has already been streamed, or belongs to another session",
                           code="turn_not_found")
        owner = _owner(request)
        store = _store(request)

        async def events() -> AsyncIterator[bytes]:
            start = time.monotonic()
            tokens: list[list] = []
            try:
                async for chunk in stream_chat(request, {"messages": turn.messages, **turn.sampling}):
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            tokens.append([round(time.monotonic() - start, 4), piece])
                            yield sse("token", render("token.html", text=piece))
            except ChatFailed as e:
                yield sse("done", render("turn_status.html", error=str(e), status=e.status))
                return
            elapsed = time.monotonic() - start
            store.append(*owner, turn.transcript_id, {"role": "assistant", "content": "".join(t for _, t in tokens),
                                                      "model": turn.sampling["model"], "tokens": tokens})
            yield sse("done", render("turn_status.html", error=None, count=len(tokens), elapsed=elapsed,
                                     transcript_id=turn.transcript_id))

        return sse_stream(events())


class TranscriptsApiController(Controller):
    path = "/ui/api/transcripts"
    tags = ["Admin UI"]
    include_in_schema = False
    opt = needs(READ)

    @get(operation_id="uiApiTranscripts")
    async def list_transcripts(self, request: Request) -> dict:
        return {"data": [{"id": t.id, "title": t.title, "messages": t.messages, "updated": t.updated}
                         for t in _store(request).list(*_owner(request))]}

    @get("/{transcript_id:str}", operation_id="uiApiTranscript")
    async def show(self, request: Request, transcript_id: str) -> dict:
        return {"id": transcript_id, "messages": read_own(request, transcript_id)}
