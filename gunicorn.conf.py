"""Gunicorn settings for the prediction service: `gunicorn --config gunicorn.conf.py` serves `predict:app()`.

The app is preloaded, so the master loads the model once and the workers share it by fork. Two sync
workers fit this 2-core machine; set WEB_CONCURRENCY to the number of cores on a bigger host.

Metrics: the workers write their values to files in PROMETHEUS_MULTIPROC_DIR (the environment's, emptied
at start, else a private temporary folder) and any worker's /metrics sums them (metrics.py). Logs: JSON
lines on stderr (jsonlog.py), Gunicorn's own included; the app logs each request once, so Gunicorn's access
log is off. (Modules named here are in bikeshare_membership/.)
"""

import atexit
import gc
import glob
import os
import shutil
import sys
import tempfile
from typing import Any

from gunicorn.glogging import Logger

# One OpenMP thread per process, set before the preloaded app loads scikit-learn: libgomp's thread pool does
# not survive fork, so a worker's first call through scikit-learn (a list of over 1,000 trips) would hang
# until Gunicorn killed it. One worker per core is the parallelism anyway.
os.environ["OMP_NUM_THREADS"] = "1"

from bikeshare_membership import jsonlog
from bikeshare_membership.config import settings_from_env

MASTER_PID = os.getpid()  # the process that reads this file


def remove_in_master(folder: str) -> None:
    """For atexit: the master's exit, also when the app fails to load (Gunicorn's on_exit does not run then);
    not a worker's, which runs the same handlers after the fork."""
    if os.getpid() == MASTER_PID:
        shutil.rmtree(folder, ignore_errors=True)


# Before anything imports prometheus_client, which picks its multiprocess mode from this variable on import.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bikeshare-metrics-")
    atexit.register(remove_in_master, os.environ["PROMETHEUS_MULTIPROC_DIR"])
else:
    for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(stale)  # a previous run's values

from bikeshare_membership import metrics_archive  # noqa: E402

# Not a Gunicorn setting name, so Gunicorn ignores it. An invalid setting exits here with its one line: Gunicorn
# would print an exception's traceback, a SystemExit passes through.
service = settings_from_env("bikeshare-membership")
# The app factory (predict.py); a command line naming another app overrides it (the benchmark's no-op floor).
wsgi_app = "predict:app()"
bind = f"0.0.0.0:{service.port}"
workers = service.workers
preload_app = True
timeout = service.worker_timeout_seconds
# On SIGTERM the master closes its listening socket and each worker finishes the request it holds, then exits;
# a worker still busy after this many seconds is killed.
graceful_timeout = service.graceful_timeout_seconds
keepalive = 5
max_requests = 20_000
max_requests_jitter = 2_000
# Each worker's heartbeat is a file it touches between requests; on a disk-backed folder (Docker's /tmp, on an EBS
# volume on EC2) that call can block the worker, Gunicorn's FAQ warns. /dev/shm is in memory wherever it exists.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
control_socket_disable = True  # Gunicorn 26+ would share one control socket path between instances
logconfig_dict = jsonlog.LOGGING  # from the start; the app's preload applies it again (app.serve_app)


class ErrorOnlyLogger(Logger):
    """Gunicorn's logger without its access log, which a logconfig_dict would otherwise turn on: the app
    logs every request itself (recorder.py)."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        pass


logger_class = ErrorOnlyLogger


def when_ready(server: Any) -> None:
    """After the master preloaded the app: freeze what it allocated, so the workers' garbage collector skips
    those objects (cheaper collections, and pages stay shared between the forked workers)."""
    gc.freeze()


def post_worker_init(worker: Any) -> None:
    if "model_holder" in worker.wsgi.extensions:  # the benchmark's no-op HTTP floor has no model
        from bikeshare_membership.app import start_serving  # loaded already by the preload

        start_serving(worker.wsgi)


def worker_exit(server: Any, worker: Any) -> None:
    """In the worker, as it exits (SIGTERM, max_requests): its request records not yet written, then the end of
    the process. (The master calls this too for a worker already gone, which has no app.)"""
    app = getattr(worker, "wsgi", None)
    if app is not None and "recorder" in app.extensions:
        from bikeshare_membership.app import stop_serving

        stop_serving(app)
    if worker.pid == os.getpid():
        end_worker(sys.exc_info()[1])  # Gunicorn calls this hook while the worker's SystemExit is raised


def end_worker(exiting: BaseException | None) -> None:
    """End the worker with the status Gunicorn exits it with, after the atexit handlers but without the
    interpreter's teardown, as multiprocessing ends its forked children. Freeing every object of the preloaded
    app writes to pages the worker shares with the master, which the kernel copies first, on a core the other
    workers are serving from (docs/performance.md, "A worker's exit"). Any other exit is left to Python."""
    if not isinstance(exiting, SystemExit) or not (exiting.code is None or isinstance(exiting.code, int)):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exiting.code or 0)


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's gauges leave the sums; its counters and histograms join the archive of workers gone."""
    metrics_archive.archive_dead_worker(worker.pid)
