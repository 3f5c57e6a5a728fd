"""LoRA adapters and the base model's hot reload through the HTTP API, on a live loopback server.

The churn test is the issue's soak: 32 streaming clients for CHURN_SECONDS (60 s), while an
adapter is replaced every ~1.5 s, another is loaded and unloaded, and the base model reloads
twice (a third and two thirds of the way through). Every response must equal, as a whole, the
greedy answer of one (base model, adapter) version pair, measured before the churn.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import shutil
import time

import httpx
import pytest

from ops import audit
from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from serving import observability
from serving.app import create_app
from serving.config import ServerConfig
from tests.helpers.tiny_adapter import build_adapter
from tests.helpers.tiny_checkpoint import build_checkpoint
from tests.serving.conftest import assert_error, start_server

NAME = "tiny-lora"
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["the quick brown fox", "a b c d e f", "once upon a time", "hello there"]
CHURN_SECONDS = 60  # the soak: 32 streams for 60 s
CHURN_PERIOD_S = 1.5  # adapter loads, replacements and unloads every 1.5 s


@pytest.fixture(scope="module")
def folders(checkpoint, tmp_path_factory):
    base = checkpoint("llama")
    root = tmp_path_factory.mktemp("lora-api")
    other = build_checkpoint(root / "base2", "llama", seed=7)  # same shapes, other weights
    return {
        "base": base, "base2": other,
        "p1": build_adapter(base, root / "p1", rank=4, targets=("q_proj", "v_proj"), seed=3),
        "p2": build_adapter(base, root / "p2", rank=8, targets=ALL, rslora=True, seed=4),
        "big": build_adapter(base, root / "big", rank=16, targets=("q_proj",), seed=5),
    }


@pytest.fixture(scope="module")
def audit_stream():
    stream = io.StringIO()
    audit.configure_audit(stream=stream)
    yield stream
    audit.reset_audit()


@pytest.fixture(scope="module")
def server(folders, audit_stream):
    core = Engine.from_model_dir(folders["base"], config=EngineConfig(
        block_size=16, num_blocks=128, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=128,
        token_buckets=(16, 64), model_id=NAME, max_loras=2, max_lora_rank=8))
    core.warm_up()
    engine = AsyncEngine(core, metrics=observability.make_metrics(NAME, core))
    live = start_server(create_app(engine, ServerConfig(served_model_name=NAME, max_queue=64, allow_unsigned=True)))
    yield live
    live.stop()
    engine.shutdown()


def _complete(client: httpx.Client, model: str, prompt: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                "ignore_eos": True})


def test_load_list_select_unload_and_refusals(server, folders, audit_stream):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(folders["p1"])})
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["rank"], r.json()["targets"]) == ("sql@1", 4, ["q_proj", "v_proj"])
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert cards["sql"]["parent"] == NAME and cards["sql"]["root"] == str(folders["p1"])
        assert cards[NAME]["parent"] is None and cards[NAME]["version"] == 1

        base, lora = _complete(c, NAME, PROMPTS[0]).json(), _complete(c, "sql", PROMPTS[0]).json()
        assert lora["model"] == "sql" and lora["choices"][0]["text"] != base["choices"][0]["text"]
        assert _complete(c, "sql", PROMPTS[0]).json()["choices"][0]["text"] == lora["choices"][0]["text"]

        assert_error(_complete(c, "nope", PROMPTS[0]), 404, param="model", code="model_not_found")
        corrupt = folders["p1"].parent / "corrupt"
        corrupt.mkdir(exist_ok=True)
        (corrupt / "adapter_config.json").write_text("{\"peft_type\": \"LORA\"")
        assert_error(c.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(corrupt)}), 400,
                     code="invalid_adapter")
        assert_error(c.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(folders["big"])}),
                     400, code="invalid_adapter", message_has="rank 16")
        assert_error(c.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400)
        assert _complete(c, "sql", PROMPTS[0]).json()["choices"][0]["text"] == lora["choices"][0]["text"]

        debug = c.get("/debug/adapters").json()
        (sql,) = debug["adapters"]
        assert (debug["max_loras"], sql["version"], sql["slot"], sql["misses"], sql["hits"]) == (2, "sql@1", 1, 1, 2)
        metrics = c.get("/metrics").text
        assert f'tessera:lora_adapter_hits_total{{model_name="{NAME}"}} 2.0' in metrics
        assert f'tessera:lora_adapter_loads_total{{model_name="{NAME}"}} 1.0' in metrics
        assert 'tessera:lora_requests_info{max_lora="2"' in metrics

        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert (r.status_code, r.json()["status"]) == (200, "unloaded")
        assert_error(_complete(c, "sql", PROMPTS[0]), 404, code="model_not_found")
        assert_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}), 404, code="model_not_found")
    lines = [json.loads(x) for x in audit_stream.getvalue().splitlines()]
    actions = [(x["action"], x["outcome"], x.get("adapter")) for x in lines if x["action"].startswith("adapter.")]
    assert actions == [("adapter.load", "success", "sql"), ("adapter.load", "failure", "bad"),
                       ("adapter.load", "failure", "big"), ("adapter.unload", "success", "sql")]


def test_reload_refuses_another_architecture_or_tokenizer_and_keeps_serving(server, checkpoint, folders, audit_stream,
                                                                           tmp_path):
    retokenized = tmp_path / "retokenized"
    shutil.copytree(folders["base2"], retokenized)
    config = json.loads((retokenized / "tokenizer_config.json").read_text())
    (retokenized / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        before = _complete(c, NAME, PROMPTS[1]).json()["choices"][0]["text"]
        r = c.post("/admin/models/reload", json={"model_path": str(checkpoint("qwen3"))})
        assert_error(r, 400, code="model_reload_failed", message_has="architecture")
        r = c.post("/admin/models/reload", json={"model_path": str(retokenized)})
        assert_error(r, 400, code="model_reload_failed", message_has="tokenizer_config.json differs")
        assert_error(c.post("/admin/models/reload", json={"model_path": "/nonexistent"}), 400,
                     code="model_reload_failed")
        assert _complete(c, NAME, PROMPTS[1]).json()["choices"][0]["text"] == before
    assert [x["outcome"] for x in map(json.loads, audit_stream.getvalue().splitlines())
            if x["action"] == "model.reload"] == ["failure"] * 3


async def _answers(url: str, models: list[str]) -> dict[tuple[str, str], str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        out = {}
        for model in models:
            for prompt in PROMPTS:
                r = await c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                         "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                out[(model, prompt)] = r.json()["choices"][0]["text"]
        return out


def test_32_streams_while_adapters_churn_and_the_base_reloads_twice(server, folders):
    url = server.url
    post = httpx.Client(base_url=url, timeout=120)

    def load(name, key):
        assert post.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folders[key])}
                         ).status_code == 200

    def reload(key):
        r = post.post("/admin/models/reload", json={"model_path": str(folders[key])})
        assert r.status_code == 200, r.text
        return r.json()

    # Every (base, adapter) version's answers, measured alone first.
    valid: dict[tuple[str, str], set[str]] = {}
    for base in ("base2", "base"):
        reload(base)
        for key in ("p1", "p2"):
            load("a", key)
            for k, v in asyncio.run(_answers(url, [NAME, "a"])).items():
                valid.setdefault(k, set()).add(v)
    assert all(len(valid[("a", p)]) >= 2 for p in PROMPTS)  # versions are told apart

    results: list[tuple[str, str, str]] = []
    failures: list[str] = []
    stop_at = time.monotonic() + CHURN_SECONDS
    # the two base reloads, by churn step: a third and two thirds of the way through
    steps = int((CHURN_SECONDS - 1) / CHURN_PERIOD_S)
    reload_to = {max(1, steps // 3): "base2", max(2, 2 * steps // 3): "base"}

    async def client(i: int):
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            while time.monotonic() < stop_at:
                model, prompt = rng.choice([NAME, "a"]), rng.choice(PROMPTS)
                body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                text = ""
                try:
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {await r.aread()}")
                            continue
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                event = json.loads(line[6:])
                                if "error" in event:
                                    failures.append(str(event))
                                else:
                                    text += event["choices"][0]["text"]
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                results.append((model, prompt, text))

    async def churn():
        reloads, step = [], 0
        while time.monotonic() < stop_at - 1:
            await asyncio.sleep(CHURN_PERIOD_S)
            step += 1
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                key = "p1" if step % 2 else "p2"
                r = await c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(folders[key])})
                assert r.status_code == 200, r.text
                if step % 2:
                    r = await c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(folders["p2"])})
                else:
                    r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
                assert r.status_code == 200, r.text
                if step in reload_to:
                    r = await c.post("/admin/models/reload", json={"model_path": str(folders[reload_to[step]])})
                    assert r.status_code == 200, r.text
                    reloads.append(r.json())
        return reloads

    async def main():
        *_, reloads = await asyncio.gather(*(client(i) for i in range(32)), churn())
        return reloads

    reloads = asyncio.run(main())
    post.close()
    assert not failures, failures[:5]
    assert len(reloads) == 2 and reloads[1]["version"] == reloads[0]["version"] + 1
    assert len(results) > 100
    mixed = [(m, p, t) for m, p, t in results if t not in valid[(m, p)]]
    assert not mixed, mixed[:3]
    print(f"churn: {len(results)} streams, {len(reloads)} reloads: "
          + ", ".join(f"load {r['load_seconds']:.2f}s switch {r['switch_seconds']:.2f}s" for r in reloads))


def test_sighup_reloads_the_served_folder_with_adapters_from_the_command_line(folders, tmp_path):
    """`tessera serve` in its own process (one token bucket, no warm-up, as the SIGTERM test):
    --lora-modules loads an adapter at start; new weights written into the served folder are
    served after SIGHUP, as version 2."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.serving.test_http_lifecycle import _free_port, _ready
    from tests.serving.conftest import wait_until

    served = tmp_path / "served"
    shutil.copytree(folders["base"], served)
    env = {**os.environ, "TESSERA_MODEL": str(served), "TESSERA_SERVED_MODEL_NAME": "sub",
           "TESSERA_MAX_NUM_SEQS": "4", "TESSERA_MAX_NUM_BATCHED_TOKENS": "8", "TESSERA_MAX_MODEL_LEN": "128",
           "TESSERA_TOKEN_BUCKETS": "8", "TESSERA_NUM_BLOCKS": "64", "TESSERA_WARM_UP": "false",
           "TESSERA_ALLOW_UNSIGNED": "true", "TESSERA_MAX_LORAS": "1", "TESSERA_MAX_LORA_RANK": "8",
           "TESSERA_LORA_MODULES": f"sql={folders['p1']}"}
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--port", str(port)], env=env,
                               cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _ready(url) or process.poll() is not None, 120, 0.2)
        assert process.poll() is None, process.stdout.read()
        with httpx.Client(base_url=url, timeout=60) as c:
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["sub", "sql"]
            before = _complete(c, "sub", PROMPTS[2]).json()["choices"][0]["text"]
            shutil.copy(folders["base2"] / "model.safetensors", served / "model.safetensors")
            process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: c.get("/v1/models").json()["data"][0]["version"] == 2, 60, 0.2)
            after = _complete(c, "sub", PROMPTS[2]).json()["choices"][0]["text"]
            assert after != before
            assert _complete(c, "sql", PROMPTS[2]).status_code == 200  # the adapter serves on the new base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
