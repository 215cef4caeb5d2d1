"""Table maintenance in a child process at a lower CPU priority (real Delta tables, real processes)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from tests.integration.transforms.sinks.test_delta_offsets import TOPIC, positions, scores, sink_at
from transforms.sinks.delta_compaction import PartitionCompactor
from transforms.sinks.delta_maintenance import MaintenanceError, MaintenanceProcess, TableJob

DATES = ["2026-03-01", "2026-03-02"]  # every batch of scores() straddles this midnight


def _table_with_small_files(uri: Path, appends: int = 5) -> None:
    sink = sink_at(uri)
    for k in range(appends):
        sink.append(scores(0, range(4 * k, 4 * k + 4)), through={(TOPIC, 0): 4 * k + 3})


def _live_files(uri: Path) -> int:
    return len(DeltaTable(str(uri)).file_uris())


def test_a_job_runs_in_a_child_at_the_given_niceness_and_reports_back(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    _table_with_small_files(uri)
    assert _live_files(uri) == 10
    process = MaintenanceProcess(nice=7)
    try:
        done = process.run(TableJob(uri=str(uri), dates=DATES, checkpoint=True))
        pid = process.pid
        assert pid is not None and pid != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    finally:
        process.close()

    assert done.compacted is not None and done.compacted["numFilesRemoved"] == 10
    assert done.checkpointed_version == DeltaTable(str(uri)).version() == 6
    assert _live_files(uri) == 2 and positions(uri) == Counter({(0, o): 1 for o in range(20)})
    assert process.pid is None  # closed: the child left when its stdin did


def test_a_failing_job_is_reported_and_the_child_keeps_serving(tmp_path: Path) -> None:
    process = MaintenanceProcess(nice=0)
    try:
        with pytest.raises(MaintenanceError, match="no-such-table"):
            process.run(TableJob(uri=str(tmp_path / "no-such-table"), dates=DATES))
        uri = tmp_path / "scores"
        _table_with_small_files(uri, appends=2)
        assert process.run(TableJob(uri=str(uri), dates=DATES)).compacted is not None
        assert process.starts == 1
    finally:
        process.close()


def test_a_child_that_died_between_jobs_is_replaced_by_the_next_job(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    _table_with_small_files(uri, appends=2)
    process = MaintenanceProcess(nice=0)
    try:
        process.run(TableJob(uri=str(uri)))  # nothing to do, but the child is up
        first = process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process.pid is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.run(TableJob(uri=str(uri), dates=DATES)).compacted is not None
        assert process.pid not in (None, first) and process.starts == 2
    finally:
        process.close()
    assert positions(uri) == Counter({(0, o): 1 for o in range(8)})


def test_the_child_ignores_the_signals_its_process_group_gets_and_leaves_with_its_parent(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    _table_with_small_files(uri, appends=2)
    process = MaintenanceProcess(nice=0)
    process.run(TableJob(uri=str(uri)))
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)  # what Ctrl-C in a terminal sends the whole foreground group
    os.kill(pid, signal.SIGTERM)
    assert process.run(TableJob(uri=str(uri), dates=DATES)).compacted is not None
    assert process.pid == pid
    process.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_compactor_maintains_through_a_child_and_stops_it(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    _table_with_small_files(uri)
    compactor = PartitionCompactor([str(uri)], {}, every_s=0, checkpoints=True, nice=5)
    compactor.saw(set(DATES))
    compactor.run_once()
    process = compactor._process
    assert process is not None and process.pid is not None

    assert compactor.stop() is True
    assert process.pid is None
    assert _live_files(uri) == 2 and compactor.runs == 1
    assert sorted(p.name for p in (uri / "_delta_log").glob("*.checkpoint.parquet")) == [f"{6:020}.checkpoint.parquet"]
