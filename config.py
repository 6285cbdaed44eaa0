"""Configuration, read from the environment in one place, with defaults that work on a laptop.

Every entry point (the web service, `train.py`, `batch.py`) builds a `Settings` with `Settings.from_env()`;
tests build their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 9696


@dataclass(frozen=True)
class Settings:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "bikeshare-membership"
    registered_model: str = "bikeshare-membership"
    port: int = DEFAULT_PORT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            tracking_uri=environ.get("MLFLOW_TRACKING_URI", cls.tracking_uri),
            experiment_name=environ.get("MLFLOW_EXP_NAME", cls.experiment_name),
            registered_model=environ.get("MLFLOW_REGISTERED_MODEL", cls.registered_model),
            port=int(environ.get("MODEL_PORT", cls.port)),
        )
