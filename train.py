"""Train the membership model on the bundled City trips, log it to MLflow and promote it to Production.

    python train.py                 # train, register, promote
    python train.py --if-missing    # only when the registry has no Production version (used by `make serve`)

The pipeline is `TripFeatures` (preprocess.py) -> target-encoded stations and routes -> gradient boosting.
Its probabilities are scored on a stratified hold-out against a prior-only baseline; the fitted pipeline is
logged with its signature, an input example and `preprocess.py`, registered, moved to the Production stage
(archiving the previous one) and given the alias `production`. The run also keeps a profile of the training
features (`feature_profile.json`, see drift.py), the reference `batch.py evaluate` measures drift against.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    brier_score_loss,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import TargetEncoder

import drift
import preprocess
from config import Settings
from model_store import (
    DECISION_THRESHOLD,
    PRODUCTION_ALIAS,
    PRODUCTION_STAGE,
    has_production_model,
    membership,
)

DEFAULT_DATA = sorted(preprocess.DATA_DIR.glob("bikeshare-ridership-*.csv.gz"))
SEED = 42
HOLDOUT_SHARE = 0.2
# Types the skops format must trust to load the pipeline: our feature step and the boosted trees.
SKOPS_TRUSTED_TYPES = [
    "preprocess.TripFeatures",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.Interval",
    "sklearn.model_selection._split.KFold",
]

log = logging.getLogger("train")


def load_labelled_trips(paths: list[Path]) -> pd.DataFrame:
    """Every labelled trip in `paths`, in the schema's types."""
    frames = [preprocess.read_trips(path).trips for path in paths]
    trips = pd.concat(frames, ignore_index=True)
    return trips[trips["user_type"].notna()].reset_index(drop=True)


def build_pipeline() -> Pipeline:
    """The unfitted model: features, encoded stations and routes, gradient boosting."""
    encoder = TargetEncoder(target_type="binary", cv=KFold(5, shuffle=True, random_state=SEED))
    columns = ColumnTransformer(
        [("stations", encoder, preprocess.STATION_FEATURES), ("numeric", "passthrough", preprocess.NUMERIC_FEATURES)],
        verbose_feature_names_out=False,
    )
    classifier = HistGradientBoostingClassifier(
        learning_rate=0.05, max_iter=500, min_samples_leaf=50, l2_regularization=1.0, random_state=SEED
    )
    return Pipeline([("features", preprocess.TripFeatures()), ("columns", columns), ("classifier", classifier)])


def holdout_metrics(is_member: np.ndarray, proba: np.ndarray, prefix: str) -> dict[str, float]:
    """The hold-out scores of P(Member), with the decision at `DECISION_THRESHOLD`."""
    predicted = proba >= DECISION_THRESHOLD
    return {
        f"{prefix}_roc_auc": roc_auc_score(is_member, proba),
        f"{prefix}_log_loss": log_loss(is_member, proba, labels=[0, 1]),
        f"{prefix}_brier": brier_score_loss(is_member, proba),
        f"{prefix}_precision": precision_score(is_member, predicted, zero_division=0),
        f"{prefix}_recall": recall_score(is_member, predicted, zero_division=0),
    }


def _log_figures(is_member: np.ndarray, proba: np.ndarray) -> None:
    """The ROC curve and the confusion matrix, drawn on plain Figures (no pyplot state, no display)."""
    roc = RocCurveDisplay.from_predictions(
        is_member, proba, name="model", plot_chance_level=True, ax=Figure().subplots()
    )
    roc.ax_.set_title("Hold-out ROC: P(Member)")
    mlflow.log_figure(roc.figure_, "roc_curve.png")
    matrix = ConfusionMatrixDisplay.from_predictions(
        np.where(is_member, preprocess.MEMBER, preprocess.CASUAL),
        membership(proba),
        ax=Figure().subplots(),
    )
    matrix.ax_.set_title(f"Hold-out confusion matrix (threshold {DECISION_THRESHOLD})")
    mlflow.log_figure(matrix.figure_, "confusion_matrix.png")


@dataclass(frozen=True)
class TrainingResult:
    version: str
    run_id: str
    metrics: dict[str, float]


