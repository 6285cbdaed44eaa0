"""How the deployed model does on a new labelled batch of trips: `batch.py evaluate`, logged to MLflow.

The file is read in chunks like any batch (city_files.py) and scored with the given model (the Production
one from the command line). One run in the monitoring experiment (`MLFLOW_MONITORING_EXP_NAME`, by default
`<MLFLOW_EXP_NAME>-monitoring`) records the same scores training records on its test month (evaluation.py:
ROC AUC, log loss, Brier score, precision and recall of Member), the Member share predicted against the share
observed, the ROC and calibration curves and the confusion matrix, and each feature's drift against the model's
training data (the profile train.py logged with the model's run; see drift.py). `passed` says whether ROC AUC
reached the floor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from bikeshare_membership import city_files, drift, evaluation, storage
from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import LoadedModel
from bikeshare_membership.schema import CASUAL, MEMBER, membership

log = logging.getLogger(__name__)


class NoLabels(ValueError):
    """The file has no trip with a label (`user_type`, `User Type`, ...), so there is nothing to evaluate."""


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    experiment: str
    metrics: dict[str, float]
    passed: bool
    message: str


def evaluate_file(settings: Settings, input_location: str, model: LoadedModel, min_roc_auc: float) -> Evaluation:
    """Score a labelled file with `model` and log the evaluation run; see the module docstring."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    profile = training_profile(model)
    drift_counter = drift.DriftCounter(profile) if profile else None
    is_member, probabilities = [], []
    rows = rejected = 0
    with storage.local_copy(input_location, settings) as path:
        for chunk in city_files.read_chunks(path):
            trips = chunk.parsed.trips
            rows += len(trips) + len(chunk.parsed.rejects)
            rejected += len(chunk.parsed.rejects)
            if trips.empty:
                continue
            if drift_counter is not None:
                drift_counter.add(drift.model_features(model.pipeline, trips))
            labelled = trips["user_type"].notna().to_numpy()
            is_member.append((trips["user_type"].to_numpy()[labelled] == MEMBER).astype("int8"))
            probabilities.append(model.member_probability(trips[labelled]) if labelled.any() else np.empty(0))
    truth = np.concatenate(is_member) if is_member else np.empty(0, dtype="int8")
    proba = np.concatenate(probabilities) if probabilities else np.empty(0)
    if len(truth) == 0:
        raise NoLabels(f"{input_location} has no labelled trips (user_type), so the model cannot be evaluated")

    metrics = member_metrics(truth, proba)
    metrics.update(rows=rows, rejected_rows=rejected, labelled_rows=len(truth))
    drift_report = drift_counter.summary() if drift_counter is not None else {}
    title, params = storage.name_of(input_location), {"input": input_location}
    return log_evaluation(settings, title, params, model, truth, proba, metrics, drift_report, min_roc_auc)


def log_evaluation(
    settings: Settings,
    title: str,
    params: dict[str, Any],
    model: LoadedModel,
    truth: np.ndarray,
    proba: np.ndarray,
    metrics: dict[str, float],
    drift_report: dict[str, Any],
    min_roc_auc: float,
) -> Evaluation:
    """One run (`evaluate <title>`) in the monitoring experiment: `metrics` with each feature's PSI, the
    verdict, the figures and the drift report. `batch.py evaluate --predictions` logs one per model version."""
    metrics = {**metrics, **{f"psi_{name}": feature["psi"] for name, feature in drift_report.items()}}
    passed, message = _verdict(metrics.get("eval_roc_auc"), min_roc_auc, truth)
    mlflow.set_experiment(settings.monitoring_experiment_name)
    with mlflow.start_run(run_name=f"evaluate {title}") as run:
        mlflow.log_params(
            {
                **params,
                "model_name": model.name,
                "model_version": model.version,
                "model_run_id": model.run_id,
                "min_roc_auc": min_roc_auc,
            }
        )
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"passed": str(passed).lower(), "verdict": message})
        evaluation.log_figures(truth, proba, title)
        if drift_report:
            mlflow.log_dict(drift_report, "feature_drift.json")
        else:
            mlflow.set_tag("drift", f"no {drift.PROFILE_ARTIFACT} in the model's run {model.run_id}")
    return Evaluation(
        run_id=run.info.run_id,
        experiment=settings.monitoring_experiment_name,
        metrics=metrics,
        passed=passed,
        message=message,
    )


def training_profile(model: LoadedModel) -> dict[str, Any] | None:
    """The feature profile logged with the model's training run, or None for a model trained without one."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{model.run_id}/{drift.PROFILE_ARTIFACT}")
    except (MlflowException, OSError, json.JSONDecodeError) as error:
        log.warning("no training feature profile for run %s, so no drift report: %s", model.run_id, error)
        return None


def member_metrics(truth: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    return {
        **evaluation.scores(truth, proba, "eval"),
        "member_share_observed": float(truth.mean()),
        "member_share_predicted": float((membership(proba) == MEMBER).mean()),
        "mean_member_probability": float(proba.mean()),
    }


def _verdict(roc_auc: float | None, floor: float, truth: np.ndarray) -> tuple[bool, str]:
    if roc_auc is None:
        only = MEMBER if truth.all() else CASUAL
        return False, f"ROC AUC is undefined: every labelled trip is {only}, so the floor {floor:.2f} cannot be checked"
    if roc_auc < floor:
        return False, f"ROC AUC {roc_auc:.4f} is below the floor {floor:.2f}"
    return True, f"ROC AUC {roc_auc:.4f} is at or above the floor {floor:.2f}"
