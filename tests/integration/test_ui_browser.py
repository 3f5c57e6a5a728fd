"""The admin UI in a real browser: Playwright driving Debian's chromium (/usr/bin/chromium, which
`make test` installs) against a live server with the tiny engine, the OIDC provider on loopback,
a key store and an audit file. Every page must keep the browser's console free of errors.

TESSERA_UI_SCREENSHOTS=DIR also saves a screenshot of each page there (docs/ui holds the
committed ones).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY
from tests.serving.conftest import SERVER, slow_engine, start_server

CHROMIUM = "/usr/bin/chromium"
SHOTS = os.environ.get("TESSERA_UI_SCREENSHOTS")


@pytest.fixture(scope="module")
def ui(engine, oidc_provider, tmp_path_factory, log_stream):
    """(url, {name: key}, audit path): a server with OIDC login for the UI and API keys."""
    from ops.audit import configure_audit, reset_audit
    from serving.app import create_app
    from serving.auth.access import build_access
    from serving.config import ServerConfig

    folder = tmp_path_factory.mktemp("ui")
    audit = folder / "audit.jsonl"
    configure_audit(file=str(audit))
    config = ServerConfig(**SERVER, auth="on", key_store=str(folder / "keys.json"), oidc_issuer=oidc_provider.issuer,
                          oidc_audience="tessera", ui_oidc_client_id="tessera-ui",
                          ui_oidc_scopes="openid read generate", audit_file=str(audit),
                          ui_transcripts_dir=str(folder / "transcripts"))
    live = start_server(create_app(engine, config, access=build_access(config, {"TESSERA_API_KEY": ADMIN_KEY})))
    created = httpx.post(f"{live.url}/admin/keys", json={"tenant": "acme", "scopes": ["read"]},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert created.status_code == 201, created.text
    yield live.url, {"admin": ADMIN_KEY, "read": created.json()["key"]}, audit
    live.stop()
    reset_audit()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is not installed (make test installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, ui):
    """A fresh browser context; fails the test on any console error or uncaught exception from
    Tessera's pages (the test provider's own pages are not ours)."""
    url = ui[0]
    context = browser.new_context()
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.expected_errors = []  # console texts a test causes on purpose (the 403 page's own load)
    tab.on("console", lambda m: errors.append(f"{m.type}: {m.text} ({tab.url})")
           if m.type == "error" and tab.url.startswith(url)
           and not any(e in m.text for e in tab.expected_errors) else None)
    tab.on("pageerror", lambda e: errors.append(f"uncaught: {e} ({tab.url})"))
    yield tab
    context.close()
    assert errors == []


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def key_login(page, url: str, key: str, next_page: str) -> None:
    page.goto(f"{url}{next_page}")
    assert "/ui/login" in page.url
    page.fill("#api-key", key)
    page.click("#key-login")
    page.wait_for_url(f"{url}{next_page}")


RECORD_TOKENS = """(selector) => {
  window.__tokens = [];
  new MutationObserver(() => {
    document.querySelectorAll(selector + ' .tok:not([data-seen])').forEach((t) => {
      t.setAttribute('data-seen', '1');
      window.__tokens.push({t: performance.now() / 1000, text: t.textContent, at: t.getAttribute('data-at')});
    });
  }).observe(document.querySelector(selector), {childList: true, subtree: true});
}"""


def test_oidc_login_then_chat_save_reopen_and_continue(page, ui, engine, oidc_provider):
    url, _, _ = ui
    page.goto(f"{url}/ui/playground")
    assert "/ui/login?next=/ui/playground" in page.url
    shot(page, "login")
    with page.expect_request(lambda r: r.url.startswith(f"{oidc_provider.issuer}/auth?")) as authorization:
        page.click("#oidc-login")  # to the provider: PKCE, state and nonce in the authorization URL
    query = parse_qs(urlparse(authorization.value.url).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["client_id"] == ["tessera-ui"] and query["redirect_uri"] == [f"{url}/ui/login/callback"]
    assert query["state"][0] and query["nonce"][0]
    page.fill("#login", "alice@acme")
    page.click("#submit")
    page.click("#submit")  # consent
    page.wait_for_url(f"{url}/ui/playground")
    assert page.text_content("#who").split(" · ")[:2] == ["alice@acme", "acme"]

    page.evaluate(RECORD_TOKENS, "#conversation")
    page.fill("input[name=max_tokens]", "12")
    page.fill("input[name=temperature]", "0")
    page.fill("#message", "Hello there")
    with slow_engine(engine, 0.05):
        page.click("#send")
        page.wait_for_selector(".turn-done")
    tokens = page.evaluate("window.__tokens")
    answer = page.text_content(".answer")
    assert len(tokens) >= 3 and "".join(t["text"] for t in tokens) == answer
    # The tokens arrived one by one as the engine made them (a step takes >= 50 ms), not at the end.
    assert tokens[-1]["t"] - tokens[0]["t"] >= 0.05 * (len(tokens) - 1) * 0.5
    shot(page, "playground")

    transcript_id = page.get_attribute("#transcript-id", "value")
    page.goto(f"{url}/ui/playground")
    page.click(f".transcript-link[data-id='{transcript_id}']")
    page.wait_for_url(f"{url}/ui/playground?transcript={transcript_id}")
    assert page.locator("#conversation .msg").all_text_contents() == [f"userHello there", f"assistant{answer}"]
    page.fill("input[name=max_tokens]", "8")  # the tiny model's context is 128 tokens
    page.fill("#message", "And again")
    page.click("#send")
    page.wait_for_selector(".turn-done, .turn-error")
    assert page.locator(".turn-error").count() == 0, page.text_content(".turn-error")
    saved = page.request.get(f"{url}/ui/api/transcripts/{transcript_id}").json()["messages"]
    assert [(m["role"], m["content"]) for m in saved[:3]] == [("user", "Hello there"), ("assistant", answer),
                                                              ("user", "And again")]
    assert saved[3]["role"] == "assistant" and saved[3]["content"] == page.locator(".answer").last.text_content()


def test_playback_keeps_the_token_timing(page, ui, tmp_path):
    url, keys, _ = ui
    offsets = [0.0, 0.3, 0.45, 0.9, 1.2]
    transcript = tmp_path / "recorded.jsonl"
    transcript.write_text("\n".join(json.dumps(m) for m in [
        {"role": "user", "content": "Count", "time": 1.0},
        {"role": "assistant", "content": "one two three four five", "time": 2.0,
         "tokens": [[t, w] for t, w in zip(offsets, ["one", " two", " three", " four", " five"], strict=True)]},
    ]) + "\n")
    key_login(page, url, keys["admin"], "/ui/playback")
    page.set_input_files("#upload-file", str(transcript))
    page.select_option("#upload-form select[name=speed]", "2.0")
    page.evaluate(RECORD_TOKENS, "#player")
    page.click("#upload")
    page.wait_for_selector(".play-done")
    shot(page, "playback")
    played = [t for t in page.evaluate("window.__tokens") if t["text"] != "Count"]
    assert [t["text"] for t in played] == ["one", " two", " three", " four", " five"]
    gaps = [b["t"] - played[0]["t"] for b in played]
    expected = [t / 2 for t in offsets]  # speed 2: half the recorded gaps
    assert all(abs(g - e) < 0.08 for g, e in zip(gaps, expected, strict=True)), (gaps, expected)
    assert page.text_content("#playback-output .play-role") == "user"


def test_live_and_health_move_while_a_load_runs(page, ui, engine):
    url, keys, _ = ui
    key_login(page, url, keys["admin"], "/ui/health")
    before = int(page.text_content("[data-field=generation_tokens]"))
    done = threading.Event()

    def load():
        body = {"prompt": "Blocks are returned", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
        threads = [threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                                                              headers={"authorization": f"Bearer {ADMIN_KEY}"}))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()

    with slow_engine(engine, 0.04):
        threading.Thread(target=load, daemon=True).start()
        # Arrow functions: a bare expression would be evaluated as a string, which the CSP forbids.
        page.wait_for_function("() => Number(document.querySelector('[data-field=num_requests_running]').textContent) > 0")
        page.wait_for_function(f"() => Number(document.querySelector('[data-field=generation_tokens]').textContent) > {before}")
        page.wait_for_function("() => Number(document.getElementById('health').dataset.updates) >= 3")
        assert page.evaluate("window.Chart.getChart('chart-queue').data.datasets[0].data.some((v) => v > 0)")
        shot(page, "health")
        page.goto(f"{url}/ui/live")
        page.wait_for_selector(".live-row")
        rows = page.locator(".live-row .tenant").all_text_contents()
        assert rows and set(rows) == {"default"}  # the bootstrap key's tenant
        shot(page, "live")
        assert done.wait(60)
    page.wait_for_selector("tr.empty")  # the feed shows them gone
    page.goto(f"{url}/ui/audit?action=key.create")
    assert page.locator(".audit-line .action").all_text_contents()[:1] == ["key.create"]
    shot(page, "audit")


def test_read_user_gets_the_403_page_and_a_form_without_csrf_is_refused(page, ui):
    url, keys, _ = ui
    key_login(page, url, keys["read"], "/ui/live")
    page.expected_errors.append("the server responded with a status of 403")  # the 403 pages below
    assert page.locator("nav a").all_text_contents() == ["Live", "Playback", "Health"]
    response = page.goto(f"{url}/ui/audit")
    assert response.status == 403
    assert page.text_content("#error-title") == "Not allowed"
    assert "needs the scope `admin`" in page.text_content("#error-message")
    shot(page, "forbidden")

    page.goto(f"{url}/ui/live")
    page.evaluate("document.querySelector('form[action=\"/ui/logout\"] input[name=_csrf]').remove()")
    with page.expect_response(f"{url}/ui/logout") as posted:
        page.click("text=Log out")
    assert posted.value.status == 403
    assert "CSRF token is missing" in page.text_content("#error-message")
    page.goto(f"{url}/ui/live")
    page.click("text=Log out")  # with its token: out, and back to the login page
    page.wait_for_url(f"{url}/ui/login")
    assert page.goto(f"{url}/ui/live").url.startswith(f"{url}/ui/login")
