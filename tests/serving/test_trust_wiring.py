"""Issue 8 wired into `tessera serve` and the CLI: the signature gate before any weight loads,
`tessera models keygen|sign|verify`, the trust settings, X-Forwarded-* first in the app, and
rotated audit files sealed under the configured KMS."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import pytest

from ops import audit
from ops.kms import decrypt_file, kms_from_uri
from runtime.engine import Engine
from serving import server as server_module
from serving.app import create_app
from serving.auth.access import configure_audit_sinks
from serving.cli import main
from serving.config import ServerConfig
from serving.forwarded import ForwardedHeadersMiddleware
from serving.server import build_server_state, make_server
from tests.serving.conftest import SERVER

pytest.importorskip("model_signing")


class _Loaded(Exception):
    """Raised by the stand-in loader: the gate let the model through."""


@pytest.fixture
def loader(monkeypatch):
    """Engine.from_model_dir replaced: records the folders it was asked to load, loads nothing."""
    calls: list[str] = []

    def from_model_dir(model_dir, *args, **kwargs):
        calls.append(str(model_dir))
        raise _Loaded(str(model_dir))

    monkeypatch.setattr(Engine, "from_model_dir", from_model_dir)
    return calls


@pytest.fixture
def audit_lines(monkeypatch):
    """Audit lines in memory; `tessera serve` keeps its hands off logging and the sinks."""
    stream = io.StringIO()
    audit.configure_audit(stream=stream)
    monkeypatch.setattr(server_module.observability, "configure", lambda config: None)
    monkeypatch.setattr(server_module, "configure_audit_sinks", lambda config: None)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    audit.reset_audit()


@pytest.fixture
def signed(tiny_model, tmp_path):
    """(a signed copy of the tiny model, its public key)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    private, public = tmp_path / "signing.pem", tmp_path / "signing.pub"
    assert main(["models", "keygen", "--private", str(private), "--public", str(public)]) == 0
    assert main(["models", "sign", "--model", str(model), "--key", str(private)]) == 0
    return model, public


def _serve(model, *flags) -> int:
    return main(["serve", "--model", str(model), "--port", "0", "--no-warm-up", *flags])


def test_a_signed_model_passes_the_gate_then_loads(signed, loader, audit_lines):
    model, public = signed
    with pytest.raises(_Loaded):
        build_server_state(ServerConfig(model=str(model), verify_key=str(public)))
    assert loader == [str(model)]
    (verified,) = [line for line in audit_lines() if line["action"] == "model.verify"]
    assert verified["outcome"] == "success" and verified["object"] == "model:model"


def _flip_a_byte(model):
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    return "model.safetensors"


def _add_a_file(model):
    (model / "extra.bin").write_bytes(b"not signed")
    return "extra.bin"


def _remove_a_file(model):
    (model / "tokenizer.json").unlink()
    return "tokenizer.json"


@pytest.mark.parametrize(("tamper", "reason"), [(_flip_a_byte, "changed"), (_add_a_file, "extra"),
                                                (_remove_a_file, "missing")])
def test_tessera_serve_refuses_a_tampered_model_naming_the_file(signed, loader, audit_lines, capsys, tamper, reason):
    model, public = signed
    name = tamper(model)
    assert _serve(model, "--verify-key", str(public)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tessera serve: refused to load the model: model {model} does not match its signature "
                          "model.sig: ")
    assert name in err and reason in err
    assert loader == []  # not one weight was read
    (failure,) = [line for line in audit_lines() if line["action"] == "model.verify"]
    assert failure["outcome"] == "failure"
    assert (failure["reason"], failure["path"]) == (reason, name)


def test_an_unsigned_model_is_refused_unless_allowed_and_allowing_it_is_audited(tiny_model, loader, audit_lines,
                                                                                capsys):
    assert _serve(tiny_model) == 2
    err = capsys.readouterr().err
    assert "would be served without verification: give a public key (--verify-key) or allow unsigned models " \
           "(--allow-unsigned, for development)" in err
    assert loader == []
    with pytest.raises(_Loaded):
        _serve(tiny_model, "--allow-unsigned")
    assert loader == [str(tiny_model)]
    (unsigned,) = [line for line in audit_lines() if line["action"] == "model.load_unsigned"]
    assert unsigned["reason"] == "allow_unsigned"


