"""ops/audit.py: the line's fields, redaction of secrets and user text, file (0600, rotation),
stdout, and the HTTP sink against a local collector."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ops.audit import FIELDS, audit_event, configure_audit, flush_audit, reset_audit


@pytest.fixture(autouse=True)
def _reset():
    yield
    reset_audit()


def test_line_has_every_field_and_details():
    stream = io.StringIO()
    configure_audit(stream=stream)
    returned = audit_event("key.create", "success", actor="key:boot", tenant="acme", key_id="7d2e90",
                           object="key:7d2e90", request_id="r1", source="127.0.0.1", scopes=["generate"])
    line = json.loads(stream.getvalue())
    assert line == returned
    assert list(line)[: len(FIELDS)] == list(FIELDS)
    assert (line["type"], line["action"], line["outcome"], line["tenant"], line["key_id"]) == (
        "audit", "key.create", "success", "acme", "7d2e90")
    assert line["scopes"] == ["generate"] and line["time"].endswith("Z")


def test_secrets_and_user_text_never_written():
    stream = io.StringIO()
    configure_audit(stream=stream)
    audit_event("auth.failure", "failure", key="tsk_abc_SECRET1", api_key="SECRET2", access_token="SECRET3",
                prompt="SECRET4", messages=[{"content": "SECRET5"}], password="SECRET6", reason="bad key")
    text = stream.getvalue()
    assert "SECRET" not in text
    line = json.loads(text)
    assert line["key"] == line["prompt"] == line["messages"] == "[redacted]" and line["reason"] == "bad key"


def test_bad_outcome_and_shadowed_field_refused():
    with pytest.raises(ValueError, match="outcome"):
        audit_event("x", "ok")
    with pytest.raises(ValueError, match="standard audit field"):
        audit_event("x", "success", **{"time": 1})


def test_file_sink_is_private_and_rotates(tmp_path):
    path = tmp_path / "audit.log"
    configure_audit(file=str(path), max_bytes=400, backup_count=2)
    for i in range(12):
        audit_event("admin.test", "success", object=f"o{i}")
    reset_audit()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert (tmp_path / "audit.log.1").exists() and stat.S_IMODE(os.stat(tmp_path / "audit.log.1").st_mode) == 0o600
    lines = [json.loads(x) for p in (tmp_path / "audit.log.2", tmp_path / "audit.log.1", path) if p.exists()
             for x in p.read_text().splitlines()]
    assert [x["object"] for x in lines] == [f"o{i}" for i in range(12 - len(lines), 12)]


def test_stdout_sink(capsys):
    configure_audit(stdout=True)
    audit_event("config.change", "success", actor="key:a", changes={"log_level": "debug"})
    assert json.loads(capsys.readouterr().out)["changes"] == {"log_level": "debug"}


def test_http_sink_delivers_ndjson_batches():
    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((self.headers["content-type"], self.headers.get("authorization"), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ingest"
        configure_audit(http_url=url, http_headers={"authorization": "Bearer siem"})
        for i in range(5):
            audit_event("model.load", "success", object=f"m{i}")
        assert flush_audit(10)
    finally:
        reset_audit()
        server.shutdown()
    assert received and all(ct == "application/x-ndjson" and auth == "Bearer siem" for ct, auth, _ in received)
    lines = [json.loads(x) for _, _, body in received for x in body.decode().splitlines()]
    assert [x["object"] for x in lines] == [f"m{i}" for i in range(5)]
