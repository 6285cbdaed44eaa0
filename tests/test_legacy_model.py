"""A model registered by an earlier release still loads and serves: `tests/fixtures/legacy-model-f5e2f3c` is a
small pipeline that release f5e2f3c saved (its TripFeatures had no `features` and no holiday calendar), with
the probabilities that release computed for 300 bundled trips."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from harness import ROOT
from mlflow.tracking import MlflowClient

import predict
import preprocess
from config import Settings
from model_store import ModelHolder

FIXTURE = ROOT / "tests" / "fixtures" / "legacy-model-f5e2f3c"


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def registered(settings: Settings, trained, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The fixture registered as version 1 of a model of its own in the session registry, in Production."""
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    name = f"{settings.registered_model}-legacy"
    client.create_registered_model(name)
    version = client.create_model_version(name, str(FIXTURE / "model"), await_creation_for=0)
    client.set_registered_model_alias(name, "production", version.version)
    return Settings(
        tracking_uri=settings.tracking_uri,
        registered_model=name,
        model_cache_dir=str(tmp_path_factory.mktemp("legacy-cache")),
    )


def test_an_earlier_releases_model_loads_through_the_registry_and_scores_as_it_did(
    registered: Settings, expected: dict
) -> None:
    model = ModelHolder.from_settings(registered).model
    features = model.pipeline.named_steps["features"]
    assert features.features == preprocess.LEGACY_FEATURES and len(features.holiday_days_) == 0
    assert model.fast is not None  # the exact fast form still derives from it and passes its self-check
    trips = pd.DataFrame(expected["trips"]).astype({"trip_start_time": "datetime64[s]"})
    np.testing.assert_array_equal(model.member_probability(trips), expected["member_probability"])


def test_an_earlier_releases_model_answers_requests(registered: Settings, expected: dict) -> None:
    client = predict.create_app(registered, ModelHolder.from_settings(registered)).test_client()
    for trip, probability in list(zip(expected["trips"], expected["member_probability"], strict=True))[:50]:
        stop = pd.Timestamp(trip["trip_start_time"]) + pd.Timedelta(seconds=trip["trip_duration_seconds"])
        body = {**trip, "trip_stop_time": stop.isoformat()}
        for end in ("from", "to"):
            body[f"{end}_station_id"] = None if body[f"{end}_station_id"] is None else int(body[f"{end}_station_id"])
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200, answer.json
        assert answer.json["proba"] == round(probability * 100, 2)
        assert answer.json["model"] == {"name": registered.registered_model, "version": "1", "run_id": ""}
