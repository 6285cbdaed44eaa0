"""The shadow challenger (SHADOW_MODEL_ALIAS): every answered trip scored by the version the alias names, after
its answer, through real Gunicorn. The answers are those of a service without a shadow; the shadow's scores
reach /metrics and the prediction log; a shadow that cannot load or fails on a trip changes nothing; it follows
its alias through reloads and stops when promotion takes the alias away."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
from conftest import service_env
from harness import ROOT, start_gunicorn, stop
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import roc_auc_score
from test_batch import run_batch
from test_prediction_log import BUNDLED_MAY, answers_of, graceful_stop, read_log, request_trip, trip

from bikeshare_membership import app as service_app
from bikeshare_membership import city_files, promotion
from bikeshare_membership.config import InvalidSetting, Settings
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import LoadedModel, ModelStore, in_memory
from bikeshare_membership.schema import MEMBER
from bikeshare_membership.shadow import Shadow

CHALLENGER = ROOT / "tests" / "fixtures" / "model-ae18eee" / "model"  # a real model of an earlier release
ADMIN_TOKEN = "shadow-test-token"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def register_challenger(settings: Settings, source: Path) -> str:
    """Register the model at `source` as a new version with the alias `challenger`, as train.py leaves one that
    the gate kept out of Production."""
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    version = client.create_model_version(settings.registered_model, str(source), await_creation_for=0)
    client.set_registered_model_alias(settings.registered_model, promotion.CHALLENGER_ALIAS, version.version)
    return str(version.version)


def bodies() -> list[Any]:
    """300 single trips and three lists of 100: 600 different trips."""
    return [*(trip(index) for index in range(300)), *([trip(300 + 100 * b + i) for i in range(100)] for b in range(3))]


def labelled_month(folder: Path) -> tuple[Path, list[Any]]:
    """The bundled May's first 600 trips as a labelled City file, and as bodies without labels: 300 single trips
    and three lists of 100."""
    with gzip.open(BUNDLED_MAY, "rt") as source:
        lines = [next(source) for _ in range(601)]
    labelled = folder / "may-labelled.csv"
    labelled.write_text("".join(lines))
    trips = [request_trip(row) for row in city_files.read_trips(labelled).trips.itertuples()]
    assert len(trips) == 600
    return labelled, [*trips[:300], *(trips[start : start + 100] for start in range(300, 600, 100))]


def metric_samples(url: str) -> list[Any]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def shadow_trips(url: str) -> dict[tuple[str, str, str], float]:
    """bikeshare_shadow_trips_total by (served version, shadow version, agreement)."""
    return {
        (sample.labels["served_version"], sample.labels["shadow_version"], sample.labels["agreement"]): sample.value
        for sample in metric_samples(url)
        if sample.name == "bikeshare_shadow_trips_total"
    }


def eventually(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def logged_by_both_workers(log_path: Path, line: str) -> Callable[[], bool]:
    """Whether both Gunicorn workers have logged `line` (the one that answered a reload at once, the other
    within a second or two); a check for `eventually`."""
    return lambda: log_path.read_text().count(line) == 2


def in_process_answers(model: LoadedModel, payloads: list[Any]) -> list[tuple[Any, list[tuple[Any, float]]]]:
    """Each body answered in this process by `model`, with each validated trip and its exact probability."""
    answered = []
    for body in payloads:
        scored: list[service_app.Scored] = []
        answer = service_app.predictions(body, model, scored=scored)
        ((trips, probabilities),) = scored
        answered.append((answer, list(zip(trips.records(), probabilities, strict=True))))
    return answered


def test_shadow_answers_equal_no_shadow_and_its_scores_reach_metrics_the_log_and_evaluate(
    own_registry: Settings, tmp_path: Path
) -> None:
    challenger = register_challenger(own_registry, CHALLENGER)
    labelled, month = labelled_month(tmp_path)
    log_folder = tmp_path / "prediction-log"
    common = {"MODEL_REFRESH_SECONDS": "0", "WEB_CONCURRENCY": "2"}
    plain, plain_url = start_gunicorn(service_env(own_registry, **common), tmp_path / "plain.log")
    try:
        plain_answers = answers_of(plain_url, month)
    finally:
        stop(plain)
    environment = service_env(own_registry, SHADOW_MODEL_ALIAS="challenger", PREDICTION_LOG=str(log_folder), **common)
    process, url = start_gunicorn(environment, tmp_path / "shadow.log")
    try:
        health = requests.get(f"{url}/health", timeout=10).json()
        served = health["model"]["version"]
        assert health["shadow"]["alias"] == "challenger" and health["shadow"]["error"] is None
        assert health["shadow"]["model"]["version"] == challenger != served
        answers = answers_of(url, month)
        assert [answer for _, answer, _ in answers] == [answer for _, answer, _ in plain_answers]

        eventually(lambda: sum(shadow_trips(url).values()) == 600)
        counted = shadow_trips(url)
        assert {(served_version, shadow) for served_version, shadow, _ in counted} == {(served, challenger)}
        assert counted.get((served, challenger, "disagree"), 0) > 0  # a different model: some answers differ
        differences = [
            sample for sample in metric_samples(url) if sample.name == "bikeshare_shadow_proba_difference_percent_count"
        ]
        assert [(sample.labels, sample.value) for sample in differences] == [
            ({"served_version": served, "shadow_version": challenger}, 600.0)
        ]
        graceful_stop(process)
    finally:
        stop(process)

    # The log: each row has the shadow's version and exactly the probability the challenger gives that trip.
    client = MlflowClient(own_registry.tracking_uri)
    challenger_model = ModelStore(own_registry).load(
        client.get_model_version(own_registry.registered_model, challenger)
    )
    expected = pd.Series(
        {
            str(validated["trip_id"]): probability
            for _, scored in in_process_answers(challenger_model, month)
            for validated, probability in scored
        }
    )
    logged = read_log(log_folder).set_index("trip_id").loc[expected.index]
    assert len(logged) == 600 and (logged["shadow_model_version"] == challenger).all()
    assert logged["shadow_member_probability"].tolist() == expected.tolist()
    assert logged["shadow_proba"].tolist() == [round(probability * 100, 2) for probability in expected]
    agreeing = (logged["shadow_member_probability"] >= 0.5) == (logged["member_probability"] >= 0.5)
    assert agreeing.sum() == counted.get((served, challenger, "agree"), 0)

    # Scored against the month's labels: a run for the served version and one for the shadow, from its own
    # probabilities.
    # The registry is a copy of the session's, which may hold monitoring runs of other tests: only the runs
    # this evaluate starts count.
    started = int(time.time() * 1000)
    live = run_batch(own_registry, tmp_path, "evaluate", "--predictions", str(log_folder), str(labelled))
    assert live.returncode == 0, live.stderr[-3000:]
    assert f"version {challenger} on 600 shadow-scored and labelled trips" in live.stdout
    assert f"version {served} on 600 answered and labelled trips" in live.stdout
    experiment = client.get_experiment_by_name(own_registry.monitoring_experiment_name)
    assert experiment is not None
    new_runs = client.search_runs(
        [experiment.experiment_id], f"params.role != '' and attributes.start_time >= {started}"
    )
    assert sorted(run.data.params["role"] for run in new_runs) == ["served", "shadow"]
    runs = {run.data.params["role"]: run for run in new_runs}
    assert runs["shadow"].data.params["model_version"] == challenger
    assert runs["served"].data.params["model_version"] == served
    month_trips = city_files.read_trips(labelled).trips
    labels = month_trips.set_index(month_trips["trip_id"].astype(str))["user_type"]
    truth = (labels.loc[expected.index] == MEMBER).astype(int)
    assert runs["shadow"].data.metrics["eval_roc_auc"] == pytest.approx(roc_auc_score(truth, expected), abs=1e-12)
    served_probability = logged["member_probability"]
    assert runs["served"].data.metrics["eval_roc_auc"] == pytest.approx(
        roc_auc_score(truth, served_probability), abs=1e-12
    )


def test_a_shadow_that_cannot_load_changes_nothing_and_the_shadow_follows_its_alias(
    own_registry: Settings, model: LoadedModel, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(CHALLENGER, broken)
    (broken / "model.skops").write_bytes(b"not a model")
    broken_version = register_challenger(own_registry, broken)
    environment = service_env(
        own_registry, SHADOW_MODEL_ALIAS="challenger", ADMIN_TOKEN=ADMIN_TOKEN, MODEL_REFRESH_SECONDS="0"
    )
    log_path = tmp_path / "gunicorn.log"
    process, url = start_gunicorn(environment | {"WEB_CONCURRENCY": "2"}, log_path)
    try:
        shadow = requests.get(f"{url}/health", timeout=10).json()["shadow"]
        assert shadow["model"] is None and shadow["error"].startswith(f"version {broken_version}: ")
        answers = answers_of(url, bodies())
        expected = [answer for answer, _ in in_process_answers(model, bodies())]
        assert [answer for _, answer, _ in answers] == expected
        time.sleep(0.5)  # the records of the last requests are written within 0.02 s
        assert shadow_trips(url) == {}

        # The alias moves to a model that loads: every worker follows it on a reload.
        challenger = register_challenger(own_registry, CHALLENGER)
        assert requests.post(f"{url}/admin/reload", headers=BEARER, timeout=60).status_code == 200
        name = own_registry.registered_model
        eventually(logged_by_both_workers(log_path, f"shadow: scoring {name} version {challenger}"))
        answers_of(url, [trip(index) for index in range(50)])
        eventually(lambda: sum(shadow_trips(url).values()) == 50)

        # Promoted, the challenger loses the alias: the shadow stops, the service serves it.
        promotion.promote(MlflowClient(own_registry.tracking_uri), own_registry.registered_model, challenger)
        assert requests.post(f"{url}/admin/reload", headers=BEARER, timeout=60).status_code == 200
        eventually(logged_by_both_workers(log_path, f"version {challenger} stops"))
        health = requests.get(f"{url}/health", timeout=10).json()
        assert health["model"]["version"] == challenger and health["shadow"] == {
            "alias": "challenger",
            "model": None,
            "error": None,
        }
    finally:
        stop(process)


class FailsOnLongTrips:
    """A fitted pipeline that raises on any batch holding a trip over an hour, as a shadow might on inputs it
    was not built for."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline, self.classes_ = pipeline, pipeline.classes_

    def predict_proba(self, frame: pd.DataFrame) -> Any:
        if (frame["trip_duration_seconds"] > 3600).any():
            raise ValueError("cannot score trips over an hour")
        return self.pipeline.predict_proba(frame)


