"""Where a scoring runner's time goes, step by step (read, score, delta, feast, kafka).

Both runners add each micro-batch's step durations into their summary's ``step_seconds``; the
summaries print them, and the benchmark reports them per batch, so a slow stream says which sink
or stage to look at before anyone reaches for a profiler.
"""

from __future__ import annotations

import time


class StepClock:
    """Adds the seconds since the previous lap (or since creation) to ``totals[step]``."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals
        self.t = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.totals[step] = self.totals.get(step, 0.0) + now - self.t
        self.t = now


def describe(step_seconds: dict[str, float], batches: int) -> str:
    """``score 120 ms · delta 30 ms · ...`` per batch, largest first; ``-`` before any batch."""
    if not batches or not step_seconds:
        return "-"
    ordered = sorted(step_seconds.items(), key=lambda kv: -kv[1])
    return " · ".join(f"{step} {seconds / batches * 1000:,.0f} ms" for step, seconds in ordered)
