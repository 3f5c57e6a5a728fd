"""Envelope encryption: secrets and files sealed with AES-256-GCM under data keys from a KMS.

Every envelope gets a fresh 256-bit data key from the provider; only the KMS-encrypted form
of that key is stored beside the ciphertext. Providers:

- `LocalKeyFileKMS`: a 32-byte master key in a file (development); data keys are wrapped
  with AES-GCM under it.
- `AwsKMS`: AWS KMS through boto3 (`GenerateDataKey` / `Decrypt` with an encryption context).

`kms_from_uri("local:/etc/tessera/master.key")` or `kms_from_uri("aws-kms:alias/tessera?region=eu-west-1")`
picks one from configuration.

Secrets (object-store credentials of private adapters, ...) come back as `Secret`, whose
repr and str never show the value; `Secret.reveal()` is the one way to read it, in memory.
Nothing here logs a plaintext or a data key. Files (rotated audit logs) are sealed in
chunks so large files stream; `EncryptedRotatingFileHandler` seals each file it rotates.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import logging.handlers
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
FILE_MAGIC = b"TSRENC1\n"
FILE_SUFFIX = ".enc"
CHUNK_SIZE = 1 << 20


class KMSError(Exception):
    """Encryption or decryption failed; the message names the key and the cause, never a secret."""


class Secret:
    """A decrypted secret, kept in memory only; its repr and str are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = value

    def reveal(self) -> str:
        return self._value.decode("utf-8")

    def reveal_bytes(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return id(self)

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, slots=True)
class DataKey:
    plaintext: bytes = field(repr=False)  # 32 bytes, AES-256
    encrypted: bytes  # what the KMS returned; stored beside the ciphertext
    key_id: str  # the KMS key that encrypted it


class KMSProvider(Protocol):
    name: str  # "local" or "aws-kms": recorded in each envelope
    key_id: str

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey: ...

    def decrypt_data_key(self, encrypted: bytes, key_id: str, context: Mapping[str, str]) -> bytes: ...


# -- providers --------------------------------------------------------------------------------


class LocalKeyFileKMS:
    """A master key in a file (base64 of 32 random bytes): for development and tests."""

    name = "local"

    def __init__(self, key_file: str | os.PathLike):
        self.key_file = Path(key_file)
        try:
            master = base64.b64decode(self.key_file.read_bytes().strip(), validate=True)
        except (OSError, ValueError) as e:
            raise KMSError(f"cannot read the local master key file {self.key_file}: {type(e).__name__}") from None
        if len(master) != 32:
            raise KMSError(f"local master key file {self.key_file} must hold 32 bytes (base64), not {len(master)}")
        self._aead = AESGCM(master)
        self.key_id = "local:" + sha256(b"tessera-local-kms" + master).hexdigest()[:16]

    @staticmethod
    def create_key_file(path: str | os.PathLike) -> Path:
        """Write a new random master key, readable by its owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64encode(os.urandom(32)) + b"\n")
        return Path(path)

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        plaintext, nonce = os.urandom(32), os.urandom(12)
        wrapped = nonce + self._aead.encrypt(nonce, plaintext, _canonical(context))
        return DataKey(plaintext, wrapped, self.key_id)

    def decrypt_data_key(self, encrypted: bytes, key_id: str, context: Mapping[str, str]) -> bytes:
        if key_id != self.key_id:
            raise KMSError(f"the data key was encrypted under {key_id}, but the configured local key is "
                           f"{self.key_id} ({self.key_file})")
        try:
            return self._aead.decrypt(encrypted[:12], encrypted[12:], _canonical(context))
        except InvalidTag:
            raise KMSError(f"the data key does not decrypt with the local key {self.key_id}: "
                           "the envelope or its context was altered") from None

    def __repr__(self) -> str:
        return f"LocalKeyFileKMS(key_id={self.key_id!r}, key_file={str(self.key_file)!r})"


class AwsKMS:
    """AWS KMS: `key` is a key id, ARN or alias; `endpoint_url` points at another endpoint
    (a VPC endpoint, or moto in tests)."""

    name = "aws-kms"

    def __init__(self, key: str, *, region: str | None = None, endpoint_url: str | None = None, client=None,
                 **client_kwargs):
        _hide_aws_response_bodies()
        if client is None:
            import boto3

            client = boto3.client("kms", region_name=region, endpoint_url=endpoint_url, **client_kwargs)
        self.client, self.key = client, key
        try:
            self.key_id = client.describe_key(KeyId=key)["KeyMetadata"]["Arn"]
        except Exception as e:  # noqa: BLE001 - botocore's ClientError, EndpointConnectionError...
            raise KMSError(f"AWS KMS key {key!r} is not usable: {_aws_error(e)}") from None

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        try:
            out = self.client.generate_data_key(KeyId=self.key_id, KeySpec="AES_256",
                                                EncryptionContext=dict(context))
        except Exception as e:  # noqa: BLE001
            raise KMSError(f"AWS KMS could not make a data key with {self.key_id}: {_aws_error(e)}") from None
        return DataKey(out["Plaintext"], out["CiphertextBlob"], out["KeyId"])

    def decrypt_data_key(self, encrypted: bytes, key_id: str, context: Mapping[str, str]) -> bytes:
        try:
            # KeyId pins the key: a blob made under any other key is refused, not decrypted.
            return self.client.decrypt(CiphertextBlob=encrypted, KeyId=self.key_id,
                                       EncryptionContext=dict(context))["Plaintext"]
        except Exception as e:  # noqa: BLE001
            raise KMSError(f"AWS KMS refused to decrypt the data key (made under {key_id}) with the configured key "
                           f"{self.key_id}: {_aws_error(e)}; wrong key, or the envelope was altered") from None

    def __repr__(self) -> str:
        return f"AwsKMS(key_id={self.key_id!r})"


class _DropResponseBodies(logging.Filter):
    """botocore logs every response body at DEBUG, and a KMS response holds a data key in clear."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Response body")


