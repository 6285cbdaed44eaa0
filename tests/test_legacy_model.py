"""Models registered by earlier releases still load and serve. Each fixture under `tests/fixtures/` is a small
pipeline that a release saved as `train.py` logs one, with the probabilities that release computed for 300
bundled trips:

- `legacy-model-f5e2f3c`: its TripFeatures had no `features` and no holiday calendar;
- `model-ae18eee`: the last release before the package layout; its `code/` folder holds that release's whole
  853-line `preprocess.py`, which must not replace this release's `preprocess.TripFeatures` when it loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io
from harness import ROOT
from mlflow.tracking import MlflowClient

from bikeshare_membership import app as service_app
from bikeshare_membership import feature_step, features
from bikeshare_membership.config import Settings
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import LoadedModel

FIXTURES = ROOT / "tests" / "fixtures"


@dataclass(frozen=True)
class Release:
    folder: str
    features: tuple[str, ...]
    has_holidays: bool


RELEASES = [
    Release("legacy-model-f5e2f3c", features.LEGACY_FEATURES, has_holidays=False),
    Release("model-ae18eee", features.DEFAULT_FEATURES, has_holidays=True),
]


@dataclass(frozen=True)
class Registered:
    release: Release
    settings: Settings
    expected: dict


@pytest.fixture(scope="module", params=RELEASES, ids=[release.folder for release in RELEASES])
def registered(
    request: pytest.FixtureRequest, settings: Settings, trained, tmp_path_factory: pytest.TempPathFactory
) -> Registered:
    """The release's model registered as version 1 of a model of its own in the session registry, in Production."""
    release: Release = request.param
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    name = f"{settings.registered_model}-{release.folder}"
    client.create_registered_model(name)
    version = client.create_model_version(name, str(FIXTURES / release.folder / "model"), await_creation_for=0)
    client.set_registered_model_alias(name, "production", version.version)
    own = Settings(
        tracking_uri=settings.tracking_uri,
        registered_model=name,
        model_cache_dir=str(tmp_path_factory.mktemp("legacy-cache")),
    )
    return Registered(release, own, json.loads((FIXTURES / release.folder / "expected.json").read_text()))


def test_an_earlier_releases_model_loads_through_the_registry_and_scores_as_it_did(registered: Registered) -> None:
    model = ModelHolder.from_settings(registered.settings).model
    step = model.pipeline.named_steps["features"]
    assert type(step) is feature_step.TripFeatures  # this release's class, not the copy in the model's code/
    assert step.features == registered.release.features
    assert (len(step.holiday_days_) > 0) == registered.release.has_holidays
    assert model.fast is not None  # the exact fast form still derives from it and passes its self-check
    trips = pd.DataFrame(registered.expected["trips"]).astype({"trip_start_time": "datetime64[s]"})
    np.testing.assert_array_equal(model.member_probability(trips), registered.expected["member_probability"])


def test_an_earlier_releases_model_answers_requests(registered: Registered) -> None:
    settings, expected = registered.settings, registered.expected
    client = service_app.create_app(settings, ModelHolder.from_settings(settings)).test_client()
    for trip, probability in list(zip(expected["trips"], expected["member_probability"], strict=True))[:50]:
        stop = pd.Timestamp(trip["trip_start_time"]) + pd.Timedelta(seconds=trip["trip_duration_seconds"])
        body = {**trip, "trip_stop_time": stop.isoformat()}
        for end in ("from", "to"):
            body[f"{end}_station_id"] = None if body[f"{end}_station_id"] is None else int(body[f"{end}_station_id"])
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200 and answer.json is not None, answer.json
        assert answer.json["proba"] == round(probability * 100, 2)
        assert answer.json["model"] == {"name": settings.registered_model, "version": "1", "run_id": ""}


def test_a_fresh_process_loads_an_earlier_model_with_this_releases_class(tmp_path: Path) -> None:
    """As a batch job's process does: nothing imported first, and the model's code/ put on sys.path by MLflow."""
    script = (
        "import sys\n"
        "from bikeshare_membership.model_store import load_model_path\n"
        "model = load_model_path(sys.argv[1])\n"
        "step = model.pipeline.named_steps['features']\n"
        "print(sys.modules['preprocess'].__file__, type(step).__module__, model.fast is not None)\n"
    )
    folder = FIXTURES / "model-ae18eee" / "model"
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(ROOT / "preprocess.py"), "preprocess", "True"]


def test_a_model_registered_now_names_preprocess_trip_features_and_carries_its_code(
    settings: Settings, model: LoadedModel
) -> None:
    """The name every registered model gives its feature step stays `preprocess.TripFeatures`, and the model's
    code/ folder holds what that name needs, so it also loads where this project is not installed."""
    folder = Path(settings.model_cache_dir) / settings.registered_model / model.version
    assert "preprocess.TripFeatures" in skops.io.get_untrusted_types(file=folder / "model.skops")
    assert (folder / "code" / "preprocess.py").read_text() == (ROOT / "preprocess.py").read_text()
    assert (folder / "code" / "bikeshare_membership" / "features.py").exists()
