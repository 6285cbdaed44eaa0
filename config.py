"""Configuration, read from the environment in one place, with defaults that work on a laptop.

Every entry point (the web service, `train.py`, `batch.py`) builds a `Settings` with `Settings.from_env()`;
tests build their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    # The folder whose files `POST /predict/batch` may read and write; None refuses every local path.
    batch_root: str | None = None
    # The s3:// prefix (`s3://bucket/prefix/`) under which `POST /predict/batch` may read and write; empty
    # refuses every s3:// location, so a request cannot reach just any bucket the credentials can.
    batch_s3_prefix: str = ""
    # Where batch jobs and `batch.py watch` keep their state: shared by every Gunicorn worker.
    batch_state_dir: str = "batch-state"
    # Batch jobs running at once on this host; more get 503 (each job is a process using the cores).
    max_batch_jobs: int = 2
    # The experiment `batch.py evaluate` logs to; empty means "<experiment_name>-monitoring".
    monitoring_experiment: str = ""
    # `batch.py evaluate` fails (exits non-zero) below this ROC AUC.
    eval_min_roc_auc: float = 0.6
    # Request limits: a larger body gets 413 before it is parsed, a longer list of trips 413 after.
    max_body_bytes: int = 8 * 1024 * 1024
    max_trips_per_request: int = 10_000
    # Gunicorn: a worker silent for longer is killed and replaced; on SIGTERM, in-flight requests get this long.
    worker_timeout_seconds: int = 30
    graceful_timeout_seconds: int = 30
    # Enables `POST /admin/reload` for callers presenting it as a Bearer token; None: the route does not exist.
    admin_token: str | None = field(default=None, repr=False)

    @property
    def monitoring_experiment_name(self) -> str:
        return self.monitoring_experiment or f"{self.experiment_name}-monitoring"

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
            batch_root=environ.get("BATCH_ROOT") or None,
            batch_s3_prefix=environ.get("BATCH_S3_PREFIX", cls.batch_s3_prefix),
            batch_state_dir=environ.get("BATCH_STATE_DIR", cls.batch_state_dir),
            max_batch_jobs=int(environ.get("MAX_BATCH_JOBS", cls.max_batch_jobs)),
            monitoring_experiment=environ.get("MLFLOW_MONITORING_EXP_NAME", cls.monitoring_experiment),
            eval_min_roc_auc=float(environ.get("EVAL_MIN_ROC_AUC", cls.eval_min_roc_auc)),
            max_body_bytes=int(environ.get("MAX_BODY_BYTES", cls.max_body_bytes)),
            max_trips_per_request=int(environ.get("MAX_TRIPS_PER_REQUEST", cls.max_trips_per_request)),
            worker_timeout_seconds=int(environ.get("WORKER_TIMEOUT", cls.worker_timeout_seconds)),
            graceful_timeout_seconds=int(environ.get("GRACEFUL_TIMEOUT", cls.graceful_timeout_seconds)),
            admin_token=environ.get("ADMIN_TOKEN") or None,
        )

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child process (a batch job) these same settings; not the admin token,
        which a child has no use for."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_EXP_NAME": self.experiment_name,
            "MLFLOW_REGISTERED_MODEL": self.registered_model,
            "MODEL_PORT": str(self.port),
            "MODEL_CACHE_DIR": self.model_cache_dir,
            "MODEL_REFRESH_SECONDS": str(self.refresh_seconds),
            "MODEL_FETCH_TIMEOUT": str(self.fetch_timeout_seconds),
            "MODEL_FETCH_RETRIES": str(self.fetch_retries),
            "MODEL_PATH": self.model_path or "",
            "BATCH_ROOT": self.batch_root or "",
            "BATCH_S3_PREFIX": self.batch_s3_prefix,
            "BATCH_STATE_DIR": self.batch_state_dir,
            "MAX_BATCH_JOBS": str(self.max_batch_jobs),
            "MLFLOW_MONITORING_EXP_NAME": self.monitoring_experiment,
            "EVAL_MIN_ROC_AUC": str(self.eval_min_roc_auc),
            "MAX_BODY_BYTES": str(self.max_body_bytes),
            "MAX_TRIPS_PER_REQUEST": str(self.max_trips_per_request),
            "WORKER_TIMEOUT": str(self.worker_timeout_seconds),
            "GRACEFUL_TIMEOUT": str(self.graceful_timeout_seconds),
        }
