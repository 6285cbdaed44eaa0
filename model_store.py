"""The model store: finds the Production version of the registered model and loads it.

The Production version is the one the alias `production` points at (MLflow 3), or else the newest version
in the `Production` stage (MLflow 2's API, still honoured). Loading happens once, at start-up; requests
only ever see a `LoadedModel`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from config import Settings
from preprocess import CASUAL, MEMBER, MODEL_INPUT_COLUMNS

# P(Member) at or above this is answered `Member`: proba is calibrated, so 0.5 means "more likely than not".
DECISION_THRESHOLD = 0.5
PRODUCTION_ALIAS = "production"
PRODUCTION_STAGE = "Production"

log = logging.getLogger(__name__)


def membership(member_probability: np.ndarray) -> np.ndarray:
    """`Member` or `Casual` for each probability, at `DECISION_THRESHOLD`."""
    return np.where(member_probability >= DECISION_THRESHOLD, MEMBER, CASUAL)


class NoProductionModel(LookupError):
    """The registry has no Production version of the model."""


@dataclass(frozen=True)
class LoadedModel:
    """A fitted pipeline with the registry facts that identify it in every answer."""

    name: str
    version: str
    run_id: str
    pipeline: Any
    source: str
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def member_probability(self, trips: pd.DataFrame) -> np.ndarray:
        """P(Member) for each trip, from the pipeline's `predict_proba`."""
        classes = list(self.pipeline.classes_)
        return self.pipeline.predict_proba(trips[MODEL_INPUT_COLUMNS])[:, classes.index(1)]

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


def production_version(client: MlflowClient, name: str) -> ModelVersion:
    """The version the alias `production` names, else the newest one in the Production stage."""
    try:
        return client.get_model_version_by_alias(name, PRODUCTION_ALIAS)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated in MLflow 3 but still in use
        try:
            versions = client.get_latest_versions(name, stages=[PRODUCTION_STAGE])
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            versions = []
    if not versions:
        raise NoProductionModel(f"no version of model {name!r} is in Production (alias or stage)")
    return max(versions, key=lambda version: int(version.version))


def load_production_model(settings: Settings) -> LoadedModel:
    """Resolve and load the Production version of the registered model."""
    tracking_uri, name = settings.tracking_uri, settings.registered_model
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = production_version(client, name)
    uri = f"models:/{name}/{version.version}"
    started = time.monotonic()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    pipeline = mlflow.sklearn.load_model(uri)
    log.info(
        "loaded model %s version %s (run %s) from %s in %.2fs",
        name,
        version.version,
        version.run_id,
        version.source,
        time.monotonic() - started,
    )
    return LoadedModel(
        name=name, version=str(version.version), run_id=version.run_id or "", pipeline=pipeline, source=uri
    )
