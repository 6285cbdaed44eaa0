"""The model store: which version is in Production, a local cache of its artifacts, loading, hot reload.

- Resolution: the version the alias `production` names (MLflow 3), else the newest version in the
  `Production` stage (MLflow 2's API, still honoured).
- Cache: `MODEL_CACHE_DIR/<name>/<version>/` holds the artifacts and `manifest.json` (each file's size and
  SHA-256, and the registry facts), written last and moved into place atomically. A version is loaded only
  if every file matches its manifest, so a partial or corrupt download is fetched again, never loaded. A
  file lock per model makes processes that need the same version at once (Gunicorn workers reloading
  together) download it once per host.
- Downloads: `s3://` artifacts straight from S3 with boto3 (the default credential chain, so `AWS_PROFILE`
  picks a profile from `~/.aws`; `MLFLOW_S3_ENDPOINT_URL` for S3-compatible stores); any other artifact
  URI through MLflow's own client.
- Bounded waiting: every registry and S3 call has a connect and read timeout (`MODEL_FETCH_TIMEOUT`) and a
  bounded retry with backoff (`MODEL_FETCH_RETRIES`). If the registry or the bucket cannot be reached at
  start-up, the newest cached version is served; with nothing cached, `ModelUnavailable` is raised.
- Hot reload: `ModelHolder` checks the registry every `MODEL_REFRESH_SECONDS` in a background thread, loads
  a newly promoted version beside the current one and swaps the reference; a request that already holds
  the old model finishes on it. `POST /admin/reload` asks every process on the host to check now (see
  `ModelHolder.request_reload`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import mlflow
import numpy as np
import pandas as pd
import requests
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from config import Settings
from fast_pipeline import FastPipeline, UnsupportedPipeline
from preprocess import CASUAL, MEMBER, MODEL_INPUT_COLUMNS, model_input

# P(Member) at or above this is answered `Member`: proba is calibrated, so 0.5 means "more likely than not".
DECISION_THRESHOLD = 0.5
PRODUCTION_ALIAS = "production"
FAST_PATH_MAX_ROWS = 1000
PRODUCTION_STAGE = "Production"
MANIFEST = "manifest.json"
# Touched by `POST /admin/reload`; every worker's refresh thread checks its mtime this often.
RELOAD_MARKER = "reload-requested"
RELOAD_POLL_SECONDS = 1.0
# What "cannot reach the registry or the bucket" looks like from the clients we use.
FETCH_ERRORS = (MlflowException, requests.RequestException, BotoCoreError, ClientError, OSError)

log = logging.getLogger(__name__)


def membership(member_probability: np.ndarray) -> np.ndarray:
    """`Member` or `Casual` for each probability, at `DECISION_THRESHOLD`."""
    return np.where(member_probability >= DECISION_THRESHOLD, MEMBER, CASUAL)


def trip_membership(member_probability: float) -> str:
    """`membership` of one probability, without an array."""
    return MEMBER if member_probability >= DECISION_THRESHOLD else CASUAL


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made if missing) for the block: one holder at a time among
    the processes of the host. Closing the file releases it."""
    with open(path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


class NoProductionModel(LookupError):
    """The registry has no Production version of the model."""


class ModelUnavailable(RuntimeError):
    """No model can be served: the reason fits on one line."""


class CorruptCache(ValueError):
    """A cached version whose files do not match its manifest."""


def fast_form(pipeline: Any) -> FastPipeline | None:
    """The exact fast evaluation of `pipeline`, or None (and the scikit-learn path) if it has none."""
    try:
        return FastPipeline.from_pipeline(pipeline)
    except UnsupportedPipeline as error:
        log.warning("serving through scikit-learn only: %s", error)
        return None


@dataclass(frozen=True)
class LoadedModel:
    """A fitted pipeline with the registry facts that identify it in every answer."""

    name: str
    version: str
    run_id: str
    pipeline: Any
    source: str  # where the artifacts came from
    origin: str  # how this process got them: downloaded, cache, path
    metadata: dict[str, Any] = field(default_factory=dict)
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    fast: FastPipeline | None = None

    def member_probability(self, trips: Mapping[str, Any]) -> np.ndarray:
        """P(Member) for each trip (a DataFrame, or columns as arrays), equal to the pipeline's `predict_proba`.

        Up to FAST_PATH_MAX_ROWS trips go through the exact fast form; more, through scikit-learn, whose
        per-call cost is then spread over enough rows to win.
        """
        if self.fast is not None and len(trips["trip_duration_seconds"]) <= FAST_PATH_MAX_ROWS:
            return self.fast.member_probability(trips)
        frame = trips if isinstance(trips, pd.DataFrame) else pd.DataFrame(trips)
        classes = list(self.pipeline.classes_)
        return self.pipeline.predict_proba(frame[MODEL_INPUT_COLUMNS])[:, classes.index(1)]

    def request_probabilities(self, trips: Sequence[Mapping[str, Any]]) -> list[float]:
        """P(Member) for validated request trips (`preprocess.parse_request_trip`); one trip through the fast
        form skips the columns and arrays (the same values)."""
        if self.fast is not None and len(trips) == 1:
            return [self.fast.trip_probability(*(trips[0][column] for column in MODEL_INPUT_COLUMNS))]
        return self.member_probability(model_input(trips)).tolist()

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` names, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def production_version(client: MlflowClient, name: str) -> ModelVersion:
    """The version the alias `production` names, else the newest one in the Production stage."""
    aliased = alias_version(client, name, PRODUCTION_ALIAS)
    if aliased is not None:
        return aliased
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated in MLflow 3 but still in use
        try:
            versions = client.get_latest_versions(name, stages=[PRODUCTION_STAGE])
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            versions = []
    if not versions:
        raise NoProductionModel(f"no version of model {name!r} is in Production (alias or stage)")
    return max(versions, key=lambda version: int(version.version))


def has_production_model(settings: Settings) -> bool:
    """Whether the registry has a Production version (for `train.py --if-missing` and wait_for_model.py)."""
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    try:
        production_version(client, settings.registered_model)
    except NoProductionModel:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def verify_cached(directory: Path) -> dict[str, Any]:
    """The manifest of a cached version, after checking every file against it; raises CorruptCache."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise CorruptCache(f"{directory}: no readable manifest ({error})") from None
    if _file_manifest(directory) != manifest["files"]:
        raise CorruptCache(f"{directory}: files differ from the manifest")
    return manifest


def first_line(error: BaseException) -> str:
    """An error as one short line, for logs and /health."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


class ModelStore:
    """Resolves, caches and loads versions of one registered model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # MLflow's REST client reads its timeout and retry settings from the environment; bound them
        # (its defaults: 120 s timeout, 7 retries with backoff factor 2) unless the operator set them.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.fetch_timeout_seconds)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.fetch_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a terminal's, not a JSON log's
        self.client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        self.cache_dir = Path(settings.model_cache_dir) / settings.registered_model.replace(os.sep, "_")
        self.reload_marker = self.cache_dir / RELOAD_MARKER

    @cached_property
    def s3(self) -> Any:
        """One S3 client for the life of the store: credentials and endpoint are resolved once."""
        return s3_client(self.settings)

    def production_version(self) -> ModelVersion:
        return production_version(self.client, self.settings.registered_model)

    def load_production(self) -> LoadedModel:
        """The Production version, or the newest cached one if the registry or bucket is unreachable."""
        name, uri = self.settings.registered_model, self.settings.tracking_uri
        try:
            return self.load(self.production_version())
        except NoProductionModel as error:
            raise ModelUnavailable(f"{error} at {uri}") from None
        except FETCH_ERRORS as error:
            reason = first_line(error)
            cached = self.newest_cached()
            if cached is None:
                raise ModelUnavailable(f"cannot fetch {name} from {uri} ({reason}) and none is cached") from None
            log.warning("cannot fetch the Production version (%s); serving cached version %s", reason, cached.name)
            model = load_directory(cached, verify_cached(cached), origin="cache")
            model.metadata["fetch_error"] = reason
            return model

    def load(self, version: ModelVersion) -> LoadedModel:
        """Load `version` from the cache, downloading it first if it is not there (or not intact).

        A download that does not load is removed: the files it matches its manifest against are whatever the
        bucket listed, so only a load proves it is the whole model (a listing taken while the artifacts were
        still being written, or with some missing, would otherwise stay in the cache as intact).
        """
        directory = self.cache_dir / str(version.version)
        with self._lock():
            try:
                manifest = verify_cached(directory)
            except CorruptCache as error:
                if directory.exists():
                    log.warning("cached model is incomplete or corrupt, fetching it again: %s", error)
                    shutil.rmtree(directory)
                manifest = self._download(version, directory)
                try:
                    return load_directory(directory, manifest, "downloaded")
                except Exception:
                    shutil.rmtree(directory, ignore_errors=True)
                    raise
        return load_directory(directory, manifest, "cache")

    def newest_cached(self) -> Path | None:
        """The cached version with the highest number whose files are intact."""
        versions = sorted(
            (path for path in self.cache_dir.glob("*") if path.name.isdigit()), key=lambda path: -int(path.name)
        )
        for directory in versions:
            try:
                verify_cached(directory)
            except CorruptCache as error:
                log.warning("skipping cached model: %s", error)
                continue
            return directory
        return None

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.cache_dir / ".lock"):
            yield

    def _download(self, version: ModelVersion, directory: Path) -> dict[str, Any]:
        name = self.settings.registered_model
        source = self.client.get_model_version_download_uri(name, version.version)
        run = self.client.get_run(version.run_id) if version.run_id else None
        started = time.monotonic()
        # Downloads happen only under the cache lock, which this process holds: a staging folder still here is
        # what a download killed before its rename left behind.
        for interrupted in self.cache_dir.glob(".[0-9]*-*"):
            shutil.rmtree(interrupted, ignore_errors=True)
        staging_root = Path(tempfile.mkdtemp(prefix=f".{version.version}-", dir=self.cache_dir))
        staging = staging_root / "model"
        try:
            if urlparse(source).scheme == "s3":
                download_s3_prefix(source, staging, self.s3)
            else:
                downloaded = mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(staging_root), tracking_uri=self.settings.tracking_uri
                )
                Path(downloaded).rename(staging)
            files = _file_manifest(staging)
            seconds = time.monotonic() - started
            manifest = {
                "name": name,
                "version": str(version.version),
                "run_id": version.run_id or "",
                "source": source,
                "files": files,
                "bytes": sum(entry["size"] for entry in files.values()),
                "download_seconds": round(seconds, 3),
                "registry": {
                    "current_stage": version.current_stage,
                    "aliases": list(version.aliases or []),
                    "creation_timestamp": version.creation_timestamp,
                    "description": version.description,
                    "tags": dict(version.tags or {}),  # the model card train.py writes
                },
                "metrics": dict(run.data.metrics) if run else {},
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            staging.rename(directory)
        finally:
            shutil.rmtree(staging_root, ignore_errors=True)
        log.info(
            "fetched model %s version %s from %s: %d bytes in %.2fs",
            name,
            version.version,
            source,
            manifest["bytes"],
            seconds,
        )
        return manifest


def load_directory(directory: Path, manifest: dict[str, Any], origin: str) -> LoadedModel:
    """Load the MLflow model in `directory`, identified by its manifest; builds its fast form too."""
    started = time.monotonic()
    pipeline = mlflow.sklearn.load_model(str(directory))
    signature = Model.load(str(directory)).signature
    log.info(
        "loaded model %s version %s (%s, %s) in %.2fs",
        manifest["name"],
        manifest["version"],
        origin,
        directory,
        time.monotonic() - started,
    )
    metadata = {
        "registry": manifest["registry"],
        "metrics": manifest["metrics"],
        "signature": signature.to_dict() if signature else None,
        "bytes": manifest["bytes"],
    }
    return LoadedModel(
        name=manifest["name"],
        version=manifest["version"],
        run_id=manifest["run_id"],
        pipeline=pipeline,
        source=manifest["source"],
        origin=origin,
        metadata=metadata,
        fast=fast_form(pipeline),
    )


def s3_client(settings: Settings) -> Any:
    """An S3 client with bounded timeouts and retries, from the default credential chain (AWS_PROFILE)."""
    config = BotoConfig(
        connect_timeout=settings.fetch_timeout_seconds,
        read_timeout=settings.fetch_timeout_seconds,
        retries={"max_attempts": settings.fetch_retries + 1, "mode": "standard"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None, config=config
    )


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


def load_model_path(path: str) -> LoadedModel:
    """A model from a local MLflow model directory, with no registry involved (`MODEL_PATH`).

    A cached version's manifest, if the directory has one, names it; otherwise it is `<folder>/local`.
    """
    directory = Path(path)
    manifest_path = directory / MANIFEST
    manifest = {"name": directory.name, "version": "local", "run_id": "", "registry": {}, "metrics": {}, "bytes": None}
    if manifest_path.exists():
        manifest |= json.loads(manifest_path.read_text())
    return load_directory(directory, manifest | {"source": str(directory)}, origin="path")


def load_production_model(settings: Settings) -> LoadedModel:
    """The model to serve now, for one-off use (batch jobs); the service keeps a `ModelHolder`."""
    return ModelHolder.from_settings(settings).model


# Told the outcome of a registry check that changed or failed something ("swapped", "registry_failed",
# "load_failed"), the model served after it and, on a swap, the one it replaced (metrics.model_refreshed).
RefreshListener = Callable[[str, LoadedModel, LoadedModel | None], None]


class ModelHolder:
    """The model a process serves now; a background check swaps in newly promoted versions."""

    def __init__(self, store: ModelStore | None, model: LoadedModel) -> None:
        self.store = store  # None when the model came from a path: nothing to refresh
        self.model = model
        self.on_refresh: RefreshListener = lambda outcome, serving, replaced: None
        self.registry_error: str | None = model.metadata.get("fetch_error")
        self.checked_at: str | None = model.loaded_at if store else None
        self._refresh_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # The reload request this model already answers: a worker forked later from a master that loaded it
        # sees a newer marker and checks at once (or it would serve the master's version until its next check).
        self._reload_seen = self._reload_requested_at()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelHolder:
        """The model from `MODEL_PATH` if set (never refreshed), else the registry's Production version."""
        if settings.model_path:
            return cls(None, load_model_path(settings.model_path))
        store = ModelStore(settings)
        return cls(store, store.load_production())

    def refresh(self) -> bool:
        """Check the registry once; load and swap in a new Production version. True if it swapped."""
        if self.store is None:
            return False
        with self._refresh_lock:
            self.checked_at = datetime.now(UTC).isoformat(timespec="seconds")
            try:
                version = self.store.production_version()
            except (NoProductionModel, *FETCH_ERRORS) as error:
                self.registry_error = first_line(error)
                log.warning(
                    "registry check failed, still serving version %s: %s", self.model.version, self.registry_error
                )
                self.on_refresh("registry_failed", self.model, None)
                return False
            if str(version.version) == self.model.version:
                self.registry_error = None
                return False
            try:
                candidate = self.store.load(version)
            except Exception as error:  # a bad version must never take down the one being served
                # The registry answered but the artifacts could not be fetched: /health says so, as it does when
                # this happens at start-up. Each error stands until a check ends, so /health does not flap.
                self.registry_error = first_line(error) if isinstance(error, FETCH_ERRORS) else None
                log.error(
                    "failed to load version %s, still serving %s: %s",
                    version.version,
                    self.model.version,
                    first_line(error),
                )
                self.on_refresh("load_failed", self.model, None)
                return False
            self.registry_error = None
            previous, self.model = self.model, candidate
            log.info("now serving %s version %s (was %s)", candidate.name, candidate.version, previous.version)
            self.on_refresh("swapped", candidate, previous)
            return True

    def request_reload(self) -> bool:
        """Check the registry now, and ask the other processes on this host to do the same; True if it swapped.

        The request travels as the mtime of a marker file in the model cache directory, which every worker's
        refresh thread reads each second: the workers of one host already share that directory (its download
        lock too), it needs no signal to the Gunicorn master nor any channel between workers, and a worker
        that was busy or being replaced when the marker was touched still sees it afterwards.
        """
        if self.store is None:
            return False
        swapped = self.refresh()
        self.store.cache_dir.mkdir(parents=True, exist_ok=True)
        self.store.reload_marker.touch()
        self._reload_seen = self._reload_requested_at()  # this process has just checked
        return swapped

    def _reload_requested_at(self) -> int | None:
        """The mtime (ns) of the reload marker, or None if no reload was ever requested."""
        if self.store is None:
            return None
        try:
            return self.store.reload_marker.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def start_refreshing(self, every_seconds: float) -> None:
        """Check every `every_seconds` (with jitter, so workers do not call the registry in step; 0: only
        when a reload is requested), and within a second of `request_reload` in any process of this host."""
        if self.store is None or (self._thread is not None and self._thread.is_alive()):
            return

        def next_check() -> float:
            return time.monotonic() + every_seconds * random.uniform(0.9, 1.1) if every_seconds > 0 else float("inf")

        def run() -> None:
            due = next_check()
            while True:
                requested = self._reload_requested_at()
                if requested != self._reload_seen or time.monotonic() >= due:
                    self._reload_seen = requested
                    self.refresh()
                    due = next_check()
                time.sleep(RELOAD_POLL_SECONDS)

        self._thread = threading.Thread(target=run, name="model-refresh", daemon=True)
        self._thread.start()

    def health(self) -> dict[str, Any]:
        model = self.model
        return {
            "status": "ok",
            "model": {**model.describe(), "loaded_at": model.loaded_at, "source": model.source, "origin": model.origin},
            "registry": {
                "reachable": self.registry_error is None,
                "error": self.registry_error,
                "checked_at": self.checked_at,
            },
        }


def load_model_version(settings: Settings, version: str) -> LoadedModel:
    """One version of the registered model, through the cache: a batch job scores with its worker's version.

    With `MODEL_PATH` set the worker serves that directory, and so does the job.
    """
    if settings.model_path:
        return load_model_path(settings.model_path)
    store = ModelStore(settings)
    return store.load(store.client.get_model_version(settings.registered_model, version))
