"""Prometheus metrics of the service, correct across Gunicorn's worker processes.

Under Gunicorn, gunicorn.conf.py sets `PROMETHEUS_MULTIPROC_DIR` before this module is imported:
prometheus_client then keeps every value in a file per process, and `exposition()` sums the files of
all workers, dead ones included for counters and histograms (so they never go backwards; the master adds a dead
worker's values to one archive file per kind, metrics_archive.py). Values are
per process, so a forked worker starts from zero and records the model it serves itself
(gunicorn.conf.py `post_worker_init`). Without the variable (`python predict.py`, in-process tests),
the usual single-process registry is exposed.

Labels are bounded: the endpoint is the route rule (`/predict/batch/<job_id>`), or `unmatched`.

Histograms take a batch of values with one write per bucket touched (`observe_all`), through prometheus_client
internals. If a release changes them, each value goes through the public `observe` instead: decided at a
process's first batch, with one warning.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import Counter as Tally
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from bikeshare_membership import metrics_archive
from bikeshare_membership.schema import CASUAL, DECISION_THRESHOLD, MEMBER, percent, trip_membership

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bikeshare_membership.model_store import LoadedModel
    from bikeshare_membership.shadow import ShadowScores

log = logging.getLogger(__name__)

MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ  # what prometheus_client decided when it was imported
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROBA_BUCKETS = tuple(float(percent) for percent in range(10, 101, 10))

REQUESTS = Counter("bikeshare_http_requests", "HTTP requests answered", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "bikeshare_http_request_duration_seconds",
    "Time from the request reaching the app to its built response",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
PREDICTIONS = Counter("bikeshare_predictions", "Trips predicted by POST /predict, by class", ["membership"])
PROBA = Histogram("bikeshare_prediction_proba_percent", "Predicted P(Member) in percent", buckets=PROBA_BUCKETS)
MODEL = Gauge(
    "bikeshare_model_loaded",
    "Live worker processes serving this model version (0 once replaced)",
    ["name", "version"],
    multiprocess_mode="livesum",
)
RELOADS = Counter("bikeshare_model_reloads", "New model versions loaded and swapped in")
RELOAD_FAILURES = Counter(
    "bikeshare_model_reload_failures", "Reload checks that failed, by stage (registry, load)", ["stage"]
)
# The shadow challenger (shadow.py), labelled by the version that answered and the shadow's version.
SHADOW_TRIPS = Counter(
    "bikeshare_shadow_trips",
    "Answered trips the shadow scored, by whether its membership agrees with the answer's",
    ["served_version", "shadow_version", "agreement"],
)
DIFFERENCE_BUCKETS = (-50.0, -20.0, -10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
SHADOW_DIFFERENCE = Histogram(
    "bikeshare_shadow_proba_difference_percent",
    "The shadow's P(Member) minus the answer's, in percentage points",
    ["served_version", "shadow_version"],
    buckets=DIFFERENCE_BUCKETS,
)
SHADOW_FAILURES = Counter("bikeshare_shadow_failures", "Answered trips the shadow failed to score", ["shadow_version"])


MEMBER_TRIPS, CASUAL_TRIPS = PREDICTIONS.labels(MEMBER), PREDICTIONS.labels(CASUAL)


def requests_answered(answered: list[tuple[str, str, int, float]]) -> None:
    """Count and time answered requests, given as (endpoint, method, status, seconds)."""
    counts: Tally[tuple[str, str, int]] = Tally()
    latencies: dict[str, list[float]] = {}
    for endpoint, method, status, seconds in answered:
        counts[endpoint, method if method in METHODS else "other", status] += 1
        latencies.setdefault(endpoint, []).append(seconds)
    for (endpoint, method, status), count in counts.items():
        REQUESTS.labels(endpoint, method, str(status)).inc(count)
    for endpoint, values in latencies.items():
        observe_all(LATENCY.labels(endpoint), values)


def trips_predicted(member_probabilities: np.ndarray) -> None:
    """Count answered trips by class and add their probabilities, in percent, to the histogram: from each trip's
    P(Member), as the answers were made (`membership`, `percent`)."""
    members = int(np.count_nonzero(member_probabilities >= DECISION_THRESHOLD))
    if members:
        MEMBER_TRIPS.inc(members)
    if members < len(member_probabilities):
        CASUAL_TRIPS.inc(len(member_probabilities) - members)
    observe_all(PROBA, percent(member_probabilities))


def shadow_compared(answered: Sequence[tuple[str, Sequence[float]]], scores: Sequence[ShadowScores]) -> None:
    """Compare the shadow's scores with the answers: per request, the version that answered and each trip's
    probability; `scores`, the shadow's for the same trips."""
    agreed: Tally[tuple[str, str, str]] = Tally()
    differences: dict[tuple[str, str], list[float]] = {}
    failed: Tally[str] = Tally()
    for (served_version, served_probabilities), shadow in zip(answered, scores, strict=True):
        for served, probability in zip(served_probabilities, shadow["probabilities"], strict=True):
            if probability is None:
                failed[shadow["version"]] += 1
                continue
            same = trip_membership(probability) == trip_membership(served)
            agreed[served_version, shadow["version"], "agree" if same else "disagree"] += 1
            differences.setdefault((served_version, shadow["version"]), []).append((probability - served) * 100)
    for labels, count in agreed.items():
        SHADOW_TRIPS.labels(*labels).inc(count)
    for versions, values in differences.items():
        observe_all(SHADOW_DIFFERENCE.labels(*versions), values)
    for version, count in failed.items():
        SHADOW_FAILURES.labels(version).inc(count)


