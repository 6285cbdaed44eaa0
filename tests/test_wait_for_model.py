"""`wait_for_model.py`, the step docker-compose.yml runs before the web service, against real registries."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from conftest import service_env
from harness import ROOT, free_port

from bikeshare_membership.config import Settings
from bikeshare_membership.wait_cli import wait_for_model


def test_returns_at_once_when_a_production_version_exists(
    settings: Settings, trained: subprocess.CompletedProcess
) -> None:
    started = time.monotonic()
    assert wait_for_model(settings, timeout=30, interval=5)
    assert time.monotonic() - started < 5


def test_gives_up_on_a_registry_without_the_model(settings: Settings, tmp_path: Path) -> None:
    empty = replace(settings, tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}")
    started = time.monotonic()
    assert not wait_for_model(empty, timeout=2, interval=0.5)
    assert time.monotonic() - started < 10


def test_exits_non_zero_quickly_while_the_registry_does_not_answer(settings: Settings) -> None:
    unreachable = replace(settings, tracking_uri=f"http://127.0.0.1:{free_port()}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "wait_for_model.py"), "--timeout", "2", "--interval", "0.5"],
        env=service_env(unreachable),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "the registry does not answer yet" in result.stdout
    assert "giving up after 2s" in result.stderr
