"""A cached version's files: the manifest that proves them, and the verified fast form saved beside them.

`MODEL_CACHE_DIR/<name>/<version>/` holds the artifacts and `manifest.json` (each file's size and SHA-256, and
the registry facts); a version is used only if every file matches it (`verify_cached`). Beside the artifacts,
outside the manifest, `derived/fast-form.npz` keeps the version's verified fast form as plain arrays, keyed by
the files and the library releases it was verified with (`fast_form_key`).

Neither needs MLflow or scikit-learn: a process that finds a version's saved fast form (a Spark executor, a
batch job, a restarting service) scores with numpy alone. Fetching versions is model_store.py's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from bikeshare_membership.errors import first_line
from bikeshare_membership.fast_pipeline import FastPipeline
from bikeshare_membership.storage import atomic_path

MANIFEST = "manifest.json"
# A cached version's verified fast form (`FastPipeline.to_arrays`), derived when it is first loaded: outside
# the manifest's files.
FAST_FORM = Path("derived") / "fast-form.npz"
# What reading a saved fast form raises when it is missing, damaged, stale or of another shape.
SAVED_FORM_ERRORS = (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile)

log = logging.getLogger(__name__)


class CorruptCache(ValueError):
    """A cached version whose files do not match its manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Each artifact of the version in `directory` (the manifest and the derived files left out): its size and
    SHA-256, by path."""
    return {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST and path.relative_to(directory).parts[0] != FAST_FORM.parts[0]
    }


def verify_cached(directory: Path) -> dict[str, Any]:
    """The manifest of a cached version, after checking every file against it; raises CorruptCache."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise CorruptCache(f"{directory}: no readable manifest ({error})") from None
    if file_manifest(directory) != manifest["files"]:
        raise CorruptCache(f"{directory}: files differ from the manifest")
    return manifest


def fast_form_key(manifest: Mapping[str, Any]) -> str:
    """What a saved fast form was derived from: the model's files, and the libraries that computed the
    probabilities it was verified against (their installed releases, read without importing them)."""
    files = json.dumps(manifest["files"], sort_keys=True)
    releases = f"scikit-learn {version('scikit-learn')} numpy {np.__version__}"
    return hashlib.sha256(f"{files} {releases}".encode()).hexdigest()


def saved_fast_form(path: Path, key: str) -> FastPipeline | None:
    """The fast form saved at `path` for `key`, verified again; None if there is none, or it is stale or damaged
    (then the caller derives it from the pipeline)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                log.info("the saved fast form %s is of another model or library release", path)
                return None
            arrays = {name: saved[name] for name in saved.files}
        return FastPipeline.from_arrays(arrays)
    except FileNotFoundError:
        return None
    except SAVED_FORM_ERRORS as error:
        log.warning("not using the saved fast form %s: %s", path, first_line(error))
        return None


def save_fast_form(path: Path, key: str, fast: FastPipeline) -> None:
    """Save `fast` for `key`; a folder that cannot be written costs the next start its speed, nothing else."""
    try:
        arrays: dict[str, Any] = {"key": np.array(key), **fast.to_arrays()}
        with atomic_path(path) as partial, open(partial, "wb") as file:
            np.savez(file, **arrays)
    except OSError as error:
        log.warning("cannot save the fast form to %s: %s", path, first_line(error))
