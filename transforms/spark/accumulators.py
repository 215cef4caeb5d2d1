"""A Spark accumulator that sums dicts of numbers: per-task statistics reach the driver.

Tasks add their own counts and timings (rows, tokens, seconds in the model, model versions seen);
Spark merges them across tasks, and only for tasks that succeeded, so a retried task is not
counted twice.
"""

from __future__ import annotations

from typing import Any


def dict_sum_accumulator() -> Any:
    """An ``AccumulatorParam`` for ``{name: number}`` dicts, summed key by key."""
    from pyspark.accumulators import AccumulatorParam

    class _DictSum(AccumulatorParam):  # type: ignore[type-arg]
        def zero(self, value: dict[str, float]) -> dict[str, float]:
            return {}

        def addInPlace(self, a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            for k, v in b.items():
                a[k] = a.get(k, 0) + v
            return a

    return _DictSum()
