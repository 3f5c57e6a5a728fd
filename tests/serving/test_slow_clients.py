"""Slow and vanishing clients: half-sent headers, a body that stalls and an idle connection are
closed by their timeouts (408 when mid-request); a body cut off by the client is logged as 499,
never as a server error. Raw sockets, since no HTTP client misbehaves on purpose."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from serving.app import create_app
from serving.config import ServerConfig
from tests.serving.conftest import SERVER, start_server, wait_until

TIMEOUTS = dict(header_timeout_s=0.5, body_timeout_s=0.5, idle_timeout_s=0.5)
WAIT_S = 20.0  # how long a test waits for the server to act: generous, never a measurement


@pytest.fixture(scope="module")
def strict(engine, log_stream):
    live = start_server(create_app(engine, ServerConfig(**SERVER, **TIMEOUTS)))
    yield live
    live.stop()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(WAIT_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def access_status(log_stream, request_id: str) -> int | None:
    for line in log_stream.getvalue().splitlines():
        record = json.loads(line)
        if record.get("event") == "access" and record.get("request_id") == request_id:
            return record["status"]
    return None


def test_half_sent_headers_are_answered_408_and_closed(strict):
    sockets = [connect(strict.url) for _ in range(50)]
    for sock in sockets:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: tessera\r\nContent-")
    assert httpx.get(strict.url + "/health").status_code == 200  # served beside them
    answers = [read_until_closed(sock) for sock in sockets]
    for sock in sockets:
        sock.close()
    assert {a.split(b"\r\n", 1)[0] for a in answers} == {b"HTTP/1.1 408 Request Timeout"}
    body = json.loads(answers[0].split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and "headers" in body["error"]["message"]


def test_a_body_that_stalls_is_closed_and_logged_as_408(strict, log_stream):
    sock = connect(strict.url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: tessera\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\nX-Request-Id: slow-body-1\r\n\r\n{\"prompt\": ")
    answer = read_until_closed(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert wait_until(lambda: access_status(log_stream, "slow-body-1") is not None, timeout=WAIT_S)
    assert access_status(log_stream, "slow-body-1") == 408


def test_an_idle_connection_is_closed(strict):
    sock = connect(strict.url)
    assert read_until_closed(sock) == b""  # never asked anything: closed without an answer
    sock.close()
    keep_alive = connect(strict.url)
    keep_alive.sendall(b"GET /health HTTP/1.1\r\nHost: tessera\r\n\r\n")
    answer = read_until_closed(keep_alive)  # answered, then closed once idle
    keep_alive.close()
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b'{"status":"ok"}')


def test_a_body_cut_off_by_the_client_is_a_499_not_a_500(base_url, log_stream):
    sock = connect(base_url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: tessera\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\nX-Request-Id: cut-body-1\r\n\r\n" + b'{"prompt": "' + b"x" * 100)
    sock.close()
    assert wait_until(lambda: access_status(log_stream, "cut-body-1") is not None, timeout=WAIT_S)
    assert access_status(log_stream, "cut-body-1") == 499
