"""How the live answers did: `batch.py evaluate --predictions <PREDICTION_LOG> <labelled City file>`.

The prediction log (prediction_log.py: a local folder or s3:// prefix of Parquet files) is joined with a
labelled City file of any layout (city_files.py) on `trip_id`, as text. An answer with no trip id, or whose
trip id the file does not label, found no label; a labelled trip of the file that no answer names has no
answer; both counts are reported and logged. A trip answered more than once by the same version (a client's
retry) counts once, with its latest answer; a trip id labelled twice in the file takes its first label.

Each model version that answered gets one run in the monitoring experiment, with what `batch.py evaluate`
logs (monitoring.log_evaluation): ROC AUC, log loss, Brier score, precision and recall of Member computed from
the probabilities the service answered with (unrounded), the Member shares, the figures, and the drift of the
joined trips' features against that version's training profile. Each shadow version (shadow.py) that scored
answered trips gets one run too, from its own probabilities of the same trips (param `role`: `served` or
`shadow`): the challenger judged on live traffic it never answered. Only the served versions' verdicts decide
the exit status.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import mlflow
import pandas as pd
import pyarrow.parquet as pq

from bikeshare_membership import city_files, drift, monitoring, storage
from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import load_model_version
from bikeshare_membership.schema import MEMBER, TRIP_FIELDS

log = logging.getLogger(__name__)

LOG_COLUMNS = [
    *TRIP_FIELDS,
    "answered_at",
    "model_name",
    "model_version",
    "member_probability",
    "shadow_model_version",
    "shadow_member_probability",
]
Role = Literal["served", "shadow"]


@dataclass(frozen=True)
class LiveEvaluation:
    answers: int  # rows of the log
    answers_without_label: int
    labels_without_answer: int
    by_version: dict[tuple[str, str, Role], monitoring.Evaluation]  # (model name, version, role) -> its run


def read_prediction_log(location: str, settings: Settings) -> pd.DataFrame:
    """Every row of the log's Parquet files under a local folder or s3:// prefix (hidden partial files aside)."""
    frames = []
    for stored in storage.list_files(location, settings):
        if stored.location.endswith(".parquet"):
            with storage.local_copy(stored.location, settings) as path:
                frames.append(pq.read_table(path, columns=LOG_COLUMNS, partitioning=None).to_pandas())
    if not frames:
        raise monitoring.NoLabels(f"{location} holds no prediction log file (part-*.parquet)")
    return pd.concat(frames, ignore_index=True)


def read_labels(location: str, settings: Settings) -> pd.Series:
    """The labelled trips of a City file: user_type by trip id (as text), first label of an id only."""
    labels = []
    with storage.local_copy(location, settings) as path:
        for chunk in city_files.read_chunks(path):
            trips = chunk.parsed.trips
            labelled = trips[trips["user_type"].notna() & trips["trip_id"].notna()]
            labels.append(pd.Series(labelled["user_type"].to_numpy(), index=_ids(labelled["trip_id"])))
    found = pd.concat(labels) if labels else pd.Series(dtype=object)
    return found[~found.index.duplicated(keep="first")]


def _ids(values: pd.Series) -> pd.Index:
    return pd.Index(values.astype(str).str.strip(), name="trip_id")


def scores_by_role(answers: pd.DataFrame) -> pd.DataFrame:
    """One row per answered trip and model that scored it: the served version's, then the shadow's where it
    scored the trip, each with its `member_probability` and `role`."""
    shadowed = answers[answers["shadow_member_probability"].notna()]
    shadow = shadowed.assign(
        model_version=shadowed["shadow_model_version"], member_probability=shadowed["shadow_member_probability"]
    )
    return pd.concat([answers.assign(role="served"), shadow.assign(role="shadow")], ignore_index=True)


def evaluate_predictions(
    settings: Settings, log_location: str, labelled_location: str, min_roc_auc: float
) -> LiveEvaluation:
    """Join the log with the labelled file and log one evaluation run per model version; see the docstring."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    answers = read_prediction_log(log_location, settings)
    scores = scores_by_role(answers)
    labels = read_labels(labelled_location, settings)
    has_id = answers["trip_id"].notna()
    labelled = has_id & answers["trip_id"].isin(labels.index)
    answered_ids = set(answers.loc[has_id, "trip_id"])
    joined = (
        scores[scores["trip_id"].isin(labels.index)]
        .sort_values("answered_at", kind="stable")
        .drop_duplicates(["model_name", "model_version", "role", "trip_id"], keep="last")
    )
    if joined.empty:
        raise monitoring.NoLabels(f"no answer in {log_location} has a label in {labelled_location}")
    counts = {
        "answers": len(answers),
        "answers_without_label": int((~labelled).sum()),
        "labels_without_answer": int((~labels.index.isin(list(answered_ids))).sum()),
    }
    results: dict[tuple[str, str, Role], monitoring.Evaluation] = {}
    for (name_key, version_key, role_key), trips in joined.groupby(["model_name", "model_version", "role"]):
        name, version, role = str(name_key), str(version_key), cast(Role, role_key)
        model = load_model_version(replace(settings, registered_model=name), version)
        truth = (labels.loc[trips["trip_id"]].to_numpy() == MEMBER).astype("int8")
        proba = trips["member_probability"].to_numpy(dtype="float64")
        profile = monitoring.training_profile(model)
        drift_report: dict[str, Any] = {}
        if profile:
            counter = drift.DriftCounter(profile)
            counter.add(drift.model_features(model.pipeline, trips[list(TRIP_FIELDS)].reset_index(drop=True)))
            drift_report = counter.summary()
        metrics = monitoring.member_metrics(truth, proba)
        metrics.update(
            labelled_rows=len(truth),
            version_answers=int(
                ((scores["model_name"] == name) & (scores["model_version"] == version) & (scores["role"] == role)).sum()
            ),
            **{key: float(value) for key, value in counts.items()},
        )
        params = {"input": labelled_location, "predictions": log_location, "role": role}
        title = f"{storage.name_of(log_location)} x {storage.name_of(labelled_location)}"
        results[name, version, role] = monitoring.log_evaluation(
            settings, title, params, model, truth, proba, metrics, drift_report, min_roc_auc
        )
    return LiveEvaluation(by_version=results, **counts)


def version_line(name: str, version: str, role: Role, result: monitoring.Evaluation) -> str:
    metrics = result.metrics
    scored = "answered" if role == "served" else "shadow-scored"
    return (
        f"model {name} version {version} on {metrics['labelled_rows']:,.0f} {scored} and labelled trips: "
        f"{result.message}; Member share {metrics['member_share_predicted']:.1%} predicted, "
        f"{metrics['member_share_observed']:.1%} observed; run {result.run_id} in {result.experiment!r}"
    )
