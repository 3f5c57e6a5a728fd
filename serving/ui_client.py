"""`tessera top`, `tessera playback FILE` and `tessera transcripts list|show`: the admin UI's
Health figures, Playback and saved transcripts in a terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO

import httpx

from serving.client import ClientError, _client, _get

TOP_FIELDS = (  # (label, snapshot key, format)
    ("running", "num_requests_running", "{}"), ("waiting", "num_requests_waiting", "{}"),
    ("in flight", "requests_in_flight", "{}"), ("KV used", "kv_cache_usage_perc", "{:.1%}"),
    ("KV frag", "kv_cache_fragmentation_ratio", "{:.1%}"), ("prefix hits", "prefix_cache_hit_rate", "{:.1%}"),
    ("tok/s", "tokens_per_s", "{:.1f}"), ("generated", "generation_tokens", "{}"),
    ("preempted", "num_preemptions", "{}"), ("backend", "backend", "{}"),
)


def top_rows(snapshot: dict, previous: dict | None) -> list[tuple[str, str]]:
    """(label, text) of each figure; tokens/s from the change since the previous snapshot."""
    figures = dict(snapshot)
    if previous is not None and snapshot["time"] > previous["time"]:
        figures["tokens_per_s"] = ((snapshot["generation_tokens"] - previous["generation_tokens"])
                                   / (snapshot["time"] - previous["time"]))
    rows = []
    for label, key, fmt in TOP_FIELDS:
        value = figures.get(key)
        rows.append((label, "–" if value is None else fmt.format(value)))
    return rows


def top(url: str, interval_s: float = 1.0, iterations: int | None = None, out: IO[str] | None = None) -> int:
    """A live table of the server's health figures, redrawn every `interval_s` (Ctrl-C stops)."""
    out = out or sys.stdout
    redraw = out.isatty()
    previous = None
    count = 0
    try:
        with _client(url, timeout=30) as client:
            while iterations is None or count < iterations:
                snapshot = _get(client, "/ui/api/health").json()
                rows = top_rows(snapshot, previous)
                state = "running" if snapshot["engine_running"] else f"stopped ({snapshot['engine_error']})"
                header = f"tessera top · {url} · model {snapshot['model']} · engine {state}" + (
                    " · draining" if snapshot["draining"] else "")
                table = "\n".join(f"{label:>12}  {text}" for label, text in rows)
                out.write(("\x1b[H\x1b[2J" if redraw else "") + header + "\n" + table + "\n\n")
                out.flush()
                previous, count = snapshot, count + 1
                if iterations is None or count < iterations:
                    time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
    return 0


def playback(path: Path, speed: float = 1.0, out: IO[str] | None = None) -> int:
    """Print a transcript or SSE log at its recorded token timing."""
    from serving.ui.playback import check_speed, play, timeline

    out = out or sys.stdout
    events = timeline(path.read_text(encoding="utf-8"))
    check_speed(speed)
    for event in play(events, speed):
        if event.kind == "message":
            out.write(f"\n[{event.role}] ")
        elif event.kind == "token":
            out.write(event.text)
        out.flush()
    out.write("\n")
    return 0


def list_transcripts(url: str, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with _client(url, timeout=30) as client:
        items = _get(client, "/ui/api/transcripts").json()["data"]
    out.write("ID\tMESSAGES\tUPDATED\tTITLE\n")
    for t in items:
        updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t["updated"]))
        out.write(f"{t['id']}\t{t['messages']}\t{updated}\t{t['title']}\n")
    return 0


def show_transcript(url: str, name: str, jsonl: bool = False, out: IO[str] | None = None) -> int:
    """A saved transcript (by id, from the server) or a local transcript file, as a conversation or
    as its JSON lines."""
    import json

    from serving.ui.transcripts import parse_transcript

    out = out or sys.stdout
    local = Path(name)
    if local.is_file():
        messages = parse_transcript(local.read_text(encoding="utf-8"))
    else:
        with _client(url, timeout=30) as client:
            try:
                response = client.get(f"/ui/api/transcripts/{name}")
            except httpx.HTTPError as e:
                raise ClientError(f"cannot reach {client.base_url}: {e}") from e
            if response.status_code == 404:
                raise ClientError(f"no transcript {name!r} on the server (and no such local file)")
            from serving.client import _raise_for_error

            _raise_for_error(response)
            messages = response.json()["messages"]
    for m in messages:
        if jsonl:
            out.write(json.dumps(m, ensure_ascii=False) + "\n")
        elif m["role"] == "event":
            out.write(f"-- {m['content']} --\n")
        else:
            out.write(f"[{m['role']}] {m['content']}\n")
    return 0
