"""Envelope encryption: secrets sealed under KMS data keys (a local key file, and AWS KMS served by a
moto server process), stored, and opened on load; a wrong key fails cleanly; nothing leaks to logs."""

import base64
import io
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from ops.kms import (
    AwsKMS, EncryptedRotatingFileHandler, EncryptedSecretStore, KMSError, LocalKeyFileKMS, Secret, decrypt_file,
    decrypt_secret, encrypt_file, encrypt_secret, kms_from_uri,
)
from ops.logging import configure_logging, reset_logging

S3_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_TEST_CREDENTIALS = dict(aws_access_key_id="testing", aws_secret_access_key="testing", aws_session_token="testing")


# -- a moto server process on loopback ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start (exit code {proc.poll()})")
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def kms_client(moto_endpoint):
    import boto3

    return boto3.client("kms", endpoint_url=moto_endpoint, region_name="eu-west-1", **AWS_TEST_CREDENTIALS)


@pytest.fixture(scope="module")
def aws_keys(kms_client):
    """(tessera key ARN, another key ARN); alias/tessera-adapters names the first."""
    first = kms_client.create_key(Description="tessera adapters")["KeyMetadata"]
    other = kms_client.create_key(Description="someone else's")["KeyMetadata"]
    kms_client.create_alias(AliasName="alias/tessera-adapters", TargetKeyId=first["KeyId"])
    return first["Arn"], other["Arn"]


def _aws(moto_endpoint, key):
    return AwsKMS(key, region="eu-west-1", endpoint_url=moto_endpoint, **AWS_TEST_CREDENTIALS)


@pytest.fixture
def local_kms(tmp_path):
    return LocalKeyFileKMS(LocalKeyFileKMS.create_key_file(tmp_path / "master.key"))


# -- AWS KMS (moto) -----------------------------------------------------------------------------


def test_aws_encrypt_store_and_decrypt_on_load(moto_endpoint, aws_keys, tmp_path):
    path = tmp_path / "adapter-secrets.json"
    writer = EncryptedSecretStore(path, _aws(moto_endpoint, "alias/tessera-adapters"))
    writer.put("adapters/acme-lora/s3", S3_SECRET)
    writer.put("adapters/acme-lora/s3_access_key_id", "AKIAIOSFODNN7EXAMPLE")

    stored = path.read_text()
    assert S3_SECRET not in stored and "AKIAIOSFODNN7EXAMPLE" not in stored
    assert path.stat().st_mode & 0o777 == 0o600
    envelope = json.loads(stored)["adapters/acme-lora/s3"]
    assert (envelope["provider"], envelope["key_id"], envelope["version"]) == ("aws-kms", aws_keys[0], 1)
    assert envelope["context"] == {"tessera:secret": "adapters/acme-lora/s3"}

    # "On load": a new provider (a new boto3 client) and a new store read the file back.
    loader = EncryptedSecretStore(path, kms_from_uri(
        f"aws-kms:{aws_keys[0]}?region=eu-west-1&endpoint={moto_endpoint}", **AWS_TEST_CREDENTIALS))
    assert loader.names() == ["adapters/acme-lora/s3", "adapters/acme-lora/s3_access_key_id"]
    secret = loader.get("adapters/acme-lora/s3")
    assert secret.reveal() == S3_SECRET
    assert loader.get("adapters/acme-lora/s3_access_key_id").reveal() == "AKIAIOSFODNN7EXAMPLE"


def test_aws_wrong_key_fails_cleanly(moto_endpoint, aws_keys):
    envelope = encrypt_secret(_aws(moto_endpoint, aws_keys[0]), S3_SECRET, context={"adapter": "acme"})
    wrong = _aws(moto_endpoint, aws_keys[1])
    with pytest.raises(KMSError) as e:
        decrypt_secret(wrong, envelope)
    message = str(e.value)
    assert message.startswith(f"AWS KMS refused to decrypt the data key (made under {aws_keys[0]}) with the "
                              f"configured key {aws_keys[1]}: ")
    # Real KMS answers IncorrectKeyException; moto says AccessDeniedException. Either way only the code shows.
    assert message.endswith("Exception; wrong key, or the envelope was altered")
    assert S3_SECRET not in message and e.value.__cause__ is None


