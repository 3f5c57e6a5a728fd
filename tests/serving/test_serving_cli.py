"""`tessera serve` settings (flags, TESSERA_* variables, --help) and the client commands against a server."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json

import httpx
import pytest

from serving import client
from serving.cli import _build_parser, main
from serving.config import ServerConfig, env_name
from tests.serving.conftest import MODEL_NAME


def _serve_args(argv: list[str]) -> argparse.Namespace:
    return _build_parser().parse_args(["serve", *argv])


def test_help_documents_every_setting_with_its_variable(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in text
        assert env_name(field.name) in text
        assert " ".join(field.metadata["help"].split()) in text
    assert "[TESSERA_LINEAR; alias TESSERA_CPU_LINEAR: 0 = xla, 1 = the default; default: None]" in text


def test_a_flag_wins_over_the_environment_which_wins_over_the_default():
    env = {"TESSERA_PORT": "9001", "TESSERA_MAX_NUM_SEQS": "32", "TESSERA_LOG_PROMPTS": "true",
           "TESSERA_MAX_MODEL_LEN": "", "TESSERA_KV_CACHE_MEMORY_GIB": "0.5"}
    config = ServerConfig.from_sources(_serve_args(["--port", "9002", "--no-enable-prefix-caching"]), env)
    assert (config.port, config.max_num_seqs, config.log_prompts, config.max_model_len) == (9002, 32, True, None)
    assert config.enable_prefix_caching is False and config.kv_cache_memory_gib == 0.5
    assert config.host == "127.0.0.1" and config.max_queue == 64  # defaults
    engine = config.engine_config()
    assert (engine.max_num_seqs, engine.enable_prefix_caching, engine.kv_cache_memory_bytes) == (32, False, 2**29)
    assert engine.attention_backend is None  # chosen by device at start-up
    assert ServerConfig.from_sources(_serve_args([]), {"TESSERA_ATTENTION": "reference"}).engine_config().attention_backend == "reference"


def test_the_execution_plan_s_choices_are_flags_with_the_old_variables_as_aliases():
    def engine(argv: list[str], env: dict[str, str]):
        return ServerConfig.from_sources(_serve_args(argv), env).engine_config()

    assert (engine([], {}).attention_backend, engine([], {}).linear) == (None, None)  # by device at start-up
    assert engine([], {"TESSERA_ATTENTION": "reference"}).attention_backend == "reference"
    assert engine(["--attention", "cpu"], {"TESSERA_ATTENTION": "reference"}).attention_backend == "cpu"
    assert engine([], {"TESSERA_CPU_LINEAR": "0"}).linear == "xla"
    assert engine([], {"TESSERA_CPU_LINEAR": "1"}).linear is None
    assert engine([], {"TESSERA_LINEAR": "packed", "TESSERA_CPU_LINEAR": "0"}).linear == "packed"  # the own name wins
    assert engine(["--linear", "cpu"], {"TESSERA_CPU_LINEAR": "0"}).linear == "cpu"


@pytest.mark.parametrize(("env", "message"), [
    ({"TESSERA_PORT": "eighty"}, "TESSERA_PORT='eighty' must be int"),
    ({"TESSERA_LOG_PROMPTS": "maybe"}, "TESSERA_LOG_PROMPTS='maybe' must be true or false"),
    ({"TESSERA_LOG_LEVEL": "loud"}, "log_level='loud' must be one of"),
    ({"TESSERA_ATTENTION": "triton"}, "attention='triton' must be one of pallas, cpu, reference, pallas_interpret"),
    ({"TESSERA_LINEAR": "amx"}, "linear='amx' must be one of xla, cpu, packed"),
    ({"TESSERA_LORA_KERNEL": "punica"}, "lora_kernel='punica' must be one of xla, pallas, pallas_interpret"),
    ({"TESSERA_CPU_LINEAR": "yes"}, "TESSERA_CPU_LINEAR='yes' must be one of 0, 1"),
    ({"TESSERA_MAX_QUEUE": "-1"}, "max_queue=-1 must be >= 0"),
    ({"TESSERA_LOG_TENANT_SAMPLE_RATIOS": "acme=2"}, "log_tenant_sample_ratios='acme=2'"),
    ({"TESSERA_TOKEN_BUCKETS": "8,x"}, "token_buckets='8,x' must be comma-separated integers"),
])
def test_bad_settings_are_refused_by_name(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ServerConfig.from_sources(None, env)


def test_serve_exits_2_on_a_bad_setting(capsys, monkeypatch):
    monkeypatch.setenv("TESSERA_DRAIN_TIMEOUT_S", "-5")
    assert main(["serve"]) == 2
    assert "drain_timeout_s=-5.0 must be >= 0" in capsys.readouterr().err


def test_complete_streams_the_same_text_as_the_api(base_url, capsys):
    body = {"prompt": "Blocks are returned", "max_tokens": 8, "temperature": 0, "top_p": 1.0}
    expected = httpx.post(base_url + "/v1/completions", json=body).json()["choices"][0]["text"]
    assert main(["complete", "--url", base_url, "--max-tokens", "8", "--temperature", "0", "Blocks are returned"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_keeps_the_conversation_and_writes_a_transcript(base_url, tmp_path):
    transcript = tmp_path / "chat.jsonl"
    out = io.StringIO()
    body = {"max_tokens": 6, "temperature": 0}
    assert client.chat(base_url, body, system="Be brief.", transcript=transcript,
                       stdin=io.StringIO("Hello there\n\nHow are you?\n/exit\n"), out=out) == 0
    rows = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [r["role"] for r in rows] == ["system", "user", "assistant", "user", "assistant"]
    assert [r["content"] for r in rows if r["role"] == "user"] == ["Hello there", "How are you?"]
    # The second answer saw the whole conversation so far.
    history = [{"role": r["role"], "content": r["content"]} for r in rows[:4]]
    again = httpx.post(base_url + "/v1/chat/completions", json={"messages": history, **body}).json()
    assert rows[4]["content"] == again["choices"][0]["message"]["content"]
    assert rows[2]["content"] in out.getvalue() and rows[4]["content"] in out.getvalue()
    # Each answer keeps its streamed pieces with their times, for `tessera playback`.
    for answer in (rows[2], rows[4]):
        assert "".join(text for _, text in answer["tokens"]) == answer["content"]
        times = [t for t, _ in answer["tokens"]]
        assert times == sorted(times) and times[0] > 0


def test_models_and_health(base_url, capsys):
    assert main(["models", "--url", base_url]) == 0
    assert capsys.readouterr().out.startswith(f"{MODEL_NAME}\tmax_model_len=128")
    assert main(["health", "--url", base_url]) == 0
    assert capsys.readouterr().out.startswith("alive; ready")


def test_client_errors_are_reported_not_raised(base_url, capsys):
    assert main(["complete", "--url", base_url, "--model", "nope", "Hi"]) == 1
    assert "the model `nope` does not exist" in capsys.readouterr().err
    assert main(["health", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach" in capsys.readouterr().err
