"""Shared fixtures: a real SQLite MLflow registry trained by `train.py`, and helpers for real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402
from model_store import LoadedModel, load_production_model  # noqa: E402

MODEL_NAME = "bikeshare-membership-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 60.0) -> requests.Response:
    """Poll `url` until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before {url} answered")
        try:
            response = requests.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def start(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `command` from the repository root in its own session, its output going to `log_path`."""
    with open(log_path, "w") as log_file:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a service or CLI process gets in tests: the test registry, nothing from the user."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        MLFLOW_TRACKING_URI=settings.tracking_uri,
        MLFLOW_EXP_NAME=settings.experiment_name,
        MLFLOW_REGISTERED_MODEL=settings.registered_model,
        MODEL_PORT=str(settings.port),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def start_mlflow_server(
    backend_db: Path, artifact_root: str, env: dict[str, str], log_path: Path
) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free loopback port, clients reaching the artifact store directly."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{backend_db}", "--default-artifact-root", artifact_root]
    command += ["--no-serve-artifacts"]
    process = start(command, env, log_path)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", process, timeout=120)
    return process, url


@pytest.fixture(scope="session")
def aws_profile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A named profile in throwaway AWS shared config files, as a mounted ~/.aws provides it; no keys in env."""
    aws_dir = tmp_path_factory.mktemp("aws")
    (aws_dir / "credentials").write_text(
        "[bikeshare-test]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    (aws_dir / "config").write_text("[profile bikeshare-test]\nregion = us-east-1\n")
    return {
        "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
        "AWS_CONFIG_FILE": str(aws_dir / "config"),
        "AWS_PROFILE": "bikeshare-test",
    }


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    bucket: str
    env: dict[str, str]  # what a process needs to reach it: the profile and MLFLOW_S3_ENDPOINT_URL

    def client(self) -> Any:  # boto3 generates its client types at run time
        session = boto3.Session(profile_name=self.env["AWS_PROFILE"])
        return session.client("s3", endpoint_url=self.url)


@pytest.fixture(scope="session")
def s3(aws_profile: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A real S3-compatible HTTP endpoint on loopback (moto's server mode) with one bucket."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    process = start(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        dict(os.environ),
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/moto-api/", process)
        endpoint = S3Endpoint(url=url, bucket="bikeshare-models", env={**aws_profile, "MLFLOW_S3_ENDPOINT_URL": url})
        old_env = {key: os.environ.get(key) for key in aws_profile}
        os.environ.update(aws_profile)  # boto3.Session(profile_name=...) in this process reads the same files
        endpoint.client().create_bucket(Bucket=endpoint.bucket)
        yield endpoint
    finally:
        stop(process)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--cv-folds", "2"],
            cwd=work_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
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
    )


@pytest.fixture(scope="session")
def trained(settings: Settings, registry_dir: Path) -> subprocess.CompletedProcess:
    """`train.py` run for real into an empty SQLite registry (artifacts beside it)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--cv-folds", "3"],
        cwd=registry_dir,
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def model(settings: Settings, trained: subprocess.CompletedProcess) -> LoadedModel:
    return load_production_model(settings)


@pytest.fixture
def gunicorn_service(settings: Settings, trained: subprocess.CompletedProcess, tmp_path: Path) -> Iterator[str]:
    """A real Gunicorn serving the Production model on a free loopback port; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py")]
    command += ["--bind", f"127.0.0.1:{port}", "predict:app"]
    process = start(command, service_env(settings, MODEL_PORT=str(port)), tmp_path / "gunicorn.log")
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
