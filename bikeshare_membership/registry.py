"""Which version of the registered model is in Production: the alias `production` (MLflow 3), else the newest
version in the `Production` stage (MLflow 2's API, still honoured)."""

from __future__ import annotations

import warnings

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bikeshare_membership.config import Settings

PRODUCTION_ALIAS = "production"
PRODUCTION_STAGE = "Production"


class NoProductionModel(LookupError):
    """The registry has no Production version of the model."""


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` names, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def production_version(client: MlflowClient, name: str) -> ModelVersion:
    """The version the alias `production` names, else the newest one in the Production stage."""
    aliased = alias_version(client, name, PRODUCTION_ALIAS)
    if aliased is not None:
        return aliased
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


def has_production_model(settings: Settings) -> bool:
    """Whether the registry has a Production version (for `train.py --if-missing` and wait_for_model.py)."""
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    try:
        production_version(client, settings.registered_model)
    except NoProductionModel:
        return False
    return True
