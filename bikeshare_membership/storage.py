"""Where batch files live: a local path or an `s3://` URI, listed, read and written the same way.

S3 is reached with one client per process (`s3_client`, which the model store downloads artifacts with too):
boto3's default credential chain (`AWS_PROFILE` picks a
profile from the shared files), the endpoint MLflow uses (`MLFLOW_S3_ENDPOINT_URL`), timeouts and bounded
retries. An S3 input is copied to a local temporary file before it is read (zip and Parquet need random
access, and a copy keeps one reading path); an output is written to a local temporary file and published
only when complete: renamed into place, or uploaded. A reader therefore never sees half a file.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bikeshare_membership.config import Settings

S3_SCHEME = "s3://"


def is_s3(location: str) -> bool:
    return location.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> (`bucket`, `some/key`)."""
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    return bucket, key


def name_of(location: str) -> str:
    """The file name at the end of a path or URI."""
    return location.rstrip("/").rsplit("/", 1)[-1]


def sibling(location: str, name: str) -> str:
    """The location of `name` in the same folder (or under the same S3 prefix) as `location`."""
    if is_s3(location):
        return f"{location.rsplit('/', 1)[0]}/{name}"
    return str(Path(location).with_name(name))


def inside(folder: str, name: str) -> str:
    """The location of `name` in `folder`, a local folder or an S3 prefix."""
    if is_s3(folder):
        return f"{folder.rstrip('/')}/{name}"
    return str(Path(folder) / name)


@cache
def s3_client(settings: Settings) -> Any:  # boto3 generates its client types at run time
    """The S3 client of this process for `settings`: bounded timeouts and retries, the default credential chain
    (AWS_PROFILE), resolved once. boto3 is imported here, by the processes that reach S3: a Spark worker, which
    imports this module for `atomic_path` (through model_files), starts without it."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        connect_timeout=settings.fetch_timeout_seconds,
        read_timeout=settings.fetch_timeout_seconds,
        retries={"max_attempts": settings.fetch_retries + 1, "mode": "standard"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None, config=config
    )


@dataclass(frozen=True)
class StoredFile:
    """A file found under a folder or prefix; `fingerprint` changes whenever its content does."""

    location: str
    size: int
    modified: float  # seconds since the epoch
    fingerprint: str


def list_files(source: str, settings: Settings) -> list[StoredFile]:
    """Every file under a local folder (recursively) or an S3 prefix, but hidden ones: a name or folder
    starting with `.`, like the partial files `output_file` writes."""
    if is_s3(source):
        bucket, prefix = split_s3(source)
        pages = s3_client(settings).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [
            StoredFile(
                location=f"{S3_SCHEME}{bucket}/{item['Key']}",
                size=item["Size"],
                modified=item["LastModified"].timestamp(),
                fingerprint=item["ETag"].strip('"'),
            )
            for page in pages
            for item in page.get("Contents", [])
            if not item["Key"].endswith("/") and not _hidden(item["Key"][len(prefix) :].split("/"))
        ]
    found = []
    for path in sorted(Path(source).rglob("*")):
        if path.is_file() and not _hidden(path.relative_to(source).parts):
            stat = path.stat()
            found.append(StoredFile(str(path), stat.st_size, stat.st_mtime, f"{stat.st_size}:{stat.st_mtime_ns}"))
    return found


def _hidden(parts: Sequence[str]) -> bool:
    return any(part.startswith(".") for part in parts)


@contextmanager
def local_copy(location: str, settings: Settings) -> Iterator[Path]:
    """A local path to read `location` from: the file itself, or a temporary copy of an S3 object."""
    if not is_s3(location):
        yield Path(location)
        return
    bucket, key = split_s3(location)
    with tempfile.TemporaryDirectory(prefix="bikeshare-batch-") as folder:
        path = Path(folder) / name_of(key)  # keeps the suffix, which says how to read it
        s3_client(settings).download_file(bucket, key, str(path))
        yield path


@contextmanager
def output_file(location: str, settings: Settings) -> Iterator[Path]:
    """A local path to write `location` to; published (renamed or uploaded) only if the block succeeds."""
    if is_s3(location):
        bucket, key = split_s3(location)
        with tempfile.TemporaryDirectory(prefix="bikeshare-batch-") as folder:
            path = Path(folder) / name_of(key)
            yield path
            s3_client(settings).upload_file(str(path), bucket, key)
        return
    with atomic_path(Path(location)) as partial:
        yield partial


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A hidden path beside `final` to write to, moved onto `final` only if the block succeeds: a reader in
    another process sees the old file or the whole new one, never half of one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".partial-{os.getpid()}-{threading.get_ident()}-{final.name}")
    try:
        yield partial
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made if missing) for the block: one holder at a time among
    the processes of the host. Closing the file releases it."""
    with open(path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def download_s3_prefix(uri: str, destination: Path, client: Any) -> int:
    """Download every object under the `s3://bucket/prefix` URI; returns the bytes, checked object by object."""
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/") + "/"
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            target = destination / entry["Key"][len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, entry["Key"], str(target))
            if target.stat().st_size != entry["Size"]:
                raise OSError(f"s3://{bucket}/{entry['Key']}: got {target.stat().st_size} of {entry['Size']} bytes")
            total += entry["Size"]
    if total == 0:
        raise OSError(f"{uri}: no objects")
    return total
