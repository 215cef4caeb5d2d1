"""Background OPTIMIZE of the date partitions a streaming writer touches (both scoring runners)."""

from __future__ import annotations

import logging
import threading

import pyarrow as pa

from schemas.scores import SCORES_PARTITION_COLUMNS

log = logging.getLogger("sluice.delta_compaction")

(PARTITION_COLUMN,) = SCORES_PARTITION_COLUMNS


class PartitionCompactor:
    """Compacts the date partitions a writer reported (:meth:`saw`), every ``every_s`` seconds, on a
    thread (0: never).

    Both scoring runners commit a few small files per batch; delta-rs pays ~50 µs per live file on
    every commit, so without compaction a day-long stream slows down hour by hour. OPTIMIZE commits
    do not conflict with the appends (data and app transactions are unchanged), so it runs beside
    them; each sink notices the foreign commit and re-reads its progress.
    """

    def __init__(self, uris: list[str], storage_options: dict[str, str], every_s: float) -> None:
        self.uris = uris
        self.storage_options = storage_options or None
        self.every_s = every_s
        self.dates: set[str] = set()
        self.lock = threading.Lock()
        self.runs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sluice-compact", daemon=True)
        if every_s > 0:
            self._thread.start()

    def saw(self, dates: set[str]) -> None:
        with self.lock:
            self.dates |= dates

    def saw_rows(self, rows: pa.Table | pa.RecordBatch) -> None:
        """Note the ``event_date`` partitions of rows just committed."""
        self.saw({str(d) for d in rows.column(PARTITION_COLUMN).unique().to_pylist()})

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.run_once()

    def run_once(self) -> None:
        from deltalake import DeltaTable

        with self.lock:
            dates, self.dates = sorted(self.dates), set()
        for uri in self.uris:
            try:
                dt = DeltaTable(uri, storage_options=self.storage_options)
                filters = (
                    [(PARTITION_COLUMN, "in", dates)]
                    if dates and PARTITION_COLUMN in dt.metadata().partition_columns
                    else None
                )
                if filters is None and PARTITION_COLUMN in dt.metadata().partition_columns:
                    continue  # nothing written there since the last run
                metrics = dt.optimize.compact(partition_filters=filters)
                log.info("compacted %s", uri, extra={"dates": dates, "metrics": metrics})
            except Exception as exc:  # maintenance must never take the stream down
                log.warning("compaction of %s failed (will retry): %s", uri, exc)
        self.runs += 1

    def stop(self, timeout_s: float = 120.0) -> bool:
        """Stop, waiting for a compaction under way; True once the thread has ended.

        Waiting matters: the thread is a daemon, and one still inside delta-rs when the interpreter
        shuts down can take the process down with SIGSEGV (seen in CI: a clean SIGTERM drain exiting
        -11 because a compaction had just started). An unfinished compaction loses nothing (its
        commit is atomic), so after ``timeout_s`` the caller goes on, with a warning.
        """
        self._stop.set()
        if not self._thread.is_alive():
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("a compaction is still running after %.0f s; stopping without waiting for it", timeout_s)
            return False
        return True
