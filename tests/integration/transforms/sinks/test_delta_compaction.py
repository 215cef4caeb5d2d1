"""Background compaction of the date partitions a scoring runner wrote (real Delta tables, delta-rs)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from schemas.scores import SCORES_SCHEMA
from tests.integration.transforms.sinks.test_delta_offsets import PREFIX, TOPIC, positions, scores, sink_at
from transforms.sinks.delta_compaction import PartitionCompactor
from transforms.sinks.delta_offsets import OffsetTrackedDeltaSink


def _files_per_date(uri: Path) -> Counter[str]:
    actions = pa.table(DeltaTable(str(uri)).get_add_actions(flatten=True))
    return Counter(str(d) for d in actions.column("partition.event_date").to_pylist())


def test_only_the_dates_reported_since_the_last_run_are_compacted(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink = sink_at(uri)
    compactor = PartitionCompactor([str(uri)], {}, every_s=0)  # 0: no thread, runs only when asked
    for k in range(4):  # each batch straddles midnight: one file per date per append
        batch = scores(0, range(4 * k, 4 * k + 4))
        sink.append(batch, through={(TOPIC, 0): 4 * k + 3})
    before = _files_per_date(uri)
    assert sorted(before.values()) == [4, 4]
    first_date = min(before)

    compactor.saw({first_date})
    compactor.run_once()

    after = _files_per_date(uri)
    assert after[first_date] == 1 and after[max(before)] == 4
    assert positions(uri) == Counter({(0, o): 1 for o in range(16)})
    compactor.run_once()  # nothing reported since: the table is left as it is
    assert _files_per_date(uri) == after and compactor.runs == 2


def test_a_writer_keeps_appending_after_a_compaction(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink = sink_at(uri)
    compactor = PartitionCompactor([str(uri)], {}, every_s=0)
    sink.append(scores(0, range(4)), through={(TOPIC, 0): 3})
    sink.append(scores(0, range(4, 8)), through={(TOPIC, 0): 7})
    compactor.saw_rows(scores(0, range(8)))
    compactor.run_once()

    assert sink.append(scores(0, range(6, 12)), through={(TOPIC, 0): 11}).rows_written == 4
    assert positions(uri) == Counter({(0, o): 1 for o in range(12)})


def test_stop_waits_for_a_compaction_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = tmp_path / "scores"
    sink = sink_at(uri)
    sink.append(scores(0, range(4)), through={(TOPIC, 0): 3})
    sink.append(scores(0, range(4, 8)), through={(TOPIC, 0): 7})
    started, finished = threading.Event(), threading.Event()
    real_run_once = PartitionCompactor.run_once

    def slow_run_once(self: PartitionCompactor, **kwargs: Any) -> None:
        started.set()
        time.sleep(0.5)  # a compaction long enough for stop() to arrive in the middle of it
        real_run_once(self, **kwargs)
        finished.set()

    monkeypatch.setattr(PartitionCompactor, "run_once", slow_run_once)
    compactor = PartitionCompactor([str(uri)], {}, every_s=0.05)
    compactor.saw_rows(scores(0, range(8)))
    assert started.wait(10)

    assert compactor.stop() is True
    assert finished.is_set() and compactor.runs == 1
    assert sum(_files_per_date(uri).values()) == 2  # one file per date: the compaction committed


def test_a_count_of_commits_triggers_a_compaction_without_waiting_for_the_timer(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink = sink_at(uri)
    compactor = PartitionCompactor([str(uri)], {}, every_s=3600, every_commits=3)
    try:
        for k in range(2):
            batch = scores(0, range(4 * k, 4 * k + 4))
            sink.append(batch, through={(TOPIC, 0): 4 * k + 3})
            compactor.saw_rows(batch)
        time.sleep(0.5)
        assert compactor.runs == 0  # two commits: not yet
        batch = scores(0, range(8, 12))
        sink.append(batch, through={(TOPIC, 0): 11})
        compactor.saw_rows(batch)
        deadline = time.monotonic() + 30
        while compactor.runs == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert compactor.stop() is True

    assert compactor.runs == 1
    assert sorted(_files_per_date(uri).values()) == [1, 1]
    assert positions(uri) == Counter({(0, o): 1 for o in range(12)})


DATES = {"2026-03-01", "2026-03-02"}  # every batch of scores() straddles this midnight


def _append(sink: OffsetTrackedDeltaSink, batches: range, size: int) -> None:
    """Append batches number ``batches`` of ``size`` consecutive offsets of partition 0."""
    for k in batches:
        sink.append(scores(0, range(size * k, size * (k + 1))), through={(TOPIC, 0): size * (k + 1) - 1})


def _sizes(uri: Path) -> list[int]:
    return sorted(pa.table(DeltaTable(str(uri)).get_add_actions(flatten=True)).column("size_bytes").to_pylist())


def test_a_compaction_by_count_leaves_files_above_its_small_file_size_alone(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink = sink_at(uri)
    _append(sink, range(40), 100)
    compactor = PartitionCompactor([str(uri)], {}, every_s=0)
    compactor.saw(DATES)
    compactor.run_once()  # the default target: everything merges, one file per date
    merged = _sizes(uri)
    assert len(merged) == 2
    _append(sink, range(40, 43), 100)
    new_files = [size for size in _sizes(uri) if size not in merged]
    assert sum(new_files) / 2 < min(merged)  # per date, a bin of all the new files fits below the target

    compactor.saw(DATES)
    compactor.run_once(target_size=min(merged))

    after = _sizes(uri)
    assert merged[0] in after and merged[1] in after  # not rewritten
    assert len(after) == 4  # plus one file per date for the three new appends
    assert positions(uri) == Counter({(0, o): 1 for o in range(4300)})


def test_a_timed_run_vacuums_replaced_files_only_when_asked(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink = sink_at(uri)
    _append(sink, range(3), 4)
    on_disk = lambda: len(list(uri.rglob("*.parquet")))  # noqa: E731
    assert on_disk() == 6
    keeping = PartitionCompactor([str(uri)], {}, every_s=0)  # no retention set: nothing deleted
    keeping.saw(DATES)
    keeping.run_once(vacuum=True)
    assert on_disk() == 8

    sink.append(scores(0, range(12, 16)), through={(TOPIC, 0): 15})
    vacuuming = PartitionCompactor([str(uri)], {}, every_s=0, vacuum_retention_hours=0)
    vacuuming.saw(DATES)
    vacuuming.run_once(vacuum=True)

    assert on_disk() == 2 == len(_sizes(uri))  # only the live files are left
    assert positions(uri) == Counter({(0, o): 1 for o in range(16)})


def _checkpoint_files(uri: Path) -> list[str]:
    return sorted(p.name for p in (uri / "_delta_log").glob("*.checkpoint.parquet"))


def test_commits_of_a_maintained_sink_leave_checkpoints_and_log_cleanup_to_the_compactor(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink = sink_at(
        uri, table_properties={"delta.logRetentionDuration": "interval 1 seconds"}, checkpoints="by_maintenance"
    )
    for k in range(105):  # past delta.checkpointInterval (100): delta-rs's hook would checkpoint at 100
        sink.append(scores(0, [k]), through={(TOPIC, 0): k})
    assert _checkpoint_files(uri) == []
    time.sleep(1.5)  # every commit so far is older than the log retention

    compactor = PartitionCompactor([str(uri)], {}, every_s=0, checkpoints=True)
    compactor.saw(DATES)
    compactor.run_once()

    (checkpoint,) = _checkpoint_files(uri)
    version = int(checkpoint.split(".")[0])
    assert version == DeltaTable(str(uri)).version() == 106  # create, 105 appends, the compaction
    logs = sorted((uri / "_delta_log").glob("*.json"))
    assert [p.name for p in logs] == [f"{version:020}.json"]  # the expired commits before it are gone
    fresh = OffsetTrackedDeltaSink(str(uri), SCORES_SCHEMA, app_prefix=PREFIX)
    assert fresh.version_of(sink.app_id(TOPIC, 0)) == 104  # progress lives in the checkpoint
    assert positions(uri) == Counter({(0, o): 1 for o in range(105)})

    compactor.run_once()  # the table did not move: no second checkpoint of the same version
    assert _checkpoint_files(uri) == [checkpoint]
    assert (uri / "_delta_log" / "_last_checkpoint").read_text().count(f'"version":{version}') == 1


def test_tombstones_leave_the_checkpoints_after_the_tables_retention(tmp_path: Path) -> None:
    """What delta.deletedFileRetentionDuration is for: each file a compaction replaced stays in every
    checkpoint as a tombstone until it expires (7 days by default)."""
    uri = tmp_path / "scores"
    sink = sink_at(
        uri, table_properties={"delta.deletedFileRetentionDuration": "interval 2 seconds"}, checkpoints="by_maintenance"
    )
    _append(sink, range(10), 4)  # 20 files, two dates
    compactor = PartitionCompactor([str(uri)], {}, every_s=0, checkpoints=True)
    compactor.saw(DATES)
    compactor.run_once()
    last = lambda: json.loads((uri / "_delta_log" / "_last_checkpoint").read_text())  # noqa: E731
    assert last()["numOfAddFiles"] == 2 and last()["size"] >= 2 + 20  # the 20 tombstones are in

    time.sleep(2.5)
    _append(sink, range(10, 11), 4)
    compactor.saw(DATES)
    compactor.run_once()

    assert last()["numOfAddFiles"] == 2
    assert last()["size"] < 20  # protocol, metadata, app transaction, live files and the 2 new tombstones
    assert positions(uri) == Counter({(0, o): 1 for o in range(44)})
