"""Signed model folders: a signed folder verifies; a flipped byte, an extra and a missing file are
each refused with the file named; unsigned is refused unless allowed, and that is audited."""

import base64
import io
import json

import pytest

from ops.audit import configure_audit, reset_audit
from ops.model_signing import (
    ModelSignatureError, check_model_trust, generate_key_pair, key_fingerprint, manifest_diff, sign_model, verify_model,
)

FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer.json": b'{"version": "1.0"}',
    "nested/adapter_config.json": b'{"r": 8}',
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair(folder / "private.pem", folder / "public.pem")
    generate_key_pair(folder / "other-private.pem", folder / "other-public.pem")
    return folder


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "llama-tiny"
    for name, data in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def signed(model, keys):
    sign_model(model, keys / "private.pem")
    return model


@pytest.fixture
def audit_lines():
    stream = io.StringIO()
    configure_audit(stream=stream)
    yield lambda: [json.loads(x) for x in stream.getvalue().splitlines()]
    reset_audit()


def test_signed_model_verifies_every_file(signed, keys):
    result = verify_model(signed, keys / "public.pem")
    assert result.signed is True
    assert result.files == ("config.json", "model.safetensors", "nested/adapter_config.json", "tokenizer.json")
    assert result.signature_path == signed / "model.sig"
    assert result.key_fingerprint == key_fingerprint(keys / "public.pem")
    assert len(result.key_fingerprint) == 64


def test_signature_is_the_model_signing_v1_format(signed):
    bundle = json.loads((signed / "model.sig").read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    resources = {r["name"]: r for r in statement["predicate"]["resources"]}
    assert sorted(resources) == sorted(FILES)
    assert resources["tokenizer.json"]["algorithm"] == "sha256"
    assert "model.sig" in statement["predicate"]["serialization"]["ignore_paths"]


def test_the_model_signing_package_verifies_what_we_sign(signed, keys):
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=keys / "public.pem").verify(signed, signed / "model.sig")


def test_flipped_byte_is_refused_with_the_file_named(signed, keys):
    weights = signed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelSignatureError, match="model.safetensors was changed since it was signed") as e:
        verify_model(signed, keys / "public.pem")
    assert (e.value.path, e.value.reason) == ("model.safetensors", "changed")


def test_extra_file_is_refused_with_the_file_named(signed, keys):
    (signed / "nested" / "evil.py").write_text("import os")
    with pytest.raises(ModelSignatureError, match=r"nested/evil.py is not in the signature \(an extra file\)") as e:
        verify_model(signed, keys / "public.pem")
    assert (e.value.path, e.value.reason) == ("nested/evil.py", "extra")


def test_missing_file_is_refused_with_the_file_named(signed, keys):
    (signed / "tokenizer.json").unlink()
    with pytest.raises(ModelSignatureError, match="tokenizer.json is signed but missing") as e:
        verify_model(signed, keys / "public.pem")
    assert (e.value.path, e.value.reason) == ("tokenizer.json", "missing")


def test_every_difference_is_listed(signed, keys):
    (signed / "config.json").write_bytes(b"{}")
    (signed / "tokenizer.json").unlink()
    (signed / "extra.bin").write_bytes(b"\0")
    with pytest.raises(ModelSignatureError) as e:
        verify_model(signed, keys / "public.pem")
    assert [(m.path, m.reason) for m in e.value.mismatches] == [
        ("config.json", "changed"), ("extra.bin", "extra"), ("tokenizer.json", "missing")]


def test_signature_from_another_key_is_refused(signed, keys):
    with pytest.raises(ModelSignatureError, match="was not made by the key") as e:
        verify_model(signed, keys / "other-public.pem")
    assert e.value.reason == "signature"


def test_tampered_signature_is_refused(signed, keys):
    sig = signed / "model.sig"
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"] = [r for r in statement["predicate"]["resources"] if r["name"] != "config.json"]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(bundle))
    with pytest.raises(ModelSignatureError, match="was not made by the key") as e:
        verify_model(signed, keys / "public.pem")
    assert e.value.reason == "signature"


