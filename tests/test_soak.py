"""bench/soak.py, briefly: steady load, a killed worker, the registry and S3 down, a corrupt cache, each
against real processes (moto, `mlflow server`, Gunicorn); its JSON line is checked here."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import ROOT, clean_env

from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import LoadedModel, ModelStore


def test_the_service_survives_load_and_faults(settings: Settings, model: LoadedModel) -> None:
    model_dir = ModelStore(settings).cache_dir / model.version  # the session's trained model, as the cache holds it
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--model-dir", str(model_dir)]
    command += ["--duration", "10", "--clients", "16", "--phase-seconds", "6"]
    env = clean_env()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env | {"MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=subprocess.PIPE, text=True
    )
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.terminate()  # the soak stops what it started on SIGTERM
        output, _ = process.communicate(timeout=60)
    print(output)
    result = json.loads(output.strip().splitlines()[-1])

    steady = result["steady"]
    assert steady["ok"] > 0 and steady["failed"] == 0 and steady["warmup_failed"] == 0
    assert max(steady["growth_mb"].values()) <= steady["memory_bound_mb"]
    kill = result["kill"]
    assert kill["failed"] <= kill["held_by_killed_worker"] == 1
    assert kill["replacement_pids"] and kill["replacement_answered"] == "20/20" and kill["answered_after_kill"] > 0
    for outage, served in (("registry_outage", "served_version"), ("s3_outage", "old_version")):
        numbers = result[outage]
        assert numbers["failed"] == 0 and set(numbers["versions"]) == {numbers[served]}, outage
        assert numbers["health_error"] and numbers["checks"]["health_unreachable_observed"], outage
    assert result["registry_outage"]["registry_checks_during_outage"] >= 2  # the refresh threads live on
    s3_outage = result["s3_outage"]
    assert s3_outage["reload_failures_logged"] > 0
    assert set(s3_outage["versions_after_restore"]) == {s3_outage["promoted_version"]}
    corrupt = result["corrupt_cache"]
    assert corrupt["origin"] == "downloaded" and corrupt["fetched_again"] >= 1
    assert corrupt["loaded_from_cache"] == 0 and corrupt["cache_intact_after"]
    assert corrupt["staging_removed"]  # what an interrupted download left is cleaned by the next download
    assert result["ok"] and process.returncode == 0, result["failed_checks"]