def _hide_aws_response_bodies() -> None:
    parsers = logging.getLogger("botocore.parsers")
    if not any(isinstance(f, _DropResponseBodies) for f in parsers.filters):
        parsers.addFilter(_DropResponseBodies())


def kms_from_uri(uri: str, **aws_client_kwargs) -> KMSProvider:
    """`local:PATH` or `aws-kms:KEY[?region=R&endpoint=URL]` (KEY: id, ARN or alias/NAME)."""
    scheme, sep, rest = uri.partition(":")
    if scheme == "local" and sep and rest:
        return LocalKeyFileKMS(rest)
    if scheme == "aws-kms" and sep and rest:
        parts = urlsplit("x:" + rest)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return AwsKMS(parts.path, region=query.get("region"), endpoint_url=query.get("endpoint"),
                      **aws_client_kwargs)
    raise KMSError(f"KMS {uri!r} must be local:PATH or aws-kms:KEY[?region=R&endpoint=URL]")


# -- secrets ----------------------------------------------------------------------------------


def encrypt_secret(kms: KMSProvider, value: str | bytes, *, context: Mapping[str, str] | None = None) -> dict:
    """An envelope (a JSON-ready dict) holding `value` sealed under a fresh data key.
    `context` is bound to it: decrypting needs the same context."""
    context = dict(context or {})
    data_key = kms.generate_data_key(context)
    header = _header(kms.name, data_key.key_id, context)
    nonce = os.urandom(12)
    plaintext = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    ciphertext = AESGCM(data_key.plaintext).encrypt(nonce, plaintext, _canonical(header))
    return {**header, "encrypted_key": _b64(data_key.encrypted), "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}


def decrypt_secret(kms: KMSProvider, envelope: Mapping, *, context: Mapping[str, str] | None = None) -> Secret:
    """The value inside an envelope from `encrypt_secret`. `context`, when given, must equal
    the one it was sealed with."""
    try:
        header = _header(envelope["provider"], envelope["key_id"], envelope["context"], envelope["version"])
        encrypted_key, nonce, ciphertext = (_unb64(envelope[k]) for k in ("encrypted_key", "nonce", "ciphertext"))
    except (KeyError, TypeError, ValueError) as e:
        raise KMSError(f"not a Tessera secret envelope (missing or malformed {e})") from None
    _check_header(kms, header, context)
    data_key = kms.decrypt_data_key(encrypted_key, header["key_id"], header["context"])
    try:
        return Secret(AESGCM(data_key).decrypt(nonce, ciphertext, _canonical(header)))
    except InvalidTag:
        raise KMSError("the secret's ciphertext does not authenticate: the envelope was altered") from None


class EncryptedSecretStore:
    """Named secrets in one JSON file of envelopes (0600); each is bound to its name."""

    def __init__(self, path: str | os.PathLike, kms: KMSProvider):
        self.path, self.kms = Path(path), kms

    def put(self, name: str, value: str | bytes) -> None:
        entries = self._read()
        entries[name] = encrypt_secret(self.kms, value, context={"tessera:secret": name})
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def get(self, name: str) -> Secret:
        entries = self._read()
        if name not in entries:
            raise KeyError(f"no secret named {name!r} in {self.path}")
        try:
            return decrypt_secret(self.kms, entries[name], context={"tessera:secret": name})
        except KMSError as e:
            raise KMSError(f"secret {name!r} in {self.path}: {e}") from None

    def names(self) -> list[str]:
        return sorted(self._read())

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        return json.loads(self.path.read_text(encoding="utf-8"))

    def __repr__(self) -> str:
        return f"EncryptedSecretStore({str(self.path)!r}, {self.kms!r})"


# -- files ------------------------------------------------------------------------------------
# Layout: MAGIC, u32 header length, header JSON, then chunks of (u32 length, AES-GCM ciphertext).
# Chunk i's nonce is a random 7-byte prefix, i as u32 and a last-chunk flag byte; the header is
# each chunk's associated data. So chunks cannot be reordered, dropped, or cut off at the end.


def encrypt_file(kms: KMSProvider, src: str | os.PathLike, dst: str | os.PathLike, *,
                 context: Mapping[str, str] | None = None, chunk_size: int = CHUNK_SIZE) -> Path:
    """Seal `src` into `dst` (0600) under a fresh data key."""
    context = dict(context or {})
    data_key = kms.generate_data_key(context)
    prefix = os.urandom(7)
    header = {**_header(kms.name, data_key.key_id, context), "encrypted_key": _b64(data_key.encrypted),
              "nonce_prefix": _b64(prefix), "chunk_size": chunk_size}
    header_bytes = _canonical(header)
    aead = AESGCM(data_key.plaintext)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        fout.write(FILE_MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes)
        index, chunk = 0, fin.read(chunk_size)
        while True:
            following = fin.read(chunk_size) if chunk else b""
            last = not following
            sealed = aead.encrypt(prefix + struct.pack(">IB", index, last), chunk, header_bytes)
            fout.write(struct.pack(">I", len(sealed)) + sealed)
            if last:
                break
            index, chunk = index + 1, following
    return Path(dst)


def decrypt_file(kms: KMSProvider, src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                 context: Mapping[str, str] | None = None) -> bytes | Path:
    """Open a file sealed by `encrypt_file`: its bytes, or written to `dst` (0600) when given."""
    with open(src, "rb") as fin:
        if fin.read(len(FILE_MAGIC)) != FILE_MAGIC:
            raise KMSError(f"{src} is not a Tessera encrypted file")
        header_bytes = fin.read(_read_u32(fin, src))
        try:
            header = json.loads(header_bytes)
            prefix, encrypted_key = _unb64(header["nonce_prefix"]), _unb64(header["encrypted_key"])
        except (KeyError, ValueError) as e:
            raise KMSError(f"{src} has a malformed header ({e})") from None
        _check_header(kms, header, context)
        aead = AESGCM(kms.decrypt_data_key(encrypted_key, header["key_id"], header["context"]))
        if dst is None:
            return b"".join(_open_chunks(fin, aead, prefix, header_bytes, src))
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                for plain in _open_chunks(fin, aead, prefix, header_bytes, src):
                    out.write(plain)
        except BaseException:
            os.remove(dst)  # never leave a partial plaintext behind
            raise
        return Path(dst)


def _open_chunks(fin: BinaryIO, aead: AESGCM, prefix: bytes, header_bytes: bytes, src):
    index = 0
    while True:
        sealed = fin.read(_read_u32(fin, src))
        plain = last = None
        for last in (False, True):
            try:
                plain = aead.decrypt(prefix + struct.pack(">IB", index, last), sealed, header_bytes)
                break
            except InvalidTag:
                continue
        if plain is None:
            raise KMSError(f"{src}: chunk {index} does not authenticate (altered, reordered or truncated)")
        yield plain
        if last:
            break
        index += 1
    if fin.read(1):
        raise KMSError(f"{src}: data after the last chunk")


def _read_u32(f: BinaryIO, src) -> int:
    raw = f.read(4)
    if len(raw) != 4:
        raise KMSError(f"{src} is truncated")
    return struct.unpack(">I", raw)[0]


class EncryptedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose rotated files are sealed (`F.1.enc`, `F.2.enc`, ...) under
    data keys from `kms`; the live file stays plain until it rotates."""

    def __init__(self, filename: str | os.PathLike, kms: KMSProvider, **kwargs):
        super().__init__(filename, **kwargs)
        attach_file_encryption(self, kms)


def attach_file_encryption(handler: logging.handlers.BaseRotatingHandler, kms: KMSProvider) -> None:
    """Make an existing rotating handler seal each file it rotates (the stdlib's namer/rotator hooks)."""
    def namer(name: str) -> str:
        return name + FILE_SUFFIX

    def rotator(source: str, dest: str) -> None:
        encrypt_file(kms, source, dest, context={"tessera:file": Path(handler.baseFilename).name})
        os.remove(source)

    handler.namer, handler.rotator = namer, rotator


# -- helpers ----------------------------------------------------------------------------------


def _header(provider: str, key_id: str, context: Mapping[str, str], version: int = ENVELOPE_VERSION) -> dict:
    if version != ENVELOPE_VERSION:
        raise KMSError(f"envelope version {version} is not supported (this Tessera reads {ENVELOPE_VERSION})")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(context).items()):
        raise KMSError("an encryption context maps strings to strings")
    return {"version": version, "provider": provider, "key_id": key_id, "context": dict(context)}


def _check_header(kms: KMSProvider, header: Mapping, context: Mapping[str, str] | None) -> None:
    if header.get("version") != ENVELOPE_VERSION:
        raise KMSError(f"envelope version {header.get('version')} is not supported")
    if header["provider"] != kms.name:
        raise KMSError(f"sealed with KMS provider {header['provider']!r}, but the configured one is {kms.name!r}")
    if context is not None and dict(context) != header["context"]:
        raise KMSError("the envelope was sealed for another context")


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _aws_error(e: Exception) -> str:
    code = getattr(e, "response", {}).get("Error", {}).get("Code")
    return code or type(e).__name__
