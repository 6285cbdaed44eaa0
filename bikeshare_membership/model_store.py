"""The model store: a local cache of a registered version's artifacts, and loading it with its fast form.

- Cache: `MODEL_CACHE_DIR/<name>/<version>/` holds the artifacts and `manifest.json` (model_files.py), written
  last and moved into place atomically. A version is loaded only if every file matches its manifest, so a
  partial or corrupt download is fetched again, never loaded. A file lock per model makes processes that need
  the same version at once (Gunicorn workers reloading together) download it once per host. The version's
  verified fast form is saved beside it, so later loads skip unpickling the pipeline and importing
  scikit-learn (`load_directory`).
- Downloads: `s3://` artifacts straight from S3 with boto3 (storage.py: the default credential chain, so
  `AWS_PROFILE` picks a profile from `~/.aws`; `MLFLOW_S3_ENDPOINT_URL` for S3-compatible stores); any other
  artifact URI through MLflow's own client.
- Bounded waiting: every registry and S3 call has a connect and read timeout (`MODEL_FETCH_TIMEOUT`) and a
  bounded retry with backoff (`MODEL_FETCH_RETRIES`). If the registry or the bucket cannot be reached at
  start-up, the newest cached version is served; with nothing cached, `ModelUnavailable` is raised.

Which version is in Production is registry.py's; swapping in a newly promoted one is model_holder.py's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import requests
from botocore.exceptions import BotoCoreError, ClientError
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from pydantic import Field
from typing_extensions import TypedDict

from bikeshare_membership.config import Settings
from bikeshare_membership.errors import first_line
from bikeshare_membership.fast_pipeline import FastPipeline, UnsupportedPipeline
from bikeshare_membership.features import TripColumns
from bikeshare_membership.model_files import (
    FAST_FORM,
    MANIFEST,
    CorruptCache,
    fast_form_key,
    file_manifest,
    save_fast_form,
    saved_fast_form,
    verify_cached,
)
from bikeshare_membership.registry import NoProductionModel, alias_version, production_version
from bikeshare_membership.schema import MODEL_INPUT_COLUMNS, RequestTrips, Timestamp, closed
from bikeshare_membership.storage import download_s3_prefix, exclusive_lock, s3_client

# Touched by `POST /admin/reload`; every worker's refresh thread checks its mtime (model_holder.py).
RELOAD_MARKER = "reload-requested"
# What "cannot reach the registry or the bucket" looks like from the clients we use.
FETCH_ERRORS = (MlflowException, requests.RequestException, BotoCoreError, ClientError, OSError)

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No model can be served: the reason fits on one line."""


def read_pipeline(directory: Path) -> Any:
    """The fitted scikit-learn pipeline of the MLflow model in `directory`.

    This release's `preprocess` is imported first, so that unpickling resolves `preprocess.TripFeatures` to this
    release's class, never to the older copy of preprocess.py an earlier model carries in its code/ folder (MLflow
    puts that on sys.path). Imported here, with scikit-learn: a version served by its saved fast form needs
    neither.
    """
    import preprocess  # noqa: F401

    return mlflow.sklearn.load_model(str(directory))


def fast_form(pipeline: Any) -> FastPipeline | None:
    """The exact fast evaluation of `pipeline`, or None (and the scikit-learn path) if it has none."""
    from bikeshare_membership.pipeline_reader import fast_pipeline_of  # scikit-learn's, as the pipeline is

    try:
        return fast_pipeline_of(pipeline)
    except UnsupportedPipeline as error:
        log.warning("serving through scikit-learn only: %s", error)
        return None


Origin = Literal["downloaded", "cache", "path"]  # how a process got a model's files


@closed
class ModelRef(TypedDict):
    """The model version that answered."""

    name: Annotated[str, Field(description="The registered model.")]
    version: Annotated[str, Field(description="Its version (`local` for a MODEL_PATH folder).")]
    run_id: Annotated[str, Field(description="The MLflow run that trained it.")]


