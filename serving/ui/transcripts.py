"""Conversation transcripts: JSON lines, one message per line, as `tessera chat --transcript` writes.

    {"role": "user", "content": "Hello", "time": 1733212345.12}
    {"role": "assistant", "content": "Hi!", "time": 1733212345.90, "model": "demo",
     "tokens": [[0.081, "Hi"], [0.113, "!"]]}
    {"role": "event", "content": "reset", "time": ...}

`time` is when the message was complete (Unix seconds). An assistant line may carry `tokens`:
each streamed piece with its arrival in seconds after the request was sent, which is what
playback replays. A `reset` event starts the conversation over (the system message stays).

The playground saves transcripts on the server, one folder per caller (tenant and subject,
hashed into the folder name), files created 0600: they hold user text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant", "event")
MAX_TRANSCRIPT_BYTES = 4 * 2**20
_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{8}$")


class TranscriptError(ValueError):
    """A transcript that does not parse; the message names the line."""


class TranscriptNotFound(LookupError):
    pass


@dataclass(frozen=True)
class TranscriptInfo:
    id: str
    title: str  # the first user message, cut short
    messages: int
    updated: float


def parse_transcript(text: str) -> list[dict]:
    """The messages of a transcript file; TranscriptError names the first bad line."""
    messages = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError as e:
            raise TranscriptError(f"line {number} is not JSON: {e.msg}") from None
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise TranscriptError(f"line {number} is not a message (a JSON object whose role is one of "
                                  f"{', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise TranscriptError(f"line {number}: content must be a string")
        tokens = message.get("tokens")
        if tokens is not None and not (isinstance(tokens, list) and all(
                isinstance(t, list) and len(t) == 2 and isinstance(t[0], int | float) and isinstance(t[1], str)
                for t in tokens)):
            raise TranscriptError(f"line {number}: tokens must be a list of [seconds, text] pairs")
        messages.append(message)
    return messages


def conversation(messages: list[dict]) -> list[dict]:
    """The messages the model sees for the next turn: since the last reset (the system message
    stays), as {role, content}."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    current: list[dict] = []
    for message in messages:
        if message["role"] == "event" and message["content"] == "reset":
            current = []
        elif message["role"] in ("user", "assistant"):
            current.append(message)
    return [{"role": m["role"], "content": m["content"]} for m in system + current]


def title_of(messages: list[dict]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user"), "(no messages)")
    first = " ".join(first.split())
    return first if len(first) <= 60 else first[:57] + "..."


class TranscriptStore:
    def __init__(self, root: str | Path | None = None):
        default = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tessera" / "transcripts"
        self.root = Path(root) if root else default

    def _folder(self, tenant: str, subject: str) -> Path:
        # Hashed: a tenant or subject is the caller's text, never a path.
        owner = hashlib.sha256(f"{tenant}\0{subject}".encode()).hexdigest()[:24]
        return self.root / owner

    def _path(self, tenant: str, subject: str, transcript_id: str) -> Path:
        if not _ID.match(transcript_id):
            raise TranscriptNotFound(transcript_id)
        return self._folder(tenant, subject) / f"{transcript_id}.jsonl"

    def create(self, tenant: str, subject: str) -> str:
        folder = self._folder(tenant, subject)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        transcript_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        os.close(os.open(folder / f"{transcript_id}.jsonl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return transcript_id

    def append(self, tenant: str, subject: str, transcript_id: str, message: dict) -> None:
        path = self._path(tenant, subject, transcript_id)
        if not path.exists():
            raise TranscriptNotFound(transcript_id)
        line = json.dumps({**message, "time": message.get("time", time.time())}, ensure_ascii=False) + "\n"
        with path.open("a", encoding="utf-8") as f:
            f.write(line)

    def read(self, tenant: str, subject: str, transcript_id: str) -> list[dict]:
        path = self._path(tenant, subject, transcript_id)
        try:
            return parse_transcript(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TranscriptNotFound(transcript_id) from None

    def list(self, tenant: str, subject: str) -> list[TranscriptInfo]:
        """The caller's transcripts, newest first."""
        folder = self._folder(tenant, subject)
        infos = []
        for path in folder.glob("*.jsonl") if folder.exists() else ():
            try:
                messages = parse_transcript(path.read_text(encoding="utf-8"))
            except (OSError, TranscriptError):
                continue
            infos.append(TranscriptInfo(path.stem, title_of(messages), len(messages), path.stat().st_mtime))
        return sorted(infos, key=lambda i: (i.updated, i.id), reverse=True)
