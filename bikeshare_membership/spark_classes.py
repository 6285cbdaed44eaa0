"""Java's class-data archive (CDS) for a Spark that this process starts. Starting a session and running its first
job, Java loads and checks thousands of classes from Spark's jars, one by one. Mapped from an archive file, they
are ready at once, and a local job starts in about half the time (docs/spark.md has the measurements).

The first run on a machine dumps Java's own classes (`java -Xshare:dump`, a second or so) and then runs with
`-XX:ArchiveClassesAtExit`: as Java exits, it saves every class the job loaded over that base, which is kept
once Java has checked it (`-XX:+PrintSharedArchiveAndExit`). Later runs map both files. Java checks an archive
against its own build and its class path before it maps one and runs without a stale one, which then costs only
the time it would have saved; a damaged one stops it, and spark_scoring's `start_session` then removes it. Each
Java and Spark install gets its own folder (a digest of both), so an upgrade makes new archives instead of
finding old ones refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BASE = "base.jsa"  # Java's own classes
SPARK = "spark.jsa"  # the classes a Spark job loaded, over BASE
# A part file is written by a Java dumping or exiting, in seconds; one this much older was left by a run that was
# killed meanwhile (a Spark archive is about 130 MB), and the next run removes it.
STALE_PART_SECONDS = 600
# Java's notices about archives, and its own errors, go to its stdout (the job's summary line's stream) unless
# told otherwise: a stale archive is not the user's concern (the job runs without it), and a refused one is logged.
QUIET = "-Xlog:cds*=off -XX:+DisplayVMOutputToStderr"


@dataclass(frozen=True)
class ClassArchive:
    """The archive files for one Java and one Spark install, and where this run saves Spark's classes if they
    are not saved yet (`saving`: Java writes it as it exits, then `keep` moves it to `spark`)."""

    java: Path  # the program
    java_options: str  # the options Spark's Java runs with (the archive is checked with them)
    base: Path
    spark: Path
    saving: Path | None

    def options(self) -> str:
        """Java's options to start from the archive, or to save it as it exits."""
        if self.saving is None:
            return f"-XX:SharedArchiveFile={self.base}:{self.spark} {QUIET}"
        return f"-XX:SharedArchiveFile={self.base} -XX:ArchiveClassesAtExit={self.saving} {QUIET}"

    def keep(self, class_path: str) -> None:
        """Once Java has exited: this run's saved classes become the archive later runs map, if Java finds them
        valid for Spark's `class_path` (os.replace, so two first runs at once leave one whole archive)."""
        if self.saving is None or not self.saving.exists():
            return
        try:
            check = subprocess.run(
                [
                    *(str(self.java), *self.java_options.split(), f"-XX:SharedArchiveFile={self.base}:{self.saving}"),
                    *("-XX:+PrintSharedArchiveAndExit", "-cp", class_path, "-version"),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if check.returncode == 0 and "archive is valid" in check.stdout:
                os.replace(self.saving, self.spark)
                log.info("saved the classes Spark loaded to %s: later runs start from them", self.spark)
                return
            problem = "Java did not find them valid"
        except (OSError, subprocess.SubprocessError) as error:
            problem = str(error)
        log.warning("the classes Spark loaded were not kept (%s): later runs start without them", problem)
        self.discard()

    def remove(self) -> None:
        """Remove the archive (Java refused it): the next run saves it again."""
        _remove(self.spark, self.base)

    def discard(self) -> None:
        """Once Java has exited: drop what a failed run saved (it may lack the classes a job loads, or be cut short)."""
        if self.saving is not None:
            _remove(self.saving)


def _remove_stale_parts(folder: Path) -> None:
    """Remove the part files of killed runs (older than STALE_PART_SECONDS): another run's own is newer."""
    stale_before = time.time() - STALE_PART_SECONDS
    for part in folder.glob("*.part"):
        try:
            stale = part.stat().st_mtime < stale_before
        except FileNotFoundError:  # renamed or removed by its own run meanwhile
            continue
        if stale:
            _remove(part)


def _remove(*files: Path) -> None:
    """Remove `files`; one that cannot be removed is logged, not raised: the job does not depend on it."""
    for file in files:
        try:
            file.unlink(missing_ok=True)
        except OSError as error:
            log.warning("could not remove %s: %s", file, error)


def class_archive(cache: Path, java_home: Path, spark_home: Path, java_options: str) -> ClassArchive | None:
    """The archive for this Java (`java_home`), Spark (`spark_home`, its jars) and these options, under `cache`;
    the base made if it is missing. None, with a warning, if it cannot be made: Spark then starts as it would
    without one."""
    jars = spark_home / "jars"
    try:
        identity = "\n".join(
            [str(java_home), (java_home / "release").read_text(), str(jars), str(jars.stat().st_mtime_ns), java_options]
        )
        folder = cache / hashlib.sha256(identity.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(folder)
        base = folder / BASE
        if not base.exists():
            dumping = folder / f"{BASE}.{os.getpid()}.part"
            try:
                subprocess.run(
                    [str(java_home / "bin" / "java"), "-Xshare:dump", f"-XX:SharedArchiveFile={dumping}"],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                os.replace(dumping, base)
            finally:
                _remove(dumping)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("Spark starts without a class archive in %s: %s", cache, error)
        return None
    spark = folder / SPARK
    saving = None if spark.exists() else folder / f"{SPARK}.{os.getpid()}.part"
    return ClassArchive(java_home / "bin" / "java", java_options, base, spark, saving)
