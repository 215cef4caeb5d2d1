"""What the driver's progress line says, from the stage counts it polls (transforms/spark/progress.py)."""

from __future__ import annotations

from transforms.spark.progress import Pace, PaceTracker, Progress, StageCounts, measure

T0 = 1_000.0
SCAN = StageCounts(0, tasks=3, completed=3, submitted=T0)


def _work(completed: int, *, stage_id: int = 1, tasks: int = 6, submitted: float = T0 + 5, **kw: int) -> StageCounts:
    return StageCounts(stage_id, tasks=tasks, completed=completed, submitted=submitted, **kw)


def test_only_the_stage_cut_into_the_given_tasks_counts() -> None:
    agg = StageCounts(2, tasks=1, completed=0)
    p = measure([SCAN, _work(2, active=2), agg], tasks=6, rows_total=20_000)
    assert p == Progress(done=2, total=6, active=2, failed=0, rows_total=20_000, started=T0 + 5)


def test_stages_that_never_ran_are_not_counted() -> None:
    """Adaptive execution runs each shuffle as its own job; the next job lists the finished stage
    again under a new id, skipped (never submitted). The demo's last line read 12/18 from those."""
    skipped_copy = StageCounts(3, tasks=6, completed=0, submitted=0.0)
    p = measure([SCAN, _work(6), skipped_copy], tasks=6, rows_total=600)
    assert p is not None and (p.done, p.total) == (6, 6)


def test_a_scan_of_the_same_width_gives_way_to_the_work_stage_once_it_runs() -> None:
    scan6 = StageCounts(0, tasks=6, completed=6, submitted=T0)
    waiting = StageCounts(1, tasks=6, completed=0, submitted=0.0)
    assert measure([scan6, waiting], tasks=6, rows_total=600) == Progress(6, 6, 0, 0, 600, T0)
    p = measure([scan6, _work(1)], tasks=6, rows_total=600)
    assert p is not None and p.done == 1


def test_before_the_work_stage_runs_nothing_of_it_is_done() -> None:
    p = measure([SCAN], tasks=6, rows_total=20_000)
    assert p == Progress(0, 6, 0, 0, 20_000, 0.0)
    assert p.describe("embedding", PaceTracker().update(p, T0 + 3)) == "embedding: 0/6 tasks · ~0/20,000 rows"


def test_the_pace_holds_between_waves_and_the_time_left_counts_down() -> None:
    pace = PaceTracker()
    first_wave = measure([SCAN, _work(2)], tasks=6, rows_total=20_000)
    assert first_wave is not None and first_wave.rows_done == 6_666
    at_wave = pace.update(first_wave, now=T0 + 5 + 33.33)
    assert at_wave.rows_per_second is not None and round(at_wave.rows_per_second) == 200
    assert at_wave.seconds_left is not None and round(at_wave.seconds_left) == 67
    later = pace.update(first_wave, now=T0 + 5 + 43.33)  # no task ended since
    assert later.rows_per_second == at_wave.rows_per_second
    assert later.seconds_left is not None and round(later.seconds_left) == 57
    assert (
        first_wave.describe("embedding", later) == "embedding: 2/6 tasks · ~6,666/20,000 rows · 200 rows/s · ~57s left"
    )
    overdue = pace.update(first_wave, now=T0 + 5 + 200)
    assert overdue.seconds_left == 0.0


def test_long_waits_read_in_minutes_and_a_finished_stage_has_no_time_left() -> None:
    one = measure([_work(1, tasks=8, submitted=T0)], tasks=8, rows_total=80_000)
    assert one is not None
    assert one.describe("x", PaceTracker().update(one, T0 + 100)).endswith("100 rows/s · ~11m40s left")
    done = measure([_work(8, tasks=8, submitted=T0)], tasks=8, rows_total=80_000)
    assert done is not None
    assert done.describe("x", PaceTracker().update(done, T0 + 100)) == "x: 8/8 tasks · ~80,000/80,000 rows · 800 rows/s"


def test_an_empty_run_has_no_pace_and_does_not_divide_by_zero() -> None:
    """A stale run with nothing stale still runs its (empty) stage: 0 rows over 4 tasks."""
    empty = measure([_work(4, tasks=4, submitted=T0)], tasks=4, rows_total=0)
    assert empty is not None
    assert PaceTracker().update(empty, T0 + 3) == Pace(None, None)
    assert empty.describe("embedding", Pace(None, None)) == "embedding: 4/4 tasks · ~0/0 rows"


def test_failed_attempts_are_said() -> None:
    p = measure([_work(1, tasks=4, failed=1)], tasks=4, rows_total=400)
    assert p is not None and p.describe("x").endswith("1 task attempt(s) failed and retried")


def test_without_a_task_count_every_stage_that_ran_counts() -> None:
    running = StageCounts(1, tasks=1, completed=0, active=1, submitted=T0 + 1)
    p = measure([SCAN, running, StageCounts(2, tasks=5, completed=0)], tasks=None, rows_total=100)
    assert p == Progress(3, 4, 1, 0, 100, T0)
    assert measure([], tasks=None, rows_total=100) is None
