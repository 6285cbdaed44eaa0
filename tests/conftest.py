"""Shared fixtures: a real SQLite MLflow registry trained by `train.py`, and helpers for real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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
