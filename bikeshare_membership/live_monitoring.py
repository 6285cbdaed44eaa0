"""How the live answers did: `batch.py evaluate --predictions <PREDICTION_LOG> <labelled City file>`.

The prediction log (prediction_log.py: a local folder or s3:// prefix of Parquet files) is joined with a
labelled City file of any layout (city_files.py) on `trip_id`, as text. An answer with no trip id, or whose
trip id the file does not label, found no label; a labelled trip of the file that no answer names has no
answer; both counts are reported and logged. A trip answered more than once by the same version (a client's
retry) counts once, with its latest answer; a trip id labelled twice in the file takes its first label.

Each model version that answered gets one run in the monitoring experiment, with what `batch.py evaluate`
logs (monitoring.log_evaluation): ROC AUC, log loss, Brier score, precision and recall of Member computed from
the probabilities the service answered with (unrounded), the Member shares, the figures, and the drift of the
joined trips' features against that version's training profile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import mlflow
import pandas as pd
import pyarrow.parquet as pq

from bikeshare_membership import city_files, drift, monitoring, storage
from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import load_model_version
from bikeshare_membership.schema import MEMBER, TRIP_FIELDS

log = logging.getLogger(__name__)

LOG_COLUMNS = [*TRIP_FIELDS, "answered_at", "model_name", "model_version", "member_probability"]


@dataclass(frozen=True)
class LiveEvaluation:
    answers: int  # rows of the log
    answers_without_label: int
    labels_without_answer: int
    by_version: dict[tuple[str, str], monitoring.Evaluation]  # (model name, version) -> its run


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


def evaluate_predictions(
    settings: Settings, log_location: str, labelled_location: str, min_roc_auc: float
) -> LiveEvaluation:
    """Join the log with the labelled file and log one evaluation run per model version; see the docstring."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    answers = read_prediction_log(log_location, settings)
    labels = read_labels(labelled_location, settings)
    has_id = answers["trip_id"].notna()
    labelled = has_id & answers["trip_id"].isin(labels.index)
    answered_ids = set(answers.loc[has_id, "trip_id"])
    joined = (
        answers[labelled]
        .sort_values("answered_at", kind="stable")
        .drop_duplicates(["model_name", "model_version", "trip_id"], keep="last")
    )
    if joined.empty:
        raise monitoring.NoLabels(f"no answer in {log_location} has a label in {labelled_location}")
    counts = {
        "answers": len(answers),
        "answers_without_label": int((~labelled).sum()),
        "labels_without_answer": int((~labels.index.isin(list(answered_ids))).sum()),
    }
    results: dict[tuple[str, str], monitoring.Evaluation] = {}
    for (name_key, version_key), trips in joined.groupby(["model_name", "model_version"], sort=True):
        name, version = str(name_key), str(version_key)
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
            version_answers=int(((answers["model_name"] == name) & (answers["model_version"] == version)).sum()),
            **{key: float(value) for key, value in counts.items()},
        )
        params = {"input": labelled_location, "predictions": log_location}
        title = f"{storage.name_of(log_location)} x {storage.name_of(labelled_location)}"
        results[name, version] = monitoring.log_evaluation(
            settings, title, params, model, truth, proba, metrics, drift_report, min_roc_auc
        )
    return LiveEvaluation(by_version=results, **counts)


def version_line(name: str, version: str, result: monitoring.Evaluation) -> str:
    metrics = result.metrics
    return (
        f"model {name} version {version} on {metrics['labelled_rows']:,.0f} answered and labelled trips: "
        f"{result.message}; Member share {metrics['member_share_predicted']:.1%} predicted, "
        f"{metrics['member_share_observed']:.1%} observed; run {result.run_id} in {result.experiment!r}"
    )