def test_trips_the_shadow_fails_on_get_no_shadow_score_and_are_counted(model: LoadedModel, tmp_path: Path) -> None:
    """In process: the failing batch is scored trip by trip; the answers are the served model's."""
    failing = dataclasses.replace(
        model, version="99", load_pipeline=in_memory(FailsOnLongTrips(model.pipeline)), fast=None
    )
    shadow = Shadow(ModelStore(Settings(model_cache_dir=str(tmp_path / "cache"))), "challenger")
    shadow.model = failing
    folder = tmp_path / "log"
    holder = ModelHolder(None, model, shadow)
    app = service_app.create_app(Settings(prediction_log=str(folder)), holder)
    client = app.test_client()
    trips = [{**trip(index), "trip_duration_seconds": 600 if index != 1 else 5400} for index in range(3)]
    response = client.post("/predict", json=trips)
    response.close()  # recorded once closed, as servers do
    app.extensions["prediction_log"].close()
    assert response.get_json() == service_app.predictions(trips, model)
    logged = pd.read_parquet(folder)
    assert logged["shadow_model_version"].tolist() == ["99"] * 3
    assert logged["shadow_member_probability"].isna().tolist() == [False, True, False]
    scored = logged.iloc[[0, 2]]  # through scikit-learn in the shadow, the fast form in the answer: the same
    assert scored["shadow_member_probability"].tolist() == scored["member_probability"].tolist()
    failures = [sample for sample in metric_samples_in_process(app) if sample.name == "bikeshare_shadow_failures_total"]
    assert [(sample.labels, sample.value) for sample in failures] == [({"shadow_version": "99"}, 1.0)]


def metric_samples_in_process(app: Any) -> list[Any]:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def test_a_shadow_needs_the_registry() -> None:
    with pytest.raises(InvalidSetting, match=r"^SHADOW_MODEL_ALIAS: .* MODEL_PATH is set"):
        Settings.from_env({"SHADOW_MODEL_ALIAS": "challenger", "MODEL_PATH": "/models/local"})
