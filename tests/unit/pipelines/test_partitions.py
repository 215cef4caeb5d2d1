"""How many inference tasks the backfill asks Spark for (pipelines.backfill._partitions)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pipelines.backfill import ROWS_PER_TASK, _partitions
from pipelines.config import load_config


def _cfg(partitions: int | None = None) -> Any:
    return load_config(
        overrides={"source": {"uri": "/tmp/items"}, "target": {"uri": "/tmp/emb"}, "spark": {"partitions": partitions}},
        environ={},
    )


def _spark(cores: int) -> Any:
    return SimpleNamespace(sparkContext=SimpleNamespace(defaultParallelism=cores))


@pytest.mark.parametrize(
    ("rows", "cores", "tasks"),
    [
        (10, 2, 4),  # tiny: still two waves
        (20_000, 2, 6),  # demo table: ~4k rows per task, rounded up to whole waves
        (20_000, 8, 16),
        (10_000_000, 2, 32),  # 16 waves at most: tasks grow instead
        (10_000_000, 64, 1024),
    ],
)
def test_tasks_come_in_whole_waves_of_about_rows_per_task(rows: int, cores: int, tasks: int) -> None:
    got = _partitions(_cfg(), _spark(cores), rows)
    assert got == tasks
    assert got % cores == 0 and got >= 2 * cores
    if 2 * cores < got < 16 * cores:
        assert rows / got <= ROWS_PER_TASK


def test_configured_partitions_win() -> None:
    assert _partitions(_cfg(partitions=3), _spark(2), 20_000) == 3
