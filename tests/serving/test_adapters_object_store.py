"""Adapters from object storage (moto's S3 server), loaded as models are: `lora_path: s3://...` is
fetched into the model cache and, with `--verify-key`, must carry a valid signature; a tampered
object or an unsigned adapter is a 400 naming why, and the adapters already loaded keep serving."""

from __future__ import annotations

import shutil

import boto3
import httpx
import pytest

from runtime.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.engine import Engine
from serving.app import create_app
from serving.cli import main
from serving.config import ServerConfig
from tests.helpers.tiny_adapter import build_adapter
from tests.ops.test_kms_envelope import moto_endpoint  # noqa: F401 - the moto server fixture
from tests.serving.conftest import assert_error, start_server

pytest.importorskip("model_signing")
NAME = "tiny-s3-lora"
BUCKET = "adapters"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-keys")
    private, public = root / "signing.pem", root / "signing.pub"
    assert main(["models", "keygen", "--private", str(private), "--public", str(public)]) == 0
    return private, public


@pytest.fixture
def s3(moto_endpoint, monkeypatch):  # noqa: F811
    for name, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    for old in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=old["Key"])
    return client


def upload(client, folder, prefix: str) -> str:
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def adapters(checkpoint, keys, tmp_path_factory):
    base = checkpoint("llama")
    root = tmp_path_factory.mktemp("s3-adapters")
    signed = build_adapter(base, root / "signed", rank=4, targets=("q_proj", "v_proj"), seed=3)
    assert main(["models", "sign", "--model", str(signed), "--key", str(keys[0])]) == 0
    unsigned = build_adapter(base, root / "unsigned", rank=4, targets=("q_proj",), seed=4)
    return base, signed, unsigned


@pytest.fixture(scope="module")
def server(adapters, keys, tmp_path_factory):
    base, _, _ = adapters
    core = Engine.from_model_dir(base, config=EngineConfig(
        block_size=16, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
        token_buckets=(32,), model_id=NAME, max_loras=2, max_lora_rank=8))
    core.warm_up()
    engine = AsyncEngine(core)
    cache = tmp_path_factory.mktemp("s3-adapter-cache")
    live = start_server(create_app(engine, ServerConfig(served_model_name=NAME, verify_key=str(keys[1]),
                                                        model_cache_dir=str(cache), allow_unsigned=False)))
    yield live, cache
    live.stop()
    engine.shutdown()


def greedy(client: httpx.Client, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": "the quick brown fox", "max_tokens": 8,
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_signed_adapter_loads_from_s3_and_answers_as_the_local_folder(server, adapters, s3):
    live, cache = server
    _, signed, _ = adapters
    uri = upload(s3, signed, "team/sql")
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "sql-s3", "lora_path": uri})
        assert r.status_code == 200, r.text
        assert (r.json()["rank"], r.json()["targets"]) == (4, ["q_proj", "v_proj"])
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "sql-local", "lora_path": str(signed)})
        assert r.status_code == 200, r.text
        from_s3, local, base = greedy(c, "sql-s3"), greedy(c, "sql-local"), greedy(c, NAME)
        assert from_s3 == local != base
        (copy,) = [p for p in cache.iterdir() if p.is_dir()]
        assert (copy / "adapter_model.safetensors").read_bytes() == (signed / "adapter_model.safetensors").read_bytes()
        # Loaded again: the cached copy is used (same folder, nothing new in the cache).
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "sql-s3", "lora_path": uri})
        assert r.status_code == 200, r.text
        assert [p for p in cache.iterdir() if p.is_dir()] == [copy]


def test_tampered_unsigned_and_missing_adapters_are_refused_naming_why(server, adapters, s3, tmp_path):
    live, _ = server
    _, signed, unsigned = adapters
    tampered = tmp_path / "tampered"
    shutil.copytree(signed, tampered)
    weights = bytearray((tampered / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (tampered / "adapter_model.safetensors").write_bytes(bytes(weights))
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "keep", "lora_path": upload(s3, signed, "team/keep")})
        assert r.status_code == 200, r.text
        before = greedy(c, "keep")
        cases = [(upload(s3, tampered, "team/tampered"), "adapter_model.safetensors"),
                 (upload(s3, unsigned, "team/unsigned"), "signature"),
                 (f"s3://{BUCKET}/team/nothing-here", "team/nothing-here"),
                 (str(unsigned), "signature")]
        for path, named in cases:
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
            assert_error(r, 400, param="lora_path", code="invalid_adapter", message_has=named)
        assert c.post("/v1/completions", json={"model": "bad", "prompt": "x", "max_tokens": 1}).status_code == 404
        assert greedy(c, "keep") == before
