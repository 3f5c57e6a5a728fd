"""`tessera top`, `tessera playback FILE` and `tessera transcripts list|show` against a live server."""

from __future__ import annotations

import io
import json
import re
import time

import httpx
import pytest

from serving.app import create_app
from serving.cli import main
from serving.config import ServerConfig
from serving.ui_client import top, top_rows
from tests.serving.conftest import SERVER, start_server


@pytest.fixture(scope="module")
def ui_live(engine, tmp_path_factory, log_stream):
    folder = tmp_path_factory.mktemp("ui-cli")
    running = start_server(create_app(engine, ServerConfig(**SERVER, ui_transcripts_dir=str(folder))))
    yield running.url
    running.stop()


def test_top_prints_the_health_figures(ui_live):
    out = io.StringIO()
    assert top(ui_live, interval_s=0.01, iterations=2, out=out) == 0
    text = out.getvalue()
    assert text.count("tessera top · ") == 2 and "model tiny-llama · engine running" in text
    assert re.search(r"^\s+running  0$", text, re.M) and re.search(r"^\s+KV used  0\.0%$", text, re.M)
    assert re.search(r"^\s+tok/s  0\.0$", text, re.M)  # the second update has a rate


def test_top_rows_rate_from_two_snapshots():
    base = {"time": 10.0, "generation_tokens": 100, "num_requests_running": 2, "kv_cache_usage_perc": 0.25,
            "prefix_cache_hit_rate": None, "backend": "cpu"}
    rows = dict(top_rows({**base, "time": 12.0, "generation_tokens": 160}, base))
    assert (rows["tok/s"], rows["running"], rows["KV used"], rows["prefix hits"], rows["backend"]) == (
        "30.0", "2", "25.0%", "–", "cpu")
    assert dict(top_rows(base, None))["tok/s"] == "–"


def test_transcripts_list_and_show(ui_live, capsys):
    page = httpx.get(f"{ui_live}/ui/playground")
    token = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)
    cookies = page.cookies
    turn = httpx.post(f"{ui_live}/ui/playground/turns", cookies=cookies, headers={"x-csrf-token": token},
                      data={"message": "Blocks are returned", "max_tokens": "4", "temperature": "0"})
    transcript_id = re.search(r'id="transcript-id" value="([\w-]+)"', turn.text).group(1)
    stream_path = re.search(r'sse-connect="([^"]+)"', turn.text).group(1)
    assert "event: done" in httpx.get(f"{ui_live}{stream_path}", cookies=cookies, timeout=60).text

    assert main(["transcripts", "list", "--url", ui_live]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "ID\tMESSAGES\tUPDATED\tTITLE" and listing[1].startswith(f"{transcript_id}\t2\t")
    assert listing[1].endswith("\tBlocks are returned")
    assert main(["transcripts", "show", "--url", ui_live, transcript_id]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "[user] Blocks are returned" and shown[1].startswith("[assistant] ")
    assert main(["transcripts", "show", "--url", ui_live, "20990101-000000-00000000"]) == 1
    assert "no transcript '20990101-000000-00000000' on the server" in capsys.readouterr().err


def test_playback_replays_a_file_at_its_timing(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"role": "user", "content": "Hi"}) + "\n" + json.dumps(
        {"role": "assistant", "content": "Yo!", "tokens": [[0.0, "Yo"], [0.4, "!"]]}) + "\n")
    start = time.monotonic()
    assert main(["playback", str(path), "--speed", "2"]) == 0
    elapsed = time.monotonic() - start
    assert capsys.readouterr().out == "\n[user] Hi\n[assistant] Yo!\n"
    assert 0.2 <= elapsed < 0.5  # 0.4 s recorded, at twice the speed
    assert main(["transcripts", "show", str(path), "--jsonl"]) == 0  # a local file needs no server
    assert [json.loads(x)["role"] for x in capsys.readouterr().out.splitlines()] == ["user", "assistant"]
    path.write_text("not json\n")
    assert main(["playback", str(path)]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err
    assert main(["playback", str(tmp_path / "missing.jsonl")]) == 2
