"""The admin UI's server side, in-process around a fixed-token EngineClient (no browser): pages,
sessions and logins, scopes, CSRF, the security headers, the playground's transcripts, playback
timing, the audit filter, and bad input answered with the right status."""

from __future__ import annotations

import json
import re

import pytest
from litestar.testing import TestClient

from models.tokenizer import Tokenizer
from serving.app import create_app
from serving.auth.access import build_access
from serving.config import ServerConfig
from serving.in_flight import InFlight
from serving.records import RequestRecord
from serving.ui.audit_view import AuditFilter, parse_time, read_audit
from serving.ui.login import safe_next
from serving.ui.playback import PlaybackEvent, play, timeline
from serving.ui.security import CSP
from serving.ui.transcripts import TranscriptError, conversation, parse_transcript
from tests.serving.conftest import SERVER
from tests.serving.test_engine_client_boundary import TOKENS, FixedTokensEngine

ADMIN_KEY = "ui-bootstrap-admin-key-0123456789abcdef"


@pytest.fixture
def fake(tiny_model) -> FixedTokensEngine:
    return FixedTokensEngine(Tokenizer.from_dir(tiny_model))


def _config(tmp_path, **overrides) -> ServerConfig:
    return ServerConfig(**{**SERVER, "served_model_name": None}, ui_transcripts_dir=str(tmp_path / "transcripts"),
                        **overrides)


@pytest.fixture
def open_client(fake, tmp_path):
    """Auth off: every caller is the anonymous admin of tenant `default`."""
    with TestClient(create_app(fake, _config(tmp_path))) as client:
        yield client


@pytest.fixture
def keyed(fake, tmp_path):
    """Auth on with a key store; yields (client, {scope: key})."""
    config = _config(tmp_path, auth="on", key_store=str(tmp_path / "keys.json"))
    app = create_app(fake, config, access=build_access(config, {"TESSERA_API_KEY": ADMIN_KEY}))
    with TestClient(app) as client:
        keys = {}
        for scope in ("read", "generate"):
            created = client.post("/admin/keys", json={"tenant": "acme", "scopes": [scope]},
                                  headers={"authorization": f"Bearer {ADMIN_KEY}"})
            assert created.status_code == 201, created.text
            keys[scope] = created.json()["key"]
        yield client, keys


def csrf(client: TestClient, path: str = "/ui/playground") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    return re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)  # htmx sends it with every request


def log_in(client: TestClient, key: str, next_page: str = "/ui/health"):
    token = csrf(client, "/ui/login")
    return client.post("/ui/login/key", data={"_csrf": token, "key": key, "next": next_page}, follow_redirects=False)


def stream_turn(client: TestClient, token: str, **form) -> tuple[str, str]:
    """(the turn's fragment, its SSE stream) for one playground message."""
    turn = client.post("/ui/playground/turns", data={"_csrf": token, **form})
    assert turn.status_code == 200, turn.text
    turn_id = re.search(r"/ui/playground/turns/([\w-]+)/stream", turn.text).group(1)
    return turn.text, client.get(f"/ui/playground/turns/{turn_id}/stream").text


def test_every_page_renders_with_the_security_headers(open_client):
    for path in ("/ui/live", "/ui/playground", "/ui/playback", "/ui/health", "/ui/audit", "/ui/login"):
        response = open_client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["content-security-policy"] == CSP
        assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP
        assert (response.headers["x-frame-options"], response.headers["x-content-type-options"]) == ("DENY", "nosniff")
        assert response.headers["cache-control"] == "no-store"
        assert "<script>" not in response.text and " style=" not in response.text  # nothing inline for the CSP to block
    cookie = open_client.get("/ui/login").headers.get("set-cookie") or ""
    assert cookie == "" or ("HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/ui" in cookie)
    home = open_client.get("/ui/", follow_redirects=False)
    assert (home.status_code, home.headers["location"]) == (303, "/ui/live")
    static = open_client.get("/ui/static/vendor/htmx-2.0.11.min.js")
    assert static.status_code == 200 and static.headers["content-security-policy"] == CSP


