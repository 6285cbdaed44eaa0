"""Model retrieval against the real topology: `mlflow server` (SQLite store) with S3 artifacts on a moto
server, credentials from a named profile in AWS config files, and the service under Gunicorn."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from conftest import RemoteRegistry
from harness import ROOT, free_port, run_train, start, start_gunicorn, stop
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from bikeshare_membership import promotion
from bikeshare_membership.config import Settings
from bikeshare_membership.model_files import MANIFEST, verify_cached
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import ModelStore
from bikeshare_membership.schema import EXAMPLE_TRIP as TRIP


def service_env_for(registry: RemoteRegistry, cache_dir: Path, **extra: str) -> dict[str, str]:
    return {**registry.env, "MODEL_CACHE_DIR": str(cache_dir), "MODEL_REFRESH_SECONDS": "0", **extra}


def test_credentials_come_from_the_profile_only(remote_registry: RemoteRegistry) -> None:
    env = remote_registry.env
    assert env["AWS_PROFILE"] and "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert "aws_access_key_id" in Path(env["AWS_SHARED_CREDENTIALS_FILE"]).read_text()


def test_cold_start_fetches_from_s3_then_a_warm_restart_needs_no_bucket(
    remote_registry: RemoteRegistry, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    process, url = start_gunicorn(service_env_for(remote_registry, cache_dir), tmp_path / "cold.log")
    try:
        health = requests.get(f"{url}/health", timeout=5).json()
        answer = requests.post(f"{url}/predict", json=TRIP, timeout=5).json()
        model = requests.get(f"{url}/model", timeout=5).json()
    finally:
        stop(process)
    log = (tmp_path / "cold.log").read_text()
    assert "fetched model bikeshare-remote-test version 1 from s3://bikeshare-models/mlflow/" in log
    assert " bytes in " in log
    assert log.count("fetched model") == 1  # the master fetched it; the preloaded workers did not
    assert health["model"]["origin"] == "downloaded" and health["registry"]["reachable"] is True
    assert health["model"]["source"].startswith("s3://")
    assert answer["model"]["version"] == "1" and answer["membership"] in ("Member", "Casual")
    assert model["metrics"]["test_roc_auc"] > 0.6 and model["signature"]["inputs"]
    assert model["registry"]["aliases"] == ["production"]
    manifest = verify_cached(cache_dir / "bikeshare-remote-test" / "1")
    assert manifest["bytes"] == sum(entry["size"] for entry in manifest["files"].values()) > 0

    # A restart with the bucket unreachable still starts: the cache holds version 1, intact.
    no_bucket = service_env_for(remote_registry, cache_dir, MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    process, url = start_gunicorn(no_bucket, tmp_path / "warm.log")
    try:
        health = requests.get(f"{url}/health", timeout=5).json()
        assert requests.post(f"{url}/predict", json=TRIP, timeout=5).status_code == 200
    finally:
        stop(process)
    assert health["model"]["origin"] == "cache" and health["model"]["version"] == "1"
    assert "fetched model" not in (tmp_path / "warm.log").read_text()


def warm_cache(registry: RemoteRegistry, cache_dir: Path) -> Path:
    """Fill `cache_dir` with the Production version the way the service does; returns its directory."""
    settings = Settings(
        tracking_uri=registry.settings.tracking_uri,
        registered_model=registry.settings.registered_model,
        model_cache_dir=str(cache_dir),
    )
    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "MLFLOW_S3_ENDPOINT_URL"):
            patch.setenv(key, registry.env[key])
        model = ModelStore(settings).load_production()
    return cache_dir / settings.registered_model / model.version


def test_registry_down_with_a_warm_cache_serves_the_cached_version(
    remote_registry: RemoteRegistry, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    warm_cache(remote_registry, cache_dir)
    env = service_env_for(remote_registry, cache_dir, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    process, url = start_gunicorn(env, tmp_path / "gunicorn.log")
    try:
        health = requests.get(f"{url}/health", timeout=5).json()
        answer = requests.post(f"{url}/predict", json=TRIP, timeout=5).json()
    finally:
        stop(process)
    assert answer["model"]["version"] == "1"
    assert health["model"]["origin"] == "cache"
    assert health["registry"]["reachable"] is False and "Connection" in health["registry"]["error"]
    assert "serving cached version 1" in (tmp_path / "gunicorn.log").read_text()


def exit_of_gunicorn(env: dict[str, str], log_path: Path, limit: float) -> tuple[int, float, str]:
    command = [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py")]
    started = time.monotonic()
    process = start(command, {**env, "MODEL_PORT": str(free_port())}, log_path)
    try:
        returncode = process.wait(timeout=limit)
    finally:
        stop(process)
    return returncode, time.monotonic() - started, log_path.read_text()


def test_registry_down_with_no_cache_exits_with_one_line(remote_registry: RemoteRegistry, tmp_path: Path) -> None:
    temporary = tmp_path / "tmp"  # where gunicorn.conf.py makes its metrics folder
    temporary.mkdir()
    env = service_env_for(
        remote_registry,
        tmp_path / "empty",
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
        TMPDIR=str(temporary),
    )
    returncode, seconds, log = exit_of_gunicorn(env, tmp_path / "gunicorn.log", limit=60)
    assert returncode != 0 and seconds < 30
    last_line = log.strip().splitlines()[-1]
    assert last_line.startswith("bikeshare-membership: no model to serve: cannot fetch bikeshare-remote-test")
    assert "none is cached" in last_line
    assert not list(temporary.iterdir())  # the metrics folder went with the master


def test_a_registry_that_never_answers_is_given_up_on(remote_registry: RemoteRegistry, tmp_path: Path) -> None:
    """A host that accepts the connection and then says nothing: bounded by MODEL_FETCH_TIMEOUT, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = service_env_for(
            remote_registry,
            tmp_path / "empty",
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{silent.getsockname()[1]}",
            MODEL_FETCH_TIMEOUT="2",
        )
        returncode, seconds, log = exit_of_gunicorn(env, tmp_path / "gunicorn.log", limit=60)
    assert returncode != 0 and seconds < 30, log[-2000:]
    assert "none is cached" in log.strip().splitlines()[-1]


