"""Where an adapter's files come from: a local folder, or an object-store prefix fetched into the
model cache exactly as `--model s3://...` is (serving/model_store.py: parallel download, ETag and
size checked, one folder per listing, reused on the next load).

With `--verify-key`, an adapter must carry a valid signature as a base model must (the same
gate, ops/model_signing.py), checked on the local folder before a tensor is read; without a key,
adapters load as before (an `adapter-manager` caller chose them). Every refusal is an
`AdapterError`, which the API answers 400 `invalid_adapter` and start-up reports by name."""

from __future__ import annotations

from pathlib import Path

from models.lora import AdapterError
from serving.config import ServerConfig


def adapter_folder(config: ServerConfig, name: str, path: str) -> str:
    """The local folder of adapter `name` from `path` (a folder, file:// or s3://), trusted per the settings."""
    from serving.model_store import ModelStoreError, fetch_model, is_remote

    folder = path
    if is_remote(path):
        try:
            folder = str(fetch_model(path, config.model_cache_dir or Path.home() / ".cache" / "tessera" / "models").path)
        except ModelStoreError as e:
            raise AdapterError(str(e)) from None
        except Exception as e:  # boto3's own errors (no credentials, no bucket): named, never a 500
            raise AdapterError(f"{path} could not be fetched: {type(e).__name__}: {e}") from None
    if config.verify_key is not None:
        from ops.model_signing import ModelSignatureError, check_model_trust

        try:
            check_model_trust(folder, verify_key=config.verify_key, allow_unsigned=config.allow_unsigned,
                              model_name=name)
        except ModelSignatureError as e:
            raise AdapterError(f"refused by the signature check: {e}") from None
    return folder