@closed
class ServedModel(ModelRef):
    """The model version a process serves, and where and when it loaded it."""

    loaded_at: Timestamp
    source: Annotated[str, Field(description="Where the artifacts came from.")]
    origin: Origin


@closed
class RegistryFacts(TypedDict, total=False):
    """The registry's facts about the version (empty for a MODEL_PATH folder)."""

    current_stage: str | None
    aliases: list[str]
    creation_timestamp: int | None
    description: Annotated[str | None, Field(description="The model card, in words.")]
    tags: Annotated[
        dict[str, str],
        Field(
            description="The model card train.py writes: data files and span, rows, Member share, the time-ordered "
            "test month and figures beside the prior's, the gate's verdict and reason, the candidate and its features."
        ),
    ]


@closed
class ModelMetadata(TypedDict):
    """What a loaded model carries beside its name: the registry's facts and the training run's figures."""

    registry: RegistryFacts
    metrics: Annotated[dict[str, float | None], Field(description="The training run's metrics.")]
    signature: Annotated[dict[str, Any] | None, Field(description="The MLflow model signature.")]
    bytes: Annotated[int | None, Field(description="The size of the model's files.")]
    fetch_error: NotRequired[Annotated[str, Field(description="Why a cached version is served, if it is.")]]


def no_metadata() -> ModelMetadata:
    """The metadata of a model with no registry facts, run metrics nor manifest."""
    return {"registry": {}, "metrics": {}, "signature": None, "bytes": None}


def in_memory(pipeline: Any) -> Callable[[], Any]:
    """`LoadedModel.load_pipeline` for a pipeline already loaded."""
    return lambda: pipeline


def from_directory(directory: Path) -> Callable[[], Any]:
    """`LoadedModel.load_pipeline` for the MLflow model in `directory`, loaded when called."""
    return lambda: read_pipeline(directory)


@dataclass(frozen=True)
class LoadedModel:
    """A fitted pipeline with the registry facts that identify it in every answer.

    The pipeline itself is loaded when first asked for (`pipeline`): a model served by its saved fast form
    answers without it.
    """

    name: str
    version: str
    run_id: str
    load_pipeline: Callable[[], Any]
    source: str  # where the artifacts came from
    origin: Origin
    metadata: ModelMetadata = field(default_factory=no_metadata)
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    fast: FastPipeline | None = None

    @cached_property
    def pipeline(self) -> Any:
        """The fitted scikit-learn pipeline."""
        return self.load_pipeline()

    def member_probability(self, trips: TripColumns) -> np.ndarray:
        """P(Member) for each trip (a DataFrame, or columns as arrays), equal to the pipeline's `predict_proba`:
        through the exact fast form if the model has one (faster than scikit-learn at every size), else
        scikit-learn."""
        if self.fast is not None:
            return self.fast.member_probability(trips)
        frame = trips if isinstance(trips, pd.DataFrame) else pd.DataFrame(trips)
        classes = list(self.pipeline.classes_)
        return self.pipeline.predict_proba(frame[MODEL_INPUT_COLUMNS])[:, classes.index(1)]

    def request_probabilities(self, trips: RequestTrips) -> list[float]:
        """P(Member) for a request's validated trips; one trip through the fast form skips the arrays (the same
        values)."""
        if self.fast is not None and len(trips) == 1:
            return [self.fast.trip_probability(*(trips.columns[column][0] for column in MODEL_INPUT_COLUMNS))]
        return self.member_probability(trips.model_input()).tolist()

    def describe(self) -> ModelRef:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}

    def served(self) -> ServedModel:
        return {**self.describe(), "loaded_at": self.loaded_at, "source": self.source, "origin": self.origin}


