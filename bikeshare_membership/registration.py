"""Training's outcome into the registry: one MLflow run with the time-ordered figures, the model logged and
registered with its model card, judged by the gate (promotion.py) and promoted when it passes.

The time-ordered evaluation and the candidates are training.py's; the gate, promotion and rollback
promotion.py's; the command line train_cli.py's.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import preprocess
from bikeshare_membership import drift, evaluation, promotion, training
from bikeshare_membership.config import Settings
from bikeshare_membership.errors import first_line
from bikeshare_membership.model_store import load_model_version
from bikeshare_membership.registry import NoProductionModel, production_version
from bikeshare_membership.schema import DECISION_THRESHOLD
from bikeshare_membership.stations import DATA_DIR

DEFAULT_DATA = sorted(DATA_DIR.glob("bikeshare-ridership-*.csv.gz"))
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

# What a registered model carries to load where this project is not installed: the module its feature step is
# named after, and the package that module imports.
CODE_PATHS = [preprocess.__file__, str(Path(__file__).parent)]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    version: str
    run_id: str
    test_month: str
    metrics: dict[str, float]
    verdict: promotion.Verdict
    replaced: str | None  # the Production version it replaced, when promoted


def train(
    settings: Settings,
    paths: list[Path],
    force: bool = False,
    candidates: tuple[training.Candidate, ...] = training.CANDIDATES,
) -> TrainingResult:
    """Evaluate, refit, log, register and judge; promote when the gate passes (or `force`)."""
    trips = training.load_labelled_trips(paths)
    trained = training.train_and_evaluate(trips, candidates)
    time_ordered, pipeline = trained.evaluation, trained.pipeline
    log.info(
        "chose %s (%s); time-ordered test on %s", time_ordered.chosen.name, time_ordered.why, time_ordered.test_month
    )

    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    mlflow.set_experiment(settings.experiment_name)
    name = settings.registered_model
    with mlflow.start_run() as run:
        metrics = _log_evaluation(trips, time_ordered, pipeline)
        example = trips.inputs.head(5)
        printed = io.StringIO()  # MLflow prints registration notices to stderr: they go to the JSON log instead
        with contextlib.redirect_stderr(printed):
            model_info = mlflow.sklearn.log_model(
                pipeline,
                name="model",
                signature=infer_signature(example, pipeline.predict_proba(example)),
                input_example=example,
                code_paths=CODE_PATHS,
                skops_trusted_types=SKOPS_TRUSTED_TYPES,
                pyfunc_predict_fn="predict_proba",
                registered_model_name=name,
            )
        for line in filter(None, printed.getvalue().splitlines()):
            log.info("%s", line)
        version = str(model_info.registered_model_version)
        client.set_registered_model_alias(name, promotion.CHALLENGER_ALIAS, version)
        challenger = {metric: metrics[f"test_{metric}"] for metric in promotion.GATED_METRICS}
        prior = {metric: metrics[f"prior_{metric}"] for metric in promotion.GATED_METRICS}
        verdict = promotion.judge(challenger, prior, _champion_score(settings, client, time_ordered), force)
        if verdict.champion is not None:
            mlflow.log_metrics({f"champion_test_{key}": value for key, value in verdict.champion.scores.items()})
        mlflow.set_tags({"gate": verdict.label, "gate_reason": verdict.reason, "registered_version": version})
        mlflow.log_dict(verdict.as_dict(), "gate.json")
        description, tags = model_card(trips, time_ordered, verdict)
        client.update_model_version(name, version, description=description)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    replaced = promotion.promote(client, name, version) if verdict.promote else None
    return TrainingResult(version, run.info.run_id, time_ordered.test_month, metrics, verdict, replaced)


def _log_evaluation(
    trips: training.LabelledTrips, time_ordered: training.TimeOrderedEvaluation, pipeline: object
) -> dict[str, float]:
    """Parameters, the time-ordered metrics (test month, prior, each validation month), the figures and the
    feature profile of the refitted model, logged to the active run; returns the metrics."""
    chosen = time_ordered.chosen
    mlflow.log_params(
        {
            "data_files": ",".join(trips.files),
            "rows": len(trips),
            "member_share": round(float(trips.is_member.mean()), 4),
            "months": ",".join(training.month_name(month) for month in trips.months),
            "test_month": time_ordered.test_month,
            "test_rows": time_ordered.test.rows,
            "candidate": chosen.name,
            "candidate_choice": time_ordered.why,
            "features": ",".join(chosen.features),
            "refit": "all months, the test month included",
            "decision_threshold": DECISION_THRESHOLD,
            **{f"classifier_{key}": value for key, value in chosen.classifier_params.items()},
        }
    )
    metrics = {**time_ordered.test.scores, **time_ordered.prior.scores}
    for month in time_ordered.validation[chosen.name] + [time_ordered.test]:
        metrics |= {f"month_{month.month}_{key.split('_', 1)[1]}": value for key, value in month.scores.items()}
    for candidate in time_ordered.validation:
        for metric in promotion.GATED_METRICS:
            metrics[f"validation_{metric}_{candidate}"] = time_ordered.mean_validation(candidate, metric)
    mlflow.log_metrics(metrics)
    mlflow.log_dict(
        {
            "test_month": time_ordered.test_month,
            "chosen": chosen.name,
            "why": time_ordered.why,
            "test": asdict(time_ordered.test),
            "prior": asdict(time_ordered.prior),
            "validation": {
                name: [asdict(month) for month in months] for name, months in time_ordered.validation.items()
            },
        },
        "time_ordered.json",
    )
    evaluation.log_figures(
        time_ordered.test_is_member, time_ordered.test_proba, f"Test month {time_ordered.test_month}"
    )
    # The reference `batch.py evaluate` measures drift against: the features the registered model learnt from.
    mlflow.log_dict(drift.feature_profile(drift.model_features(pipeline, trips.inputs)), drift.PROFILE_ARTIFACT)
    return metrics


def _champion_score(
    settings: Settings, client: MlflowClient, time_ordered: training.TimeOrderedEvaluation
) -> promotion.ChampionScore | None:
    """The Production version's ROC AUC and log loss on the test month (see promotion.py), None without one."""
    try:
        champion = production_version(client, settings.registered_model)
    except NoProductionModel:
        return None
    version = str(champion.version)
    evidence, recorded = promotion.champion_evidence(champion, time_ordered.test_month)
    if recorded is not None:
        return promotion.ChampionScore(version, recorded, evidence)
    try:
        proba = load_model_version(settings, version).member_probability(time_ordered.test_inputs)
    except Exception as error:  # whatever keeps it from scoring here keeps it from serving too
        return promotion.ChampionScore(version, {}, f"could not be scored: {first_line(error)}")
    scores = evaluation.scores(time_ordered.test_is_member, proba, "champion")
    gated = {metric: scores[f"champion_{metric}"] for metric in promotion.GATED_METRICS}
    return promotion.ChampionScore(version, gated, evidence)


