"""Replaying a recorded stream at its original token timing: the Playback page and `tessera playback`.

Two sources:
- a transcript (serving/ui/transcripts.py): user and system messages appear at once, each
  assistant message token by token at the offsets its `tokens` recorded (an assistant line
  without them appears whole);
- a captured SSE log: the `data:` lines of a chat or completion stream, each preceded by a
  comment `: t=SECONDS` (seconds after the request was sent), as `tessera complete --capture`
  writes them. A log without those comments plays one event every `UNTIMED_GAP_S`.

`timeline()` turns a source into events with their times; `play()` and `aplay()` wait for
each (divided by the speed) and hand it over, so the page and the CLI share one clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from serving.ui.transcripts import TranscriptError, parse_transcript

UNTIMED_GAP_S = 0.05
MIN_SPEED, MAX_SPEED = 0.1, 16.0


@dataclass(frozen=True)
class PlaybackEvent:
    at_s: float  # seconds after playback starts, at speed 1
    kind: str  # "message" (a new message begins), "token" (text of the current message), "end"
    role: str = ""
    text: str = ""


def is_sse_log(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.startswith("data:") or first.startswith(":")


def timeline(text: str) -> list[PlaybackEvent]:
    """The events of a transcript or an SSE log; TranscriptError says what does not parse."""
    return _sse_timeline(text) if is_sse_log(text) else _transcript_timeline(parse_transcript(text))


def _transcript_timeline(messages: list[dict]) -> list[PlaybackEvent]:
    events, cursor = [], 0.0
    for message in messages:
        role, content = message["role"], message["content"]
        events.append(PlaybackEvent(cursor, "message", role))
        if role == "assistant" and message.get("tokens"):
            for offset, piece in message["tokens"]:
                events.append(PlaybackEvent(cursor + max(float(offset), 0.0), "token", role, piece))
            cursor = events[-1].at_s
        else:
            events.append(PlaybackEvent(cursor, "token", role, content))
    events.append(PlaybackEvent(cursor, "end"))
    return _monotonic(events)


def _sse_timeline(text: str) -> list[PlaybackEvent]:
    events = [PlaybackEvent(0.0, "message", "assistant")]
    at, timed = 0.0, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(":"):
            stamp = line[1:].strip()
            if stamp.startswith("t="):
                try:
                    at, timed = float(stamp[2:]), True
                except ValueError:
                    raise TranscriptError(f"line {number}: a time comment must be `: t=SECONDS`") from None
            continue
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError as e:
            raise TranscriptError(f"line {number}: the event's data is not JSON: {e.msg}") from None
        if not timed:
            at = (len(events) - 1) * UNTIMED_GAP_S
        piece = _chunk_text(chunk)
        if piece:
            events.append(PlaybackEvent(at, "token", "assistant", piece))
    events.append(PlaybackEvent(events[-1].at_s, "end"))
    return _monotonic(events)


def _chunk_text(chunk) -> str:
    """The first choice's text of a chat (`delta.content`) or completion (`text`) chunk."""
    if not isinstance(chunk, dict) or not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _monotonic(events: list[PlaybackEvent]) -> list[PlaybackEvent]:
    """Recorded offsets never run backwards in playback (a clock that stepped back waits 0)."""
    out, latest = [], 0.0
    for event in events:
        latest = max(latest, event.at_s)
        out.append(event if event.at_s == latest else PlaybackEvent(latest, event.kind, event.role, event.text))
    return out


def check_speed(speed: float) -> float:
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
    return speed


def play(events: list[PlaybackEvent], speed: float = 1.0, *, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> Iterator[PlaybackEvent]:
    """Each event at its time divided by `speed` (waits against a start time, so they do not drift)."""
    start = clock()
    for event in events:
        delay = start + event.at_s / speed - clock()
        if delay > 0:
            sleep(delay)
        yield event


async def aplay(events: list[PlaybackEvent], speed: float = 1.0) -> AsyncIterator[PlaybackEvent]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for event in events:
        delay = start + event.at_s / speed - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield event
