"""Watching a folder or S3 prefix: score each new trip file as it appears (`batch.py watch`), and evaluate
it when it is labelled. A state file remembers what was scored, so a restart neither repeats nor skips work.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from bikeshare_membership import city_files, storage
from bikeshare_membership.batch_jobs import now, write_json
from bikeshare_membership.batch_scoring import is_batch_output, resolve_output, score_file
from bikeshare_membership.config import Settings
from bikeshare_membership.model_store import (
    LoadedModel,
    load_production_model,
)

log = logging.getLogger(__name__)

INTERVAL = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
SECONDS_PER_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """`30s`, `10m`, `1h`, `1d` (or plain seconds) as seconds."""
    match = INTERVAL.fullmatch(text.strip().lower())
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval such as 30s, 10m, 1h or 1d")
    return float(match[1]) * SECONDS_PER_UNIT[match[2]]


def input_files(source: str, settings: Settings) -> list[storage.StoredFile]:
    """The trip files under a folder or prefix: readable suffixes, not results of `score`."""
    return [
        found
        for found in storage.list_files(source, settings)
        if city_files.input_suffix(name := storage.name_of(found.location)) and not is_batch_output(name)
    ]


class WatchState:
    """What `watch` has scored: location -> fingerprint (size and mtime, or the S3 ETag), and the outcome.

    Saved after every file, atomically, so a restart neither scores a file again nor misses one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = json.loads(path.read_text())["files"] if path.exists() else {}

    def is_done(self, found: storage.StoredFile) -> bool:
        return self.files.get(found.location, {}).get("fingerprint") == found.fingerprint

    def pending(self, found: list[storage.StoredFile]) -> list[storage.StoredFile]:
        """What to score now, oldest first: on the first run the newest file; after that every file not done
        that is at least as new as the newest one done (what arrived while `watch` was down included)."""
        new = sorted(
            (item for item in found if not self.is_done(item)), key=lambda item: (item.modified, item.location)
        )
        if not self.files:
            return new[-1:]
        newest_done = max(record["modified"] for record in self.files.values())
        return [item for item in new if item.modified >= newest_done]

    def record(self, found: storage.StoredFile, outcome: dict[str, Any]) -> None:
        self.files[found.location] = {"fingerprint": found.fingerprint, "modified": found.modified, **outcome}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"files": self.files})


def watch(
    settings: Settings,
    source: str,
    every: float,
    state: WatchState,
    output: str | None = None,
    evaluate: bool = False,
    min_roc_auc: float | None = None,
    max_cycles: int | None = None,
) -> None:
    """Score what is new under `source`, sleep `every` seconds, repeat (`max_cycles` times, or forever)."""
    cycle = 0
    while True:
        _watch_once(settings, source, state, output, evaluate, min_roc_auc)
        cycle += 1
        if max_cycles is not None and cycle >= max_cycles:
            return
        time.sleep(every)


def _watch_once(
    settings: Settings,
    source: str,
    state: WatchState,
    output: str | None,
    evaluate: bool,
    min_roc_auc: float | None,
) -> None:
    try:
        pending = state.pending(input_files(source, settings))
    except Exception:  # the store may be down for a while: try again next cycle
        log.exception("cannot list %s", source)
        return
    if not pending:
        log.info("nothing new under %s", source)
        return
    model = load_production_model(settings)  # each cycle, so a newly promoted version takes over
    for found in pending:
        try:
            summary = score_file(settings, found.location, resolve_output(found.location, output), model)
        except Exception:  # one unreadable file must not stop the watch; it is tried again next cycle
            log.exception("scoring %s failed", found.location)
            continue
        print(summary.line(), flush=True)
        outcome: dict[str, Any] = {"scored_at": now(), "summary": summary.as_dict()}
        if evaluate:
            outcome["evaluation"] = _evaluate_in_watch(settings, found.location, model, min_roc_auc)
        state.record(found, outcome)


def _evaluate_in_watch(
    settings: Settings, location: str, model: LoadedModel, min_roc_auc: float | None
) -> dict[str, Any]:
    from bikeshare_membership import monitoring  # MLflow's run logging and matplotlib, only when evaluating

    try:
        result = monitoring.evaluate_file(settings, location, model, floor(settings, min_roc_auc))
    except monitoring.NoLabels:
        log.info("%s has no labels: not evaluated", location)
        return {"evaluated": False}
    except Exception:
        log.exception("evaluating %s failed", location)
        return {"evaluated": False, "error": True}
    if not result.passed:
        log.error("ALERT %s: %s (MLflow run %s)", location, result.message, result.run_id)
    return {"evaluated": True, "passed": result.passed, "run_id": result.run_id, "message": result.message}


def floor(settings: Settings, min_roc_auc: float | None) -> float:
    return settings.eval_min_roc_auc if min_roc_auc is None else min_roc_auc


# --- Command line -----------------------------------------------------------------------------------
