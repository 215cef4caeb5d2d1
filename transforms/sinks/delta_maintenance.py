"""One Delta table's maintenance (compact, checkpoint, vacuum), in this process or in a child
process at a lower CPU priority.

Why a child process: the scoring runners' compactions share two cores with the stream they
maintain. delta-rs releases the GIL and rewrites the files on its own tokio threads, so the work
competes with the consumer for CPU, not for the GIL, and a thread cannot be given a lower priority
(the tokio threads also run the stream's own commits). Measured at 10k events/s with the work in
the consumer's process: every ~11 s a compaction of ~100 small files took 0.4-0.8 s, and the
batches committed meanwhile took 200-330 ms in their Delta step instead of ~25 ms: nearly all of
the consumer's p99 latency above its p95. The child runs under ``nice``, so the stream's threads
win the cores and the compaction uses what they leave (the niceness is a share, not a ban: at
nice 10 it still gets ~10% of a saturated core).

The child is long-lived (one Python start, not one per run) and speaks one JSON object per line
on its stdin/stdout. It exits when its stdin closes, which is also what happens when the parent
dies, however it dies. A run that fails, or a child that dies, is reported to the caller; the
next run starts a new child.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("sluice.delta_maintenance")

#: Repository root: the child imports this module by name, whatever the parent's working directory
#: (spark-submit, Airflow) and however the parent found it.
_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TableJob:
    """What to do to one table; every step is optional."""

    uri: str
    storage_options: dict[str, str] | None = None
    #: Compact: the ``partition_column`` values to compact, or None to skip compaction. An
    #: unpartitioned table is compacted whole whenever this is not None.
    dates: list[str] | None = None
    partition_column: str = "event_date"
    #: Files below this size are merged (None: delta-rs's 100 MB default).
    target_size: int | None = None
    #: Checkpoint and clean the expired log afterwards, unless the table is still at this version
    #: (the caller's last checkpoint).
    checkpoint: bool = False
    checkpointed_version: int | None = None
    #: VACUUM (full mode) files unreferenced for longer than this; None: no VACUUM.
    vacuum_retention_hours: int | None = None


@dataclass
class TableJobResult:
    compacted: dict[str, Any] | None = None
    compact_seconds: float | None = None
    checkpointed_version: int | None = None
    checkpoint_seconds: float | None = None
    vacuumed_files: int | None = None


def run_table_job(job: TableJob) -> TableJobResult:
    """Do ``job`` here and now (also what the child does with each job it reads)."""
    from deltalake import DeltaTable

    result = TableJobResult()
    dt = DeltaTable(job.uri, storage_options=job.storage_options)
    if job.dates is not None:
        partitioned = job.partition_column in dt.metadata().partition_columns
        if job.dates or not partitioned:
            started = time.perf_counter()
            result.compacted = dt.optimize.compact(
                partition_filters=[(job.partition_column, "in", job.dates)] if partitioned else None,
                target_size=job.target_size,
            )
            result.compact_seconds = round(time.perf_counter() - started, 3)
    if job.checkpoint and dt.version() != job.checkpointed_version:
        started = time.perf_counter()
        dt.create_checkpoint()
        dt.cleanup_metadata()
        result.checkpointed_version = dt.version()
        result.checkpoint_seconds = round(time.perf_counter() - started, 3)
    if job.vacuum_retention_hours is not None:
        # Full mode finds replaced files by listing: with a short delta.deletedFileRetentionDuration
        # their tombstones have left the log long before the retention asked for here.
        result.vacuumed_files = len(
            dt.vacuum(
                retention_hours=job.vacuum_retention_hours, enforce_retention_duration=False, dry_run=False, full=True
            )
        )
    return result


class MaintenanceError(Exception):
    """A job failed in the child, or the child died under it."""


class MaintenanceProcess:
    """Runs :class:`TableJob`\\ s one at a time in a child process at ``nice`` (0-19)."""

    def __init__(self, nice: int) -> None:
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0-19, got {nice}")
        self.nice = nice
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def run(self, job: TableJob) -> TableJobResult:
        with self._lock:
            proc = self._ensure_started()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(dataclasses.asdict(job)) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, OSError, ValueError) as exc:
                self._reap()
                raise MaintenanceError(f"the maintenance process died: {exc}") from exc
            if not line:
                self._reap()
                raise MaintenanceError("the maintenance process died (see its error above)")
            reply = json.loads(line)
            if "error" in reply:
                raise MaintenanceError(reply["error"])
            return TableJobResult(**reply["result"])

    def close(self, *, kill: bool = False) -> None:
        """End the child: close its stdin and let it finish the job in hand, or ``kill`` it (safe
        at any moment: a Delta commit is atomic, an unfinished compaction leaves files that no
        commit references and that VACUUM removes)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        elif proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _ensure_started(self) -> subprocess.Popen[str]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(self.nice)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # its tracebacks go where the parent's stderr goes
            text=True,
            env=env,
        )
        self.starts += 1
        log.debug("maintenance process started", extra={"pid": self._proc.pid, "nice": self.nice})
        return self._proc

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()


def _serve(nice: int) -> None:
    os.nice(nice)
    # Ctrl-C or a SIGTERM to the parent's process group reaches this child too: it finishes the job
    # in hand and leaves when the parent closes its stdin (a draining parent does, a dead one has).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for line in sys.stdin:
        try:
            result = run_table_job(TableJob(**json.loads(line)))
            reply: dict[str, Any] = {"result": dataclasses.asdict(result)}
        except Exception as exc:  # reported to the parent, which logs it and retries later
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply, default=str) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