def test_aws_context_is_bound(moto_endpoint, aws_keys):
    kms = _aws(moto_endpoint, aws_keys[0])
    envelope = encrypt_secret(kms, S3_SECRET, context={"adapter": "acme"})
    with pytest.raises(KMSError, match="sealed for another context"):
        decrypt_secret(kms, envelope, context={"adapter": "globex"})
    envelope["context"] = {"adapter": "globex"}  # rewritten in storage: KMS refuses the data key
    with pytest.raises(KMSError, match="InvalidCiphertextException"):
        decrypt_secret(kms, envelope)


def test_aws_unknown_key_is_refused_at_start(moto_endpoint):
    with pytest.raises(KMSError, match="AWS KMS key 'alias/nope' is not usable: NotFoundException"):
        _aws(moto_endpoint, "alias/nope")


def test_secrets_never_reach_logs_or_reprs(moto_endpoint, aws_keys, tmp_path):
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    try:
        kms = _aws(moto_endpoint, "alias/tessera-adapters")
        store = EncryptedSecretStore(tmp_path / "s.json", kms)
        store.put("s3", S3_SECRET)
        secret = store.get("s3")
        logging.getLogger("tessera.adapters").info("loaded adapter credentials %s %r", secret, secret)
        data_key = kms.generate_data_key({})
        logging.getLogger("tessera.adapters").info("data key %r", data_key)
    finally:
        reset_logging()
    logs = stream.getvalue()
    assert "Secret('********') Secret('********')" in logs
    assert S3_SECRET not in logs and S3_SECRET not in repr(store) and S3_SECRET not in repr(kms)
    assert base64.b64encode(data_key.plaintext).decode() not in logs
    assert "plaintext" not in repr(data_key)
    with pytest.raises(TypeError, match="cannot be pickled"):
        __import__("pickle").dumps(secret)


# -- the local key file -------------------------------------------------------------------------