def model_card(
    trips: training.LabelledTrips, time_ordered: training.TimeOrderedEvaluation, verdict: promotion.Verdict
) -> tuple[str, dict[str, str]]:
    """The registered version's description and tags: its data, its time-ordered figures, the gate's verdict
    and its features."""
    start, end = trips.inputs["trip_start_time"].min(), trips.inputs["trip_start_time"].max()
    test, prior, chosen = time_ordered.test, time_ordered.prior, time_ordered.chosen
    tags = {
        "data_files": ",".join(trips.files),
        "data_start": start.isoformat(),
        "data_end": end.isoformat(),
        "rows": str(len(trips)),
        "member_share": f"{trips.is_member.mean():.4f}",
        "test_month": test.month,
        "test_trained_on": ",".join(test.trained_on),
        "test_rows": str(test.rows),
        **{key: f"{value:.4f}" for key, value in {**test.scores, **prior.scores}.items()},
        "candidate": chosen.name,
        "features": ",".join(chosen.features),
        "refit": "all months, the test month included",
        "gate": verdict.label,
        "gate_reason": verdict.reason,
    }
    description = (
        f"Member or Casual rider, from {len(trips):,} labelled trips of {len(trips.files)} file(s), "
        f"{start:%Y-%m-%d} to {end:%Y-%m-%d}, {trips.is_member.mean():.1%} Members.\n\n"
        f"Time-ordered test: trained on {', '.join(test.trained_on)}, tested on {test.month} ({test.rows:,} trips it "
        f"had not seen): ROC AUC {test.scores['test_roc_auc']:.4f}, log loss {test.scores['test_log_loss']:.4f} "
        f"(the prior: {prior.scores['prior_log_loss']:.4f}), Brier {test.scores['test_brier']:.4f}. "
        f"This version was then refitted on every month, {test.month} included.\n\n"
        f"Gate: {verdict.reason}.\n\n"
        f"Candidate {chosen.name} ({time_ordered.why}); features: {', '.join(chosen.features)}."
    )
    return description, tags