def train(settings: Settings, paths: list[Path], cv_folds: int = 5) -> TrainingResult:
    """Fit, evaluate, log, register and promote; returns the promoted version and its metrics."""
    trips = load_labelled_trips(paths)
    features = trips[preprocess.MODEL_INPUT_COLUMNS]
    is_member = (trips["user_type"] == preprocess.MEMBER).to_numpy(dtype=int)
    train_x, test_x, train_y, test_y = train_test_split(
        features, is_member, test_size=HOLDOUT_SHARE, stratify=is_member, random_state=SEED
    )

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    mlflow.set_experiment(settings.experiment_name)
    with mlflow.start_run() as run:
        pipeline = build_pipeline()
        folds = StratifiedKFold(cv_folds, shuffle=True, random_state=SEED)
        cv_auc = cross_val_score(pipeline, train_x, train_y, cv=folds, scoring="roc_auc")
        pipeline.fit(train_x, train_y)
        proba = pipeline.predict_proba(test_x)[:, list(pipeline.classes_).index(1)]
        prior = DummyClassifier(strategy="prior").fit(train_x, train_y).predict_proba(test_x)[:, 1]

        metrics = {
            "cv_roc_auc_mean": float(cv_auc.mean()),
            "cv_roc_auc_std": float(cv_auc.std()),
            **holdout_metrics(test_y, proba, "holdout"),
            **holdout_metrics(test_y, prior, "prior"),
        }
        mlflow.log_params(
            {
                "data_files": ",".join(path.name for path in paths),
                "train_rows": len(train_x),
                "holdout_rows": len(test_x),
                "member_share": round(float(is_member.mean()), 4),
                "cv_folds": cv_folds,
                "decision_threshold": DECISION_THRESHOLD,
                **{
                    f"classifier_{key}": value for key, value in pipeline.named_steps["classifier"].get_params().items()
                },
            }
        )
        mlflow.log_metrics(metrics)
        _log_figures(test_y, proba)
        # The reference `batch.py evaluate` measures drift against: the features this model learnt from.
        mlflow.log_dict(drift.feature_profile(drift.model_features(train_x)), drift.PROFILE_ARTIFACT)

        example = train_x.head(5)
        model_info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(example, pipeline.predict_proba(example)),
            input_example=example,
            code_paths=[str(Path(preprocess.__file__))],
            skops_trusted_types=SKOPS_TRUSTED_TYPES,
            pyfunc_predict_fn="predict_proba",
            registered_model_name=settings.registered_model,
        )
    version = str(model_info.registered_model_version)
    promote(MlflowClient(settings.tracking_uri, settings.tracking_uri), settings.registered_model, version)
    return TrainingResult(version=version, run_id=run.info.run_id, metrics=metrics)


def promote(client: MlflowClient, name: str, version: str) -> None:
    """Make `version` the Production one: stage (archiving the previous) and alias."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, PRODUCTION_STAGE, archive_existing_versions=True)
    client.set_registered_model_alias(name, PRODUCTION_ALIAS, version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="*", type=Path, default=DEFAULT_DATA, help="trip files (default: data/*.csv.gz)")
    parser.add_argument("--if-missing", action="store_true", help="do nothing if a Production version exists")
    parser.add_argument("--cv-folds", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()

    if args.if_missing and has_production_model(settings):
        print(f"{settings.registered_model} already has a Production version at {settings.tracking_uri}; not training")
        return 0
    result = train(settings, args.data, cv_folds=args.cv_folds)
    metrics = result.metrics
    print(
        f"promoted {settings.registered_model} version {result.version} to Production (run {result.run_id})\n"
        f"  cv ROC AUC {metrics['cv_roc_auc_mean']:.4f} ± {metrics['cv_roc_auc_std']:.4f}\n"
        f"  hold-out ROC AUC {metrics['holdout_roc_auc']:.4f} (prior {metrics['prior_roc_auc']:.4f}), "
        f"log loss {metrics['holdout_log_loss']:.4f} (prior {metrics['prior_log_loss']:.4f}), "
        f"Brier {metrics['holdout_brier']:.4f} (prior {metrics['prior_brier']:.4f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
