"""Progress of a Spark action on the driver: a rich bar on a terminal, log lines elsewhere.

Spark's own console bar is turned off (it fights with rich and means nothing to a data engineer
reading ``[Stage 7:=>  (3 + 2) / 16]``); this one polls the status tracker and speaks in tasks of
the running job, with the expected row count beside it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("sluice.progress")


def _task_counts(spark: SparkSession) -> tuple[int, int]:
    tracker = spark.sparkContext.statusTracker()
    done = total = 0
    for sid in tracker.getActiveStageIds():
        info = tracker.getStageInfo(sid)
        if info is not None:
            done += info.numCompletedTasks
            total += info.numTasks
    return done, total


@contextlib.contextmanager
def stage_progress(
    spark: SparkSession, label: str, *, total_rows: int, enabled: bool = True, interval: float = 0.5
) -> Iterator[None]:
    if not enabled:
        yield
        return
    stop = threading.Event()
    tty = sys.stderr.isatty()

    def poll_rich() -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn(f"[bold]{label}[/] {total_rows:,} rows"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} tasks"),
            TimeElapsedColumn(),
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=None)
            while not stop.wait(interval):
                done, total = _task_counts(spark)
                if total:
                    bar.update(task, completed=done, total=total)

    def poll_log() -> None:
        last = 0.0
        while not stop.wait(interval):
            if time.monotonic() - last >= 10:
                done, total = _task_counts(spark)
                if total:
                    log.info("%s: %d/%d tasks", label, done, total)
                last = time.monotonic()

    thread = threading.Thread(target=poll_rich if tty else poll_log, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