def test_signature_outside_the_folder(model, keys, tmp_path):
    sig = sign_model(model, keys / "private.pem", tmp_path / "llama.sig")
    assert sig == tmp_path / "llama.sig" and not (model / "model.sig").exists()
    assert len(verify_model(model, keys / "public.pem", sig).files) == 4


def test_unsigned_model_is_refused(model, keys):
    with pytest.raises(ModelSignatureError, match="is unsigned: no signature file") as e:
        verify_model(model, keys / "public.pem")
    assert (e.value.reason, e.value.path) == ("unsigned", str(model / "model.sig"))
    with pytest.raises(ModelSignatureError, match="--allow-unsigned"):
        check_model_trust(model)
    with pytest.raises(ModelSignatureError, match="is unsigned"):
        check_model_trust(model, verify_key=keys / "public.pem")


def test_unsigned_model_served_when_allowed_is_audited(model, keys, audit_lines):
    result = check_model_trust(model, allow_unsigned=True, model_name="tiny")
    assert (result.signed, result.signature_path) == (False, None)
    (line,) = audit_lines()
    assert (line["action"], line["outcome"], line["object"]) == ("model.load_unsigned", "success", "model:tiny")
    assert (line["model_dir"], line["reason"], line["signature_expected"]) == (str(model), "allow_unsigned", False)


def test_allow_unsigned_does_not_excuse_a_bad_signature(signed, keys, audit_lines):
    (signed / "config.json").write_bytes(b"{}")
    with pytest.raises(ModelSignatureError, match="config.json was changed"):
        check_model_trust(signed, verify_key=keys / "public.pem", allow_unsigned=True)
    (line,) = audit_lines()
    assert (line["action"], line["outcome"], line["reason"], line["path"]) == ("model.verify", "failure", "changed",
                                                                               "config.json")


def test_verified_model_is_audited(signed, keys, audit_lines):
    assert check_model_trust(signed, verify_key=keys / "public.pem").signed
    (line,) = audit_lines()
    assert (line["action"], line["outcome"], line["object"], line["files"]) == ("model.verify", "success",
                                                                                "model:llama-tiny", 4)
    assert line["signer_fingerprint"] == key_fingerprint(keys / "public.pem")


def test_non_p256_key_is_refused(signed, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    (tmp_path / "p384.pem").write_bytes(p384.public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ModelSignatureError, match="is not an ECDSA P-256 key"):
        verify_model(signed, tmp_path / "p384.pem")


def test_manifest_diff():
    assert manifest_diff({"a": "1", "b": "2"}, {"a": "1", "b": "2"}) == ()
    diff = manifest_diff({"a": "1", "b": "2"}, {"a": "9", "c": "3"})
    assert [(m.path, m.reason) for m in diff] == [("a", "changed"), ("b", "missing"), ("c", "extra")]


def test_private_key_is_owner_only(keys):
    assert (keys / "private.pem").stat().st_mode & 0o777 == 0o600


def test_missing_signature_with_a_key_is_served_only_when_allowed(model, keys, audit_lines):
    result = check_model_trust(model, verify_key=keys / "public.pem", allow_unsigned=True, model_name="tiny")
    assert result.signed is False
    (line,) = audit_lines()
    assert (line["action"], line["signature_expected"]) == ("model.load_unsigned", True)


def test_command_line(model, tmp_path, capsys):
    from ops.model_signing import main

    assert main(["keygen", "--private", str(tmp_path / "k.pem"), "--public", str(tmp_path / "k.pub")]) == 0
    assert main(["sign", "--model", str(model), "--key", str(tmp_path / "k.pem")]) == 0
    assert main(["verify", "--model", str(model), "--key", str(tmp_path / "k.pub")]) == 0
    out = capsys.readouterr().out
    assert f"signed {model}: {model / 'model.sig'}" in out and f"verified {model}: 4 files signed by " in out
    (model / "config.json").write_bytes(b"{}")
    assert main(["verify", "--model", str(model), "--key", str(tmp_path / "k.pub")]) == 1
    assert "refused: " in capsys.readouterr().err
