"""The fast form of the pipeline gives scikit-learn's probabilities, on real trips and unknown stations."""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numba
import numpy as np
import pandas as pd
import pytest
from conftest import rename_attribute
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import TargetEncoder

from bikeshare_membership import app as service_app
from bikeshare_membership import city_files, fast_pipeline, pipeline_reader, schema, stations
from bikeshare_membership.config import Settings
from bikeshare_membership.fast_pipeline import UnsupportedPipeline
from bikeshare_membership.model_files import FAST_FORM
from bikeshare_membership.model_holder import ModelHolder
from bikeshare_membership.model_store import LoadedModel, ModelStore, fast_form, in_memory
from bikeshare_membership.pipeline_reader import fast_pipeline_of


@pytest.fixture(scope="module")
def real_trips() -> pd.DataFrame:
    """Every bundled trip, plus the same trips with unknown (99999) and missing stations."""
    trips = pd.concat(
        [city_files.read_trips(path).trips for path in sorted(stations.DATA_DIR.glob("*.csv.gz"))],
        ignore_index=True,
    )[schema.MODEL_INPUT_COLUMNS]
    unknown = trips.sample(2000, random_state=1).assign(from_station_id=99_999.0)
    missing = trips.sample(2000, random_state=2).assign(to_station_id=np.nan)
    return pd.concat([trips, unknown, missing], ignore_index=True)


def test_fast_form_matches_scikit_learn_on_real_trips(model: LoadedModel, real_trips: pd.DataFrame) -> None:
    assert model.fast is not None, "the served model has no fast form"
    expected = model.pipeline.predict_proba(real_trips)[:, 1]
    actual = model.fast.member_probability(real_trips)
    print(f"{len(real_trips)} trips, largest difference {np.max(np.abs(actual - expected)):.3g}")
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
    assert len(real_trips) > 60_000