def test_local_round_trip_and_tampering(local_kms):
    envelope = encrypt_secret(local_kms, b"\x00binary\xff", context={"adapter": "acme"})
    assert decrypt_secret(local_kms, envelope).reveal_bytes() == b"\x00binary\xff"
    raw = bytearray(base64.b64decode(envelope["ciphertext"]))
    raw[0] ^= 1
    envelope["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(KMSError, match="does not authenticate: the envelope was altered"):
        decrypt_secret(local_kms, envelope)


def test_local_wrong_key_file_fails_cleanly(local_kms, tmp_path):
    envelope = encrypt_secret(local_kms, S3_SECRET)
    other = LocalKeyFileKMS(LocalKeyFileKMS.create_key_file(tmp_path / "other.key"))
    with pytest.raises(KMSError, match=f"encrypted under {local_kms.key_id}, but the configured local key is "
                                       f"{other.key_id}"):
        decrypt_secret(other, envelope)


def test_provider_mismatch_and_bad_key_file(local_kms, tmp_path):
    envelope = encrypt_secret(local_kms, S3_SECRET)
    envelope["provider"] = "aws-kms"
    with pytest.raises(KMSError, match="sealed with KMS provider 'aws-kms', but the configured one is 'local'"):
        decrypt_secret(local_kms, envelope)
    (tmp_path / "short.key").write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(KMSError, match="must hold 32 bytes"):
        LocalKeyFileKMS(tmp_path / "short.key")
    with pytest.raises(KMSError, match="must be local:PATH or aws-kms:KEY"):
        kms_from_uri("vault:secret/x")


def test_swapped_secrets_do_not_open(local_kms, tmp_path):
    store = EncryptedSecretStore(tmp_path / "s.json", local_kms)
    store.put("a", "alpha")
    store.put("b", "beta")
    entries = json.loads((tmp_path / "s.json").read_text())
    entries["a"], entries["b"] = entries["b"], entries["a"]
    (tmp_path / "s.json").write_text(json.dumps(entries))
    with pytest.raises(KMSError, match="secret 'a' .* sealed for another context"):
        store.get("a")


# -- files and rotated audit logs ---------------------------------------------------------------


def test_file_round_trip_in_chunks(local_kms, tmp_path):
    data = bytes(range(256)) * 1000 + b"tail"
    (tmp_path / "audit.log").write_bytes(data)
    encrypt_file(local_kms, tmp_path / "audit.log", tmp_path / "audit.log.enc", chunk_size=4096)
    sealed = (tmp_path / "audit.log.enc").read_bytes()
    assert b"tail" not in sealed and len(sealed) > len(data)
    assert decrypt_file(local_kms, tmp_path / "audit.log.enc") == data
    assert decrypt_file(local_kms, tmp_path / "audit.log.enc", tmp_path / "out.log") == tmp_path / "out.log"
    assert (tmp_path / "out.log").read_bytes() == data

    (tmp_path / "cut.enc").write_bytes(sealed[:-5000])  # the last chunks cut off
    with pytest.raises(KMSError, match="truncated|does not authenticate"):
        decrypt_file(local_kms, tmp_path / "cut.enc", tmp_path / "cut.log")
    assert not (tmp_path / "cut.log").exists()


def test_empty_file(local_kms, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    encrypt_file(local_kms, tmp_path / "empty", tmp_path / "empty.enc")
    assert decrypt_file(local_kms, tmp_path / "empty.enc") == b""


def test_rotated_audit_logs_are_encrypted_at_rest(moto_endpoint, aws_keys, tmp_path):
    kms = _aws(moto_endpoint, aws_keys[0])
    path = tmp_path / "audit.log"
    handler = EncryptedRotatingFileHandler(path, kms, maxBytes=200, backupCount=2, encoding="utf-8")
    logger = logging.getLogger("tessera.test.audit.rotation")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        for i in range(12):
            logger.info('{"event": "model.verified", "n": %d, "pad": "%s"}', i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1.enc", "audit.log.2.enc"]
    newest = decrypt_file(kms, tmp_path / "audit.log.1.enc").decode()
    older = decrypt_file(kms, tmp_path / "audit.log.2.enc").decode()
    assert b'"event"' not in (tmp_path / "audit.log.1.enc").read_bytes()
    numbers = [json.loads(line)["n"] for text in (older, newest, path.read_text()) for line in text.splitlines()]
    assert numbers == sorted(numbers) and numbers[-1] == 11
    assert json.loads(newest.splitlines()[0])["event"] == "model.verified"


def test_secret_equality_is_by_value():
    assert Secret(b"a") == Secret(b"a") and Secret(b"a") != Secret(b"b")
    assert str(Secret(b"hunter2")) == "Secret('********')"


def test_audit_log_rotated_files_are_kms_encrypted(moto_endpoint, aws_keys, tmp_path):
    from ops.audit import audit_event, configure_audit, reset_audit

    kms = _aws(moto_endpoint, aws_keys[0])
    path = tmp_path / "audit.jsonl"
    configure_audit(file=str(path), max_bytes=400, backup_count=3, encrypt_rotated_with=kms)
    try:
        for i in range(10):
            audit_event("model.verify", "success", object=f"model:m{i}", files=i)
    finally:
        reset_audit()
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "audit.jsonl")
    assert rotated == ["audit.jsonl.1.enc", "audit.jsonl.2.enc", "audit.jsonl.3.enc"]
    assert all((tmp_path / name).stat().st_mode & 0o777 == 0o600 for name in rotated)
    assert b"model.verify" not in (tmp_path / "audit.jsonl.1.enc").read_bytes()
    lines = [json.loads(line) for name in reversed(rotated)
             for line in decrypt_file(kms, tmp_path / name).decode().splitlines()]
    lines += [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["files"] for line in lines][-1] == 9 and len(lines) >= 6
    assert [line["files"] for line in lines] == sorted(line["files"] for line in lines)
    assert {line["action"] for line in lines} == {"model.verify"}
