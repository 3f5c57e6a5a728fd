"""Models from object storage: `--model s3://bucket/prefix` becomes a local folder, downloaded once.

The objects under the prefix are listed (key, size, ETag); the local copy lives in
`cache_dir/<SHA-256 of that listing>/`, so a changed object (new ETag) is a new folder and an
unchanged model is never downloaded again (`<folder>.complete.json` marks a finished one). Objects are downloaded in parallel into a partial
folder, each checked against its listed size and, for single-part uploads (an ETag without a
"-"), its MD5; the folder is renamed into place only when complete. Nothing here reads the
files as weights: the caller verifies the signature (ops/model_signing.py, via
serving/server.py's `check_trust`) on the local folder before the loader opens any of them.

Credentials and endpoint are boto3's own: the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL,
...), a profile, or an instance role. `file://PATH` is the folder PATH. gs:// and az:// are
refused with a clear message (their fsspec drivers are not installed here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

log = logging.getLogger(__name__)

COMPLETE_SUFFIX = ".complete.json"  # beside the folder (inside, the signature would call it an extra file); written last


class ModelStoreError(ValueError):
    """The model's objects cannot be listed or fetched (named in the message)."""


@dataclass(frozen=True, slots=True)
class RemoteObject:
    name: str  # path relative to the prefix, with "/"
    key: str
    size: int
    etag: str


@dataclass(frozen=True, slots=True)
class FetchedModel:
    path: Path
    downloaded: int  # objects fetched by this call (0: the local cache was used)
    seconds: float


def is_remote(model: str | None) -> bool:
    return model is not None and "://" in model


def model_name(uri: str) -> str:
    """The last part of the URI's path: what the model is served as by default."""
    return PurePosixPath(urlparse(uri).path.rstrip("/")).name or urlparse(uri).netloc


def fetch_model(uri: str, cache_dir: str | Path, workers: int = 8) -> FetchedModel:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return FetchedModel(Path(parsed.netloc + parsed.path), 0, 0.0)
    if parsed.scheme != "s3":
        raise ModelStoreError(f"--model {uri}: the {parsed.scheme}:// scheme needs an fsspec driver that is not "
                              "installed; s3:// and file:// are supported")
    started = time.perf_counter()
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/").rstrip("/") + "/"
    client = _s3_client()
    objects = _list(client, bucket, prefix, uri)
    listing = json.dumps([(o.name, o.size, o.etag) for o in objects]).encode()
    folder = Path(cache_dir) / hashlib.sha256(f"{uri}\0".encode() + listing).hexdigest()[:32]
    marker = folder.with_name(folder.name + COMPLETE_SUFFIX)
    if marker.is_file() and folder.is_dir():
        log.info("model %s: using the local copy %s", uri, folder)
        return FetchedModel(folder, 0, time.perf_counter() - started)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda o: _download(client, bucket, o, partial, uri), objects))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"uri": uri, "objects": [dataclasses.asdict(o) for o in objects]}))
    tmp.replace(marker)
    seconds = time.perf_counter() - started
    log.info("model %s: %d objects (%d bytes) downloaded to %s in %.1fs", uri, len(objects),
             sum(o.size for o in objects), folder, seconds)
    return FetchedModel(folder, len(objects), seconds)


def _s3_client():
    try:
        import boto3
    except ImportError as e:
        raise ModelStoreError(f"s3:// models need boto3 (pip install 'tessera-serve[aws]'): {e}") from None
    return boto3.client("s3")


def _list(client, bucket: str, prefix: str, uri: str) -> list[RemoteObject]:
    from botocore.exceptions import BotoCoreError, ClientError

    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                if not name or name.endswith("/"):
                    continue
                if ".." in PurePosixPath(name).parts or name.startswith("/"):
                    raise ModelStoreError(f"--model {uri}: refusing the object name {name!r}")
                objects.append(RemoteObject(name, item["Key"], int(item["Size"]), item["ETag"].strip('"')))
    except (BotoCoreError, ClientError) as e:
        raise ModelStoreError(f"--model {uri}: cannot list the objects: {e}") from None
    if not objects:
        raise ModelStoreError(f"--model {uri}: no objects under that prefix")
    return sorted(objects, key=lambda o: o.name)


def _download(client, bucket: str, obj: RemoteObject, folder: Path, uri: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    path = folder / obj.name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.download_file(bucket, obj.key, str(path))
    except (BotoCoreError, ClientError) as e:
        raise ModelStoreError(f"--model {uri}: cannot fetch {obj.name}: {e}") from None
    size = path.stat().st_size
    if size != obj.size:
        raise ModelStoreError(f"--model {uri}: {obj.name} has {size} bytes, the listing said {obj.size}")
    if "-" not in obj.etag and len(obj.etag) == 32:  # a single-part upload's ETag is its MD5
        md5 = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                md5.update(block)
        if md5.hexdigest() != obj.etag:
            raise ModelStoreError(f"--model {uri}: {obj.name} does not match its ETag (damaged in transfer)")
