from __future__ import annotations

import pytest

from pipelines import step_times
from pipelines.step_times import StepClock, describe


def test_laps_add_up_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([10.0, 10.5, 11.0, 13.0])
    monkeypatch.setattr(step_times.time, "perf_counter", lambda: next(ticks))
    totals: dict[str, float] = {"score": 1.0}
    clock = StepClock(totals)
    clock.lap("score")
    clock.lap("delta")
    clock.lap("score")
    assert totals == {"score": 1.0 + 0.5 + 2.0, "delta": 0.5}


def test_describe_is_per_batch_and_largest_first() -> None:
    assert describe({"delta": 0.2, "score": 1.0, "kafka": 0.4}, 4) == "score 250 ms · kafka 100 ms · delta 50 ms"


@pytest.mark.parametrize(("steps", "batches"), [({}, 3), ({"score": 1.0}, 0)])
def test_describe_before_any_batch(steps: dict[str, float], batches: int) -> None:
    assert describe(steps, batches) == "-"
