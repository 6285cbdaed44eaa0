"""The champion/challenger gate, the model card, promotion and rollback, in the MLflow Model Registry.

A newly registered version gets the alias `challenger`. It is promoted (stage Production, alias
`production`; the version it replaces gets the alias `previous`) only when, on the time-ordered test month:
- it beats the prior, the Member share of the months it learnt from: ROC AUC higher by at least
  MIN_AUC_GAIN_OVER_PRIOR and log loss lower by at least MIN_LOG_LOSS_GAIN_OVER_PRIOR (the only check for
  the first model, with nothing in Production);
- it is not worse than the Production version (the champion) beyond a tolerance: ROC AUC at most
  AUC_TOLERANCE lower, log loss at most LOG_LOSS_TOLERANCE higher.
Both are MLflow's `validate_evaluation_results` with `MetricThreshold`s, on scores computed by evaluation.py.

The champion is scored on the same test month only if it did not learn from it (its card's `data_end` is
before the month). A champion trained on that month, as a retrain on the same files is, would be scored on
trips it has seen; its own time-ordered figures on that same month stand in for it (`recorded`). A champion
that saw the month but was tested on another one (or has no card) is scored anyway, and the comparison says
`in-sample`: its figures flatter it, so the gate errs towards keeping it (`--force` overrides).

`rollback` moves Production back to the `previous` version.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException
from mlflow.tracking import MlflowClient

from bikeshare_membership.registry import (
    PRODUCTION_ALIAS,
    PRODUCTION_STAGE,
    NoProductionModel,
    alias_version,
    production_version,
)

CHALLENGER_ALIAS = "challenger"
PREVIOUS_ALIAS = "previous"
MIN_AUC_GAIN_OVER_PRIOR = 0.02
MIN_LOG_LOSS_GAIN_OVER_PRIOR = 0.001
AUC_TOLERANCE = 0.005
LOG_LOSS_TOLERANCE = 0.002
GATED_METRICS = ("roc_auc", "log_loss")


@dataclass(frozen=True)
class ChampionScore:
    """The Production version's ROC AUC and log loss on the test month, and how they were obtained."""

    version: str
    scores: dict[str, float]  # roc_auc, log_loss; empty when it could not be scored
    evidence: str  # scored, recorded, in-sample, or why it could not be scored


@dataclass(frozen=True)
class Verdict:
    promote: bool
    forced: bool
    reason: str  # one line
    challenger: dict[str, float]
    prior: dict[str, float]
    champion: ChampionScore | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        if self.forced:
            return "forced"
        return "promoted" if self.promote else "refused"


def _failed(
    thresholds: dict[str, MetricThreshold], candidate: Mapping[str, float], baseline: Mapping[str, float] | None
) -> list[str]:
    """The metrics of `candidate` that fail MLflow's validation against the thresholds (and `baseline`)."""
    try:
        mlflow.validate_evaluation_results(
            thresholds,
            EvaluationResult(dict(candidate), {}, run_id=""),
            EvaluationResult(dict(baseline), {}, run_id="") if baseline is not None else None,
        )
    except ModelValidationFailedException as failure:
        return [name for name in thresholds if f"Metric {name} " in str(failure)]
    return []


def judge(
    challenger: Mapping[str, float], prior: Mapping[str, float], champion: ChampionScore | None, force: bool = False
) -> Verdict:
    """The gate's verdict on a challenger's test-month ROC AUC and log loss; see the module docstring."""
    over_prior = {
        "roc_auc": MetricThreshold(min_absolute_change=MIN_AUC_GAIN_OVER_PRIOR, greater_is_better=True),
        "log_loss": MetricThreshold(min_absolute_change=MIN_LOG_LOSS_GAIN_OVER_PRIOR, greater_is_better=False),
    }
    problems = []
    if failed := _failed(over_prior, challenger, prior):
        gains = {"roc_auc": f"+{MIN_AUC_GAIN_OVER_PRIOR}", "log_loss": f"-{MIN_LOG_LOSS_GAIN_OVER_PRIOR}"}
        shortfalls = [
            f"{name} {challenger[name]:.4f} vs the prior's {prior[name]:.4f} {gains[name]}" for name in failed
        ]
        problems.append(f"does not beat the prior ({', '.join(shortfalls)})")
    if champion is not None and champion.scores:
        limits = {
            "roc_auc": champion.scores["roc_auc"] - AUC_TOLERANCE,
            "log_loss": champion.scores["log_loss"] + LOG_LOSS_TOLERANCE,
        }
        not_worse = {
            "roc_auc": MetricThreshold(threshold=limits["roc_auc"], greater_is_better=True),
            "log_loss": MetricThreshold(threshold=limits["log_loss"], greater_is_better=False),
        }
        if failed := _failed(not_worse, challenger, None):
            shortfalls = [f"{name} {challenger[name]:.4f} vs {champion.scores[name]:.4f}" for name in failed]
            problems.append(
                f"worse than Production version {champion.version} ({champion.evidence}) beyond the tolerance "
                f"({', '.join(shortfalls)})"
            )
    against = f"Production version {champion.version} ({champion.evidence})" if champion else "the prior"
    if champion is not None and not champion.scores:
        against = f"the prior (Production version {champion.version} {champion.evidence})"
    figures = ", ".join(f"{name} {challenger[name]:.4f}" for name in GATED_METRICS)
    if not problems:
        reason = f"passed: {figures}, not worse than {against}"
    else:
        reason = ("forced past the gate: " if force else "refused: ") + "; ".join(problems)
    return Verdict(not problems or force, force and bool(problems), reason, dict(challenger), dict(prior), champion)


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Make `version` the Production one (stage, archiving the others, and alias); the version it replaces
    gets the alias `previous`, which `rollback` returns to. Returns the replaced version, if any."""
    try:
        replaced: str | None = str(production_version(client, name).version)
    except NoProductionModel:
        replaced = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, PRODUCTION_STAGE, archive_existing_versions=True)
    client.set_registered_model_alias(name, PRODUCTION_ALIAS, version)
    if replaced is not None and replaced != version:
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, replaced)
    if _alias_version(client, name, CHALLENGER_ALIAS) == version:
        client.delete_registered_model_alias(name, CHALLENGER_ALIAS)
    return replaced


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Move Production back to the `previous` version; returns (the version rolled back from, to).

    The alias `previous` is removed, so a second rollback does not bounce back to the version left."""
    target = _alias_version(client, name, PREVIOUS_ALIAS)
    if target is None:
        raise LookupError(f"model {name!r} has no {PREVIOUS_ALIAS!r} version to roll back to")
    current = str(production_version(client, name).version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, target, PRODUCTION_STAGE, archive_existing_versions=True)
    client.set_registered_model_alias(name, PRODUCTION_ALIAS, target)
    client.delete_registered_model_alias(name, PREVIOUS_ALIAS)
    client.set_model_version_tag(name, current, "rolled_back", f"Production moved back to version {target}")
    return current, target


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    found = alias_version(client, name, alias)
    return None if found is None else str(found.version)


def champion_evidence(champion: ModelVersion, test_month: str) -> tuple[str, dict[str, float] | None]:
    """How the champion can be compared on `test_month` (see the module docstring), with its recorded
    figures when they stand in for it."""
    tags = champion.tags or {}
    data_end = tags.get("data_end")
    if data_end is not None and data_end[:7] < test_month:
        return "scored", None
    if tags.get("test_month") == test_month and all(f"test_{name}" in tags for name in GATED_METRICS):
        return "recorded", {name: float(tags[f"test_{name}"]) for name in GATED_METRICS}
    return "in-sample", None
