"""The client commands: `tessera chat`, `complete`, `models`, `health`, against a running server."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The server answered with an error, or could not be reached."""


def _headers() -> dict[str, str]:
    """TESSERA_API_KEY, else the token `tessera login` cached (refreshed when due)."""
    from serving.auth.tokens import LoginRequired, authorization_header

    try:
        return authorization_header()
    except LoginRequired as e:
        raise ClientError(str(e)) from None


def _client(url: str, timeout: float | None = 600.0) -> httpx.Client:
    return httpx.Client(base_url=url.rstrip("/"), headers=_headers(), timeout=timeout)


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    raise ClientError(f"{message} (HTTP {response.status_code})")


def stream_events(client: httpx.Client, path: str, body: dict) -> Iterator[dict]:
    """The JSON payloads of a server-sent event stream, up to `[DONE]`."""
    try:
        with client.stream("POST", path, json={**body, "stream": True}) as response:
            _raise_for_error(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ClientError(event["error"]["message"])
                yield event
    except httpx.HTTPError as e:
        raise ClientError(f"cannot reach {client.base_url}: {e}") from e


def complete(url: str, prompt: str, body: dict, out: IO[str] | None = None) -> str:
    """Stream one completion to `out`; returns its text."""
    out = out or sys.stdout
    parts = []
    with _client(url) as client:
        for event in stream_events(client, "/v1/completions", {"prompt": prompt, **body}):
            for choice in event["choices"]:
                parts.append(choice["text"])
                out.write(choice["text"])
                out.flush()
    out.write("\n")
    return "".join(parts)


def chat_turn(client: httpx.Client, messages: list[dict], body: dict, out: IO[str]) -> list[list]:
    """Stream one answer to `out`; returns its pieces as [seconds after sending, text] (the
    transcript's `tokens`, which `tessera playback` replays)."""
    pieces = []
    start = time.monotonic()
    for event in stream_events(client, "/v1/chat/completions", {"messages": messages, **body}):
        for choice in event["choices"]:
            text = choice["delta"].get("content") or ""
            if text:
                pieces.append([round(time.monotonic() - start, 4), text])
            out.write(text)
            out.flush()
    out.write("\n")
    return pieces


def chat(url: str, body: dict, system: str | None = None, transcript: Path | None = None,
         stdin: IO[str] | None = None, out: IO[str] | None = None) -> int:
    """An interactive chat: a line is a user turn; `/reset` starts over; `/exit` or end of input quits.
    With `transcript`, every message is appended to it as a JSON line as soon as it is complete."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    log = transcript.open("a", encoding="utf-8") if transcript else None

    def record(message: dict) -> None:
        if log is not None:
            log.write(json.dumps({**message, "time": time.time()}, ensure_ascii=False) + "\n")
            log.flush()

    for message in messages:
        record(message)
    out.write("tessera chat: type a message; /reset starts over, /exit quits\n")
    try:
        with _client(url) as client:
            while True:
                out.write("> ")
                out.flush()
                line = stdin.readline()
                if not line or line.strip() == "/exit":
                    return 0
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                if text.strip() == "/reset":
                    messages = messages[:1] if system else []
                    record({"role": "event", "content": "reset"})
                    continue
                messages.append({"role": "user", "content": text})
                record(messages[-1])
                pieces = chat_turn(client, messages, body, out)
                messages.append({"role": "assistant", "content": "".join(text for _, text in pieces)})
                record({**messages[-1], "tokens": pieces})
    finally:
        if log is not None:
            log.close()


def models(url: str, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    with _client(url, timeout=30) as client:
        response = _get(client, "/v1/models")
    for card in response.json()["data"]:
        out.write(f"{card['id']}\tmax_model_len={card.get('max_model_len')}\troot={card.get('root')}\n")
    return 0


def health(url: str, out: IO[str] | None = None) -> int:
    """0 when the server is alive and ready, 1 when alive but not ready."""
    out = out or sys.stdout
    with _client(url, timeout=30) as client:
        _get(client, "/health")
        ready = client.get("/ready")
    body = ready.json()
    out.write(f"alive; {body['status']}" + (f" ({body['reason']})" if body.get("reason") else "")
              + f"; {body['requests_in_flight']} requests in flight\n")
    return 0 if ready.status_code == 200 else 1


def _get(client: httpx.Client, path: str) -> httpx.Response:
    try:
        response = client.get(path)
    except httpx.HTTPError as e:
        raise ClientError(f"cannot reach {client.base_url}: {e}") from e
    _raise_for_error(response)
    return response
