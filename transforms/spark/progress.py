"""Progress of a Spark action on the driver: a rich bar on a terminal, log lines elsewhere.

Spark's own console bar is turned off (it fights with rich and means nothing to a data engineer
reading ``[Stage 7:=>  (3 + 2) / 16]``); this one polls the status tracker and speaks in tasks of
the stage doing the work, the rows that stand for, a rate and the time left.

Only jobs started by the action being watched count: they carry a job tag set on the calling
thread. Counting every active stage (as this did first) mixed in the jobs the driver runs beside
the embedding (creating the target table, registering the feature view), so the demo's bar read
``0/7`` and ``5/8`` for a stage of 6 tasks.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("sluice.progress")


@dataclass(frozen=True)
class StageCounts:
    """One stage's task counts, as the status tracker reports them.

    ``submitted`` (epoch seconds) is 0 for a stage that never ran: one still waiting, or a parent
    whose shuffle output an earlier job already wrote (adaptive execution runs each shuffle as a
    job of its own, and every later job lists the stages before it again, skipped).
    """

    stage_id: int
    tasks: int
    completed: int
    active: int = 0
    failed: int = 0
    submitted: float = 0.0


@dataclass(frozen=True)
class Progress:
    """How far the watched work is, in tasks and in the rows they stand for."""

    done: int
    total: int
    active: int
    failed: int
    rows_total: int
    started: float  # epoch seconds the work's stage was submitted; 0 before that

    @property
    def rows_done(self) -> int:
        # A repartition by number deals rows round-robin, so each task holds about rows/tasks.
        return self.rows_total * self.done // self.total if self.total else 0

    def describe(self, label: str, pace: Pace | None = None) -> str:
        parts = [f"{label}: {self.done}/{self.total} tasks", f"~{self.rows_done:,}/{self.rows_total:,} rows"]
        if pace is not None and pace.rows_per_second is not None:
            parts.append(f"{pace.rows_per_second:,.0f} rows/s")
            if pace.seconds_left is not None and self.done < self.total:
                parts.append(f"~{_duration(pace.seconds_left)} left")
        if self.failed:
            parts.append(f"{self.failed} task attempt(s) failed and retried")
        return " · ".join(parts)


@dataclass(frozen=True)
class Pace:
    rows_per_second: float | None
    seconds_left: float | None


class PaceTracker:
    """Rows/s and time left from task completions, which arrive in waves.

    Rows are only known done when a task ends, and a wave of tasks ends together: a rate measured
    up to *now* sinks between waves and the time left jumps (1m41s, 2m21s, then 40s on the demo).
    The rate is therefore measured from the stage's start to the last completion, and the time left
    counts down from that completion.
    """

    def __init__(self) -> None:
        self._done = 0
        self._changed_at = 0.0

    def update(self, p: Progress, now: float) -> Pace:
        if p.done != self._done:
            self._done, self._changed_at = p.done, now
        if not p.done or not p.started or self._changed_at <= p.started:
            return Pace(None, None)
        rate = p.rows_done / (self._changed_at - p.started)
        if rate <= 0:  # no rows to count (an empty run: a stale run with nothing stale)
            return Pace(None, None)
        left = max(0.0, (p.rows_total - p.rows_done) / rate - (now - self._changed_at))
        return Pace(rate, left)


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def measure(stages: Sequence[StageCounts], *, tasks: int | None, rows_total: int) -> Progress | None:
    """Progress of the work among ``stages`` (all stages of the watched action's jobs).

    With ``tasks`` known (the partition count the work was cut into), the work is the latest
    stage of exactly that many tasks that has run: the scan before it and the aggregation after it
    take seconds, the stage of the model calls minutes. Until it runs, nothing of it is done.
    Without ``tasks``, every stage that ran counts. ``None`` when there is nothing to report yet.
    """
    ran = [s for s in stages if s.submitted]
    if tasks:
        work = [s for s in ran if s.tasks == tasks]
        if not work:
            return Progress(0, tasks, 0, 0, rows_total, 0.0)
        latest = max(work, key=lambda s: s.stage_id)
        return Progress(latest.completed, tasks, latest.active, latest.failed, rows_total, latest.submitted)
    total = sum(s.tasks for s in ran)
    if not total:
        return None
    return Progress(
        done=min(total, sum(s.completed for s in ran)),
        total=total,
        active=sum(s.active for s in ran),
        failed=sum(s.failed for s in ran),
        rows_total=rows_total,
        started=min(s.submitted for s in ran),
    )


def _tagged_stages(spark: SparkSession, tag: str) -> list[StageCounts]:
    # PySpark's tracker has neither a tag lookup nor stage submission times; the JVM's
    # SparkContext tracker has both (tags since Spark 3.5). Its lookups answer Scala Options.
    tracker = spark.sparkContext._jsc.sc().statusTracker()
    stages: list[StageCounts] = []
    seen: set[int] = set()
    for job_id in tracker.getJobIdsForTag(tag):
        job = tracker.getJobInfo(int(job_id))
        if not job.isDefined():
            continue
        for sid in job.get().stageIds():
            info = tracker.getStageInfo(int(sid))
            if int(sid) in seen or not info.isDefined():
                continue
            seen.add(int(sid))
            i = info.get()
            stages.append(
                StageCounts(
                    int(sid),
                    i.numTasks(),
                    i.numCompletedTasks(),
                    i.numActiveTasks(),
                    i.numFailedTasks(),
                    i.submissionTime() / 1000 if i.submissionTime() > 0 else 0.0,
                )
            )
    return stages


@contextlib.contextmanager
def stage_progress(
    spark: SparkSession,
    label: str,
    *,
    total_rows: int,
    tasks: int | None = None,
    enabled: bool = True,
    interval: float = 0.5,
    log_every: float = 10.0,
) -> Iterator[None]:
    """Show the progress of the Spark action(s) run inside the block, on this thread only.

    ``tasks``: the number of partitions the work was cut into (see :func:`measure`).
    """
    if not enabled:
        yield
        return
    sc = spark.sparkContext
    tag = f"sluice-progress-{uuid.uuid4().hex[:12]}"
    stop = threading.Event()
    pace = PaceTracker()
    tty = sys.stderr.isatty()
    ended = False

    def current() -> tuple[Progress, Pace] | None:
        try:
            stages = _tagged_stages(spark, tag)
        except Exception:  # the session stopping under us (an error in the block): just stop showing
            return None
        p = measure(stages, tasks=tasks, rows_total=total_rows)
        return (p, pace.update(p, time.time())) if p is not None else None

    def poll_rich() -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn(f"[bold]{label}[/]"),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            transient=True,
        ) as bar:
            task = bar.add_task(f"{total_rows:,} rows", total=None)
            while not stop.wait(interval):
                now = current()
                if now is not None:
                    p, speed = now
                    bar.update(task, completed=p.done, total=p.total, description=p.describe("", speed)[2:])

    def poll_log() -> None:
        last = time.monotonic()
        while not stop.wait(interval):
            if time.monotonic() - last >= log_every:
                now = current()
                if now is not None:
                    p, speed = now
                    log.info(
                        p.describe(label, speed),
                        extra={"tasks_done": p.done, "tasks": p.total, "rows_done_estimate": p.rows_done},
                    )
                last = time.monotonic()

    sc.addJobTag(tag)  # thread-local: jobs other driver threads start are not counted
    thread = threading.Thread(target=poll_rich if tty else poll_log, daemon=True)
    thread.start()
    try:
        yield
        ended = True
    finally:
        stop.set()
        thread.join(timeout=5)
        if not tty and ended:  # the last periodic line may be 10 s old: say where the work ended
            now = current()
            if now is not None:
                p, speed = now
                log.info(p.describe(label, speed), extra={"tasks_done": p.done, "tasks": p.total, "finished": True})
        with contextlib.suppress(Exception):
            sc.removeJobTag(tag)
