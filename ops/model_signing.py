"""Signed model folders: sign with an ECDSA P-256 key, verify every file before any weight loads.

The signature is the OpenSSF model-signing v1.0 format (a sigstore bundle whose DSSE
envelope holds an in-toto statement listing every file of the folder with its SHA-256),
written and read with the `model-signing` package, so `model_signing verify key ...`
accepts what `tessera models sign` writes and the other way round.

`verify_model` checks the signature first, then hashes the folder and compares it file by
file with the signed manifest, so the error names the file that changed, appeared or went
missing (`ModelSignatureError.path`, `.reason`). It only reads bytes: nothing is parsed or
loaded before it returns.

`check_model_trust` is the one call the server makes at start-up and at every reload:
it verifies when a public key is given, and serves an unsigned model only when
`allow_unsigned` is set, writing that to the audit log (`ops.audit`: actions `model.verify`
and `model.load_unsigned`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ops.audit import audit_event

log = logging.getLogger(__name__)
SIGNATURE_FILE = "model.sig"
HASH_ALGORITHM = "sha256"


class ModelSignatureError(Exception):
    """A model folder that must not be served. `path` is the file at fault (relative to the
    folder for model files), `reason` one of: changed, extra, missing, signature, unsigned, key, unavailable."""

    def __init__(self, message: str, *, path: str | None = None, reason: str,
                 mismatches: tuple[FileMismatch, ...] = ()):
        super().__init__(message)
        self.path, self.reason, self.mismatches = path, reason, mismatches


@dataclass(frozen=True, slots=True)
class FileMismatch:
    path: str  # relative to the model folder, '/'-separated
    reason: str  # changed, extra or missing

    def describe(self) -> str:
        return {"changed": f"{self.path} was changed since it was signed",
                "extra": f"{self.path} is not in the signature (an extra file)",
                "missing": f"{self.path} is signed but missing"}[self.reason]


@dataclass(frozen=True, slots=True)
class VerifiedModel:
    """What a verification established, for logs and the audit trail."""

    model_dir: Path
    signature_path: Path | None  # None: served unsigned
    key_fingerprint: str | None  # SHA-256 of the public key's DER form, hex
    files: tuple[str, ...]  # every signed file, relative
    signed: bool


# -- keys -------------------------------------------------------------------------------------


def generate_key_pair(private_key_path: str | os.PathLike, public_key_path: str | os.PathLike) -> str:
    """Write a new ECDSA P-256 key pair as PEM (the private key readable by its owner only);
    returns the public key's fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(private_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    Path(public_key_path).write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_fingerprint(public_key_path)


