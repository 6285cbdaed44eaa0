"""Configuration, read from the environment in one place, with defaults that work on a laptop.

Every entry point (the web service, `train.py`, `batch.py`, `wait_for_model.py`) builds its `Settings` with
`settings_from_env`: a value that cannot be used ends the process with one line naming the variable and the
problem (`MODEL_PORT: 'abc' is not an integer`), not a traceback. Tests build their own `Settings`, which are
not checked (a service that may run no batch job, `max_batch_jobs=0`, is one of them).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PORT = 9696
# The exit status of an entry point refusing a setting (as argparse's for a bad command line).
INVALID_SETTING_STATUS = 2


class InvalidSetting(ValueError):
    """An environment variable whose value cannot be used: the message, one line, names it and the problem."""


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
    # Gunicorn's sync worker processes: one per core, as the work is CPU-bound (docs/operations.md).
    workers: int = 2
    # Enables `POST /admin/reload` for callers presenting it as a Bearer token; None: the route does not exist.
    admin_token: str | None = field(default=None, repr=False)
    # The prediction log (prediction_log.py): a local folder or s3:// prefix; None: answers are not logged.
    prediction_log: str | None = None
    prediction_log_roll_seconds: float = 60.0  # a worker writes a file at least this often (and at 100,000 trips)
    prediction_log_max_pending: int = 200_000  # trips a worker holds at most while the destination fails
    # The alias of the version scored in shadow beside the served one (shadow.py); None: no shadow.
    shadow_model_alias: str | None = None
    # Where `spark_score.py` keeps Java's class archive for the Spark it starts (spark_classes.py); empty: none.
    spark_class_cache: str = "~/.cache/bikeshare-membership/spark-classes"

    @property
    def monitoring_experiment_name(self) -> str:
        return self.monitoring_experiment or f"{self.experiment_name}-monitoring"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Each field from its variable (ENVIRONMENT), converted to the type of its default and checked against
        its LIMITS; an empty value of a field whose default is None means None. Raises InvalidSetting."""
        values: dict[str, Any] = {}
        for name, variable in ENVIRONMENT.items():
            if variable in environ:
                values[name] = _value(name, variable, environ[variable], getattr(cls, name))
        settings = cls(**values)
        if settings.shadow_model_alias and settings.model_path:
            raise InvalidSetting("SHADOW_MODEL_ALIAS: a shadow comes from the registry, and MODEL_PATH is set")
        return settings

    def to_env(self) -> dict[str, str]:
        """The environment that gives a child process (a batch job) these same settings; not the admin token,
        which a child has no use for."""
        return {
            variable: "" if (value := getattr(self, name)) is None else str(value)
            for name, variable in ENVIRONMENT.items()
            if name != "admin_token"
        }


def _value(name: str, variable: str, text: str, default: Any) -> Any:
    if default is None:
        return text or None
    if isinstance(default, str):
        return text
    kind = "an integer" if isinstance(default, int) else "a number"
    try:
        value = type(default)(text)
    except ValueError:
        raise InvalidSetting(f"{variable}: {text!r} is not {kind}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidSetting(f"{variable}: {text!r} is not a finite number")
    allowed, wanted = LIMITS[name]
    if not allowed(value):
        raise InvalidSetting(f"{variable}: {text!r} is not {wanted}")
    return value


def settings_from_env(
    program: str, environ: Mapping[str, str] = os.environ, status: int = INVALID_SETTING_STATUS
) -> Settings:
    """`Settings.from_env` for an entry point: an InvalidSetting ends the process with its one line on stderr,
    `<program>: <VARIABLE>: <problem>`, and exit `status`, instead of a traceback. (Raised from Gunicorn's
    configuration file or its preloaded app factory, the SystemExit passes through Gunicorn too.)"""
    try:
        return Settings.from_env(environ)
    except InvalidSetting as error:
        print(f"{program}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None


def _above_zero(value: float) -> bool:
    return value > 0


ABOVE_ZERO = (_above_zero, "above 0")
# What each number may be: a test, and what it asks for ("VARIABLE: 'text' is not <that>"). Every int and float
# field has an entry.
LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "port": (lambda port: 1 <= port <= 65535, "a port number from 1 to 65535"),
    # 0: only when a reload is requested (model_holder.start_refreshing).
    "refresh_seconds": (lambda seconds: seconds >= 0, "0 or more (0: check only when a reload is requested)"),
    "fetch_timeout_seconds": ABOVE_ZERO,
    "fetch_retries": (lambda retries: retries >= 0, "0 or more"),  # 0: one attempt
    "max_batch_jobs": ABOVE_ZERO,  # a service without jobs leaves BATCH_ROOT and BATCH_S3_PREFIX unset
    "eval_min_roc_auc": (lambda auc: 0 <= auc <= 1, "between 0 and 1"),
    "max_body_bytes": ABOVE_ZERO,
    "max_trips_per_request": ABOVE_ZERO,
    # Gunicorn reads a timeout of 0 as "never kill a silent worker", which no deployment of this service wants.
    "worker_timeout_seconds": ABOVE_ZERO,
    "graceful_timeout_seconds": ABOVE_ZERO,  # 0 would kill in-flight requests at once on SIGTERM
    "workers": ABOVE_ZERO,
    "prediction_log_roll_seconds": ABOVE_ZERO,
    "prediction_log_max_pending": ABOVE_ZERO,
}


# Each setting's environment variable: the one table `from_env` reads and `to_env` writes.
ENVIRONMENT = {
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "experiment_name": "MLFLOW_EXP_NAME",
    "registered_model": "MLFLOW_REGISTERED_MODEL",
    "port": "MODEL_PORT",
    "model_cache_dir": "MODEL_CACHE_DIR",
    "refresh_seconds": "MODEL_REFRESH_SECONDS",
    "fetch_timeout_seconds": "MODEL_FETCH_TIMEOUT",
    "fetch_retries": "MODEL_FETCH_RETRIES",
    "model_path": "MODEL_PATH",
    "batch_root": "BATCH_ROOT",
    "batch_s3_prefix": "BATCH_S3_PREFIX",
    "batch_state_dir": "BATCH_STATE_DIR",
    "max_batch_jobs": "MAX_BATCH_JOBS",
    "monitoring_experiment": "MLFLOW_MONITORING_EXP_NAME",
    "eval_min_roc_auc": "EVAL_MIN_ROC_AUC",
    "max_body_bytes": "MAX_BODY_BYTES",
    "max_trips_per_request": "MAX_TRIPS_PER_REQUEST",
    "worker_timeout_seconds": "WORKER_TIMEOUT",
    "graceful_timeout_seconds": "GRACEFUL_TIMEOUT",
    "workers": "WEB_CONCURRENCY",
    "admin_token": "ADMIN_TOKEN",
    "prediction_log": "PREDICTION_LOG",
    "prediction_log_roll_seconds": "PREDICTION_LOG_ROLL_SECONDS",
    "prediction_log_max_pending": "PREDICTION_LOG_MAX_PENDING",
    "shadow_model_alias": "SHADOW_MODEL_ALIAS",
    "spark_class_cache": "SPARK_CLASS_CACHE",
}
