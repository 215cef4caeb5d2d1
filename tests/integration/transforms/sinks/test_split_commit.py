"""A replay after a crash between a batch's quarantine and scores commits (real Delta tables)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tests.integration.transforms.sinks.test_delta_offsets import TOPIC, _pair, _quarantined, positions, scores
from transforms.sinks import split_commit
from transforms.sinks.delta_offsets import OffsetTrackedDeltaSink


def _split(offsets: range, quarantine: set[int]) -> tuple[pa.Table, pa.Table]:
    """A batch of partition 0: the scores rows and the quarantined rows of these verdicts."""
    return (
        scores(0, [o for o in offsets if o not in quarantine]),
        _quarantined(0, sorted(o for o in offsets if o in quarantine)),
    )


def _publish(
    scores_sink: OffsetTrackedDeltaSink, quarantine: OffsetTrackedDeltaSink, offsets: range, verdict: set[int]
) -> split_commit.SettledBatch:
    """What the consumer does with a batch (pipelines.consume ``_publish``), Delta part."""
    good, bad = _split(offsets, verdict)
    through = {(TOPIC, 0): offsets[-1]}
    settled = split_commit.settle(good, bad, through=through, scores_sink=scores_sink, quarantine_sink=quarantine)
    if settled.quarantine_missing.num_rows:
        quarantine.append_unrecorded(settled.quarantine_missing)
    if settled.quarantined.num_rows:
        quarantine.append(settled.quarantined, through=through)
    scores_sink.append(settled.scores, through=through, covers=quarantine)
    return settled


def _held(uri: Path) -> Counter[int]:
    """Rows per offset of partition 0 (a count above 1 is a duplicate)."""
    return Counter({offset: n for (_, offset), n in positions(uri).items()})


def _reopened(tmp_path: Path) -> tuple[OffsetTrackedDeltaSink, OffsetTrackedDeltaSink]:
    """The sinks of a new process (nothing cached)."""
    return _pair(tmp_path)


def test_a_normal_batch_is_left_as_it_is_without_reading_anything(tmp_path: Path) -> None:
    scores_sink, quarantine = _pair(tmp_path)
    _publish(scores_sink, quarantine, range(0, 10), {3})
    good, bad = _split(range(10, 20), {12})
    settled = split_commit.settle(
        good, bad, through={(TOPIC, 0): 19}, scores_sink=scores_sink, quarantine_sink=quarantine
    )
    assert settled.windows == {} and settled.scores.num_rows == 9 and settled.quarantined.num_rows == 1
    assert settled.quarantine_missing.num_rows == 0


def test_the_first_runs_quarantine_stands_whatever_the_replays_verdicts(tmp_path: Path) -> None:
    scores_sink, quarantine = _pair(tmp_path)
    _publish(scores_sink, quarantine, range(0, 10), {1})  # a whole batch, committed in both tables
    # The next batch quarantines 13 and 15; the process dies after the quarantine commit.
    _, first_bad = _split(range(10, 20), {13, 15})
    quarantine.append(first_bad, through={(TOPIC, 0): 19})

    # The replay reads 10..24 in one batch and judges otherwise: 15 and 17 and 22 are quarantined.
    scores_sink, quarantine = _reopened(tmp_path)
    settled = _publish(scores_sink, quarantine, range(10, 25), {15, 17, 22})

    assert settled.windows == {(TOPIC, 0): (9, 19)}
    assert settled.kept_in_quarantine == 1  # 13: the replay scored it, the first run quarantined it
    assert pc.equal(settled.quarantine_missing["offset"], 17).to_pylist() == [True]  # the replay's own
    held_q, held_s = _held(tmp_path / "quarantine"), _held(tmp_path / "scores")
    assert sorted(held_q) == [1, 13, 15, 17, 22]
    assert held_q + held_s == Counter(range(25))  # every offset exactly once, in one table


def test_a_crash_during_the_replay_is_settled_by_the_next_one(tmp_path: Path) -> None:
    scores_sink, quarantine = _pair(tmp_path)
    _, first_bad = _split(range(0, 10), {4})
    quarantine.append(first_bad, through={(TOPIC, 0): 9})  # crash 1: before the scores commit
    # Replay 1 quarantines 6 (not 4): it appends 6 unfiltered, then dies before its scores commit.
    scores_sink, quarantine = _reopened(tmp_path)
    good, bad = _split(range(0, 10), {6})
    settled = split_commit.settle(
        good, bad, through={(TOPIC, 0): 9}, scores_sink=scores_sink, quarantine_sink=quarantine
    )
    quarantine.append_unrecorded(settled.quarantine_missing)

    # Replay 2 quarantines nothing at all: both earlier verdicts stand.
    scores_sink, quarantine = _reopened(tmp_path)
    _publish(scores_sink, quarantine, range(0, 10), set())

    held_q, held_s = _held(tmp_path / "quarantine"), _held(tmp_path / "scores")
    assert sorted(held_q) == [4, 6] and held_q + held_s == Counter(range(10))
    # And the tables now agree again: the next batch is a normal one.
    good, bad = _split(range(10, 12), set())
    assert (
        split_commit.settle(
            good, bad, through={(TOPIC, 0): 11}, scores_sink=scores_sink, quarantine_sink=quarantine
        ).windows
        == {}
    )


APP = "sluice-stream:test"


def test_a_spark_batch_replayed_after_its_scores_commit_goes_where_the_scores_table_says(tmp_path: Path) -> None:
    scores_sink, quarantine = _pair(tmp_path)
    # Batch id 7 scored all but 3 and 5; the driver died before the quarantine commit.
    first_good, _ = _split(range(0, 10), {3, 5})
    scores_sink.append_once(first_good, app=APP, version=7)

    # The replay (another model by now) quarantines 5 and 8 instead.
    scores_sink, quarantine = _reopened(tmp_path)
    good, bad = _split(range(0, 10), {5, 8})
    assert scores_sink.append_once(good, app=APP, version=7).version is None  # the batch id is recorded
    settled = split_commit.settle_batch_replay(good, bad, scores_sink=scores_sink)
    assert settled.kept_in_scores == 1  # 8: the first run scored it
    assert settled.scores_missing["offset"].to_pylist() == [3]  # its first verdict was lost: the replay's stands
    scores_sink.append_unrecorded(settled.scores_missing)
    quarantine.append_once(settled.quarantined, app=APP, version=7)

    held_q, held_s = _held(tmp_path / "quarantine"), _held(tmp_path / "scores")
    assert sorted(held_q) == [5] and held_q + held_s == Counter(range(10))


def test_a_spark_batch_replayed_with_the_same_verdicts_changes_nothing(tmp_path: Path) -> None:
    scores_sink, _ = _pair(tmp_path)
    good, bad = _split(range(0, 10), {3})
    scores_sink.append_once(good, app=APP, version=2)
    settled = split_commit.settle_batch_replay(good, bad, scores_sink=scores_sink)
    assert settled.scores_missing.num_rows == 0 and settled.kept_in_scores == 0
    assert settled.quarantined["offset"].to_pylist() == [3]
