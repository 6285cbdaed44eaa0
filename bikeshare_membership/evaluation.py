"""How well probabilities of Member fit the labels: the scores and figures that training and monitoring log.

Training scores its time-ordered test month and the gate compares versions with these scores; `batch.py
evaluate` scores a labelled file with the same ones, so a figure in a model's card and one in a monitoring
run mean the same thing.
"""

from __future__ import annotations

import mlflow
import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    brier_score_loss,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from bikeshare_membership.schema import CASUAL, DECISION_THRESHOLD, MEMBER, membership


def scores(is_member: np.ndarray, proba: np.ndarray, prefix: str) -> dict[str, float]:
    """`<prefix>_roc_auc`, `_log_loss`, `_brier`, `_precision` and `_recall` of P(Member), deciding at
    `DECISION_THRESHOLD`. ROC AUC is left out when every trip has the same label: it is undefined then."""
    predicted = proba >= DECISION_THRESHOLD
    result = {
        f"{prefix}_log_loss": log_loss(is_member, proba, labels=[0, 1]),
        f"{prefix}_brier": brier_score_loss(is_member, proba, pos_label=1),
        f"{prefix}_precision": precision_score(is_member, predicted, zero_division=0),
        f"{prefix}_recall": recall_score(is_member, predicted, zero_division=0),
    }
    if 0 < is_member.sum() < len(is_member):
        result[f"{prefix}_roc_auc"] = roc_auc_score(is_member, proba)
    return {name: float(value) for name, value in result.items()}


def log_figures(is_member: np.ndarray, proba: np.ndarray, title: str) -> None:
    """The ROC curve (when both labels occur), the calibration curve and the confusion matrix, on plain
    Figures (no pyplot state, no display), as `roc_curve.png`, `calibration_curve.png`, `confusion_matrix.png`."""
    if 0 < is_member.sum() < len(is_member):
        roc = RocCurveDisplay.from_predictions(
            is_member, proba, name="model", plot_chance_level=True, ax=Figure().subplots()
        )
        roc.ax_.set_title(f"{title}: ROC of P(Member)")
        mlflow.log_figure(roc.figure_, "roc_curve.png")
    calibration = CalibrationDisplay.from_predictions(
        is_member, proba, n_bins=10, strategy="quantile", pos_label=1, name="model", ax=Figure().subplots()
    )
    calibration.ax_.set_title(f"{title}: P(Member) against the observed share")
    mlflow.log_figure(calibration.figure_, "calibration_curve.png")
    matrix = ConfusionMatrixDisplay.from_predictions(
        np.where(is_member == 1, MEMBER, CASUAL), membership(proba), labels=[CASUAL, MEMBER], ax=Figure().subplots()
    )
    matrix.ax_.set_title(f"{title}: confusion matrix (threshold {DECISION_THRESHOLD})")
    mlflow.log_figure(matrix.figure_, "confusion_matrix.png")
