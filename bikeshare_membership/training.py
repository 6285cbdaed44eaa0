"""Training: the candidate models, the time-ordered evaluation that chooses one and measures it, the refit.

Trips are grouped by the calendar month of their start (Toronto time). The latest month is the test month.
Users score trips from months the model has not seen, so that is what every figure measures:
- selection: each candidate is fitted on the months before each of the latest MAX_VALIDATION_MONTHS months
  before the test month and validated on that month (forward chaining); the first candidate in `CANDIDATES`
  whose mean validation log loss is within `SELECTION_TOLERANCE` of the best is chosen, so a later, larger
  candidate has to earn its place;
- test: the chosen candidate is fitted on every month before the test month and scored on it, beside the
  prior (the Member share of those months): the figures the gate, the model card and the docs report;
- refit: the registered model is the chosen candidate fitted on every month, test month included, so it has
  learnt from the latest trips; its card says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import TargetEncoder
from threadpoolctl import threadpool_limits

from bikeshare_membership import city_files, evaluation
from bikeshare_membership.feature_step import TripFeatures
from bikeshare_membership.features import DEFAULT_FEATURES, STATION_FEATURES
from bikeshare_membership.schema import MEMBER, MODEL_INPUT_COLUMNS

SEED = 42
# The classifier settings every candidate starts from; a candidate overrides some of them.
CLASSIFIER_DEFAULTS: Mapping[str, Any] = {
    "early_stopping": True,  # scikit-learn's "auto" stops early only above 10,000 trips: one rule at every size
    "learning_rate": 0.05,
    "max_iter": 500,
    "min_samples_leaf": 50,
    "l2_regularization": 1.0,
    "random_state": SEED,
}
# A candidate listed later must beat every earlier one by more than this in mean validation log loss.
SELECTION_TOLERANCE = 0.002
# Selection fits learn from at most this many trips (a uniform sample, fixed seed): at a full year of trips,
# choosing a candidate would otherwise cost several full fits. The test fit and the refit use every trip.
MAX_SELECTION_ROWS = 500_000
# Forward chaining validates on at most this many months, the latest before the test month: the most like it.
MAX_VALIDATION_MONTHS = 3
MIN_TEST_TRIPS = 1000


@dataclass(frozen=True)
class Candidate:
    """A model to try: the features `TripFeatures` computes and the classifier's settings."""

    name: str  # letters, digits and dashes: it names MLflow metrics
    features: tuple[str, ...]
    classifier: Mapping[str, Any] = field(default_factory=dict)

    @property
    def classifier_params(self) -> dict[str, Any]:
        return {**CLASSIFIER_DEFAULTS, **self.classifier}

    def build(self) -> Pipeline:
        """The unfitted pipeline: features, target-encoded stations and routes, gradient boosting."""
        stations = [name for name in self.features if name in STATION_FEATURES]
        numbers = [name for name in self.features if name not in STATION_FEATURES]
        encoder = TargetEncoder(target_type="binary", cv=KFold(5, shuffle=True, random_state=SEED))
        columns = ColumnTransformer(
            [("stations", encoder, stations), ("numeric", "passthrough", numbers)], verbose_feature_names_out=False
        )
        classifier = HistGradientBoostingClassifier(**self.classifier_params)
        return Pipeline([("features", TripFeatures(self.features)), ("columns", columns), ("classifier", classifier)])


# In order of preference: the simplest first (see SELECTION_TOLERANCE). docs/model.md says how they compared.
CANDIDATES = (
    Candidate("calendar", DEFAULT_FEATURES),
    Candidate("calendar-month", (*DEFAULT_FEATURES, "month")),
    Candidate("calendar-regularised", DEFAULT_FEATURES, {"min_samples_leaf": 200, "l2_regularization": 5.0}),
)


@dataclass(frozen=True)
class LabelledTrips:
    """The labelled trips of some files: the model's input columns, the label and the month of the start."""

    inputs: pd.DataFrame  # MODEL_INPUT_COLUMNS
    is_member: np.ndarray  # 1 for a Member, 0 for a Casual rider
    month: np.ndarray  # datetime64[M] of trip_start_time
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.is_member)

    def where(self, selected: np.ndarray) -> LabelledTrips:
        return LabelledTrips(
            self.inputs[selected].reset_index(drop=True), self.is_member[selected], self.month[selected], self.files
        )

    @property
    def months(self) -> list[np.datetime64]:
        return sorted(np.unique(self.month))


def load_labelled_trips(paths: Sequence[Path]) -> LabelledTrips:
    """Every labelled trip of `paths`, read as batch scoring reads a file (city_files: any layout, chunked,
    UTF-8 or cp1252), keeping only what training needs, so a year of trips fits in memory."""
    inputs, labels = [], []
    for path in paths:
        for chunk in city_files.read_chunks(Path(path)):
            trips = chunk.parsed.trips
            labelled = trips[trips["user_type"].notna()]
            inputs.append(labelled[MODEL_INPUT_COLUMNS])
            labels.append((labelled["user_type"] == MEMBER).to_numpy(dtype="int8"))
    frame = pd.concat(inputs, ignore_index=True) if inputs else pd.DataFrame(columns=MODEL_INPUT_COLUMNS)
    frame = frame.astype({"trip_start_time": "datetime64[s]", "trip_duration_seconds": "float64"})
    month = frame["trip_start_time"].to_numpy().astype("datetime64[M]")
    is_member = np.concatenate(labels) if labels else np.empty(0, dtype="int8")
    return LabelledTrips(frame, is_member, month, tuple(Path(path).name for path in paths))


def month_name(month: np.datetime64) -> str:
    return str(month.astype("datetime64[M]"))  # 2023-05


