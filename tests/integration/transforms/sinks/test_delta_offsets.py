"""The offset-tracked Delta sink against real Delta tables on disk (delta-rs).

Each test states one promise the consumer runner's exactly-once argument relies on: a replay writes
nothing twice whatever its batch boundaries, progress is recorded even for batches with no row in
this table, it survives a restart, concurrent writers of disjoint partitions neither lose nor
duplicate rows, a zombie writer of the *same* partition is refused, and a table of another shape is
refused with one line.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from schemas.scores import SCORES_PARTITION_COLUMNS, SCORES_QUARANTINE_SCHEMA, SCORES_SCHEMA
from transforms.errors import SinkError
from transforms.sinks.delta_offsets import THROUGH_KEY, OffsetTrackedDeltaSink

TOPIC = "ad-requests"
PREFIX = "sluice-consume:test-group"
T0 = datetime(2026, 3, 1, 23, 59, 58, tzinfo=UTC)


def scores(partition: int, offsets: range | list[int], *, topic: str = TOPIC) -> pa.Table:
    """SCORES_SCHEMA rows for these offsets of one partition; event times straddle midnight so a
    batch spans two ``event_date`` partitions."""
    offs = list(offsets)
    times = [T0 + timedelta(seconds=o % 4) for o in offs]
    return pa.Table.from_pydict(
        {
            "request_id": [f"r-{partition}-{o}" for o in offs],
            "user_id": [f"u{o % 7}" for o in offs],
            "ad_id": [f"a{o % 5}" for o in offs],
            "seq": offs,
            "score": [0.25] * len(offs),
            "model_name": ["ctr"] * len(offs),
            "model_version": ["m1"] * len(offs),
            "topic": [topic] * len(offs),
            "partition": [partition] * len(offs),
            "offset": offs,
            "event_time": times,
            "scored_at": [T0] * len(offs),
            "event_date": [t.date() for t in times],
        },
        schema=SCORES_SCHEMA,
    )


def sink_at(
    uri: Path | str,
    *,
    schema: pa.Schema = SCORES_SCHEMA,
    partition_by: tuple[str, ...] = SCORES_PARTITION_COLUMNS,
    table_properties: dict[str, str] | None = None,
    checkpoints: Literal["on_commit", "by_maintenance"] = "on_commit",
) -> OffsetTrackedDeltaSink:
    sink = OffsetTrackedDeltaSink(
        str(uri),
        schema,
        app_prefix=PREFIX,
        partition_by=partition_by,
        table_properties=table_properties,
        checkpoints=checkpoints,
    )
    sink.ensure_table()
    return sink


def positions(uri: Path | str) -> Counter[tuple[int, int]]:
    """How many rows the table holds per (partition, offset): every count must be 1."""
    table = DeltaTable(str(uri)).to_pyarrow_table(columns=["partition", "offset"])
    return Counter(zip(table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True))


def test_replaying_the_same_batch_writes_nothing(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "scores")
    first = sink.append(scores(0, range(10)), through={(TOPIC, 0): 9}, metadata={"sluice.job": "test"})
    again = sink.append(scores(0, range(10)), through={(TOPIC, 0): 9})

    assert (first.rows_written, first.rows_skipped) == (10, 0) and first.version is not None
    assert (again.rows_written, again.rows_skipped, again.version) == (0, 10, None)
    assert positions(tmp_path / "scores") == Counter({(0, o): 1 for o in range(10)})
    assert sink.recorded(TOPIC, 0) == 9
    info = DeltaTable(str(tmp_path / "scores")).history(1)[0]
    assert info["sluice.job"] == "test" and info[THROUGH_KEY] == {f"{TOPIC}:0": 9}


def test_a_replay_with_other_boundaries_writes_only_new_offsets(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "scores")
    sink.append(scores(0, range(10)), through={(TOPIC, 0): 9})
    sink.append(scores(1, range(3)), through={(TOPIC, 1): 2})
    # Kafka re-reads from the committed offset, so the replayed batch starts inside the written one
    # and runs past it, over both partitions.
    replay = pa.concat_tables([scores(0, range(5, 15)), scores(1, range(0, 6))])
    result = sink.append(replay, through={(TOPIC, 0): 14, (TOPIC, 1): 5})

    assert (result.rows_written, result.rows_skipped) == (8, 8)
    assert positions(tmp_path / "scores") == Counter(
        {**{(0, o): 1 for o in range(15)}, **{(1, o): 1 for o in range(6)}}
    )
    assert (sink.recorded(TOPIC, 0), sink.recorded(TOPIC, 1)) == (14, 5)


def test_progress_is_recorded_for_a_batch_with_no_rows_here(tmp_path: Path) -> None:
    # Every record of the batch went to the dead letters or the other table.
    sink = sink_at(tmp_path / "scores")
    result = sink.append(SCORES_SCHEMA.empty_table(), through={(TOPIC, 0): 7, (TOPIC, 3): 2})

    assert result.rows_written == 0 and result.version is not None
    assert (sink.recorded(TOPIC, 0), sink.recorded(TOPIC, 3), sink.recorded(TOPIC, 1)) == (7, 2, None)
    assert sink.append(scores(0, range(8)), through={(TOPIC, 0): 7}).rows_written == 0
    assert sum(positions(tmp_path / "scores").values()) == 0
    # Nothing new at all: no commit.
    version = DeltaTable(str(tmp_path / "scores")).version()
    assert sink.append(SCORES_SCHEMA.empty_table(), through={(TOPIC, 0): 5}).version is None
    assert DeltaTable(str(tmp_path / "scores")).version() == version


def test_a_restarted_sink_reads_the_recorded_offsets_back(tmp_path: Path) -> None:
    sink_at(tmp_path / "scores").append(scores(2, range(4)), through={(TOPIC, 2): 6})

    fresh = sink_at(tmp_path / "scores")
    assert fresh.recorded(TOPIC, 2) == 6
    assert fresh.recorded(TOPIC, 0) is None
    assert fresh.append(scores(2, range(8)), through={(TOPIC, 2): 7}).rows_written == 1
    assert positions(tmp_path / "scores")[(2, 7)] == 1


def test_refresh_sees_what_another_writer_recorded(tmp_path: Path) -> None:
    mine, theirs = sink_at(tmp_path / "scores"), sink_at(tmp_path / "scores")
    assert mine.recorded(TOPIC, 0) is None
    theirs.append(scores(0, range(5)), through={(TOPIC, 0): 4})

    assert mine.recorded(TOPIC, 0) is None  # cached
    mine.refresh([(TOPIC, 0)])
    assert mine.recorded(TOPIC, 0) == 4


def test_a_zombie_writer_of_the_same_partition_is_refused_not_duplicated(tmp_path: Path) -> None:
    # A consumer lost partition 0 in a rebalance but still holds a batch of it; the new owner has
    # already written it. The zombie's commit conflicts (same app id) and is filtered again.
    uri = tmp_path / "scores"
    zombie, owner = sink_at(uri), sink_at(uri)
    assert zombie.recorded(TOPIC, 0) is None
    owner.append(scores(0, range(10)), through={(TOPIC, 0): 9})

    result = zombie.append(scores(0, range(10)), through={(TOPIC, 0): 9})

    assert (result.rows_written, result.rows_skipped) == (0, 10)
    assert positions(uri) == Counter({(0, o): 1 for o in range(10)})


def test_a_commit_that_jumps_over_another_writer_does_not_keep_a_stale_record(tmp_path: Path) -> None:
    # The zombie's next commit (another partition) lands after the owner's: it is not a conflict,
    # but the zombie must not keep trusting what it read about partition 0 before.
    uri = tmp_path / "scores"
    zombie, owner = sink_at(uri), sink_at(uri)
    assert zombie.recorded(TOPIC, 0) is None
    owner.append(scores(0, range(10)), through={(TOPIC, 0): 9})
    zombie.append(scores(1, range(3)), through={(TOPIC, 1): 2})

    result = zombie.append(scores(0, range(10)), through={(TOPIC, 0): 9})

    assert result.rows_written == 0
    assert positions(uri) == Counter({**{(0, o): 1 for o in range(10)}, **{(1, o): 1 for o in range(3)}})


def _writer(uri: str, partitions: list[int], batches: int, rows: int, start: Any) -> None:
    sink = OffsetTrackedDeltaSink(uri, SCORES_SCHEMA, app_prefix=PREFIX, partition_by=SCORES_PARTITION_COLUMNS)
    start.wait()
    sink.ensure_table()  # both processes race to create the table, too
    for b in range(batches):
        offs = range(b * rows, (b + 1) * rows)
        batch = pa.concat_tables([scores(p, offs) for p in partitions])
        sink.append(batch, through={(TOPIC, p): offs[-1] for p in partitions})
        if b % 3 == 2:  # and a replay now and then, overlapping what was just written
            sink.append(
                pa.concat_tables([scores(p, range(b * rows - 5, (b + 1) * rows)) for p in partitions]),
                through={(TOPIC, p): offs[-1] for p in partitions},
            )


def test_two_processes_appending_disjoint_partitions_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    uri, batches, rows = str(tmp_path / "scores"), 12, 50
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(uri, parts, batches, rows, start)) for parts in ([0, 1], [2, 3])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]

    assert positions(uri) == Counter({(p, o): 1 for p in range(4) for o in range(batches * rows)})
    fresh = sink_at(uri)
    assert [fresh.recorded(TOPIC, p) for p in range(4)] == [batches * rows - 1] * 4


def test_an_incompatible_existing_table_is_refused(tmp_path: Path) -> None:
    sink_at(tmp_path / "scores")
    with pytest.raises(SinkError, match=r"incompatible schema.*missing column 'check'"):
        sink_at(tmp_path / "scores", schema=SCORES_QUARANTINE_SCHEMA, partition_by=())
    with pytest.raises(SinkError, match=r"partitioned by \['event_date'\], expected \[\]"):
        sink_at(tmp_path / "scores", partition_by=())
    retyped = pa.schema([f.with_type(pa.float64()) if f.name == "score" else f for f in SCORES_SCHEMA])
    with pytest.raises(SinkError, match="column 'score' is float, expected double"):
        sink_at(tmp_path / "scores", schema=retyped)


def test_the_table_is_partitioned_by_event_date(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink_at(uri).append(scores(0, range(8)), through={(TOPIC, 0): 7})

    dt = DeltaTable(str(uri))
    assert dt.metadata().partition_columns == ["event_date"]
    assert sorted(p["event_date"] for p in dt.partitions()) == ["2026-03-01", "2026-03-02"]
    assert {d.name for d in uri.iterdir() if d.is_dir()} >= {"event_date=2026-03-01", "event_date=2026-03-02"}
    back = dt.to_pyarrow_table(filters=[("event_date", "=", date(2026, 3, 2))])
    assert back.num_rows == 4 and set(back["event_date"].to_pylist()) == {date(2026, 3, 2)}


def test_the_quarantine_table_uses_the_same_sink(tmp_path: Path) -> None:
    uri = tmp_path / "quarantine"
    sink = sink_at(uri, schema=SCORES_QUARANTINE_SCHEMA, partition_by=())
    rows = pa.Table.from_pydict(
        {
            "request_id": ["r1", None],
            "user_id": ["u1", None],
            "ad_id": ["a1", None],
            "seq": [1, None],
            "score": [float("nan"), None],
            "check": ["score_finite", "batch_mean"],
            "reason": ["score is NaN", "batch mean out of bounds"],
            "model_version": ["m1", "m1"],
            "topic": [TOPIC, TOPIC],
            "partition": [0, 0],
            "offset": [3, 4],
            "quarantined_at": [T0, T0],
        },
        schema=SCORES_QUARANTINE_SCHEMA,
    )
    assert sink.append(rows, through={(TOPIC, 0): 4}).rows_written == 2
    assert sink.append(rows, through={(TOPIC, 0): 4}).rows_written == 0
    assert DeltaTable(str(uri)).to_pyarrow_table()["check"].to_pylist() == ["score_finite", "batch_mean"]


def test_many_small_commits_get_checkpointed_and_compacted(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink = sink_at(uri)
    for b in range(100):  # with the create, version 100: past delta-rs's default checkpoint interval
        sink.append(scores(0, [b]), through={(TOPIC, 0): b})

    log = uri / "_delta_log"
    assert list(log.glob("*.checkpoint.parquet")), "delta-rs wrote no checkpoint after 100 commits"
    assert sink_at(uri).recorded(TOPIC, 0) == 99  # read back through the checkpoint

    metrics = sink.compact()
    assert metrics["numFilesRemoved"] > metrics["numFilesAdded"] > 0
    dt = DeltaTable(str(uri))
    assert len(dt.file_uris()) == 2  # one file per event_date
    assert positions(uri) == Counter({(0, o): 1 for o in range(100)})
    assert dt.transaction_version(sink.app_id(TOPIC, 0)) == 99


def test_rows_must_be_covered_by_through(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "scores")
    with pytest.raises(ValueError, match="missing from `through`"):
        sink.append(scores(1, range(3)), through={(TOPIC, 0): 9})
    with pytest.raises(ValueError, match="beyond through"):
        sink.append(scores(0, range(3)), through={(TOPIC, 0): 1})


def test_compaction_alongside_a_writer_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # The operator compacts the partition the consumer is writing to, from another process with a
    # snapshot that is already behind: neither commit may drop or repeat the other's files.
    uri = tmp_path / "scores"
    writer = sink_at(uri)
    for b in range(6):
        writer.append(scores(0, range(b * 4, b * 4 + 4)), through={(TOPIC, 0): b * 4 + 3})
    operator = sink_at(uri)
    writer.append(scores(0, range(24, 28)), through={(TOPIC, 0): 27})  # the operator has not seen this one

    metrics = operator.compact()
    writer.append(scores(0, range(20, 32)), through={(TOPIC, 0): 31})  # a replay overlapping the compacted rows

    assert metrics["numFilesRemoved"] == 12  # 6 appends x 2 event dates, as of the operator's snapshot
    assert positions(uri) == Counter({(0, o): 1 for o in range(32)})
    assert sink_at(uri).recorded(TOPIC, 0) == 31


@pytest.mark.spark
def test_a_table_spark_created_takes_these_commits_and_spark_keeps_writing(tmp_path: Path, spark: Any) -> None:
    # A scores table delta-spark created (all columns nullable: another Spark job, or the Spark runner
    # before it appended through this sink) takes this sink's commits, and Spark keeps writing to it.
    from transforms.spark import delta_io

    uri = str(tmp_path / "scores")
    batch = spark.createDataFrame(scores(0, range(5)).to_pandas(), schema=None)
    delta_io.append_idempotent(batch, uri, app_id="stream", version=0, user_metadata="{}", partition_by=("event_date",))

    ledger = OffsetTrackedDeltaSink.for_existing_table(uri, app_prefix="stream:topics")
    ledger.record_progress({"stream:topics": 0}, metadata={"sluice.ledger": {"batch_id": 0}})
    consumer = sink_at(uri)
    assert consumer.append(scores(1, range(5)), through={(TOPIC, 1): 4}).rows_written == 5
    delta_io.append_idempotent(batch, uri, app_id="stream", version=0, user_metadata="{}", partition_by=("event_date",))

    dt = DeltaTable(uri)
    assert (dt.transaction_version("stream"), dt.transaction_version("stream:topics")) == (0, 0)
    assert spark.read.format("delta").load(uri).count() == 10


def test_append_once_writes_a_batch_id_once(tmp_path: Path) -> None:
    # The Spark runner's idempotence: app transaction (stream, batch id), like delta-spark's
    # txnAppId/txnVersion. A replay of the id, or of an older one, writes nothing.
    sink = sink_at(tmp_path / "scores")
    first = sink.append_once(scores(0, range(10)), app="stream", version=0, metadata={"sluice": {"batch_id": 0}})
    replay = sink.append_once(scores(0, range(10)), app="stream", version=0)
    next_ = sink.append_once(scores(0, range(10, 15)), app="stream", version=1)
    older = sink.append_once(scores(0, range(10)), app="stream", version=0)

    assert (first.rows_written, first.version is not None) == (10, True)
    assert (replay.rows_written, replay.rows_skipped, replay.version) == (0, 10, None)
    assert next_.rows_written == 5 and older.version is None
    assert positions(tmp_path / "scores") == Counter({(0, o): 1 for o in range(15)})
    dt = DeltaTable(str(tmp_path / "scores"))
    assert dt.transaction_version("stream") == 1
    assert dt.history(2)[1]["sluice"] == {"batch_id": 0}


def test_append_once_sees_a_commit_made_after_its_snapshot(tmp_path: Path) -> None:
    # A restarted driver's sink, or one whose table object predates another writer's commit of the
    # same batch id: the log is re-read before the check, so the batch is not written twice.
    stale = sink_at(tmp_path / "scores")
    stale.append_once(scores(0, range(3)), app="other", version=0)  # the sink's snapshot is now open
    other = sink_at(tmp_path / "scores")
    assert other.append_once(scores(1, range(5)), app="stream", version=7).rows_written == 5

    assert stale.append_once(scores(1, range(5)), app="stream", version=7).version is None
    assert positions(tmp_path / "scores") == Counter({**{(0, o): 1 for o in range(3)}, **{(1, o): 1 for o in range(5)}})


def test_append_once_refuses_rows_of_another_shape_before_writing(tmp_path: Path) -> None:
    sink = sink_at(tmp_path / "scores")
    with pytest.raises(SinkError, match="lack column"):
        sink.append_once(scores(0, range(3)).drop_columns(["score"]), app="stream", version=0)
    assert DeltaTable(str(tmp_path / "scores")).transaction_version("stream") is None


def test_offsets_published_to_kafka_ride_along_and_are_read_back(tmp_path: Path) -> None:
    # The consumer records, with each Delta commit, how far the previous batches reached Kafka: where
    # a group without broker-side offsets resumes (pipelines/consume.py).
    uri = tmp_path / "scores"
    sink = sink_at(uri)
    sink.append(scores(0, range(5)), through={(TOPIC, 0): 4})
    second = sink.append(scores(0, range(5, 10)), through={(TOPIC, 0): 9}, published={(TOPIC, 0): 4})

    assert second.rows_written == 5
    fresh = sink_at(uri)
    assert (fresh.recorded(TOPIC, 0), fresh.published(TOPIC, 0), fresh.published(TOPIC, 1)) == (9, 4, None)
    # Only the published mark moved: it is committed alone; when nothing moved, nothing is.
    assert fresh.append(SCORES_SCHEMA.empty_table(), through={(TOPIC, 0): 9}, published={(TOPIC, 0): 9}).version
    assert fresh.append(SCORES_SCHEMA.empty_table(), through={(TOPIC, 0): 9}, published={(TOPIC, 0): 9}).version is None
    sink.refresh_published([(TOPIC, 0)])
    assert sink.published(TOPIC, 0) == 9
    assert positions(uri) == Counter({(0, o): 1 for o in range(10)})


RETENTION = {"delta.logRetentionDuration": "interval 15 minutes"}


def test_a_new_table_is_created_with_the_writers_table_properties(tmp_path: Path) -> None:
    sink = OffsetTrackedDeltaSink(
        str(tmp_path / "scores"), SCORES_SCHEMA, app_prefix=PREFIX, table_properties=RETENTION
    )
    sink.ensure_table()

    dt = DeltaTable(str(tmp_path / "scores"))
    assert dt.metadata().configuration == RETENTION and dt.version() == 0  # no extra commit


def test_an_existing_table_gets_a_differing_property_set_once_and_keeps_its_rows(tmp_path: Path) -> None:
    uri = tmp_path / "scores"
    sink_at(uri).append(scores(0, range(4)), through={(TOPIC, 0): 3})  # created without properties
    before = DeltaTable(str(uri)).version()

    sink = OffsetTrackedDeltaSink(
        str(uri), SCORES_SCHEMA, app_prefix=PREFIX, partition_by=SCORES_PARTITION_COLUMNS, table_properties=RETENTION
    )
    sink.ensure_table()
    sink.ensure_table()  # already set: no second commit

    dt = DeltaTable(str(uri))
    assert dt.metadata().configuration == RETENTION and dt.version() == before + 1
    assert sink.recorded(TOPIC, 0) == 3  # progress survives the metadata commit
    assert sink.append(scores(0, range(2, 8)), through={(TOPIC, 0): 7}).rows_written == 4
    assert positions(uri) == Counter({(0, o): 1 for o in range(8)})


def test_a_short_log_retention_keeps_the_log_directory_bounded(tmp_path: Path) -> None:
    """What the property is for: delta-rs lists the whole _delta_log on every commit, so the number
    of log files, not only of data files, is what a long stream's commits pay for. Delta deletes
    expired commits at a checkpoint, up to the checkpoint before it."""
    uri = tmp_path / "quarantine"
    sink = sink_at(uri, table_properties={"delta.logRetentionDuration": "interval 1 seconds"})
    sink.append(scores(0, range(2)), through={(TOPIC, 0): 1})
    for k in range(2, 206):  # progress-only commits, as the quarantine table gets every batch
        if k == 102:
            time.sleep(1.5)  # the first hundred commits are now older than the retention
        sink.append(scores(0, []), through={(TOPIC, 0): k})

    logs = sorted(p.name for p in (uri / "_delta_log").iterdir() if p.name.endswith(".json"))
    assert len(logs) < 150 and logs[0] != f"{0:020}.json"  # the checkpoint at 199 dropped those before 99
    assert sink.recorded(TOPIC, 0) == 205 and positions(uri) == Counter({(0, 0): 1, (0, 1): 1})
    fresh = OffsetTrackedDeltaSink(str(uri), SCORES_SCHEMA, app_prefix=PREFIX)
    assert fresh.version_of(sink.app_id(TOPIC, 0)) == 205  # progress lives in the checkpoint, not the old commits


def _pair(tmp_path: Path) -> tuple[OffsetTrackedDeltaSink, OffsetTrackedDeltaSink]:
    """A scores sink and a quarantine sink whose progress the scores commits may record."""
    scores_sink = sink_at(tmp_path / "scores")
    quarantine = OffsetTrackedDeltaSink(
        str(tmp_path / "quarantine"), SCORES_QUARANTINE_SCHEMA, app_prefix=PREFIX, recorded_also_by=scores_sink
    )
    quarantine.ensure_table()
    return scores_sink, quarantine


def _quarantined(partition: int, offsets: range | list[int]) -> pa.Table:
    rows = scores(partition, offsets)
    n = rows.num_rows
    return (
        rows.append_column("check", pa.array(["score_finite"] * n))
        .append_column("reason", pa.array(["score is nan"] * n))
        .append_column("quarantined_at", rows["scored_at"])
    )


def test_a_scores_commit_that_covers_the_quarantine_spares_it_a_commit(tmp_path: Path) -> None:
    scores_sink, quarantine = _pair(tmp_path)

    scores_sink.append(scores(0, range(10)), through={(TOPIC, 0): 9}, covers=quarantine)

    assert DeltaTable(str(tmp_path / "quarantine")).version() == 0  # nothing committed there
    assert quarantine.recorded(TOPIC, 0) == 9
    # A replay whose verdict flipped (rows the first run scored are now quarantined) writes nothing twice.
    replay = quarantine.append(_quarantined(0, [3, 4, 12]), through={(TOPIC, 0): 12})
    assert (replay.rows_written, replay.rows_skipped) == (1, 2)
    assert positions(tmp_path / "quarantine") == Counter({(0, 12): 1})


def test_the_covering_record_survives_a_restart_and_the_later_record_wins(tmp_path: Path) -> None:
    scores_sink, quarantine = _pair(tmp_path)
    quarantine.append(_quarantined(0, [2]), through={(TOPIC, 0): 4})
    scores_sink.append(scores(0, [0, 1, 3, 4]), through={(TOPIC, 0): 4}, covers=quarantine)
    scores_sink.append(scores(0, range(5, 10)), through={(TOPIC, 0): 9}, covers=quarantine)

    restarted_scores, restarted = _pair(tmp_path)
    assert restarted.recorded(TOPIC, 0) == 9  # the scores table's mark, later than the quarantine's own 4
    assert restarted.append(_quarantined(0, [2, 7]), through={(TOPIC, 0): 9}).rows_written == 0
    assert restarted.append(_quarantined(0, [11]), through={(TOPIC, 0): 11}).rows_written == 1
    assert restarted.recorded(TOPIC, 0) == 11  # its own record, now the later one
    assert restarted_scores.mark(restarted.covered_app_id(TOPIC, 0)) == 9
    assert positions(tmp_path / "quarantine") == Counter({(0, 2): 1, (0, 11): 1})
