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
    model_cache_dir: str = ".model-cache"
    refresh_seconds: float = 60.0
    fetch_timeout_seconds: float = 10.0
    fetch_retries: int = 2
    model_path: str | None = None  # a local MLflow model directory, served with no registry

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            tracking_uri=environ.get("MLFLOW_TRACKING_URI", cls.tracking_uri),
            experiment_name=environ.get("MLFLOW_EXP_NAME", cls.experiment_name),
            registered_model=environ.get("MLFLOW_REGISTERED_MODEL", cls.registered_model),
            port=int(environ.get("MODEL_PORT", cls.port)),
            model_cache_dir=environ.get("MODEL_CACHE_DIR", cls.model_cache_dir),
            refresh_seconds=float(environ.get("MODEL_REFRESH_SECONDS", cls.refresh_seconds)),
            fetch_timeout_seconds=float(environ.get("MODEL_FETCH_TIMEOUT", cls.fetch_timeout_seconds)),
            fetch_retries=int(environ.get("MODEL_FETCH_RETRIES", cls.fetch_retries)),
            model_path=environ.get("MODEL_PATH") or None,
        )
