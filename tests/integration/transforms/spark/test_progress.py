"""The driver's progress line against real Spark jobs (transforms/spark/progress.py).

The backfill registers its feature view and creates its target on driver threads while the
executors embed; those jobs must not leak into the bar of the embedding stage.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from transforms.spark.progress import stage_progress

pytestmark = pytest.mark.spark

TASKS = 6


def _slow_job(spark, parts: int) -> int:  # type: ignore[no-untyped-def]
    """The backfill's shape: a scan, a stage of ``parts`` slow tasks (~0.4 s each) through
    mapInArrow, then an aggregation; adaptive execution runs it as several jobs."""
    from pyspark.sql import functions as F

    def nap(batches):  # type: ignore[no-untyped-def]
        time.sleep(0.4)
        yield from batches

    df = spark.range(0, 60, 1, 2).repartition(parts).mapInArrow(nap, "id long")
    return int(df.groupBy((F.col("id") % 2).alias("k")).count().agg(F.sum("count")).collect()[0][0])


def test_progress_counts_only_the_watched_actions_work_stage(spark, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.progress")
    # A job of the very same shape on another driver thread, running the whole time.
    beside = threading.Thread(target=_slow_job, args=(spark, TASKS))
    with stage_progress(spark, "work", total_rows=60, tasks=TASKS, interval=0.05, log_every=0.3):
        beside.start()
        rows = _slow_job(spark, TASKS)
    beside.join()
    assert rows == 60

    lines = [r for r in caplog.records if r.name == "sluice.progress"]
    assert len(lines) >= 2, [r.getMessage() for r in lines]
    assert all(r.tasks == TASKS for r in lines), [r.getMessage() for r in lines]  # type: ignore[attr-defined]
    done = [r.tasks_done for r in lines]  # type: ignore[attr-defined]
    assert done == sorted(done)
    assert lines[-1].finished is True  # type: ignore[attr-defined]
    assert lines[-1].getMessage().startswith(f"work: {TASKS}/{TASKS} tasks · ~60/60 rows")


def test_jobs_after_the_block_are_not_tagged(spark, caplog: pytest.LogCaptureFixture) -> None:
    with stage_progress(spark, "first", total_rows=60, tasks=TASKS, interval=0.05, log_every=60):
        _slow_job(spark, TASKS)
    caplog.set_level(logging.INFO, logger="sluice.progress")
    # A second watched block sees its own job only, not the first block's.
    with stage_progress(spark, "second", total_rows=60, tasks=TASKS, interval=0.05, log_every=60):
        _slow_job(spark, TASKS)
    final = [r for r in caplog.records if getattr(r, "finished", False)]
    assert [r.getMessage().split(" · ")[0] for r in final] == [f"second: {TASKS}/{TASKS} tasks"]
