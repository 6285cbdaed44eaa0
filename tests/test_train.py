"""`train.py` for real: a time-ordered test on the latest month, a logged run, a registered version with its
model card, and a champion/challenger gate that refuses a model trained on shuffled labels."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import service_env
from harness import ROOT
from mlflow.tracking import MlflowClient

from bikeshare_membership import city_files, promotion, schema, training
from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import LoadedModel
from bikeshare_membership.registration import DEFAULT_DATA as BUNDLED
from bikeshare_membership.registry import PRODUCTION_ALIAS, production_version


def client_for(settings: Settings) -> MlflowClient:
    return MlflowClient(settings.tracking_uri, settings.tracking_uri)


def run(settings: Settings, cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=service_env(settings, **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


# --- the time-ordered split ---------------------------------------------------------------------------


def labelled(months: list[str], rows_per_month: int = 2000, seed: int = 0) -> training.LabelledTrips:
    """Synthetic labelled trips, months in the order given (not sorted), Members commuting at short durations."""
    rng = np.random.default_rng(seed)
    month = np.repeat(np.array(months, dtype="datetime64[M]"), rows_per_month)
    start = month.astype("datetime64[s]") + rng.integers(0, 27 * 86_400, len(month)).astype("timedelta64[s]")
    is_member = (rng.random(len(month)) < 0.3).astype("int8")
    inputs = pd.DataFrame(
        {
            "trip_start_time": start,
            "trip_duration_seconds": np.where(is_member == 1, 400.0, 1200.0) * rng.uniform(0.5, 1.5, len(month)),
            "from_station_id": rng.choice([7000.0, 7001.0, 7033.0], len(month)),
            "to_station_id": rng.choice([7000.0, 7076.0, np.nan], len(month)),
        }
    )
    return training.LabelledTrips(inputs, is_member, month, ("synthetic.csv",))


def test_the_test_month_is_the_latest_by_trip_start_whatever_the_order_of_the_files() -> None:
    trips = labelled(["2023-05", "2023-01", "2023-03", "2023-02"])
    candidates = training.CANDIDATES[:2]
    trained = training.train_and_evaluate(trips, candidates)
    result = trained.evaluation
    assert result.test_month == "2023-05" and result.test.trained_on == ["2023-01", "2023-02", "2023-03"]
    assert result.test.rows == 2000 and len(result.test_proba) == 2000
    # Forward chaining: each validation month is predicted from the months before it only.
    for candidate in candidates:
        assert [(m.month, m.trained_on) for m in result.validation[candidate.name]] == [
            ("2023-02", ["2023-01"]),
            ("2023-03", ["2023-01", "2023-02"]),
        ]
    assert result.test.scores["test_roc_auc"] > 0.9  # the duration separates the synthetic riders
    assert result.prior.scores["prior_roc_auc"] == 0.5
    # The registered model is refitted on every month: it has seen more trips than the tested one.
    assert trained.pipeline.named_steps["classifier"].n_iter_ > 0
    assert trained.pipeline.named_steps["features"].features == result.chosen.features


def test_a_later_candidate_must_beat_the_earlier_ones_by_the_tolerance() -> None:
    def month(loss: float) -> training.MonthScore:
        return training.MonthScore("2023-02", ["2023-01"], 100, 0.2, {"validation_log_loss": loss})

    first, second = training.CANDIDATES[:2]
    close = {first.name: [month(0.5010)], second.name: [month(0.5000)]}
    assert training._choose([first, second], close)[0] == first
    clear = {first.name: [month(0.5100)], second.name: [month(0.5000)]}
    assert training._choose([first, second], clear)[0] == second


def test_one_month_or_a_thin_latest_month_cannot_be_tested_in_time_order() -> None:
    with pytest.raises(ValueError, match="at least two months"):
        training.train_and_evaluate(labelled(["2023-05"]))
    thin = labelled(["2023-01", "2023-02"], rows_per_month=600)
    with pytest.raises(ValueError, match="2023-02, has 600 labelled trips"):
        training.train_and_evaluate(thin)


def test_training_reads_files_as_batch_scoring_does(tmp_path: Path) -> None:
    """A cp1252 file (as some of the City's months are) decodes for training as for `batch.py` (trip_reader):
    a station known only by its name, with an en dash (byte 0x96), still resolves to its id."""
    text = gzip.decompress(BUNDLED[0].read_bytes()).decode("utf-8-sig")
    name = "25 York St \u2013 Union Station South"
    text = text.replace(f",7070,01/02/2023 11:16,{name},", f",,01/02/2023 11:16,{name},")  # no start id
    path = tmp_path / "cp1252.csv"
    path.write_bytes(text.encode("cp1252"))
    trips = training.load_labelled_trips([path])
    assert len(trips) == len(city_files.read_trips(BUNDLED[0]).trips)
    assert trips.months == [np.datetime64("2023-01")]
    starts = trips.inputs["trip_start_time"] == pd.Timestamp("2023-01-02 11:16")
    assert 7070 in trips.inputs.loc[starts, "from_station_id"].tolist()


# --- the trained session model ------------------------------------------------------------------------


def test_training_registers_and_promotes_a_version(settings: Settings, trained: subprocess.CompletedProcess) -> None:
    client = client_for(settings)
    version = client.get_model_version_by_alias(settings.registered_model, PRODUCTION_ALIAS)
    assert version.current_stage == "Production"
    assert list(version.aliases) == [PRODUCTION_ALIAS]  # `challenger` until promoted
    assert f"promoted {settings.registered_model} version {version.version} to Production" in trained.stdout
    assert "time-ordered test on 2023-05" in trained.stdout
    assert production_version(client, settings.registered_model).version == version.version


def test_the_time_ordered_test_beats_the_prior_and_everything_is_logged(
    settings: Settings, trained: subprocess.CompletedProcess
) -> None:
    client = client_for(settings)
    version = production_version(client, settings.registered_model)
    assert version.run_id is not None
    run = client.get_run(version.run_id)
    metrics, params = run.data.metrics, run.data.params
    assert params["test_month"] == "2023-05" and params["months"] == "2023-01,2023-02,2023-03,2023-05"
    assert metrics["test_roc_auc"] > metrics["prior_roc_auc"] + 0.1
    assert metrics["test_log_loss"] < metrics["prior_log_loss"]
    assert metrics["test_brier"] < metrics["prior_brier"]
    # Per month: the validation months of forward chaining and the test month.
    for month in ("2023-02", "2023-03", "2023-05"):
        assert 0.5 < metrics[f"month_{month}_roc_auc"] < 1 and metrics[f"month_{month}_log_loss"] > 0
    assert metrics["month_2023-05_roc_auc"] == metrics["test_roc_auc"]
    for candidate in training.CANDIDATES:
        assert 0.5 < metrics[f"validation_roc_auc_{candidate.name}"] < 1
    assert params["refit"].startswith("all months") and int(params["rows"]) == 58_352
    assert run.data.tags["gate"] == "promoted" and run.data.tags["gate_reason"].startswith("passed")
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"roc_curve.png", "calibration_curve.png", "confusion_matrix.png", "time_ordered.json", "gate.json"} <= (
        artifacts
    )
    mlflow.set_tracking_uri(settings.tracking_uri)
    time_ordered = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/time_ordered.json")
    assert time_ordered["test"]["trained_on"] == ["2023-01", "2023-02", "2023-03"]
    assert set(time_ordered["validation"]) == {candidate.name for candidate in training.CANDIDATES}


def test_the_model_card_describes_data_figures_gate_and_features(
    settings: Settings, trained: subprocess.CompletedProcess
) -> None:
    client = client_for(settings)
    version = production_version(client, settings.registered_model)
    tags = version.tags
    assert tags["data_files"] == ",".join(path.name for path in BUNDLED)
    assert tags["data_start"].startswith("2023-01-01") and tags["data_end"].startswith("2023-05-31")
    assert tags["rows"] == "58352" and float(tags["member_share"]) == pytest.approx(0.197, abs=0.001)
    assert tags["test_month"] == "2023-05" and tags["test_trained_on"] == "2023-01,2023-02,2023-03"
    assert float(tags["test_roc_auc"]) > float(tags["prior_roc_auc"]) and tags["gate"] == "promoted"
    assert tags["features"].split(",") == list(
        next(c for c in training.CANDIDATES if c.name == tags["candidate"]).features
    )
    assert version.description is not None
    assert "refitted on every month, 2023-05 included" in version.description
    assert f"ROC AUC {float(tags['test_roc_auc']):.4f}" in version.description


def test_logged_model_is_the_fitted_pipeline_with_signature(model: LoadedModel) -> None:
    signature = model.metadata["signature"]
    assert signature is not None
    inputs = json.loads(signature["inputs"])
    assert [column["name"] for column in inputs] == schema.MODEL_INPUT_COLUMNS
    assert model.pipeline.named_steps["classifier"].n_iter_ > 0  # fitted, not a clone
    features = model.pipeline.named_steps["features"]
    assert hasattr(features, "station_coordinates_") and len(features.holiday_days_) > 200
    assert model.metadata["registry"]["tags"]["test_month"] == "2023-05"  # the card, as GET /model shows it


def test_if_missing_does_not_train_again(
    settings: Settings, trained: subprocess.CompletedProcess, registry_dir: Path
) -> None:
    before = client_for(settings).search_model_versions(f"name='{settings.registered_model}'")
    result = run(settings, registry_dir, "--if-missing")
    assert result.returncode == 0 and "not training" in result.stdout
    assert len(client_for(settings).search_model_versions(f"name='{settings.registered_model}'")) == len(before)


# --- the gate, --force and rollback ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated(settings: Settings, model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A model of its own in the session registry, whose Production version is a copy of the session model
    (card included), so promotions here leave the other tests' model alone."""
    client = client_for(settings)
    name = f"{settings.registered_model}-gate"
    client.create_registered_model(name)
    source = client.get_model_version_download_uri(settings.registered_model, model.version)
    copy = client.create_model_version(name, source, run_id=model.run_id)
    for key, value in production_version(client, settings.registered_model).tags.items():
        client.set_model_version_tag(name, copy.version, key, value)
    promotion.promote(client, name, copy.version)
    yield Settings(
        tracking_uri=settings.tracking_uri,
        experiment_name=settings.experiment_name,
        registered_model=name,
        model_cache_dir=settings.model_cache_dir,
    )


@pytest.fixture(scope="module")
def shuffled_trips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12,000 bundled trips from every month, their labels shuffled: a model can learn nothing true from them."""
    frame = pd.concat(
        [pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig") for path in BUNDLED]
    ).sample(12_000, random_state=3)
    frame["User Type"] = np.random.default_rng(3).permutation(frame["User Type"].to_numpy())
    path = tmp_path_factory.mktemp("shuffled") / "shuffled-labels.csv"
    frame.to_csv(path, index=False)
    return path


def test_a_challenger_trained_on_shuffled_labels_is_refused_and_production_stays(
    gated: Settings, shuffled_trips: Path, registry_dir: Path
) -> None:
    client = client_for(gated)
    champion = str(production_version(client, gated.registered_model).version)
    result = run(gated, registry_dir, str(shuffled_trips))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "gate: refused: does not beat the prior" in result.stdout
    assert "not promoted; Production is unchanged" in result.stderr
    assert str(production_version(client, gated.registered_model).version) == champion
    challenger = client.get_model_version_by_alias(gated.registered_model, promotion.CHALLENGER_ALIAS)
    assert str(challenger.version) != champion and challenger.tags["gate"] == "refused"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert client.get_model_version(gated.registered_model, challenger.version).current_stage == "None"
    assert challenger.run_id is not None
    run_record = client.get_run(challenger.run_id)
    assert run_record.data.tags["gate"] == "refused"
    mlflow.set_tracking_uri(gated.tracking_uri)
    comparison = mlflow.artifacts.load_dict(f"runs:/{challenger.run_id}/gate.json")
    assert comparison["promote"] is False and comparison["champion"]["version"] == champion
    assert comparison["challenger"]["roc_auc"] < comparison["prior"]["roc_auc"] + promotion.MIN_AUC_GAIN_OVER_PRIOR


def test_force_promotes_a_refused_challenger_and_says_so_then_rollback_restores_the_champion(
    gated: Settings, shuffled_trips: Path, registry_dir: Path
) -> None:
    client = client_for(gated)
    champion = str(production_version(client, gated.registered_model).version)
    forced = run(gated, registry_dir, str(shuffled_trips), "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "gate: forced past the gate: does not beat the prior" in forced.stdout
    promoted = production_version(client, gated.registered_model)
    assert str(promoted.version) != champion and promoted.tags["gate"] == "forced" and promoted.run_id is not None
    assert client.get_run(promoted.run_id).data.tags["gate"] == "forced"
    assert str(client.get_model_version_by_alias(gated.registered_model, promotion.PREVIOUS_ALIAS).version) == champion

    back = run(gated, registry_dir, "--rollback")
    assert back.returncode == 0, back.stderr[-3000:]
    assert str(production_version(client, gated.registered_model).version) == champion
    assert "rolled_back" in client.get_model_version(gated.registered_model, promoted.version).tags


def test_the_gate_uses_mlflow_thresholds_against_prior_and_champion() -> None:
    prior = {"roc_auc": 0.5, "log_loss": 0.45}
    good = {"roc_auc": 0.64, "log_loss": 0.42}
    assert promotion.judge(good, prior, None).promote
    champion = promotion.ChampionScore("1", {"roc_auc": 0.643, "log_loss": 0.4185}, "scored")
    assert promotion.judge(good, prior, champion).promote  # within both tolerances
    worse = promotion.ChampionScore("1", {"roc_auc": 0.65, "log_loss": 0.42}, "scored")
    verdict = promotion.judge(good, prior, worse)
    assert not verdict.promote and "worse than Production version 1 (scored)" in verdict.reason
    assert "roc_auc 0.6400 vs 0.6500" in verdict.reason and "log_loss" not in verdict.reason.split("(scored)")[1]
    unscorable = promotion.ChampionScore("1", {}, "could not be scored: no artifacts")
    assert promotion.judge(good, prior, unscorable).promote
    assert "\n" not in verdict.reason
