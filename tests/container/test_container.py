"""The container deployment for real: the image built by compose, the stack up with `--profile local` (its own
tracking server and trainer), and what the deployment promises checked inside the running containers.

`make test-container`, not part of `make test`. It needs a Docker engine, `docker compose` or `docker-compose`,
and `python:3.11-slim` (.ci/run prepares all three on machines without a registry). The stack runs from a copy
of the working tree with a throwaway .env (from .env.example) and a throwaway ~/.aws, on free loopback ports; it
is torn down, volumes and built image included, whatever happens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import ROOT, free_port

APP_UID = 1000  # the Dockerfile's default
AWS_PROFILE = "container-test"
FAKE_ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key: fake
CACHE_DIR = "/var/cache/bikeshare-membership"
BUILD_TIMEOUT = 900
UP_TIMEOUT = 600  # includes training: web waits for a Production model
HEALTHY_TIMEOUT = 180
# Left in the build context on purpose: .dockerignore must keep every one of them out of the image.
BAIT = {
    "mlflow.db": "not a registry",
    "mlruns/0/meta.yaml": "artifact_location: nowhere",
    "mlartifacts/secret.txt": "local artifacts",
    ".model-cache/model.pkl": "cached model",
    ".aws/credentials": "[default]\naws_secret_access_key = bait",
}
# Names no file or directory of the image may have, and a credentials file anywhere.
FORBIDDEN_IN_IMAGE = [".env", "mlflow.db", "mlruns", "mlartifacts", ".model-cache", ".aws", ".git"]

log = logging.getLogger("container-test")


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where the plugin exists, else v1 (`docker-compose`)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


def run(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


@dataclass
class Stack:
    """A compose project started from `directory`; every command goes through `compose`."""

    compose_cmd: list[str]
    directory: Path
    name: str
    environ: dict[str, str]
    web_port: int
    image: str

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        command = [*self.compose_cmd, "--project-name", self.name, "--profile", "local", *args]
        result = run(command, timeout, cwd=self.directory, env=self.environ)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        return result

    def exec_web(self, *command: str) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", "web", *command, check=False)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def web_state(self) -> str:
        inspected = run(
            ["docker", "inspect", "-f", "{{.State.Status}} {{.State.Health.Status}}", self.container("web")], 30
        )
        return inspected.stdout.strip()


def copy_working_tree(destination: Path) -> None:
    """What a clone would hold plus files not committed yet: the build context and compose's project directory."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], 60, cwd=ROOT, check=True)
    for relative in filter(None, listed.stdout.split("\0")):
        source = ROOT / relative
        if source.is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)


def write_dotenv(project: Path, settings: dict[str, str]) -> None:
    """.env.example as shipped, with `settings` replacing its values or added to it."""
    lines = []
    for line in (project / ".env.example").read_text().splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}={settings.pop(key)}" if not line.startswith("#") and key in settings else line)
    lines += [f"{key}={value}" for key, value in settings.items()]
    (project / ".env").write_text("\n".join(lines) + "\n")


def write_aws_dir(directory: Path, uid: int) -> None:
    """A named profile with fake keys, private to `uid` as on a real host."""
    directory.mkdir(mode=0o700)
    (directory / "config").write_text(f"[profile {AWS_PROFILE}]\nregion = ca-central-1\n")
    (directory / "credentials").write_text(
        f"[{AWS_PROFILE}]\naws_access_key_id = {FAKE_ACCESS_KEY}\naws_secret_access_key = fake/not-a-secret\n"
    )
    for path in (directory, directory / "config", directory / "credentials"):
        path.chmod(0o700 if path.is_dir() else 0o600)
        if os.geteuid() == 0:
            os.chown(path, uid, uid)


def timed(step: str, action: Callable[[], object]) -> None:
    """Run one step of the set-up or tear-down, saying in the log what it is and how long it took."""
    log.info("%s ...", step)
    started = time.monotonic()
    action()
    log.info("%s: done in %.0fs", step, time.monotonic() - started)


