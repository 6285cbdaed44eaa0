"""Shared fixtures: a real SQLite MLflow registry trained by `train.py`, and helpers for real processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
from harness import (
    clean_env,
    free_port,
    run_train,
    start_gunicorn,
    start_mlflow_server,
    start_moto,
    stop,
    write_aws_profile,
)

from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import LoadedModel, load_production_model

MODEL_NAME = "bikeshare-membership-test"


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a service or CLI process gets in tests: the test registry, nothing from the user."""
    env = clean_env()
    env.update(
        MLFLOW_TRACKING_URI=settings.tracking_uri,
        MLFLOW_EXP_NAME=settings.experiment_name,
        MLFLOW_REGISTERED_MODEL=settings.registered_model,
        MODEL_PORT=str(settings.port),
        MODEL_CACHE_DIR=settings.model_cache_dir,
    )
    env.update(extra)
    return env


def rename_attribute(monkeypatch: pytest.MonkeyPatch, owner: Any, old: str, new: str, package: str) -> None:
    """Make `owner` look like an object of a release of `package` (its module name) that calls its attribute
    `old` `new`: the value moves to `new`, and `old` answers only the package's own code (which such a release
    would have renamed too), so the object still works while a reader of `old` from outside fails as it would:
    AttributeError. For our code's fallbacks where it reads a library's private attributes."""
    monkeypatch.setattr(owner, new, getattr(owner, old), raising=False)
    monkeypatch.delattr(owner, old)

    def for_the_package_only(self: Any) -> Any:
        if sys._getframe(1).f_globals.get("__name__", "").startswith(f"{package}."):
            return getattr(self, new)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {old!r}")

    release = type(type(owner).__name__, (type(owner),), {old: property(for_the_package_only)})
    monkeypatch.setattr(owner, "__class__", release)


@pytest.fixture(scope="session")
def aws_profile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A named profile in throwaway AWS shared config files, as a mounted ~/.aws provides it; no keys in env."""
    return write_aws_profile(tmp_path_factory.mktemp("aws"))


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    bucket: str
    env: dict[str, str]  # what a process needs to reach it: the profile and MLFLOW_S3_ENDPOINT_URL

    def client(self) -> Any:  # boto3 generates its client types at run time
        """A client of this test process, reading the same profile files a service does."""
        files = botocore.session.Session()
        files.set_config_variable("credentials_file", self.env["AWS_SHARED_CREDENTIALS_FILE"])
        files.set_config_variable("config_file", self.env["AWS_CONFIG_FILE"])
        files.set_config_variable("profile", self.env["AWS_PROFILE"])
        return boto3.Session(botocore_session=files).client("s3", endpoint_url=self.url)


@pytest.fixture(scope="session")
def s3(aws_profile: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A real S3-compatible HTTP endpoint on loopback (moto's server mode) with one bucket."""
    process, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        endpoint = S3Endpoint(url=url, bucket="bikeshare-models", env={**aws_profile, "MLFLOW_S3_ENDPOINT_URL": url})
        endpoint.client().create_bucket(Bucket=endpoint.bucket)
        yield endpoint
    finally:
        stop(process)


@dataclass(frozen=True)
class RemoteRegistry:
    settings: Settings
    env: dict[str, str]  # what a process needs: tracking URI, model name, S3 endpoint, AWS profile
    backend_db: Path
    artifact_root: str


@pytest.fixture(scope="session")
def remote_registry(s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteRegistry]:
    """A real `mlflow server` (SQLite store, S3 artifacts) holding a model that `train.py` trained through it."""
    work_dir = tmp_path_factory.mktemp("remote-registry")
    backend_db = work_dir / "mlflow.db"
    artifact_root = f"s3://{s3.bucket}/mlflow"
    process, url = start_mlflow_server(
        backend_db, artifact_root, service_env(Settings(), **s3.env), work_dir / "mlflow.log"
    )
    settings = Settings(tracking_uri=url, experiment_name="remote-test", registered_model="bikeshare-remote-test")
    env = service_env(settings, **s3.env)
    try:
        run_train(env, work_dir)
        yield RemoteRegistry(settings=settings, env=env, backend_db=backend_db, artifact_root=artifact_root)
    finally:
        stop(process)


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def settings(registry_dir: Path) -> Settings:
    return Settings(
        tracking_uri=f"sqlite:///{registry_dir / 'mlflow.db'}",
        experiment_name="bikeshare-membership-test",
        registered_model=MODEL_NAME,
        port=free_port(),
        model_cache_dir=str(registry_dir / "model-cache"),
    )


@pytest.fixture(scope="session")
def trained(settings: Settings, registry_dir: Path) -> subprocess.CompletedProcess:
    """`train.py` run for real into an empty SQLite registry (artifacts beside it)."""
    return run_train(service_env(settings), registry_dir)


@pytest.fixture(scope="session")
def model(settings: Settings, trained: subprocess.CompletedProcess) -> LoadedModel:
    return load_production_model(settings)


@pytest.fixture
def gunicorn_service(settings: Settings, trained: subprocess.CompletedProcess, tmp_path: Path) -> Iterator[str]:
    """A real Gunicorn serving the Production model of the test registry; yields its base URL."""
    process, url = start_gunicorn(service_env(settings), tmp_path / "gunicorn.log")
    try:
        yield url
    finally:
        stop(process)


@pytest.fixture
def own_registry(settings: Settings, trained: subprocess.CompletedProcess, tmp_path: Path) -> Settings:
    """A copy of the session registry's database (the artifacts stay where they are, only read), so promoting
    a version here leaves the other tests' Production version alone."""
    copy = tmp_path / "mlflow.db"
    with sqlite3.connect(settings.tracking_uri.removeprefix("sqlite:///")) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    return Settings(
        tracking_uri=f"sqlite:///{copy}",
        experiment_name=settings.experiment_name,
        registered_model=settings.registered_model,
        model_cache_dir=str(tmp_path / "model-cache"),
    )
