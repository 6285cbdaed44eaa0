"""The values of Gunicorn workers gone, kept in one archive file per metric kind in `PROMETHEUS_MULTIPROC_DIR`.

prometheus_client's multiprocess mode keeps a counter and a histogram file for every worker that ever lived, and
every scrape reads them all; with `max_requests` replacing workers, they grow without end. Gunicorn's master
(gunicorn.conf.py `child_exit`) adds an exited worker's values to `counter_archive.db` and
`histogram_archive.db` instead, under a lock each scrape (metrics.py `exposition`) shares, so no scrape sees a
worker's values twice or not at all. This module needs only prometheus_client: the master imports it before the
app, and the benchmark's no-op floor has no app of this package at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Mapping

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

log = logging.getLogger(__name__)

ARCHIVE_NAME = "archive"  # the archive files: counter_archive.db, histogram_archive.db
ARCHIVE_LOCK = "archive.lock"
ARCHIVE_WAIT_SECONDS = 1.0  # a scrape reads the folder in about a millisecond (docs/operations.md)


@contextlib.contextmanager
def scraping() -> Iterator[None]:
    """Held (shared) while a scrape reads the folder: archiving waits for it."""
    descriptor = _open_lock()
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def archive_dead_worker(pid: int) -> None:
    """In Gunicorn's master, as a worker exits: its live gauges go, and its counters and histograms are added to
    the archive files. The sums stay the same: counters and histograms are sums of the same keys.

    Never raises: an exception would stop Gunicorn's master. A failure is logged, and what was not archived stays
    in the worker's files, where it still counts."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    descriptor = None
    try:
        multiprocess.mark_process_dead(pid, folder)
        descriptor = _open_lock()
        if not _locked_for_archiving(descriptor):
            log.warning("metrics of worker %s not archived: a scrape held the folder; its files stay", pid)
            return
        for kind in ("counter", "histogram"):  # a scrape sees them in the worker's file or in the archive, once
            _archive(os.path.join(folder, f"{kind}_{pid}.db"), os.path.join(folder, f"{kind}_{ARCHIVE_NAME}.db"))
    except Exception:
        log.exception("could not archive the metrics of worker %s; what was not archived stays in its files", pid)
    finally:
        if descriptor is not None:
            os.close(descriptor)


def _open_lock() -> int:
    return os.open(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], ARCHIVE_LOCK), os.O_RDWR | os.O_CREAT)


def _locked_for_archiving(descriptor: int) -> bool:
    """The exclusive lock, waiting at most ARCHIVE_WAIT_SECONDS: the master must not hang behind the scrape of a
    stuck worker, which only the master would kill."""
    deadline = time.monotonic() + ARCHIVE_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def _archive(dead: str, archive: str) -> None:
    if not os.path.exists(dead):
        return
    totals = _values(archive) if os.path.exists(archive) else {}
    for key, value in _values(dead).items():
        totals[key] = totals.get(key, 0.0) + value
    _write_values(f"{archive}.new", totals)  # not *.db: a scrape does not read it
    os.replace(f"{archive}.new", archive)
    os.remove(dead)


def _values(path: str) -> dict[str, float]:
    return {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(path)}


def _write_values(path: str, values: Mapping[str, float]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # left by a master killed while writing it
    written = MmapedDict(path)
    try:
        for key, value in values.items():
            written.write_value(key, value, 0.0)
    finally:
        written.close()