def test_playground_streams_saves_and_continues_a_transcript(open_client, fake):
    token = csrf(open_client)
    pieces = [fake.tokenizer.decode([t]) for t in TOKENS]
    fragment, stream = stream_turn(open_client, token, message="Hello", system="Be brief.", max_tokens="3",
                                   temperature="0")
    transcript_id = re.search(r'id="transcript-id" value="([\w-]+)"', fragment).group(1)
    events = re.findall(r"event: (\w+)\ndata: (.*)", stream)
    assert [name for name, _ in events] == ["token"] * 3 + ["done"]
    assert "3 tokens in" in stream and transcript_id in stream
    saved = open_client.get(f"/ui/api/transcripts/{transcript_id}").json()["messages"]
    assert [(m["role"], m["content"]) for m in saved] == [("system", "Be brief."), ("user", "Hello"),
                                                           ("assistant", "".join(pieces))]
    assert [text for _, text in saved[2]["tokens"]] == pieces and saved[2]["model"] == "fixed"
    times = [t for t, _ in saved[2]["tokens"]]
    assert times == sorted(times) and times[0] >= 0

    # Reopened: the page shows the conversation; the next turn continues it.
    page = open_client.get(f"/ui/playground?transcript={transcript_id}").text
    assert "Be brief." in page and 'value="' + transcript_id + '"' in page
    stream_turn(open_client, token, message="Again", transcript=transcript_id, max_tokens="2")
    saved = open_client.get(f"/ui/api/transcripts/{transcript_id}").json()["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert fake.streamed[-1].params.max_tokens == 2
    prompt = fake.tokenizer.decode(fake.streamed[-1].prompt_token_ids)
    assert "Be brief." in prompt and "Hello" in prompt and "Again" in prompt  # the whole conversation
    listing = open_client.get("/ui/api/transcripts").json()["data"]
    assert [(t["id"], t["title"], t["messages"]) for t in listing] == [(transcript_id, "Hello", 5)]


def test_a_streamed_turn_is_one_use(open_client):
    token = csrf(open_client)
    turn = open_client.post("/ui/playground/turns", data={"_csrf": token, "message": "Hi", "max_tokens": "1"})
    path = re.search(r'sse-connect="([^"]+)"', turn.text).group(1)
    assert open_client.get(path).status_code == 200
    again = open_client.get(path)
    assert again.status_code == 404 and "already been streamed" in again.text


@pytest.mark.parametrize(("form", "status", "message"), [
    ({"message": "  "}, 400, "type a message first"),
    ({"message": "Hi", "temperature": "warm"}, 400, "temperature must be a number"),
    ({"message": "Hi", "max_tokens": "0"}, 400, "max_tokens must be between 1 and 4096"),
    ({"message": "Hi", "model": "other"}, 404, "the model `other` does not exist"),
    ({"message": "Hi", "transcript": "../../etc/passwd"}, 404, "you have no transcript"),
    ({"message": "Hi", "transcript": "20990101-000000-00000000"}, 404, "you have no transcript"),
])
def test_bad_playground_input_is_named_with_its_status(open_client, form, status, message):
    response = open_client.post("/ui/playground/turns", data={"_csrf": csrf(open_client), **form},
                                headers={"hx-request": "true"})
    assert response.status_code == status, response.text
    assert message in response.text.replace("&#39;", "'").replace("&lt;", "<")
    assert 'class="error notice"' in response.text  # the fragment htmx puts in the page


def test_forms_without_their_csrf_token_are_refused(open_client):
    csrf(open_client)  # the session exists
    for data, headers in (({"message": "Hi"}, {}), ({"message": "Hi", "_csrf": "forged"}, {}),
                          ({"message": "Hi"}, {"x-csrf-token": "forged"})):
        response = open_client.post("/ui/playground/turns", data=data, headers=headers)
        assert response.status_code == 403, response.text
        assert "CSRF token is missing or does not match" in response.text.replace("&#39;", "'")
    token = csrf(open_client)
    assert open_client.post("/ui/playground/turns", data={"message": "Hi", "max_tokens": "1"},
                            headers={"x-csrf-token": token}).status_code == 200  # htmx's header
    assert open_client.post("/ui/logout", data={}).status_code == 403


def test_login_with_a_key_scopes_and_logout(keyed):
    client, keys = keyed
    away = client.get("/ui/health", follow_redirects=False)
    assert (away.status_code, away.headers["location"]) == (303, "/ui/login?next=/ui/health")
    assert client.get("/ui/api/health").status_code == 401  # the CLI's JSON: the API's answer
    assert client.get("/ui/api/health").json()["error"]["code"] == "missing_credentials"

    wrong = log_in(client, "tsk_0123456789ab_" + "A" * 43)
    assert wrong.status_code == 401 and "not valid" in wrong.text
    before = client.cookies.get("tessera_ui")
    done = log_in(client, keys["read"])
    assert (done.status_code, done.headers["location"]) == (303, "/ui/health")
    assert client.cookies.get("tessera_ui") != before  # a new session id at login
    health = client.get("/ui/health")
    assert health.status_code == 200 and "key:" in health.text and "acme" in health.text
    assert 'href="/ui/audit"' not in health.text and 'href="/ui/playground"' not in health.text  # nav by scope

    for path in ("/ui/audit", "/ui/playground"):
        denied = client.get(path)
        assert denied.status_code == 403 and "Not allowed" in denied.text
        assert "needs the scope" in denied.text
    abort = client.post("/ui/live/requests/abc/abort", data={"_csrf": csrf(client, "/ui/live")})
    assert abort.status_code == 403 and "needs the scope `admin`" in abort.text
    # A bearer header is served as on the API (no cookie, so no CSRF token needed), with its scopes.
    as_api = client.get("/ui/api/transcripts", headers={"authorization": f"Bearer {keys['generate']}"})
    assert as_api.status_code == 403 and as_api.json()["error"]["code"] == "insufficient_scope"

    out = client.post("/ui/logout", data={"_csrf": csrf(client, "/ui/live")}, follow_redirects=False)
    assert (out.status_code, out.headers["location"]) == (303, "/ui/login")
    assert client.get("/ui/live", follow_redirects=False).status_code == 303


def test_abort_ends_a_request_in_flight_and_is_audited(open_client, fake):
    record = RequestRecord("req-1", "/v1/chat/completions", tenant="acme", model="fixed")

    class Gen:  # what InFlight keeps of a Generation: its record and engine requests
        requests = [type("R", (), {"request_id": "engine-1"})()]

    Gen.record = record
    aborted = []
    fake.abort = aborted.append
    open_client.app.state["server"].in_flight.add(Gen)
    token = csrf(open_client, "/ui/live")
    assert "req-1"[:12] in open_client.get("/ui/live").text
    response = open_client.post("/ui/live/requests/req-1/abort", data={"_csrf": token})
    assert response.status_code == 200 and "request req-1 aborted" in response.text
    assert aborted == ["engine-1"]
    assert open_client.post("/ui/live/requests/nope/abort", data={"_csrf": token}).status_code == 404


def test_live_rows_show_a_tenant_its_own_requests():
    live = InFlight()
    for request_id, tenant, tokens in (("a", "acme", 5), ("b", "beta", 0)):
        record = RequestRecord(request_id, "/v1/completions", tenant=tenant, model="demo", prompt_tokens=7)
        record.completion_tokens = tokens
        record.arrival_mono -= 1.0  # arrived a second ago, first token after 0.1 s
        record.token_times = [0.1] if tokens else []
        gen = type("G", (), {"record": record, "requests": []})()
        live.add(gen)
    assert [(r.request_id, r.tenant, r.completion_tokens, r.prompt_tokens) for r in live.rows("acme")] == [
        ("a", "acme", 5, 7)]
    assert [r.request_id for r in live.rows(None)] == ["a", "b"]
    rate = live.rows("acme")[0].tokens_per_s
    assert rate is not None and rate > 0 and live.rows("beta")[0].tokens_per_s is None
    live.discard("a")
    assert [r.request_id for r in live.rows(None)] == ["b"]


def test_health_feed_and_json(open_client):
    snapshot = open_client.get("/ui/api/health").json()
    assert snapshot["model"] == "fixed" and snapshot["engine_running"] is True
    assert (snapshot["num_requests_running"], snapshot["kv_cache_usage_perc"], snapshot["prefix_cache_hit_rate"]) == (
        0, 0.0, None)
    assert snapshot["adapters"] == [] and snapshot["workers"] == []


def test_playback_uploads_and_bad_sources(open_client):
    token = csrf(open_client, "/ui/playback")
    transcript = '{"role": "user", "content": "Hi"}\n{"role": "assistant", "content": "Yo", "tokens": [[0.0, "Y"], [0.05, "o"]]}\n'
    player = open_client.post("/ui/playback/uploads", data={"_csrf": token, "speed": "4"},
                              files={"file": ("t.jsonl", transcript.encode(), "application/jsonl")})
    assert player.status_code == 200, player.text
    stream_path = re.search(r'sse-connect="([^"]+)"', player.text).group(1).replace("&amp;", "&")
    assert stream_path.endswith("&speed=4.0")
    stream = open_client.get(stream_path).text
    assert re.findall(r'<span class="tok"[^>]*>([^<]*)</span>', stream) == ["Hi", "Y", "o"]
    assert "event: end" in stream

    bad = open_client.post("/ui/playback/uploads", data={"_csrf": token},
                           files={"file": ("t.jsonl", b'{"role": "user", "content": "Hi"}\nnot json\n', "text/plain")})
    assert bad.status_code == 400 and "line 2 is not JSON" in bad.text
    binary = open_client.post("/ui/playback/uploads", data={"_csrf": token}, files={"file": ("x", b"\xff\xfe", "x/y")})
    assert binary.status_code == 400 and "not UTF-8" in binary.text
    assert open_client.get("/ui/playback/stream?source=upload:nope").status_code == 404
    assert open_client.get("/ui/playback/stream?source=transcript:x").status_code == 404
    too_fast = open_client.get("/ui/playback/player?source=upload:x&speed=100")
    assert too_fast.status_code == 400 and "speed must be a number between 0.1 and 16.0" in too_fast.text


def test_timeline_and_play_keep_the_recorded_timing():
    text = "\n".join(json.dumps(m) for m in [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q", "time": 1.0},
        {"role": "assistant", "content": "ab c", "tokens": [[0.2, "ab"], [0.5, " c"]]},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "whole"},
    ])
    events = timeline(text)
    assert [(e.at_s, e.kind, e.text) for e in events if e.kind == "token"] == [
        (0.0, "token", "S"), (0.0, "token", "Q"), (0.2, "token", "ab"), (0.5, "token", " c"), (0.5, "token", "Q2"),
        (0.5, "token", "whole")]
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(round(seconds, 6))
        now[0] += seconds

    played = list(play(events, speed=2.0, clock=lambda: now[0], sleep=sleep))
    assert played == events and slept == [0.1, 0.15]  # 0.2 / 2, then (0.5 - 0.2) / 2

    sse_log = ": t=0.10\ndata: {\"choices\": [{\"delta\": {\"content\": \"He\"}}]}\n\n: t=0.30\n" \
              "data: {\"choices\": [{\"text\": \"llo\"}]}\n\ndata: [DONE]\n"
    assert [(e.at_s, e.text) for e in timeline(sse_log) if e.kind == "token"] == [(0.1, "He"), (0.3, "llo")]
    with pytest.raises(TranscriptError, match="line 3: tokens must be a list"):
        parse_transcript('{"role":"user","content":"a"}\n\n{"role":"assistant","content":"b","tokens":[1]}')
    with pytest.raises(TranscriptError, match="line 1 is not a message"):
        parse_transcript('{"role":"robot","content":"a"}')