@dataclass(frozen=True)
class MonthScore:
    """One model's scores on one month it did not learn from."""

    month: str
    trained_on: list[str]
    rows: int
    member_share: float
    scores: dict[str, float]


@dataclass
class TimeOrderedEvaluation:
    """What the time-ordered evaluation found; see the module docstring."""

    chosen: Candidate
    why: str
    validation: dict[str, list[MonthScore]]  # per candidate, its forward-chaining months
    test: MonthScore  # the chosen candidate on the test month
    prior: MonthScore  # the training months' Member share on the test month
    test_is_member: np.ndarray
    test_proba: np.ndarray
    test_inputs: pd.DataFrame

    @property
    def test_month(self) -> str:
        return self.test.month

    def mean_validation(self, candidate: str, metric: str) -> float:
        """A candidate's mean validation `roc_auc` or `log_loss` (NaN with no validation month)."""
        values = [month.scores.get(f"validation_{metric}", np.nan) for month in self.validation[candidate]]
        return float(np.mean(values)) if values else np.nan


def _sample(trips: LabelledTrips, rows: int) -> LabelledTrips:
    if len(trips) <= rows:
        return trips
    chosen = np.zeros(len(trips), dtype=bool)
    chosen[np.random.default_rng(SEED).choice(len(trips), rows, replace=False)] = True
    return trips.where(chosen)


def member_probability(pipeline: Pipeline, inputs: pd.DataFrame) -> np.ndarray:
    return pipeline.predict_proba(inputs)[:, list(pipeline.classes_).index(1)]


def fit(candidate: Candidate, trips: LabelledTrips) -> Pipeline:
    return candidate.build().fit(trips.inputs, trips.is_member)


def score_month(proba: np.ndarray, trained_on: LabelledTrips, month: LabelledTrips, prefix: str) -> MonthScore:
    """The scores of P(Member) `proba` on the trips of `month`, from a model fitted on `trained_on`."""
    return MonthScore(
        month=month_name(month.month[0]),
        trained_on=[month_name(m) for m in trained_on.months],
        rows=len(month),
        member_share=float(month.is_member.mean()),
        scores=evaluation.scores(month.is_member, proba, prefix),
    )


def fit_all(jobs: Sequence[tuple[Candidate, LabelledTrips]]) -> list[Pipeline]:
    """Fit each (candidate, trips), one fit per core at a time, each on one OpenMP thread: the boosted trees'
    threads wait for each other at every tree, which costs more than it gains on a small, shared machine."""
    with threadpool_limits(1), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: fit(*job), jobs))


@dataclass(frozen=True)
class Trained:
    evaluation: TimeOrderedEvaluation
    pipeline: Pipeline  # the chosen candidate refitted on every month


def train_and_evaluate(
    trips: LabelledTrips,
    candidates: Sequence[Candidate] = CANDIDATES,
    max_selection_rows: int = MAX_SELECTION_ROWS,
) -> Trained:
    """Choose a candidate by forward chaining, fit it on the months before the test month and score it there,
    and refit it on every month (see the module docstring); raises ValueError when the trips cannot support a
    time-ordered test."""
    months = trips.months
    if len(months) < 2:
        raise ValueError(
            f"a time-ordered evaluation needs labelled trips from at least two months; got {len(months)} "
            f"({', '.join(month_name(m) for m in months) or 'none'})"
        )
    test_month = months[-1]
    test = trips.where(trips.month == test_month)
    if len(test) < MIN_TEST_TRIPS or test.is_member.min() == test.is_member.max():
        raise ValueError(
            f"the latest month, {month_name(test_month)}, has {len(test)} labelled trips; the time-ordered test "
            f"needs at least {MIN_TEST_TRIPS} of both Members and Casual riders"
        )
    before_test = trips.where(trips.month < test_month)

    folds = [
        (
            _sample(before_test.where(before_test.month < month), max_selection_rows),
            before_test.where(before_test.month == month),
        )
        for month in months[1:-1][-MAX_VALIDATION_MONTHS:]
    ]
    fitted = iter(fit_all([(candidate, earlier) for earlier, _ in folds for candidate in candidates]))
    validation: dict[str, list[MonthScore]] = {candidate.name: [] for candidate in candidates}
    for earlier, held in folds:
        for candidate in candidates:
            proba = member_probability(next(fitted), held.inputs)
            validation[candidate.name].append(score_month(proba, earlier, held, "validation"))
    chosen, why = _choose(candidates, validation)

    tested, refitted = fit_all([(chosen, before_test), (chosen, trips)])
    proba = member_probability(tested, test.inputs)
    prior = np.full(len(test), before_test.is_member.mean())
    time_ordered = TimeOrderedEvaluation(
        chosen=chosen,
        why=why,
        validation=validation,
        test=score_month(proba, before_test, test, "test"),
        prior=score_month(prior, before_test, test, "prior"),
        test_is_member=test.is_member,
        test_proba=proba,
        test_inputs=test.inputs,
    )
    return Trained(time_ordered, refitted)


def _choose(candidates: Sequence[Candidate], validation: Mapping[str, list[MonthScore]]) -> tuple[Candidate, str]:
    """The first candidate within SELECTION_TOLERANCE of the best mean validation log loss, and why."""
    if not next(iter(validation.values())):
        return candidates[0], "no month before the test month to validate on: the first candidate"
    loss = {
        name: float(np.mean([m.scores["validation_log_loss"] for m in months])) for name, months in validation.items()
    }
    best = min(loss.values())
    chosen = next(candidate for candidate in candidates if loss[candidate.name] <= best + SELECTION_TOLERANCE)
    listed = ", ".join(f"{name} {value:.4f}" for name, value in loss.items())
    return chosen, f"mean validation log loss {listed}; the first within {SELECTION_TOLERANCE} of the best"