def test_a_signature_missing_with_a_key_given_is_refused_naming_it(tiny_model, tmp_path, loader, audit_lines, capsys):
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    assert main(["models", "keygen", "--private", str(private), "--public", str(public)]) == 0
    assert _serve(tiny_model, "--verify-key", str(public)) == 2
    assert f"is unsigned: no signature file {tiny_model / 'model.sig'}" in capsys.readouterr().err
    assert loader == []


def test_tessera_models_keygen_sign_verify(tiny_model, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    private, public, sig = tmp_path / "k.pem", tmp_path / "k.pub", tmp_path / "elsewhere.sig"
    assert main(["models", "keygen", "--private", str(private), "--public", str(public)]) == 0
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert main(["models", "sign", "--model", str(model), "--key", str(private), "--signature", str(sig)]) == 0
    assert main(["models", "verify", "--model", str(model), "--key", str(public), "--signature", str(sig)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("public key fingerprint ") and out[1] == f"signed {model}: {sig}"
    assert out[2].startswith(f"verified {model}: {len(os.listdir(model))} files signed by ")
    _add_a_file(model)
    assert main(["models", "verify", "--model", str(model), "--key", str(public), "--signature", str(sig)]) == 1
    assert capsys.readouterr().err.startswith(f"tessera models verify: refused: model {model} does not match")


def test_trust_settings_come_from_flags_and_variables(tmp_path):
    env = {"TESSERA_VERIFY_KEY": "/keys/model.pub", "TESSERA_ALLOW_UNSIGNED": "true",
           "TESSERA_GUARDRAILS": '{"default": {"guardrails": ["pii"]}}', "TESSERA_TRUSTED_PROXIES": "10.0.0.0/8",
           "TESSERA_KMS": "local:/keys/master.key", "TESSERA_AUDIT_ENCRYPT_ROTATED": "1",
           "TESSERA_AUDIT_FILE": "/var/log/audit.jsonl"}
    config = ServerConfig.from_sources(None, env)
    assert (config.verify_key, config.allow_unsigned, config.trusted_proxies, config.kms,
            config.audit_encrypt_rotated) == ("/keys/model.pub", True, "10.0.0.0/8", "local:/keys/master.key", True)
    assert config.guardrails == '{"default": {"guardrails": ["pii"]}}'
    with pytest.raises(ValueError, match=r"trusted_proxies='10\.0\.0\.0/8,nope': trusted proxy 'nope' is not"):
        ServerConfig(trusted_proxies="10.0.0.0/8,nope")
    with pytest.raises(ValueError, match="audit_encrypt_rotated=True needs --kms"):
        ServerConfig(audit_encrypt_rotated=True, audit_file="a.jsonl")
    with pytest.raises(ValueError, match="kms='vault:x' must be local:PATH or aws-kms:KEY"):
        ServerConfig(kms="vault:x")


def test_a_bad_guardrail_policy_stops_start_up_before_the_model_loads(loader, audit_lines, tiny_model, capsys):
    assert _serve(tiny_model, "--allow-unsigned", "--guardrails", '{"default": {"guardrails": ["nope"]}}') == 2
    assert "guardrail 'nope': unknown kind 'nope'" in capsys.readouterr().err
    assert loader == []


def test_forwarded_headers_run_first_and_uvicorn_believes_none(engine):
    app = create_app(engine, ServerConfig(**SERVER, trusted_proxies="10.0.0.0/8"))
    first = app.middleware[0]
    assert first.middleware is ForwardedHeadersMiddleware
    assert str(first.kwargs["trusted"]) == "10.0.0.0/8"
    assert make_server(app, app.state["server"], "127.0.0.1", 0).config.proxy_headers is False


def test_rotated_audit_files_are_sealed_under_the_configured_kms(tmp_path):
    key = tmp_path / "master.key"
    key.write_bytes(base64.b64encode(os.urandom(32)))
    path = tmp_path / "audit.jsonl"
    config = ServerConfig(audit_file=str(path), audit_max_bytes=400, audit_backup_count=2,
                          audit_encrypt_rotated=True, kms=f"local:{key}")
    configure_audit_sinks(config, environ={})
    try:
        for i in range(8):
            audit.audit_event("config.change", "success", actor="system", object=f"test:{i}")
    finally:
        audit.reset_audit()
    sealed = tmp_path / "audit.jsonl.1.enc"
    assert sealed.is_file() and b"config.change" not in sealed.read_bytes()
    assert oct(sealed.stat().st_mode & 0o777) == "0o600"
    lines = decrypt_file(kms_from_uri(f"local:{key}"), sealed).decode().splitlines()
    assert json.loads(lines[0])["action"] == "config.change"
