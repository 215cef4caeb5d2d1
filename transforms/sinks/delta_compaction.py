"""Background OPTIMIZE of the date partitions a streaming writer touches (both scoring runners)."""

from __future__ import annotations

import logging
import threading

import pyarrow as pa

from schemas.scores import SCORES_PARTITION_COLUMNS
from transforms.sinks.delta_maintenance import MaintenanceProcess, TableJob, run_table_job

log = logging.getLogger("sluice.delta_compaction")

(PARTITION_COLUMN,) = SCORES_PARTITION_COLUMNS


class PartitionCompactor:
    """Compacts the date partitions a writer reported (:meth:`saw`) on a thread: every ``every_s``
    seconds, and as soon as ``every_commits`` commits with rows were reported since the last run
    (0 turns either trigger off; both 0: never).

    Both scoring runners commit a few small files per batch, and delta-rs pays ~90 µs per live file
    on every commit (measured: 9 ms at 100 files, 70 ms at 800), so a stream committing several
    times a second would add ~0.5 s to every commit within ten minutes if it waited for a timer;
    the commit count bounds the file count whatever the rate. OPTIMIZE commits do not conflict with
    the appends (data and app transactions are unchanged), so it runs beside them; each sink
    notices the foreign commit and re-reads its progress.

    Two tiers, because OPTIMIZE rewrites every file below its target size: a run triggered by the
    commit count only merges files below ``small_file_bytes`` (4 MB by default), so it rewrites at
    most that much; a timed run merges up to delta-rs's default target (100 MB). With a single
    100 MB target, every run rewrote the day's growing compacted file: measured at 10k events/s,
    2.3 GB written for 88 MB of live data in 10 minutes, and the CPU it took showed in the p99
    latency. A timed run also vacuums files replaced more than ``vacuum_retention_hours`` ago, if
    set (replaced files otherwise stay until the operator's VACUUM).
    """

    def __init__(
        self,
        uris: list[str],
        storage_options: dict[str, str],
        every_s: float,
        *,
        every_commits: int = 0,
        small_file_bytes: int = 4 << 20,
        vacuum_retention_hours: int | None = None,
        checkpoints: bool = False,
        nice: int | None = None,
    ) -> None:
        self.uris = uris
        self.storage_options = storage_options or None
        self.every_s = every_s
        self.every_commits = every_commits
        self.small_file_bytes = small_file_bytes
        self.vacuum_retention_hours = vacuum_retention_hours
        #: Also checkpoint each table and clean its expired log after every run (for writers whose
        #: commits skip that): needs ``every_commits``, so the log never runs far past a checkpoint.
        self.checkpoints = checkpoints
        self._checkpointed: dict[str, int] = {}  # uri -> version of this compactor's last checkpoint
        #: With ``nice``, the work runs in a child process at that niceness (delta_maintenance).
        self._process = MaintenanceProcess(nice) if nice is not None else None
        self.dates: set[str] = set()
        self.lock = threading.Lock()
        self.runs = 0
        self._commits = 0  # reported since the last run
        self._stop = threading.Event()
        self._due = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sluice-compact", daemon=True)
        if every_s > 0 or every_commits > 0:
            self._thread.start()

    def saw(self, dates: set[str]) -> None:
        """Note one commit that wrote rows into these date partitions."""
        with self.lock:
            self.dates |= dates
            self._commits += 1
            if self.every_commits and self._commits >= self.every_commits:
                self._due.set()

    def saw_rows(self, rows: pa.Table | pa.RecordBatch) -> None:
        """Note the ``event_date`` partitions of rows just committed."""
        self.saw({str(d) for d in rows.column(PARTITION_COLUMN).unique().to_pylist()})

    def _loop(self) -> None:
        timeout = self.every_s if self.every_s > 0 else None
        while True:
            by_count = self._due.wait(timeout)
            if self._stop.is_set():
                return
            self._due.clear()
            if by_count:
                self.run_once(target_size=self.small_file_bytes)
            else:
                self.run_once(vacuum=True)

    def run_once(self, *, target_size: int | None = None, vacuum: bool = False) -> None:
        """Compact the reported dates: files below ``target_size`` (delta-rs's default when None);
        then checkpoint (if ``checkpoints``); with ``vacuum``, then delete files replaced more than
        ``vacuum_retention_hours`` ago. In the maintenance process when there is one."""
        with self.lock:
            dates, self.dates = sorted(self.dates), set()
            self._commits = 0
        for uri in self.uris:
            job = TableJob(
                uri=uri,
                storage_options=self.storage_options,
                # A partitioned table with no date reported had nothing written since the last run.
                dates=dates,
                partition_column=PARTITION_COLUMN,
                target_size=target_size,
                checkpoint=self.checkpoints,
                checkpointed_version=self._checkpointed.get(uri),
                vacuum_retention_hours=self.vacuum_retention_hours if vacuum else None,
            )
            try:
                done = self._process.run(job) if self._process is not None else run_table_job(job)
            except Exception as exc:  # maintenance must never take the stream down
                log.warning("maintenance of %s failed (will retry): %s", uri, exc)
                continue
            if done.compacted is not None:
                log.info(
                    "compacted %s",
                    uri,
                    extra={
                        "dates": dates,
                        "target_size": target_size,
                        "seconds": done.compact_seconds,
                        "metrics": done.compacted,
                    },
                )
            if done.checkpointed_version is not None:
                self._checkpointed[uri] = done.checkpointed_version
                log.info(
                    "checkpointed %s",
                    uri,
                    extra={"version": done.checkpointed_version, "seconds": done.checkpoint_seconds},
                )
            if done.vacuumed_files is not None:
                log.info("vacuumed %s", uri, extra={"files_deleted": done.vacuumed_files})
        self.runs += 1

    def stop(self, timeout_s: float = 120.0) -> bool:
        """Stop, waiting for a compaction under way; True once the thread has ended.

        Waiting matters: the thread is a daemon, and one still inside delta-rs when the interpreter
        shuts down can take the process down with SIGSEGV (seen in CI: a clean SIGTERM drain exiting
        -11 because a compaction had just started). An unfinished compaction loses nothing (its
        commit is atomic), so after ``timeout_s`` the caller goes on, with a warning; a maintenance
        process is then killed.
        """
        self._stop.set()
        self._due.set()  # wake the loop
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("a compaction is still running after %.0f s; stopping without waiting for it", timeout_s)
            if self._process is not None:
                self._process.close(kill=True)  # the thread's wait for it ends with it
                self._thread.join(10)
            return not self._thread.is_alive()
        if self._process is not None:
            self._process.close()
        return True