def key_fingerprint(public_key_pem_path: str | os.PathLike) -> str:
    from cryptography.hazmat.primitives import serialization

    key = _load_public_key(Path(public_key_pem_path))
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ModelSignatureError(f"cannot read the public key {path}: {e}", path=str(path), reason="key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ModelSignatureError(f"the public key {path} is not an ECDSA P-256 key", path=str(path), reason="key")
    return key


# -- signing ----------------------------------------------------------------------------------


def sign_model(model_dir: str | os.PathLike, private_key_pem_path: str | os.PathLike,
               signature_path: str | os.PathLike | None = None, *, password: str | None = None) -> Path:
    """Sign every file under `model_dir` (git metadata and the signature itself excepted);
    the signature goes to `signature_path`, by default `model_dir/model.sig`. Returns its path."""
    _require_model_signing()
    from model_signing import hashing, signing

    model_dir = _model_dir(model_dir)
    sig = _signature_path(model_dir, signature_path)
    hashing_config = hashing.Config().use_file_serialization(hashing_algorithm=HASH_ALGORITHM)
    inside = _relative_inside(sig, model_dir)
    if inside is not None:
        hashing_config.set_ignored_paths(paths=[inside])
    try:
        config = signing.Config().set_hashing_config(hashing_config).use_elliptic_key_signer(
            private_key=Path(private_key_pem_path), password=password)
    except (OSError, ValueError, TypeError) as e:
        raise ModelSignatureError(f"cannot use the private key {private_key_pem_path}: {e}",
                                  path=str(private_key_pem_path), reason="key") from e
    config.sign(model_dir, sig)
    log.info("signed model %s: signature %s", model_dir, sig)
    return sig


# -- verifying --------------------------------------------------------------------------------


def verify_model(model_dir: str | os.PathLike, public_key_pem_path: str | os.PathLike,
                 signature_path: str | os.PathLike | None = None) -> VerifiedModel:
    """Check the signature with the public key, then every file's digest against it.

    Raises ModelSignatureError naming the first file at fault (all of them in the message
    and in `.mismatches`): a changed, extra or missing file, a missing signature, or a
    signature this key did not make.
    """
    model_dir = _model_dir(model_dir)
    sig = _signature_path(model_dir, signature_path)
    public_key_path = Path(public_key_pem_path)
    fingerprint = key_fingerprint(public_key_path)
    if not sig.is_file():
        raise ModelSignatureError(f"model {model_dir} is unsigned: no signature file {sig}", path=str(sig),
                                  reason="unsigned")
    expected = _signed_manifest(sig, public_key_path)
    actual = _hash_folder(model_dir, expected.serialization_type)
    expected_files, actual_files = _file_digests(expected), _file_digests(actual)
    mismatches = manifest_diff(expected_files, actual_files)
    if mismatches:
        listed = "; ".join(m.describe() for m in mismatches)
        raise ModelSignatureError(f"model {model_dir} does not match its signature {sig.name}: {listed}",
                                  path=mismatches[0].path, reason=mismatches[0].reason, mismatches=mismatches)
    log.info("model %s verified: %d files signed by key %s", model_dir, len(expected_files), fingerprint[:16])
    return VerifiedModel(model_dir, sig, fingerprint, tuple(sorted(expected_files)), signed=True)


def manifest_diff(expected: dict[str, str], actual: dict[str, str]) -> tuple[FileMismatch, ...]:
    """File-by-file differences between two {relative path: digest} maps, sorted by path."""
    out = [FileMismatch(p, "missing") for p in expected.keys() - actual.keys()]
    out += [FileMismatch(p, "extra") for p in actual.keys() - expected.keys()]
    out += [FileMismatch(p, "changed") for p in expected.keys() & actual.keys() if expected[p] != actual[p]]
    return tuple(sorted(out, key=lambda m: (m.path, m.reason)))


def check_model_trust(model_dir: str | os.PathLike, *, verify_key: str | os.PathLike | None = None,
                      allow_unsigned: bool = False, signature_path: str | os.PathLike | None = None,
                      model_name: str | None = None) -> VerifiedModel:
    """The server's gate before loading (start-up and every reload).

    With `verify_key`: the model must verify (a missing signature passes only with
    `allow_unsigned`). Without it: refused unless `allow_unsigned`. Serving unsigned is
    written to the audit log (action `model.load_unsigned`).
    """
    model_dir = _model_dir(model_dir)
    if verify_key is not None:
        try:
            verified = verify_model(model_dir, verify_key, signature_path)
        except ModelSignatureError as e:
            if not (allow_unsigned and e.reason == "unsigned"):
                audit_event("model.verify", "failure", object=f"model:{model_name or model_dir.name}",
                            model_dir=str(model_dir), reason=e.reason, path=e.path)
                raise
        else:
            audit_event("model.verify", "success", object=f"model:{model_name or model_dir.name}",
                        model_dir=str(model_dir), signer_fingerprint=verified.key_fingerprint,
                        files=len(verified.files))
            return verified
    elif not allow_unsigned:
        raise ModelSignatureError(
            f"model {model_dir} would be served without verification: give a public key (--verify-key) "
            "or allow unsigned models (--allow-unsigned, for development)", reason="unsigned")
    log.warning("serving model %s without a signature check (allow_unsigned)", model_dir)
    audit_event("model.load_unsigned", "success", object=f"model:{model_name or model_dir.name}",
                model_dir=str(model_dir), reason="allow_unsigned",
                signature_expected=verify_key is not None)
    return VerifiedModel(model_dir, None, None, (), signed=False)


# -- helpers ----------------------------------------------------------------------------------


def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelSignatureError(f"model folder {path} does not exist", path=str(path), reason="missing")
    return path


def _signature_path(model_dir: Path, signature_path: str | os.PathLike | None) -> Path:
    return Path(signature_path) if signature_path is not None else model_dir / SIGNATURE_FILE


def _relative_inside(path: Path, folder: Path) -> str | None:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


def _require_model_signing() -> None:
    try:
        import model_signing  # noqa: F401
    except ImportError as e:
        raise ModelSignatureError("signed models need the model-signing package: pip install 'tessera-serve[signing]'",
                                  reason="unavailable") from e


def _signed_manifest(sig: Path, public_key_path: Path):
    """The manifest inside the signature, once the signature is checked with the key."""
    _require_model_signing()
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    _load_public_key(public_key_path)
    try:
        signature = sign_sigstore_pb.Signature.read(sig)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelSignatureError(f"signature file {sig} is not a model-signing bundle: {e}", path=str(sig),
                                  reason="signature") from e
    try:
        return sign_ec_key.Verifier(public_key_path).verify(signature)
    except Exception as e:  # noqa: BLE001 - cryptography's InvalidSignature, ValueError on a key mismatch
        raise ModelSignatureError(
            f"signature {sig} was not made by the key {public_key_path} or was altered ({type(e).__name__})",
            path=str(sig), reason="signature") from e


def _hash_folder(model_dir: Path, serialization: dict):
    from model_signing import hashing

    method = serialization.get("method")
    common = dict(hashing_algorithm=serialization["hash_type"], allow_symlinks=serialization["allow_symlinks"])
    if method == "files":
        config = hashing.Config().use_file_serialization(**common)
    elif method == "shards":
        config = hashing.Config().use_shard_serialization(shard_size=serialization["shard_size"], **common)
    else:
        raise ModelSignatureError(f"unknown serialization method {method!r} in the signature", reason="signature")
    config.set_ignored_paths(paths=serialization.get("ignore_paths", ()))
    try:
        return config.hash(model_dir)
    except ValueError as e:  # a symlink or special file the signer did not allow
        raise ModelSignatureError(f"model {model_dir} cannot be hashed as signed: {e}", reason="extra") from e


def _file_digests(manifest) -> dict[str, str]:
    """{file: digest}; a sharded manifest's shards ('file:start:end') are joined per file."""
    per_file: dict[str, list[str]] = {}
    sharded = manifest.serialization_type.get("method") == "shards"
    for rd in manifest.resource_descriptors():
        name = rd.identifier.rsplit(":", 2)[0] if sharded else rd.identifier
        per_file.setdefault(name, []).append(f"{rd.identifier}={rd.digest.digest_hex}")
    return {name: hashlib.sha256("\n".join(parts).encode()).hexdigest() if sharded else parts[0].split("=", 1)[1]
            for name, parts in per_file.items()}


# -- command line: python -m ops.model_signing {keygen,sign,verify} ----------------------------------


def add_commands(sub) -> None:
    """`keygen`, `sign` and `verify` on an argparse subparsers object (this module's main, and
    `tessera models`)."""
    keygen = sub.add_parser("keygen", help="write a new ECDSA P-256 key pair (PEM)")
    keygen.add_argument("--private", required=True, help="private key file to write (mode 0600)")
    keygen.add_argument("--public", required=True, help="public key file to write")
    for name, key_help in (("sign", "private key (PEM, ECDSA P-256)"), ("verify", "public key (PEM)")):
        p = sub.add_parser(name, help=f"{name} every file of a model folder")
        p.add_argument("--model", required=True, help="model folder")
        p.add_argument("--key", required=True, help=key_help)
        p.add_argument("--signature", help=f"signature file; default: MODEL/{SIGNATURE_FILE}")


def run_command(command: str, args, prefix: str = "") -> int:
    """One of `add_commands`' commands; exit 1 with the reason when refused."""
    import sys

    try:
        if command == "keygen":
            print(f"public key fingerprint {generate_key_pair(args.private, args.public)}")
        elif command == "sign":
            print(f"signed {args.model}: {sign_model(args.model, args.key, args.signature)}")
        else:
            verified = verify_model(args.model, args.key, args.signature)
            print(f"verified {args.model}: {len(verified.files)} files signed by {verified.key_fingerprint}")
    except ModelSignatureError as e:
        print(f"{prefix}refused: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`keygen --private P --public Q`, `sign --model DIR --key P [--signature F]`,
    `verify --model DIR --key Q [--signature F]`; exit 1 with the reason when refused."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ops.model_signing", description="Sign and verify model folders.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args.command, args)


if __name__ == "__main__":
    raise SystemExit(main())