def test_request_columns_and_frames_agree(model: LoadedModel) -> None:
    """The service's path (validated dicts -> arrays -> fast form) equals the frame path through sklearn."""
    records = [
        {
            "trip_start_time": "18/04/2017 17:15",
            "trip_stop_time": "18/04/2017 17:30",
            "trip_duration_seconds": 900,
            "from_station_name": "Union Station",
            "to_station_name": "Nowhere",
        },
        {
            "trip_start_time": "2017-07-10T08:15:00Z",
            "trip_stop_time": "2017-07-10T08:25:00Z",
            "trip_duration_seconds": 600,
            "from_station_id": 7033,
            "to_station_id": 7033,
        },
        {"trip_start_time": "10/01/17 00:00:01", "trip_stop_time": "10/01/17 00:00:27", "trip_duration_seconds": 26},
    ]
    columns = schema.RequestTrips.of([schema.parse_request_trip(record) for record in records]).model_input()
    expected = model.pipeline.predict_proba(pd.DataFrame(columns))[:, 1]
    np.testing.assert_allclose(model.member_probability(columns), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def real_trips_expected(model: LoadedModel, real_trips: pd.DataFrame) -> np.ndarray:
    return model.pipeline.predict_proba(real_trips)[:, 1]


@pytest.mark.parametrize("size", [1, 2, 100, 1000, 10_000])
def test_lists_of_every_size_match_scikit_learn_bit_for_bit(
    model: LoadedModel, real_trips: pd.DataFrame, real_trips_expected: np.ndarray, size: int
) -> None:
    """Every bundled trip, in lists of `size` as requests bring them: the array features and the tree tables
    (`TreeTables`) give scikit-learn's probabilities exactly."""
    assert model.fast is not None
    columns = {name: real_trips[name].to_numpy() for name in schema.MODEL_INPUT_COLUMNS}
    actual = np.concatenate(
        [
            model.fast.member_probability({name: values[start : start + size] for name, values in columns.items()})
            for start in range(0, len(real_trips), size)
        ]
    )
    assert np.max(np.abs(actual - real_trips_expected)) == 0


def test_an_unsupported_classifier_keeps_the_exact_path(model: LoadedModel, real_trips: pd.DataFrame) -> None:
    features, columns, _ = (copy.deepcopy(step) for _, step in model.pipeline.steps)  # fitting must not touch the model
    sample = real_trips.sample(3000, random_state=3)
    target = (model.pipeline.predict_proba(sample)[:, 1] > 0.3).astype(int)
    forest = Pipeline(
        [
            ("features", features),
            ("columns", columns),
            ("classifier", RandomForestClassifier(n_estimators=5, random_state=0)),
        ]
    )
    forest.fit(sample, target)
    with pytest.raises(UnsupportedPipeline, match="RandomForestClassifier"):
        fast_pipeline_of(forest)
    assert fast_form(forest) is None
    served = LoadedModel(name="m", version="1", run_id="", load_pipeline=in_memory(forest), source="", origin="path")
    np.testing.assert_array_equal(served.member_probability(sample.head(5)), forest.predict_proba(sample.head(5))[:, 1])


def test_a_fast_form_that_disagrees_is_refused(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The self-check at load time: trees evaluated wrong by a small margin never serve."""
    raw_scores = fast_pipeline.TreeTables.raw_scores
    monkeypatch.setattr(fast_pipeline.TreeTables, "raw_scores", lambda self, columns: raw_scores(self, columns) + 1e-4)
    with pytest.raises(UnsupportedPipeline, match="differs from scikit-learn"):
        fast_pipeline_of(model.pipeline)


def test_a_single_trip_path_that_disagrees_is_refused(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same self-check covers one trip's path on its own: wrong there only, it never serves either."""
    row_score = fast_pipeline.FastPipeline.row_score
    monkeypatch.setattr(fast_pipeline.FastPipeline, "row_score", lambda self, row: row_score(self, row) + 1e-4)
    with pytest.raises(UnsupportedPipeline, match="differs from scikit-learn"):
        fast_pipeline_of(model.pipeline)


@pytest.mark.parametrize("kernel", ["_raw_scores", "_one_row_score"])
def test_a_compiler_failure_keeps_the_exact_path(
    kernel: str, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Numba failing to compile the trees (for columns, or for one trip) on some platform costs the speed, never the
    service."""

    def fails_to_compile(*arguments: Any) -> np.ndarray:
        raise numba.core.errors.TypingError("no implementation for these types")

    monkeypatch.setattr(fast_pipeline, kernel, fails_to_compile)
    with pytest.raises(UnsupportedPipeline, match=r"evaluating the check trips .*TypingError"):
        fast_pipeline_of(model.pipeline)
    assert fast_form(model.pipeline) is None


@pytest.mark.parametrize("leaves", [20, 60])
def test_tree_tables_equal_the_classifiers_raw_scores(leaves: int) -> None:
    """Trees of up to 32 leaves (32-bit masks) and up to 64 (64-bit), with missing values in every feature:
    the tables give `decision_function`, scikit-learn's raw score, to the bit."""
    rng = np.random.default_rng(leaves)
    features = rng.normal(size=(4000, 5))
    target = (features[:, 0] + features[:, 1] * features[:, 2] + rng.normal(size=4000) > 0).astype(int)
    features[rng.random(features.shape) < 0.1] = np.nan
    classifier = HistGradientBoostingClassifier(max_iter=30, max_leaf_nodes=leaves, min_samples_leaf=5).fit(
        features, target
    )
    tables = fast_pipeline.TreeTables(pipeline_reader.boosted_trees(classifier), features.shape[1])
    assert tables.mask_type == (np.uint32 if leaves <= 32 else np.uint64)
    expected = classifier.decision_function(features)
    for rows in (1, 2, 3, len(features)):
        raw = [
            tables.raw_scores(np.ascontiguousarray(features[row : row + rows].T))
            for row in range(0, len(features), rows)
        ]
        assert np.array_equal(np.concatenate(raw), expected)
    assert np.array_equal([tables.row_score(row) for row in features.tolist()], expected)  # one trip's call


@pytest.mark.parametrize("categories", [[], [7000.0], [7000.0, 7005.0, 7010.5, 7020.0]])
def test_station_encodings_of_a_column_equal_one_by_one(categories: list[float]) -> None:
    """The compiled column look-up and the dict look-up agree: known ids, ids between and beyond the categories
    (unknown), NaN (missing), and no categories at all."""
    encoding = fast_pipeline.StationEncoding(
        np.array(categories), np.arange(len(categories)) / 10 + 0.05, missing=0.9, unknown=0.5
    )
    values = np.array([math.nan, 6999.0, 7000.0, 7001.0, 7005.0, 7010.5, 7015.0, 7020.0, 7021.0, -0.0, math.inf])
    assert encoding.encode_column(values).tolist() == [encoding.encode(value) for value in values.tolist()]


def test_trees_of_more_than_64_leaves_have_no_tables() -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(4000, 3))
    target = (rng.random(4000) < 0.5).astype(int)
    classifier = HistGradientBoostingClassifier(max_iter=2, max_leaf_nodes=100, min_samples_leaf=2).fit(
        features, target
    )
    with pytest.raises(UnsupportedPipeline, match="leaves"):
        fast_pipeline.TreeTables(pipeline_reader.boosted_trees(classifier), features.shape[1])


def test_single_trips_one_at_a_time_match_scikit_learn(model: LoadedModel, real_trips: pd.DataFrame) -> None:
    """The service answers one trip from Python values (`FastPipeline.trip_probability`), not arrays: check that
    path trip by trip, with the types `parse_request_trip` gives, bit for bit."""
    sample = real_trips.sample(2000, random_state=4)
    expected = model.pipeline.predict_proba(sample)[:, 1]
    records = cast(list[dict[str, Any]], sample.to_dict("records"))  # the frame's column names are strings
    trips = [  # the fields the frame lacks (trip_id) as None
        {**dict.fromkeys(schema.TRIP_FIELDS), **trip, "trip_start_time": trip["trip_start_time"].to_pydatetime()}
        for trip in records
    ]
    assert all(type(trip["trip_start_time"]) is datetime for trip in trips)
    one_by_one = [model.request_probabilities(schema.RequestTrips.of([trip]))[0] for trip in trips]
    np.testing.assert_allclose(one_by_one, expected, rtol=0, atol=1e-5)
    assert np.max(np.abs(np.array(one_by_one) - expected)) == 0


def test_a_one_row_frame_cut_from_a_file_is_scored(model: LoadedModel, real_trips: pd.DataFrame) -> None:
    """Batch and monitoring pass frames whose index does not start at 0 (a filtered chunk's one labelled trip)."""
    one_row = real_trips.iloc[5:6]
    expected = model.pipeline.predict_proba(one_row)[:, 1]
    np.testing.assert_array_equal(model.member_probability(one_row), expected)


@pytest.mark.parametrize("raw", [-1000.0, -30.0, 0.0, 30.0, 1000.0])
def test_one_trip_link_is_expit_also_where_exp_overflows(model: LoadedModel, raw: float) -> None:
    assert model.fast is not None
    fast = copy.copy(model.fast)
    fast.row_score = lambda row: raw  # type: ignore[method-assign]
    probability = fast.trip_probability(datetime(2017, 7, 1, 8), 600.0, 7000.0, 7001.0)
    assert probability == expit(raw)


# --- a scikit-learn whose internals differ: the fast form falls back, the model still serves ------------------


def rename_node_field(monkeypatch: pytest.MonkeyPatch, classifier: Any, old: str, new: str) -> None:
    """Every tree's node records under a dtype whose field `old` is called `new` (a view: the records' bytes,
    and scikit-learn's compiled predictor that reads them by position, are unchanged)."""
    for (predictor,) in classifier._predictors:
        fields = predictor.nodes.dtype.fields
        renamed = np.dtype(
            {
                "names": [new if name == old else name for name in fields],
                "formats": [fields[name][0] for name in fields],
                "offsets": [fields[name][1] for name in fields],
                "itemsize": predictor.nodes.dtype.itemsize,
            }
        )
        monkeypatch.setattr(predictor, "nodes", predictor.nodes.view(renamed))


def station_encoder(pipeline: Pipeline) -> TargetEncoder:
    return next(step for _, step, _ in pipeline.named_steps["columns"].transformers_ if isinstance(step, TargetEncoder))


INTERNALS_CHANGED: dict[str, Callable[[pytest.MonkeyPatch, Pipeline], None]] = {
    "trees' _predictors renamed": lambda patch, pipeline: rename_attribute(
        patch, pipeline.named_steps["classifier"], "_predictors", "_predictors_by_iteration", "sklearn"
    ),
    "trees' _baseline_prediction renamed": lambda patch, pipeline: rename_attribute(
        patch, pipeline.named_steps["classifier"], "_baseline_prediction", "_raw_baseline", "sklearn"
    ),
    "node field missing_go_to_left renamed": lambda patch, pipeline: rename_node_field(
        patch, pipeline.named_steps["classifier"], "missing_go_to_left", "missing_goes_left"
    ),
    "node field is_leaf renamed": lambda patch, pipeline: rename_node_field(
        patch, pipeline.named_steps["classifier"], "is_leaf", "leaf"
    ),
    "TargetEncoder encodings_ renamed": lambda patch, pipeline: rename_attribute(
        patch, station_encoder(pipeline), "encodings_", "encodings_by_feature_", "sklearn"
    ),
    "TargetEncoder target_mean_ renamed": lambda patch, pipeline: rename_attribute(
        patch, station_encoder(pipeline), "target_mean_", "target_means_", "sklearn"
    ),
}


@pytest.mark.parametrize("change", INTERNALS_CHANGED)
def test_changed_scikit_learn_internals_fall_back_to_scikit_learn(
    change: str,
    model: LoadedModel,
    settings: Settings,
    real_trips: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A renamed or reshaped private attribute costs the fast form, never the model: fast_pipeline_of raises
    UnsupportedPipeline naming what it could not read, fast_form logs it and gives None, and the model
    answers through scikit-learn, the same probabilities as before the change, also through the service."""
    pipeline = copy.deepcopy(model.pipeline)
    INTERNALS_CHANGED[change](monkeypatch, pipeline)
    sample = real_trips.sample(500, random_state=5)
    expected = model.pipeline.predict_proba(sample)[:, 1]
    np.testing.assert_array_equal(pipeline.predict_proba(sample)[:, 1], expected)  # scikit-learn still works

    with pytest.raises(UnsupportedPipeline, match=r"^cannot read .* of scikit-learn .*: (AttributeError|ValueError)"):
        fast_pipeline_of(pipeline)
    with caplog.at_level(logging.WARNING, logger="bikeshare_membership.model_store"):
        assert fast_form(pipeline) is None
    assert "serving through scikit-learn only: cannot read" in caplog.text

    served = LoadedModel(
        name=model.name, version="9", run_id="", load_pipeline=in_memory(pipeline), source="", origin="path"
    )
    np.testing.assert_array_equal(served.member_probability(sample), expected)
    client = service_app.create_app(settings, ModelHolder(None, served)).test_client()
    response = client.post("/predict", json=schema.EXAMPLE_TRIP)
    assert response.status_code == 200, response.get_data(as_text=True)
    trip = schema.RequestTrips.of([schema.parse_request_trip(schema.EXAMPLE_TRIP)]).model_input()
    assert response.get_json()["proba"] == round(model.pipeline.predict_proba(pd.DataFrame(trip))[0, 1] * 100, 2)
    assert response.get_json()["model"]["version"] == "9"


def test_a_tree_beyond_64_leaves_keeps_the_exact_path(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with one tree of more leaves than a table's mask holds has no fast form: one more tree, a chain of
    300 splits whose leaves add 0, so scikit-learn's answers do not move, and the served model keeps them."""
    pipeline = copy.deepcopy(model.pipeline)
    classifier = pipeline.named_steps["classifier"]
    depth = 300
    chain = np.zeros(2 * depth + 1, dtype=classifier._predictors[0][0].nodes.dtype)
    splits = chain[:depth]
    splits["num_threshold"] = np.arange(depth, dtype="float64")
    splits["left"] = np.arange(depth) + depth  # a leaf
    splits["right"] = np.arange(1, depth + 1)  # the next split; the last one's right child is the leaf at 2 * depth
    splits["right"][-1] = 2 * depth
    chain["is_leaf"][depth:] = True
    deep = copy.copy(classifier._predictors[0][0])
    deep.nodes = chain
    monkeypatch.setattr(classifier, "_predictors", [*classifier._predictors, [deep]])
    trips = pd.DataFrame(schema.RequestTrips.of([schema.parse_request_trip(schema.EXAMPLE_TRIP)]).model_input())
    np.testing.assert_array_equal(pipeline.predict_proba(trips), model.pipeline.predict_proba(trips))
    with pytest.raises(UnsupportedPipeline, match="a tree with 301 leaves"):
        fast_pipeline_of(pipeline)
    assert fast_form(pipeline) is None


def saved_form_path(settings: Settings, model: LoadedModel) -> Path:
    return Path(settings.model_cache_dir) / settings.registered_model / model.version / FAST_FORM


def test_a_restart_serves_the_saved_fast_form_without_loading_the_pipeline(
    own_registry: Settings, real_trips: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    """The first load derives the fast form and saves it beside the cached version; the next builds the form from
    it, verified again, and loads the pipeline only when asked: the same answers, bit for bit."""
    first = ModelStore(own_registry).load_production()
    assert first.fast is not None and saved_form_path(own_registry, first).is_file()
    with caplog.at_level(logging.INFO, logger="bikeshare_membership.model_store"):
        again = ModelStore(own_registry).load_production()
    assert again.origin == "cache" and again.fast is not None  # the saved form sits outside the manifest's files
    assert "its saved fast form" in caplog.text and "pipeline" not in again.__dict__
    np.testing.assert_array_equal(again.fast.member_probability(real_trips), first.fast.member_probability(real_trips))
    trips = real_trips.head(300)
    singles = list(
        zip(
            trips["trip_start_time"].dt.to_pydatetime(),
            *(trips[column] for column in schema.MODEL_INPUT_COLUMNS[1:]),
            strict=True,
        )
    )
    assert [again.fast.trip_probability(*trip) for trip in singles] == [
        first.fast.trip_probability(*trip) for trip in singles
    ]
    np.testing.assert_array_equal(again.pipeline.predict_proba(real_trips), first.pipeline.predict_proba(real_trips))

    # A new process, as a restarted service is: the answer without skops, nor scikit-learn at all, imported.
    script = (
        "import sys\n"
        "from bikeshare_membership.config import Settings\n"
        "from bikeshare_membership.model_store import ModelStore\n"
        "from bikeshare_membership.schema import EXAMPLE_TRIP, RequestTrips, parse_request_trip\n"
        f"settings = Settings(tracking_uri={own_registry.tracking_uri!r}, registered_model={own_registry.registered_model!r}, "
        f"model_cache_dir={own_registry.model_cache_dir!r})\n"
        "model = ModelStore(settings).load_production()\n"
        "print(model.request_probabilities(RequestTrips.of([parse_request_trip(EXAMPLE_TRIP)]))[0], 'skops.io' in sys.modules, "
        "'sklearn' in sys.modules)\n"
    )
    restarted = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    expected = first.request_probabilities(schema.RequestTrips.of([schema.parse_request_trip(schema.EXAMPLE_TRIP)]))[0]
    assert restarted.stdout.split() == [repr(expected), "False", "False"]


@pytest.mark.parametrize("damage", ["a leaf changed", "truncated", "another release"])
def test_a_damaged_or_stale_saved_fast_form_is_derived_again(
    own_registry: Settings, real_trips: pd.DataFrame, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first = ModelStore(own_registry).load_production()
    path = saved_form_path(own_registry, first)
    with np.load(path, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files}
    if damage == "a leaf changed":
        nodes = arrays["tree_nodes"]
        nodes["value"][np.flatnonzero(nodes["is_leaf"])[0]] += 1e-3
        np.savez(path, **arrays)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        np.savez(path, **{**arrays, "key": np.array("0" * 64)})
    with caplog.at_level(logging.INFO, logger="bikeshare_membership"):  # model_store's and model_files' lines
        again = ModelStore(own_registry).load_production()
    assert again.fast is not None and "its saved fast form" not in caplog.text
    message = {
        "a leaf changed": "differs from scikit-learn",
        "truncated": "not using the saved fast form",
        "another release": "of another model or library release",
    }
    assert message[damage] in caplog.text
    sample = real_trips.sample(5000, random_state=7)
    np.testing.assert_array_equal(again.fast.member_probability(sample), again.pipeline.predict_proba(sample)[:, 1])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bikeshare_membership.model_store"):
        ModelStore(own_registry).load_production()
    assert "its saved fast form" in caplog.text  # saved again, whole