def test_a_corrupt_cached_download_is_fetched_again(
    remote_registry: RemoteRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = warm_cache(remote_registry, tmp_path / "cache")
    model_file = next(path for path in directory.rglob("model.*") if path.suffix in (".skops", ".pkl"))
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    with pytest.raises(ValueError, match="differ from the manifest"):
        verify_cached(directory)
    caplog.set_level(logging.INFO, logger="bikeshare_membership.model_store")
    warm_cache(remote_registry, tmp_path / "cache")
    assert "incomplete or corrupt" in caplog.text and "fetched model" in caplog.text
    verify_cached(directory)
    (directory / MANIFEST).unlink()  # a download cut before its manifest was written counts as absent
    with pytest.raises(ValueError, match="no readable manifest"):
        verify_cached(directory)


def test_processes_that_need_the_same_version_download_it_once(
    remote_registry: RemoteRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bikeshare_membership.model_store")
    loaders = [threading.Thread(target=warm_cache, args=(remote_registry, tmp_path / "cache")) for _ in range(3)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join(timeout=120)
    assert caplog.text.count("fetched model") == 1
    assert caplog.text.count("loaded model") == 3


def test_hot_reload_swaps_versions_under_load_and_survives_a_bad_version(
    remote_registry: RemoteRegistry, tmp_path: Path
) -> None:
    """A new name in the same registry, so promotions here do not move the other tests' model."""
    client = MlflowClient(remote_registry.settings.tracking_uri)
    original = remote_registry.settings.registered_model
    name = "bikeshare-reload-test"
    client.create_registered_model(name)
    good_source = client.get_model_version_download_uri(original, "1")
    run_id = client.get_model_version(original, "1").run_id
    promotion.promote(
        client, name, client.create_model_version(name, good_source, run_id=run_id, await_creation_for=0).version
    )

    env = service_env_for(remote_registry, tmp_path / "cache", MLFLOW_REGISTERED_MODEL=name, MODEL_REFRESH_SECONDS="1")
    process, url = start_gunicorn(env, tmp_path / "gunicorn.log")
    outcomes: Counter[str] = Counter()
    versions_seen: list[str] = []
    stop_hammering = threading.Event()

    def hammer() -> None:
        with requests.Session() as session:
            deadline = time.monotonic() + 300
            while not stop_hammering.is_set() and time.monotonic() < deadline:
                try:
                    response = session.post(f"{url}/predict", json=TRIP, timeout=10)
                    outcomes[str(response.status_code)] += 1
                    versions_seen.append(response.json()["model"]["version"])
                except requests.RequestException as error:
                    outcomes[type(error).__name__] += 1

    hammers = [threading.Thread(target=hammer) for _ in range(2)]
    try:
        for thread in hammers:
            thread.start()
        # A version whose artifacts do not exist: the reload fails and version 1 keeps serving.
        broken = client.create_model_version(
            name, f"s3://{remote_registry.artifact_root[5:]}/missing", run_id=run_id, await_creation_for=0
        )
        promotion.promote(client, name, broken.version)
        deadline = time.monotonic() + 30
        while "failed to load version 2" not in (tmp_path / "gunicorn.log").read_text():
            assert time.monotonic() < deadline, "the broken version was never tried"
            time.sleep(0.5)
        assert versions_seen[-1] == "1"

        # train.py trains, registers and promotes version 3: every worker converges on it, no request fails.
        run_train(env, tmp_path)
        promoted_at = time.monotonic()
        converged = None
        while converged is None and time.monotonic() - promoted_at < 30:
            # Both workers swapped (one busy loading lets the other answer everything), and answers say so.
            both = (tmp_path / "gunicorn.log").read_text().count(f"now serving {name} version 3") == 2
            recent = [
                requests.post(f"{url}/predict", json=TRIP, timeout=10).json()["model"]["version"] for _ in range(20)
            ]
            converged = time.monotonic() - promoted_at if both and set(recent) == {"3"} else None
        stop_hammering.set()
        for thread in hammers:
            thread.join(timeout=30)
        health = requests.get(f"{url}/health", timeout=5).json()
        scraped = {
            (sample.name, tuple(sorted(sample.labels.values()))): sample.value
            for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=5).text)
            for sample in family.samples
        }
    finally:
        stop_hammering.set()
        stop(process)
    log = (tmp_path / "gunicorn.log").read_text()
    assert converged is not None, "the workers did not all move to version 3"
    print(f"requests during the swaps: {dict(outcomes)}; all on version 3 {converged:.1f}s after train.py ended")
    assert set(outcomes) == {"200"} and outcomes["200"] > 50
    assert {"1", "3"} <= set(versions_seen) and "2" not in versions_seen
    assert health["model"]["version"] == "3" and health["registry"]["reachable"] is True
    assert log.count("now serving bikeshare-reload-test version 3") == 2  # both workers
    assert log.count("fetched model bikeshare-reload-test version 3") == 1  # once per host
    # Metrics summed over both workers: each swapped once, tried the broken version, now serves version 3.
    assert scraped["bikeshare_model_reloads_total", ()] == 2
    assert scraped["bikeshare_model_reload_failures_total", ("load",)] >= 2
    assert scraped["bikeshare_model_loaded", ("3", "bikeshare-reload-test")] == 2
    assert scraped["bikeshare_model_loaded", ("1", "bikeshare-reload-test")] == 0


def test_a_model_path_is_served_without_any_registry(remote_registry: RemoteRegistry, tmp_path: Path) -> None:
    directory = warm_cache(remote_registry, tmp_path / "cache")
    env = service_env_for(remote_registry, tmp_path / "unused", MODEL_PATH=str(directory))
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    process, url = start_gunicorn(env, tmp_path / "gunicorn.log")
    try:
        answer = requests.post(f"{url}/predict", json=TRIP, timeout=5).json()
        health = requests.get(f"{url}/health", timeout=5).json()
    finally:
        stop(process)
    assert answer["model"] == {"name": "bikeshare-remote-test", "version": "1", "run_id": answer["model"]["run_id"]}
    assert health["model"]["origin"] == "path"


def test_train_through_the_tracking_server_stored_artifacts_in_s3(remote_registry: RemoteRegistry, s3) -> None:
    keys = [entry["Key"] for entry in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert any(key.endswith("/MLmodel") for key in keys) and any(key.endswith("roc_curve.png") for key in keys)


def test_a_version_whose_artifacts_are_incomplete_is_never_cached(
    remote_registry: RemoteRegistry, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that misses files (artifacts still being written, or lost) downloads "intact" against its own
    manifest; only a load shows it is not the whole model. It must not stay in the cache, where a restart would
    take it for intact, and /health must say that the artifacts could not be fetched."""
    for key in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(key, remote_registry.env[key])
    client = MlflowClient(remote_registry.settings.tracking_uri)
    name = "bikeshare-partial-test"
    client.create_registered_model(name)
    good = client.get_model_version(remote_registry.settings.registered_model, "1")
    source = client.get_model_version_download_uri(remote_registry.settings.registered_model, "1")
    promotion.promote(
        client, name, client.create_model_version(name, source, good.run_id, await_creation_for=0).version
    )
    settings = Settings(
        tracking_uri=remote_registry.settings.tracking_uri, registered_model=name, model_cache_dir=str(tmp_path)
    )
    holder = ModelHolder.from_settings(settings)

    bucket, prefix = source[len("s3://") :].split("/", 1)
    objects = s3.client()
    keys = [entry["Key"] for entry in objects.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]]
    partial = f"partial/{name}"

    def copy(key: str) -> None:
        target = f"{partial}/{key[len(prefix) + 1 :]}"
        objects.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": key})

    copy(f"{prefix}/MLmodel")  # version 2's artifacts: only MLmodel is there yet
    version_2 = client.create_model_version(name, f"s3://{bucket}/{partial}", good.run_id, await_creation_for=0)
    promotion.promote(client, name, version_2.version)

    assert holder.refresh() is False and holder.model.version == "1"
    health = holder.health()["registry"]
    assert health["reachable"] is False and health["error"] is not None and "FileNotFoundError" in health["error"]
    assert not (tmp_path / name / "2").exists()
    restarted = ModelStore(settings).load_production()  # a restart now: version 1, intact, from the cache
    assert (restarted.version, restarted.origin) == ("1", "cache")

    for key in keys:  # the rest arrives: the next check loads version 2
        copy(key)
    assert holder.refresh() is True and holder.model.version == "2"
    assert holder.health()["registry"]["reachable"] is True
    verify_cached(tmp_path / name / "2")