def wait_until_healthy(stack: Stack) -> None:
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        state = stack.web_state()
        if state == "running healthy":
            return
        if not state.startswith("running"):
            break
        time.sleep(2)
    raise AssertionError(f"web is not healthy (state: {state!r})")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("docker") is None or run(["docker", "info"], 60).returncode != 0:
        pytest.fail("no Docker engine answers `docker info` (on CI machines: bash ../shared/container/engine.sh)")
    workspace = tmp_path_factory.mktemp("container")
    project = workspace / "project"
    project.mkdir()
    copy_working_tree(project)
    for relative, content in BAIT.items():
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        (project / relative).write_text(content)

    app_uid = APP_UID if os.geteuid() == 0 else os.geteuid()  # without root the files stay ours, so must the user
    aws_dir = workspace / "aws"
    write_aws_dir(aws_dir, app_uid)
    token = uuid.uuid4().hex[:8]
    web_port = free_port()
    dotenv = {
        "HOST_PORT": f"127.0.0.1:{web_port}",
        "MLFLOW_HOST_PORT": f"127.0.0.1:{free_port()}",
        "HOST_AWS_DIR": str(aws_dir),
        "AWS_PROFILE": AWS_PROFILE,
        "APP_UID": str(app_uid),
        "IMAGE_TAG": f"test-{token}",
    }
    write_dotenv(project, dict(dotenv))
    # Compose prefers the shell's variables to .env's: keep the caller's out.
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in dotenv and not key.startswith(("MLFLOW_", "AWS_", "COMPOSE_", "MODEL_"))
    }
    stack = Stack(
        compose_command(), project, f"bikeshare-test-{token}", environ, web_port, f"bikeshare-membership:test-{token}"
    )
    log.info("compose: %s, project %s in %s", " ".join(stack.compose_cmd), stack.name, project)
    try:
        timed("build the image", lambda: stack.compose("build", timeout=BUILD_TIMEOUT))
        timed(
            "start the stack: tracking server, trainer, model-ready, web",
            lambda: stack.compose("up", "-d", timeout=UP_TIMEOUT),
        )
        timed("wait until the web healthcheck says healthy", lambda: wait_until_healthy(stack))
        yield stack
    except BaseException:
        logs = stack.compose("logs", "--no-color", "--tail", "60", check=False)
        log.error("the stack failed; its last logs:\n%s%s", logs.stdout, logs.stderr)
        raise
    finally:
        down = ("down", "--volumes", "--rmi", "all", "--remove-orphans")
        timed("tear down: containers, network, volumes, image", lambda: stack.compose(*down, check=False))


def test_pred_script_gets_a_prediction_from_the_trained_model(stack: Stack) -> None:
    result = run([sys.executable, str(ROOT / "test_pred.py"), "127.0.0.1", "--port", str(stack.web_port)], 60)
    log.info("test_pred.py answered:\n%s", result.stdout)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["membership"] in ("Member", "Casual") and 0 <= answer["proba"] <= 100
    health = requests.get(f"http://127.0.0.1:{stack.web_port}/health", timeout=10).json()
    assert (
        health["model"]["name"] == "bikeshare-membership" and health["model"]["version"] == answer["model"]["version"]
    )


def test_the_service_does_not_run_as_root(stack: Stack) -> None:
    exec_user = stack.exec_web("id", "-u")
    gunicorn_owner = stack.exec_web("python", "-c", "import os; print(os.stat('/proc/1').st_uid)")
    log.info("id -u: %s; owner of PID 1 (gunicorn): %s", exec_user.stdout.strip(), gunicorn_owner.stdout.strip())
    assert exec_user.returncode == 0 and exec_user.stdout.strip() not in ("", "0")
    assert gunicorn_owner.stdout.strip() == exec_user.stdout.strip()