class ModelStore:
    """Resolves, caches and loads versions of one registered model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # MLflow's REST client reads its timeout and retry settings from the environment; bound them
        # (its defaults: 120 s timeout, 7 retries with backoff factor 2) unless the operator set them.
        # (whole seconds, at least 1: a fraction rounded down to 0 would fail every request)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(settings.fetch_timeout_seconds)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.fetch_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a terminal's, not a JSON log's
        self.client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        self.cache_dir = Path(settings.model_cache_dir) / settings.registered_model.replace(os.sep, "_")
        self.reload_marker = self.cache_dir / RELOAD_MARKER

    def production_version(self) -> ModelVersion:
        return production_version(self.client, self.settings.registered_model)

    def alias_version(self, alias: str) -> ModelVersion | None:
        """The version `alias` names, or None."""
        return alias_version(self.client, self.settings.registered_model, alias)

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
                download_s3_prefix(source, staging, s3_client(self.settings))
            else:
                downloaded = mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(staging_root), tracking_uri=self.settings.tracking_uri
                )
                Path(downloaded).rename(staging)
            files = file_manifest(staging)
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


def load_directory(directory: Path, manifest: dict[str, Any], origin: Origin) -> LoadedModel:
    """Load the MLflow model in `directory`, identified by its manifest, with its fast form.

    A version whose manifest lists its files (the store's cache) keeps its verified fast form in FAST_FORM. A
    later load builds the form from it, verifies it again against the probabilities scikit-learn gave, and leaves
    the pipeline unloaded until asked for: unpickling it through skops imports every scikit-learn estimator, a
    large part of a warm start (docs/performance.md).
    """
    started = time.monotonic()
    key = fast_form_key(manifest) if "files" in manifest else None
    saved = saved_fast_form(directory / FAST_FORM, key) if key else None
    fast: FastPipeline | None
    if saved is not None:
        fast, load_pipeline = saved, from_directory(directory)
    else:
        pipeline = read_pipeline(directory)
        fast, load_pipeline = fast_form(pipeline), in_memory(pipeline)
        if fast is not None and key:
            save_fast_form(directory / FAST_FORM, key, fast)
    signature = Model.load(str(directory)).signature
    log.info(
        "loaded model %s version %s (%s, %s, %s) in %.2fs",
        manifest["name"],
        manifest["version"],
        origin,
        directory,
        "its saved fast form" if saved else "the pipeline",
        time.monotonic() - started,
    )
    metadata: ModelMetadata = {
        "registry": manifest["registry"],
        "metrics": manifest["metrics"],
        "signature": signature.to_dict() if signature else None,
        "bytes": manifest["bytes"],
    }
    return LoadedModel(
        name=manifest["name"],
        version=manifest["version"],
        run_id=manifest["run_id"],
        load_pipeline=load_pipeline,
        source=manifest["source"],
        origin=origin,
        metadata=metadata,
        fast=fast,
    )


def load_model_path(path: str) -> LoadedModel:
    """A model from a local MLflow model directory, with no registry involved (`MODEL_PATH`).

    A cached version's manifest, if the directory has one, names it; otherwise it is `<folder>/local`.
    """
    directory = Path(path)
    manifest_path = directory / MANIFEST
    manifest: dict[str, Any] = {
        "name": directory.name,
        "version": "local",
        "run_id": "",
        "registry": {},
        "metrics": {},
        "bytes": None,
    }
    if manifest_path.exists():
        manifest |= json.loads(manifest_path.read_text())
    return load_directory(directory, manifest | {"source": str(directory)}, origin="path")


def load_production_model(settings: Settings) -> LoadedModel:
    """The model to serve now, for one-off use (batch jobs): the one at `MODEL_PATH` if set, else the
    registry's Production version (the newest cached one if the registry is unreachable). The service keeps a
    `ModelHolder` instead, which follows promotions."""
    if settings.model_path:
        return load_model_path(settings.model_path)
    return ModelStore(settings).load_production()


def load_model_version(settings: Settings, version: str) -> LoadedModel:
    """One version of the registered model, through the cache: a batch job scores with its worker's version.

    With `MODEL_PATH` set the worker serves that directory, and so does the job.
    """
    if settings.model_path:
        return load_model_path(settings.model_path)
    store = ModelStore(settings)
    return store.load(store.client.get_model_version(settings.registered_model, version))
