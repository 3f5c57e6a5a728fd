"""The Playback page: a saved transcript or an uploaded file (transcript or captured SSE log),
replayed into the page at its recorded token timing, at a chosen speed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar import Controller, Request, Response, get, post
from litestar.response import Stream

from serving.auth.guard import needs
from serving.auth.principal import READ
from serving.errors import APIError
from serving.ui.monitor import sse_stream
from serving.ui.playback import MAX_SPEED, MIN_SPEED, aplay, check_speed, timeline
from serving.ui.playground import _owner, _store, read_own
from serving.ui.render import fragment, page, render, sse
from serving.ui.security import session_of
from serving.ui.transcripts import MAX_TRANSCRIPT_BYTES, TranscriptError

SPEEDS = (0.5, 1.0, 2.0, 4.0)


class Upload(str):
    """An uploaded file's text, kept in the session until played."""


def _speed(text: str | None) -> float:
    try:
        return check_speed(float(text or 1.0))
    except ValueError:
        raise APIError(400, f"speed must be a number between {MIN_SPEED} and {MAX_SPEED}", param="speed") from None


def _source_text(request: Request, source: str) -> str:
    kind, _, name = source.partition(":")
    if kind == "transcript":
        import json

        return "\n".join(json.dumps(m) for m in read_own(request, name))
    if kind == "upload":
        upload = session_of(request).pending.get(name)
        if isinstance(upload, Upload):
            return str(upload)
    raise APIError(404, f"nothing to play as {source[:80]!r}", param="source", code="source_not_found")


class PlaybackController(Controller):
    path = "/ui/playback"
    tags = ["Admin UI"]
    include_in_schema = False
    opt = needs(READ)

    @get(operation_id="uiPlayback")
    async def playback(self, request: Request, transcript: str | None = None) -> Response:
        return page(request, "playback.html", transcripts=_store(request).list(*_owner(request)), speeds=SPEEDS,
                    selected=f"transcript:{transcript}" if transcript else "")

    @get("/player", operation_id="uiPlaybackPlayer")
    async def player(self, source: str, speed: str | None = None) -> Response:
        return fragment("player.html", source=source, speed=_speed(speed))

    @post("/uploads", operation_id="uiPlaybackUpload", status_code=200)
    async def upload(self, request: Request) -> Response:
        form = await request.form()
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise APIError(400, "choose a transcript or SSE log file to upload", param="file")
        data = await file.read()
        if len(data) > MAX_TRANSCRIPT_BYTES:
            raise APIError(413, f"the file is larger than {MAX_TRANSCRIPT_BYTES // 2**20} MiB", param="file")
        try:
            text = data.decode("utf-8")
            if not timeline(text)[:-1]:
                raise TranscriptError("the file holds nothing to play")
        except UnicodeDecodeError:
            raise APIError(400, "the file is not UTF-8 text", param="file") from None
        except TranscriptError as e:
            raise APIError(400, f"{file.filename or 'the file'}: {e}", param="file") from None
        key = session_of(request).put_pending(Upload(text))
        return fragment("player.html", source=f"upload:{key}", speed=_speed(form.get("speed")))

    @get("/stream", operation_id="uiPlaybackStream")
    async def stream(self, request: Request, source: str, speed: str | None = None) -> Stream:
        rate = _speed(speed)
        try:
            events = timeline(_source_text(request, source))
        except TranscriptError as e:
            raise APIError(400, str(e), param="source") from None

        async def frames() -> AsyncIterator[bytes]:
            async for event in aplay(events, rate):
                if event.kind == "message":
                    yield sse("play", render("play_message.html", role=event.role))
                elif event.kind == "token":
                    yield sse("play", render("token.html", text=event.text, at=round(event.at_s, 4)))
                else:
                    yield sse("end", render("play_end.html", duration=event.at_s / rate))

        return sse_stream(frames())
