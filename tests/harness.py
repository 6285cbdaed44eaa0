"""Real processes for tests and benchmarks: free loopback ports, start/stop in their own session,
`mlflow server`, moto's S3 server, and the service under its production Gunicorn configuration."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """This process's environment without the user's MLflow and AWS settings: a started process reaches only
    the registry, bucket and profile it is given. Without PROMETHEUS_MULTIPROC_DIR too (a test that loads
    gunicorn.conf.py in process sets it): each Gunicorn a test starts makes its own metrics folder."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "AWS_")) and key != "PROMETHEUS_MULTIPROC_DIR"
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 60.0) -> requests.Response:
    """Poll `url` until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            response = requests.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def start(command: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """Start `command` from the repository root (or `cwd`) in its own session, its output going to `log_path`."""
    with open(log_path, "w") as log_file:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
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


def start_mlflow_server(
    backend_db: Path, artifact_root: str, env: dict[str, str], log_path: Path
) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free loopback port, clients reaching the artifact store directly."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{backend_db}", "--default-artifact-root", artifact_root]
    command += ["--no-serve-artifacts"]
    # Without MLflow's job runner (GenAI evaluation jobs), which the registry does not need: it would start a
    # consumer process, and each start leaves its queue folder in /dev/shm, which MLflow never removes.
    process = start(command, env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, log_path)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", process, timeout=120)
    return process, url


def start_gunicorn(
    env: dict[str, str], log_path: Path, root: Path = ROOT, app: str | None = None
) -> tuple[subprocess.Popen, str]:
    """The service of the checkout at `root` (the app its gunicorn.conf.py names, or `app`) under its production
    Gunicorn configuration on a free loopback port, once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--config", str(root / "gunicorn.conf.py")]
    command += ["--bind", f"127.0.0.1:{port}", *([app] if app else [])]
    process = start(command, {**env, "MODEL_PORT": str(port)}, log_path, cwd=root)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process)
    except RuntimeError:
        stop(process)
        raise RuntimeError(f"Gunicorn did not start:\n{log_path.read_text()[-3000:]}") from None
    return process, f"http://127.0.0.1:{port}"


def run_train(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`train.py ARGS` for real, as a user runs it, in `cwd` (where local artifacts land); raises if it fails."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{result.stderr[-3000:]}")
    return result


def start_moto(log_path: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3-compatible server on a free loopback port (or `port`, to restart one; it keeps no data)."""
    port = port or free_port()
    process = start(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        dict(os.environ),
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/moto-api/", process)
    return process, url


def write_aws_profile(directory: Path, profile: str = "bikeshare-test") -> dict[str, str]:
    """A named profile in AWS shared config files, as a mounted ~/.aws holds it; the variables selecting it."""
    (directory / "credentials").write_text(
        f"[{profile}]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    (directory / "config").write_text(f"[profile {profile}]\nregion = us-east-1\n")
    return {
        "AWS_SHARED_CREDENTIALS_FILE": str(directory / "credentials"),
        "AWS_CONFIG_FILE": str(directory / "config"),
        "AWS_PROFILE": profile,
    }