def test_aws_dir_is_read_only_and_the_profile_resolves(stack: Stack) -> None:
    write = stack.exec_web("touch", "/home/app/.aws/written-by-the-service")
    log.info("writing into ~/.aws: exit %d, %s", write.returncode, write.stderr.strip())
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    resolved = stack.exec_web(
        "python",
        "-c",
        "import boto3, os; session = boto3.Session(); "
        "print(os.environ['AWS_PROFILE'], session.get_credentials().access_key)",
    )
    log.info("AWS_PROFILE and the access key the SDK resolves: %s", resolved.stdout.strip())
    assert resolved.stdout.split() == [AWS_PROFILE, FAKE_ACCESS_KEY], resolved.stderr


def test_model_cache_is_a_writable_volume(stack: Stack) -> None:
    probe = stack.exec_web(
        "sh", "-c", f'test "$MODEL_CACHE_DIR" = {CACHE_DIR} && touch {CACHE_DIR}/probe && rm {CACHE_DIR}/probe'
    )
    assert probe.returncode == 0, probe.stderr
    mounts = run(["docker", "inspect", "-f", "{{json .Mounts}}", stack.container("web")], 30).stdout
    cache_mount = next(mount for mount in json.loads(mounts) if mount["Destination"] == CACHE_DIR)
    assert cache_mount["Type"] == "volume" and cache_mount["Name"].endswith("model-cache")


def test_the_fast_form_serves_with_its_compiled_code_in_the_volume(stack: Stack) -> None:
    """The image's service checked and kept the fast form (no fallback to scikit-learn), and Numba cached what it
    compiled for it in the model cache volume (NUMBA_CACHE_DIR), where the next start finds it."""
    cached = stack.exec_web(
        "sh", "-c", f'test "$NUMBA_CACHE_DIR" = {CACHE_DIR}/numba && find {CACHE_DIR}/numba -name "*.nbi"'
    )
    log.info("Numba's cache index files: %s", cached.stdout.split())
    assert cached.returncode == 0, cached.stderr
    assert all(kernel in cached.stdout for kernel in ("_raw_scores", "_one_row_score", "_encoded"))
    logs = run(["docker", "logs", stack.container("web")], 30)
    assert "serving through scikit-learn only" not in logs.stdout + logs.stderr


def test_every_containers_log_is_rotated(stack: Stack) -> None:
    """Docker's json-file driver keeps a log without limit unless told (docker-compose.yml `logging`)."""
    for service in ("web", "mlflow"):
        inspected = run(["docker", "inspect", "-f", "{{json .HostConfig.LogConfig}}", stack.container(service)], 30)
        log_config = json.loads(inspected.stdout)
        assert log_config == {"Type": "json-file", "Config": {"max-size": "50m", "max-file": "5"}}, log_config


def test_the_local_registry_runs_without_mlflows_job_runner(stack: Stack) -> None:
    """The local profile's MLflow server is a registry and tracking server only (docker-compose.yml)."""
    processes = stack.compose("top", "mlflow").stdout
    assert "mlflow server" in processes or "mlflow.server" in processes, processes
    assert "mlflow.server.jobs" not in processes and "huey" not in processes, processes


def test_image_holds_no_secret_or_local_state(stack: Stack) -> None:
    names = " -o ".join([*(f"-name {name}" for name in FORBIDDEN_IN_IMAGE), "-type f -name credentials"])
    found = run(
        ["docker", "run", "--rm", "--user", "0", stack.image, "sh", "-c", f"find / -xdev \\( {names} \\) -print"], 120
    )
    app_files = run(["docker", "run", "--rm", stack.image, "find", "/app", "-type", "f"], 60)
    log.info("files in /app: %s", " ".join(sorted(app_files.stdout.split())))
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout
    assert "/app/data/stations.csv" in app_files.stdout and ".csv.gz" not in app_files.stdout
    assert "/app/tests" not in app_files.stdout
