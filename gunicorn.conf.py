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

service = Settings.from_env()  # not a Gunicorn setting name, so Gunicorn ignores it
bind = f"0.0.0.0:{service.port}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
preload_app = True
timeout = service.worker_timeout_seconds
# On SIGTERM the master closes its listening socket and each worker finishes the request it holds, then exits;
# a worker still busy after this many seconds is killed.
graceful_timeout = service.graceful_timeout_seconds
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
        holder.start_refreshing(service.refresh_seconds)