# Whether prometheus_client's Histogram internals take batched writes (`observe_all`): None until the first batch.
_batched_writes: bool | None = None
_deciding = threading.Lock()


def observe_all(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """`histogram.observe` of each value, with one write per bucket touched where prometheus_client's internals
    allow it (`batched_writes_refused`), else by `observe` of each value: the batch is never lost."""
    if not len(values):
        return
    if _batched_writes is None:
        _decide(histogram)
    if _batched_writes:
        _observe_batched(histogram, values)
    else:
        for value in values:
            histogram.observe(float(value))


def _decide(histogram: Histogram) -> None:
    global _batched_writes
    with _deciding:
        if _batched_writes is not None:  # another thread decided meanwhile
            return
        refused = batched_writes_refused(histogram)
        if refused:
            log.warning("histograms observe one value at a time (prometheus_client's internals changed: %s)", refused)
        _batched_writes = not refused


def batched_writes_refused(histogram: Histogram) -> str | None:
    """Why `histogram`'s internals cannot take `_observe_batched`'s writes, or None if they can: its sorted upper
    bounds ending with +Inf, one stored bucket per bound, and a sum and buckets that each take `inc(amount)`
    (tried with 0, which changes no value)."""
    try:
        bounds, buckets, total = list(histogram._upper_bounds), list(histogram._buckets), histogram._sum
        if not bounds or bounds != sorted(bounds) or bounds[-1] != math.inf or len(buckets) != len(bounds):
            return f"{len(bounds)} upper bounds {bounds[-3:]} and {len(buckets)} buckets"
        total.inc(0)
        for bucket in buckets:
            bucket.inc(0)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _observe_batched(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """What `observe` of each value writes, summed: its stored buckets are not cumulative, index i counts the
    values in (bound i-1, bound i] (`searchsorted` on the left, as `observe`'s own bisect)."""
    values = np.asarray(values, dtype="float64")
    histogram._sum.inc(float(values.sum()))
    counts = np.bincount(np.searchsorted(histogram._upper_bounds, values, side="left"), minlength=1)
    for bucket in np.flatnonzero(counts).tolist():
        histogram._buckets[bucket].inc(int(counts[bucket]))


def model_served(model: LoadedModel, replaced: LoadedModel | None = None) -> None:
    """This process serves `model` now (instead of `replaced`)."""
    if replaced is not None:
        MODEL.labels(replaced.name, replaced.version).set(0)
    MODEL.labels(model.name, model.version).set(1)


def model_refreshed(outcome: str, serving: LoadedModel, replaced: LoadedModel | None) -> None:
    """ModelHolder's report of a registry check (its `on_refresh`): a swap, or where the check failed."""
    if outcome == "swapped":
        RELOADS.inc()
        model_served(serving, replaced)
    else:
        RELOAD_FAILURES.labels(outcome.removesuffix("_failed")).inc()


def exposition() -> bytes:
    """Every metric in Prometheus' text format: summed over all worker processes when there are several."""
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()  # a fresh one per scrape, as prometheus_client's multiprocess docs advise
    multiprocess.MultiProcessCollector(registry)
    with metrics_archive.scraping():  # not while a dead worker's values move to the archive
        return generate_latest(registry)
