"""Hot reload: the model a process serves, and a background check that swaps in newly promoted versions.

`ModelHolder` checks the registry every `MODEL_REFRESH_SECONDS` in a background thread, loads a newly
promoted version beside the current one and swaps the reference; a request that already holds the old model
finishes on it. `POST /admin/reload` asks every process on the host to check now (see
`ModelHolder.request_reload`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import Field
from typing_extensions import TypedDict

from bikeshare_membership.config import Settings
from bikeshare_membership.errors import first_line
from bikeshare_membership.model_store import FETCH_ERRORS, LoadedModel, ModelStore, ServedModel, load_model_path
from bikeshare_membership.registry import NoProductionModel
from bikeshare_membership.schema import Timestamp, closed
from bikeshare_membership.shadow import Shadow, ShadowState

RELOAD_POLL_SECONDS = 1.0  # how often every worker's refresh thread looks at the reload marker

log = logging.getLogger(__name__)

# Told the outcome of a registry check that changed or failed something ("swapped", "registry_failed",
# "load_failed"), the model served after it and, on a swap, the one it replaced (metrics.model_refreshed).
RefreshListener = Callable[[str, LoadedModel, LoadedModel | None], None]


@closed
class RegistryCheck(TypedDict):
    """The last registry check: whether it answered, and why not."""

    reachable: Annotated[bool, Field(description="Whether the last registry check answered.")]
    error: str | None
    checked_at: Timestamp | None


@closed
class Health(TypedDict):
    """The service is up and has a model: the one it serves, and the registry's last answer."""

    status: Literal["ok"]
    model: ServedModel
    registry: RegistryCheck
    shadow: Annotated[ShadowState | None, Field(description="The shadow challenger; null without SHADOW_MODEL_ALIAS.")]


class ModelHolder:
    """The model a process serves now, and its shadow challenger if any; a background check swaps in newly
    promoted versions, and the version the shadow's alias names."""

    def __init__(self, store: ModelStore | None, model: LoadedModel, shadow: Shadow | None = None) -> None:
        self.store = store  # None when the model came from a path: nothing to refresh
        self.model = model
        self.shadow = shadow
        self.on_refresh: RefreshListener = lambda outcome, serving, replaced: None
        self.registry_error: str | None = model.metadata.get("fetch_error")
        self.checked_at: str | None = model.loaded_at if store else None
        self._refresh_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # The reload request this model already answers: a worker forked later from a master that loaded it
        # sees a newer marker and checks at once (or it would serve the master's version until its next check).
        self._reload_seen = self._reload_requested_at()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelHolder:
        """The model from `MODEL_PATH` if set (never refreshed), else the registry's Production version, with the
        version `SHADOW_MODEL_ALIAS` names as its shadow."""
        if settings.model_path:
            return cls(None, load_model_path(settings.model_path))
        store = ModelStore(settings)
        model = store.load_production()
        shadow = None
        if settings.shadow_model_alias:
            shadow = Shadow(store, settings.shadow_model_alias)
            shadow.refresh()
        return cls(store, model, shadow)

    def refresh(self) -> bool:
        """Check the registry once; load and swap in a new Production version (True if it swapped), and the
        version the shadow's alias names."""
        if self.store is None:
            return False
        with self._refresh_lock:
            swapped = self._refresh_served(self.store)
            if self.shadow is not None:
                self.shadow.refresh()
            return swapped

    def _refresh_served(self, store: ModelStore) -> bool:
        self.checked_at = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            version = store.production_version()
        except (NoProductionModel, *FETCH_ERRORS) as error:
            self.registry_error = first_line(error)
            log.warning("registry check failed, still serving version %s: %s", self.model.version, self.registry_error)
            self.on_refresh("registry_failed", self.model, None)
            return False
        if str(version.version) == self.model.version:
            self.registry_error = None
            return False
        try:
            candidate = store.load(version)
        except Exception as error:  # a bad version must never take down the one being served
            # The registry answered but the artifacts could not be fetched: /health says so, as it does when
            # this happens at start-up. Each error stands until a check ends, so /health does not flap.
            self.registry_error = first_line(error) if isinstance(error, FETCH_ERRORS) else None
            log.error(
                "failed to load version %s, still serving %s: %s",
                version.version,
                self.model.version,
                first_line(error),
            )
            self.on_refresh("load_failed", self.model, None)
            return False
        self.registry_error = None
        previous, self.model = self.model, candidate
        log.info("now serving %s version %s (was %s)", candidate.name, candidate.version, previous.version)
        self.on_refresh("swapped", candidate, previous)
        return True

    def request_reload(self) -> bool:
        """Check the registry now, and ask the other processes on this host to do the same; True if it swapped.

        The request travels as the mtime of a marker file in the model cache directory, which every worker's
        refresh thread reads each second: the workers of one host already share that directory (its download
        lock too), it needs no signal to the Gunicorn master nor any channel between workers, and a worker
        that was busy or being replaced when the marker was touched still sees it afterwards.
        """
        if self.store is None:
            return False
        swapped = self.refresh()
        self.store.cache_dir.mkdir(parents=True, exist_ok=True)
        self.store.reload_marker.touch()
        self._reload_seen = self._reload_requested_at()  # this process has just checked
        return swapped

    def _reload_requested_at(self) -> int | None:
        """The mtime (ns) of the reload marker, or None if no reload was ever requested."""
        if self.store is None:
            return None
        try:
            return self.store.reload_marker.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def start_refreshing(self, every_seconds: float) -> None:
        """Check every `every_seconds` (with jitter, so workers do not call the registry in step; 0: only
        when a reload is requested), and within a second of `request_reload` in any process of this host."""
        if self.store is None or (self._thread is not None and self._thread.is_alive()):
            return

        def next_check() -> float:
            return time.monotonic() + every_seconds * random.uniform(0.9, 1.1) if every_seconds > 0 else float("inf")

        def run() -> None:
            due = next_check()
            while True:
                requested = self._reload_requested_at()
                if requested != self._reload_seen or time.monotonic() >= due:
                    self._reload_seen = requested
                    self.refresh()
                    due = next_check()
                time.sleep(RELOAD_POLL_SECONDS)

        self._thread = threading.Thread(target=run, name="model-refresh", daemon=True)
        self._thread.start()

    def health(self) -> Health:
        return {
            "status": "ok",
            "model": self.model.served(),
            "registry": {
                "reachable": self.registry_error is None,
                "error": self.registry_error,
                "checked_at": self.checked_at,
            },
            "shadow": self.shadow.state() if self.shadow else None,
        }
