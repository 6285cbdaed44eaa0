"""The shadow challenger: the version an alias names (`SHADOW_MODEL_ALIAS`, for example `challenger`), scored
on every answered trip after its answer is sent, so a new model is judged on live traffic before it takes any.

Off the request path: the request recorder's thread (recorder.py) hands `score` the trips of all requests
answered since its last batch, and the shadow scores them in one call. The answers were sent before, and the
served model's probabilities are the ones compared: a shadow never changes or delays an answer.

Failures stay inside: an alias that names no version means no shadow (promotion removes `challenger` from the
version it promotes, so the shadow stops once its challenger serves); a version that cannot be fetched or loaded
leaves the previous shadow, or none, with the error in /health; a batch the shadow fails on is scored trip by
trip, and a trip it fails on gets no shadow probability and is counted (`bikeshare_shadow_failures_total`).

It follows the alias like the served model follows Production: `ModelHolder.refresh` checks both, on the same
schedule and on `POST /admin/reload`, and loads through the same model store and cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from typing_extensions import TypedDict

from bikeshare_membership.errors import first_line
from bikeshare_membership.model_store import FETCH_ERRORS, LoadedModel, ModelStore, ServedModel
from bikeshare_membership.schema import RequestTrips, closed

log = logging.getLogger(__name__)


@closed
class ShadowState(TypedDict):
    """The shadow challenger: the alias it follows, the version it scores (null: none), and why not, if it could
    not check or load one."""

    alias: str
    model: ServedModel | None
    error: str | None


class ShadowScores(TypedDict):
    """A request's trips as the shadow scored them: its version, and P(Member) per trip (None where it failed)."""

    version: str
    probabilities: list[float | None]


class Shadow:
    """The version `alias` names, loaded through the served model's store, and scored beside it."""

    def __init__(self, store: ModelStore, alias: str) -> None:
        self.store, self.alias = store, alias
        self.model: LoadedModel | None = None
        self.error: str | None = None
        self.failing_version: str | None = None  # the version whose failures were logged: once, not per batch

    def refresh(self) -> None:
        """Load the version the alias names, if it changed; no shadow if it names none. Never raises."""
        try:
            version = self.store.alias_version(self.alias)
        except FETCH_ERRORS as error:
            self.error = first_line(error)
            log.warning("shadow: cannot check alias %r: %s", self.alias, self.error)
            return
        if version is None:
            if self.model is not None:
                log.info("shadow: alias %r names no version now; version %s stops", self.alias, self.model.version)
            self.model, self.error = None, None
            return
        if self.model is not None and self.model.version == str(version.version):
            self.error = None
            return
        try:
            model = self.store.load(version)
        except Exception as error:  # the shadow must never take the service down
            self.error = f"version {version.version}: {first_line(error)}"
            log.error("shadow: failed to load %s", self.error)
            return
        self.model, self.error = model, None
        log.info("shadow: scoring %s version %s (alias %r)", model.name, model.version, self.alias)

    def state(self) -> ShadowState:
        return {"alias": self.alias, "model": self.model.served() if self.model else None, "error": self.error}

    def score(self, requests: Sequence[RequestTrips]) -> list[ShadowScores] | None:
        """The shadow's P(Member) for each request's validated trips, in order; None when there is no shadow."""
        model = self.model  # read once: a swap meanwhile takes effect at the next batch
        if model is None:
            return None
        trips = RequestTrips.joined(requests)
        probabilities = self._probabilities(model, trips)
        scores: list[ShadowScores] = []
        start = 0
        for request in requests:
            scores.append({"version": model.version, "probabilities": probabilities[start : start + len(request)]})
            start += len(request)
        return scores

    def _probabilities(self, model: LoadedModel, trips: RequestTrips) -> list[float | None]:
        """All trips in one call; if that fails, trip by trip, with None for each trip that fails."""
        try:
            return list(model.request_probabilities(trips))
        except Exception:
            if self.failing_version != model.version:
                self.failing_version = model.version
                log.exception("shadow: version %s fails on answered trips; scoring them one by one", model.version)
        scored: list[float | None] = []
        for trip in trips.records():
            try:
                scored.append(model.request_probabilities(RequestTrips.one(trip))[0])
            except Exception:
                scored.append(None)
        return scored
