"""End to end with real processes: Gunicorn serving the registry's model, `test_pred.py` as the client; every
entry point refusing a bad setting in one line, and logging JSON."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import service_env
from harness import ROOT, free_port, start, start_gunicorn, stop, wait_for_http

from bikeshare_membership.config import Settings


def test_pred_script_against_gunicorn(gunicorn_service: str) -> None:
    port = gunicorn_service.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, str(ROOT / "test_pred.py"), "127.0.0.1", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["membership"] in ("Member", "Casual") and 0 <= answer["proba"] <= 100
    assert answer["model"]["version"]


def test_gunicorn_workers_answer_bad_input_with_json(gunicorn_service: str) -> None:
    response = requests.post(
        f"{gunicorn_service}/predict", data="{", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "MALFORMED_REQUEST"


def test_workers_keep_their_heartbeat_files_in_memory(settings: Settings, trained, tmp_path: Path) -> None:
    """/dev/shm, not the disk-backed /tmp (gunicorn.conf.py `worker_tmp_dir`); the files are open and unlinked."""
    process, _ = start_gunicorn(service_env(settings), tmp_path / "gunicorn.log")
    try:
        workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        heartbeats = [path for worker in workers for path in open_files(worker) if "/wgunicorn-" in path]
    finally:
        stop(process)
    assert workers and len(heartbeats) >= len(workers)
    assert all(path.startswith("/dev/shm/wgunicorn-") for path in heartbeats), heartbeats


def open_files(pid: str) -> list[str]:
    """What a process holds open, from /proc; a descriptor closed between the listing and its reading (a
    connection, the registry's database as a worker checks it) is skipped."""
    paths = []
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            paths.append(os.readlink(link))
    return paths


# Run as `python - CONFIG MARKS STATUS ENDING`: exits with STATUS through Gunicorn's worker_exit hook as a worker
# calls it (ENDING "worker") or through Python alone ("python"), writing to MARKS what ran on the way out.
WORKER_ENDING = """
import atexit, os, runpy, sys
config, marks, status, ending = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
hooks = runpy.run_path(config)
fd = os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_APPEND)


class TornDown:
    write = staticmethod(os.write)

    def __del__(self):
        self.write(fd, b"torn down\\n")


kept = TornDown()  # freed by the interpreter's teardown, when that runs
atexit.register(os.write, fd, b"atexit\\n")


class Worker:
    wsgi = None  # the app is not needed: what stop_serving does is tested on its own
    pid = os.getpid()


class GoneWorker(Worker):
    pid = -1


try:
    sys.exit(status)
finally:
    hooks["worker_exit"](None, GoneWorker())  # the master's call for a worker already gone
    os.write(fd, b"the master's call returned\\n")
    if ending == "worker":
        hooks["worker_exit"](None, Worker())
"""


@pytest.mark.parametrize(("ending", "status"), [("worker", 0), ("worker", 3), ("python", 3)])
def test_a_worker_ends_without_the_interpreters_teardown(
    ending: str, status: int, settings: Settings, tmp_path: Path
) -> None:
    """A worker's end (gunicorn.conf.py `worker_exit`) keeps the exit status and runs the atexit handlers, but
    frees no object, which would make the kernel copy every page the worker shares with the master; Python's own
    exit (the control) does free them."""
    marks = tmp_path / "marks"
    result = subprocess.run(
        [sys.executable, "-", str(ROOT / "gunicorn.conf.py"), str(marks), str(status), ending],
        input=WORKER_ENDING,
        cwd=ROOT,
        env=service_env(settings, TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == status, result.stderr[-3000:]
    ran = marks.read_text().splitlines()
    assert ran[:2] == ["the master's call returned", "atexit"]
    assert ("torn down" in ran) == (ending == "python")


def test_pred_script_fails_when_nothing_listens() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "test_pred.py"), "127.0.0.1", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "FAILED" in result.stderr


def test_python_predict_runs_the_same_app_in_debug_mode(settings: Settings, trained, tmp_path: Path) -> None:
    port = free_port()
    env = service_env(settings, MODEL_PORT=str(port))
    process = start([sys.executable, str(ROOT / "predict.py")], env, tmp_path / "debug.log")
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process)
        result = subprocess.run(
            [sys.executable, str(ROOT / "test_pred.py"), "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    finally:
        stop(process)
    assert "Debug mode: on" in (tmp_path / "debug.log").read_text()


def test_default_ports_agree(monkeypatch) -> None:
    """The client, `python predict.py` and Gunicorn all default to the same port."""
    import runpy

    monkeypatch.delenv("MODEL_PORT", raising=False)
    gunicorn_settings = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    client = runpy.run_path(str(ROOT / "test_pred.py"))  # a script, like gunicorn.conf.py: run it, not imported
    assert client["build_parser"]().parse_args([]).port == Settings.from_env({}).port == 9696
    assert gunicorn_settings["bind"] == "0.0.0.0:9696"


# --- every entry point: a bad setting is one line and a non-zero status, logs are JSON -------------------------

# (command after `python`, the bad setting, the line, the exit status). The service's line comes from
# gunicorn.conf.py, which reads the settings before Gunicorn loads the app, or from the app factory
# (app.serve_app) under another configuration and in `python predict.py`.
REFUSING_ENTRY_POINTS = {
    "train.py": (
        ["train.py"],
        {"MODEL_FETCH_RETRIES": "-1"},
        "train.py: MODEL_FETCH_RETRIES: '-1' is not 0 or more",
        2,
    ),
    "batch.py": (
        ["batch.py", "score", "x.csv"],
        {"MAX_TRIPS_PER_REQUEST": "0"},
        "batch.py score: MAX_TRIPS_PER_REQUEST: '0' is not above 0",
        2,
    ),
    "wait_for_model.py": (
        ["wait_for_model.py", "--timeout", "1"],
        {"MODEL_FETCH_TIMEOUT": "soon"},
        "wait_for_model.py: MODEL_FETCH_TIMEOUT: 'soon' is not a number",
        2,
    ),
    "gunicorn.conf.py": (
        ["-m", "gunicorn", "--config", "gunicorn.conf.py"],
        {"MODEL_PORT": "abc"},
        "bikeshare-membership: MODEL_PORT: 'abc' is not an integer",
        2,
    ),
    "gunicorn.conf.py, a limit": (
        ["-m", "gunicorn", "--config", "gunicorn.conf.py"],
        {"MAX_BODY_BYTES": "0"},
        "bikeshare-membership: MAX_BODY_BYTES: '0' is not above 0",
        2,
    ),
    # (Gunicorn reads WEB_CONCURRENCY as an integer itself, as it starts: a non-integer fails there, before this.)
    "gunicorn.conf.py, no workers": (
        ["-m", "gunicorn", "--config", "gunicorn.conf.py"],
        {"WEB_CONCURRENCY": "0"},
        "bikeshare-membership: WEB_CONCURRENCY: '0' is not above 0",
        2,
    ),
    "predict:app() preloaded": (
        ["-m", "gunicorn", "--config", "{bare_config}", "--preload", "predict:app()"],
        {"MAX_BODY_BYTES": "0"},
        "bikeshare-membership: MAX_BODY_BYTES: '0' is not above 0",
        3,
    ),
    "predict.py": (
        ["predict.py"],
        {"GRACEFUL_TIMEOUT": "-5"},
        "bikeshare-membership: GRACEFUL_TIMEOUT: '-5' is not above 0",
        3,
    ),
}


def bare_gunicorn_config(directory: Path) -> Path:
    """A Gunicorn configuration that reads no setting itself, so the app factory is the first to."""
    config = directory / "bare.conf.py"
    config.write_text(f"bind = '127.0.0.1:{free_port()}'\nworkers = 1\ncontrol_socket_disable = True\n")
    return config


@pytest.mark.parametrize("entry_point", REFUSING_ENTRY_POINTS)
def test_every_entry_point_refuses_a_bad_setting_in_one_line(
    entry_point: str, settings: Settings, tmp_path: Path
) -> None:
    arguments, bad, line, status = REFUSING_ENTRY_POINTS[entry_point]
    arguments = [argument.format(bare_config=bare_gunicorn_config(tmp_path)) for argument in arguments]
    temporary = tmp_path / "tmp"  # where gunicorn.conf.py makes its metrics folder
    temporary.mkdir()
    result = subprocess.run(
        [sys.executable, *arguments],
        cwd=ROOT,
        env=service_env(settings, TMPDIR=str(temporary), **bad),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr) == (status, f"{line}\n"), result.stderr[-3000:]
    assert result.stdout == ""
    assert not list(temporary.iterdir())  # the master removed the metrics folder it made


def test_a_worker_loading_the_app_stops_gunicorn_on_a_bad_setting(settings: Settings, tmp_path: Path) -> None:
    """Without preload_app each worker calls the factory: its exit status is Gunicorn's "worker failed to boot",
    so the master stops instead of forking a new worker again and again."""
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--config", str(bare_gunicorn_config(tmp_path)), "predict:app()"],
        cwd=ROOT,
        env=service_env(settings, MAX_TRIPS_PER_REQUEST="-3"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.count("bikeshare-membership: MAX_TRIPS_PER_REQUEST: '-3' is not above 0\n") == 1
    assert "Worker failed to boot" in result.stderr and "Traceback" not in result.stderr


# Started with every Python process that has it on its path: at exit, after the entry point has set up its logs,
# a Python warning and a record of an MLflow logger (which MLflow gives a plain-text handler of its own).
AT_EXIT_LOGGING = """
import atexit, logging, warnings
atexit.register(lambda: logging.getLogger("mlflow.tracking.probe").warning("an MLflow record at exit"))
atexit.register(lambda: warnings.warn("a Python warning at exit", UserWarning))
"""


def test_train_if_missing_logs_only_json_lines(
    settings: Settings, trained: subprocess.CompletedProcess, registry_dir: Path, tmp_path: Path
) -> None:
    """Like the service, `train.py` logs JSON lines on stderr, Python's warnings and MLflow's loggers included; its
    summary stays a human line on stdout."""
    (tmp_path / "sitecustomize.py").write_text(AT_EXIT_LOGGING)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--if-missing"],
        cwd=registry_dir,
        env=service_env(settings, PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == (
        f"{settings.registered_model} already has a Production version at {settings.tracking_uri}; not training\n"
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # each line a JSON object, or this fails
    assert {(line["logger"], line["level"]) for line in lines} >= {
        ("py.warnings", "WARNING"),
        ("mlflow.tracking.probe", "WARNING"),
    }, result.stderr
    assert all(isinstance(line, dict) and {"time", "message", "pid"} <= line.keys() for line in lines)
