"""End to end with real processes: Gunicorn serving the registry's model, `test_pred.py` as the client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests
from conftest import service_env
from harness import ROOT, free_port, start, stop, wait_for_http

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
