"""`train.py` for real: a SQLite registry, a promoted version, logged metrics and figures that beat the prior."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

from mlflow.tracking import MlflowClient

import train
from config import Settings
from model_store import PRODUCTION_ALIAS, production_version


def client_for(settings: Settings) -> MlflowClient:
    return MlflowClient(settings.tracking_uri, settings.tracking_uri)


def test_training_registers_and_promotes_a_version(settings: Settings, trained: subprocess.CompletedProcess) -> None:
    client = client_for(settings)
    version = client.get_model_version_by_alias(settings.registered_model, PRODUCTION_ALIAS)
    assert version.current_stage == "Production"
    assert f"promoted {settings.registered_model} version {version.version} to Production" in trained.stdout
    assert production_version(client, settings.registered_model).version == version.version


def test_holdout_beats_the_prior_and_everything_is_logged(
    settings: Settings, trained: subprocess.CompletedProcess
) -> None:
    client = client_for(settings)
    version = production_version(client, settings.registered_model)
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    assert metrics["holdout_roc_auc"] > metrics["prior_roc_auc"] + 0.1
    assert metrics["holdout_log_loss"] < metrics["prior_log_loss"]
    assert metrics["holdout_brier"] < metrics["prior_brier"]
    assert 0.5 < metrics["cv_roc_auc_mean"] < 1
    for name in ("holdout_precision", "holdout_recall", "prior_precision", "prior_recall"):
        assert 0 <= metrics[name] <= 1
    assert int(run.data.params["train_rows"]) > 40_000
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"roc_curve.png", "confusion_matrix.png"} <= artifacts


def test_logged_model_is_the_fitted_pipeline_with_signature(model) -> None:
    inputs = json.loads(model.metadata["signature"]["inputs"])
    assert [column["name"] for column in inputs] == train.preprocess.MODEL_INPUT_COLUMNS
    assert model.pipeline.named_steps["classifier"].n_iter_ > 0  # fitted, not a clone
    assert hasattr(model.pipeline.named_steps["features"], "station_coordinates_")


def test_promoting_a_new_version_archives_the_previous_one(settings: Settings, model, registry_dir: Path) -> None:
    client = client_for(settings)
    name = f"{settings.registered_model}-promotion"
    client.create_registered_model(name)
    source = client.get_model_version_download_uri(settings.registered_model, model.version)
    first = client.create_model_version(name, source, run_id=model.run_id).version
    second = client.create_model_version(name, source, run_id=model.run_id).version
    train.promote(client, name, first)
    train.promote(client, name, second)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert client.get_model_version(name, first).current_stage == "Archived"
    assert client.get_model_version(name, second).current_stage == "Production"
    assert client.get_model_version_by_alias(name, PRODUCTION_ALIAS).version == second


def test_if_missing_does_not_train_again(
    settings: Settings, trained: subprocess.CompletedProcess, registry_dir: Path
) -> None:
    from conftest import service_env

    before = client_for(settings).search_model_versions(f"name='{settings.registered_model}'")
    result = subprocess.run(
        [train.sys.executable, str(Path(train.__file__)), "--if-missing"],
        cwd=registry_dir,
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "not training" in result.stdout
    assert len(client_for(settings).search_model_versions(f"name='{settings.registered_model}'")) == len(before)