def test_conversation_starts_over_after_a_reset():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "1"},
                {"role": "assistant", "content": "2"}, {"role": "event", "content": "reset"},
                {"role": "user", "content": "3"}]
    assert conversation(messages) == [{"role": "system", "content": "S"}, {"role": "user", "content": "3"}]


def test_audit_page_filters_the_audit_file(fake, tmp_path):
    audit = tmp_path / "audit.jsonl"
    lines = [{"time": "2025-01-01T10:00:00Z", "action": "key.create", "outcome": "success", "tenant": "acme"},
             {"time": "2025-01-01T11:00:00Z", "action": "authz.denied", "outcome": "denied", "tenant": "beta"},
             {"time": "2025-01-01T12:00:00Z", "action": "key.revoke", "outcome": "success", "tenant": "acme"}]
    audit.write_text("".join(json.dumps(x) + "\n" for x in lines) + "garbage\n")
    assert [x["action"] for x in read_audit(str(audit), AuditFilter("key."))] == ["key.revoke", "key.create"]
    assert [x["action"] for x in read_audit(str(audit), AuditFilter(tenant="beta"))] == ["authz.denied"]
    since = AuditFilter(since=parse_time("2025-01-01T10:30"), until=parse_time("2025-01-01T11:30"))
    assert [x["action"] for x in read_audit(str(audit), since)] == ["authz.denied"]
    with TestClient(create_app(fake, _config(tmp_path, audit_file=str(audit)))) as client:
        page = client.get("/ui/audit?action=key.&tenant=acme").text
        assert page.count('class="audit-line"') == 2 and ">key.revoke<" in page and ">authz.denied<" not in page
        bad = client.get("/ui/audit?since=yesterday")
        assert bad.status_code == 400 and "since must be a date and time" in bad.text


@pytest.mark.parametrize(("target", "expected"), [
    ("/ui/health", "/ui/health"), (None, "/ui/"), ("https://evil.example/ui/", "/ui/"), ("//evil.example", "/ui/"),
    ("/ui//evil.example", "/ui/"), ("/ui/../admin/keys", "/ui/"), ("/v1/models", "/ui/"), ("/ui\\evil", "/ui/"),
])
def test_login_returns_only_to_ui_pages(target, expected):
    assert safe_next(target) == expected
