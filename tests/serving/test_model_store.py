"""`--model s3://bucket/prefix` against moto's S3 server: a signed model is downloaded (in parallel)
to the local cache, verified and served; a second start uses the cache without downloading; a
tampered object is refused naming the file, before any weight is read."""

from __future__ import annotations

import filecmp
import shutil

import boto3
import pytest
from litestar.testing import TestClient

from runtime.engine import Engine
from serving import server as server_module
from serving.app import create_app
from serving.cli import main
from serving.config import ServerConfig
from serving.model_store import ModelStoreError, fetch_model
from serving.server import build_server_state
from tests.ops.test_kms_envelope import moto_endpoint  # noqa: F401 - the moto server fixture

pytest.importorskip("model_signing")
URI = "s3://models/team/tiny"


@pytest.fixture
def bucket(moto_endpoint, monkeypatch, tiny_model, tmp_path):  # noqa: F811
    """A signed tiny model under s3://models/team/tiny; (the S3 client, the public key, the local original)."""
    for name, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model, model)
    private, public = tmp_path / "signing.pem", tmp_path / "signing.pub"
    assert main(["models", "keygen", "--private", str(private), "--public", str(public)]) == 0
    assert main(["models", "sign", "--model", str(model), "--key", str(private)]) == 0
    s3 = boto3.client("s3")
    if "models" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="models")
    for old in s3.list_objects_v2(Bucket="models").get("Contents", []):
        s3.delete_object(Bucket="models", Key=old["Key"])
    for path in model.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "models", f"team/tiny/{path.relative_to(model).as_posix()}")
    return s3, public, model


def test_a_signed_model_loads_from_s3_and_a_second_start_uses_the_cache(bucket, tmp_path, monkeypatch):
    s3, public, original = bucket
    cache = tmp_path / "cache"
    config = ServerConfig(model=URI, verify_key=str(public), model_cache_dir=str(cache), warm_up=False,
                          max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, num_blocks=16,
                          token_buckets="16")
    state = build_server_state(config)
    try:
        (local,) = [p for p in cache.iterdir() if p.is_dir()]
        names = sorted(p.relative_to(original).as_posix() for p in original.rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert all(filecmp.cmp(original / n, local / n, shallow=False) for n in names)
        assert state.model_name == "tiny"  # served as the prefix's last part
        with TestClient(create_app(state.engine, ServerConfig(served_model_name="tiny"))) as client:
            response = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4,
                                                            "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    finally:
        state.engine.shutdown()

    # A second start: the same listing (keys, sizes, ETags), so the same folder and no download.
    again = fetch_model(URI, cache)
    assert (again.path, again.downloaded) == (local, 0)
    loaded: list[str] = []
    monkeypatch.setattr(Engine, "from_model_dir", lambda model_dir, *a, **k: loaded.append(str(model_dir)) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_server_state(config)
    assert loaded == [str(local)]


def test_a_tampered_object_is_refused_naming_the_file_before_any_weight_is_read(bucket, tmp_path, monkeypatch,
                                                                                capsys):
    s3, public, original = bucket
    data = bytearray((original / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    s3.put_object(Bucket="models", Key="team/tiny/model.safetensors", Body=bytes(data))
    loaded: list[str] = []
    monkeypatch.setattr(Engine, "from_model_dir", lambda model_dir, *a, **k: loaded.append(str(model_dir)))
    monkeypatch.setattr(server_module.observability, "configure", lambda config: None)  # logging stays the tests'
    monkeypatch.setattr(server_module, "configure_audit_sinks", lambda config: None)
    code = main(["serve", "--model", URI, "--verify-key", str(public), "--model-cache-dir", str(tmp_path / "cache"),
                 "--port", "0", "--no-warm-up"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tessera serve: refused to load the model: model ")
    assert "model.safetensors" in err and "changed" in err
    assert loaded == []  # not one weight was read


def test_missing_prefixes_and_other_schemes_are_clear_errors(bucket, tmp_path):
    with pytest.raises(ModelStoreError, match="no objects under that prefix"):
        fetch_model("s3://models/team/nothing", tmp_path)
    with pytest.raises(ModelStoreError, match="gs:// scheme needs an fsspec driver"):
        fetch_model("gs://models/team/tiny", tmp_path)
    assert fetch_model(f"file://{tmp_path}", tmp_path).path == tmp_path
