"""Gunicorn settings for the prediction service: `gunicorn --config gunicorn.conf.py predict:app`.

The app is preloaded, so the master loads the model once and the workers share it by fork. Two sync
workers fit this 2-core machine; set WEB_CONCURRENCY to the number of cores on a bigger host.
"""

import gc
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Gunicorn reads this file before --chdir
# One OpenMP thread per process, set before the preloaded app loads scikit-learn: libgomp's thread pool does
# not survive fork, so a worker's first call through scikit-learn (a list of over 1,000 trips) would hang
# until Gunicorn killed it. One worker per core is the parallelism anyway.
os.environ["OMP_NUM_THREADS"] = "1"

from config import Settings

bind = f"0.0.0.0:{Settings.from_env().port}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
preload_app = True
timeout = 30
graceful_timeout = 30
keepalive = 5
max_requests = 20_000
max_requests_jitter = 2_000
accesslog = "-"
control_socket_disable = True  # Gunicorn 26+ would share one control socket path between instances


def when_ready(server: Any) -> None:
    """After the master preloaded the app: freeze what it allocated, so the workers' garbage collector skips
    those objects (cheaper collections, and pages stay shared between the forked workers)."""
    gc.freeze()


def post_worker_init(worker: Any) -> None:
    """Each worker checks the registry for newly promoted versions (threads do not survive the fork)."""
    holder = worker.wsgi.extensions.get("model_holder")  # the benchmark's no-op HTTP floor has no model
    if holder is not None:
        holder.start_refreshing(Settings.from_env().refresh_seconds)
