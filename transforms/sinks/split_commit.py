"""Replaying a batch that crashed between its quarantine commit and its scores commit.

The consumer writes a batch's quarantined rows to the quarantine table, then its good rows to the
scores table: two Delta tables, two commits. A crash between them leaves the quarantine table
recording progress through offset X while the scores table records less. The replay reads those
offsets again and routes each row again, and its verdict can differ from the first run's: the
batch-mean check depends on the batch's boundaries, which a replay does not reproduce, and a new
model may have been promoted meanwhile. Left alone, a row the first run quarantined and the replay
scores would land in both tables, and a row the replay quarantines but the first run did not would
be dropped by the quarantine table's offset filter: lost.

So in such a *window* (offsets above the scores table's record, up to the quarantine table's own),
the quarantine table's content decides. A row it holds stays there and leaves the replay's scores;
a row it lacks goes where the replay sends it: to the scores table as usual, or to the quarantine
table by an explicit append (:meth:`~transforms.sinks.delta_offsets.OffsetTrackedDeltaSink.append_unrecorded`)
before the scores commit. Every offset then ends in exactly one table, whatever the verdicts. A
crash during the replay leaves the same kind of window, settled the same way next time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from transforms.sinks.delta_offsets import OffsetTrackedDeltaSink, TopicPartitionKey

log = logging.getLogger("sluice.split_commit")


@dataclass(frozen=True)
class SettledBatch:
    """A batch's rows once the windows are settled."""

    scores: pa.Table
    #: Quarantined rows for :meth:`OffsetTrackedDeltaSink.append` (its offset filter applies).
    quarantined: pa.Table
    #: Quarantined rows of a window the quarantine table lacks: append them unfiltered, first.
    quarantine_missing: pa.Table
    #: Rows the replay scored but the first run quarantined: left out of the scores.
    kept_in_quarantine: int = 0
    #: The windows found, ``(topic, partition) -> (low, high]``; empty in a normal batch.
    windows: dict[TopicPartitionKey, tuple[int, int]] = field(default_factory=dict)


def _table(rows: pa.Table | pa.RecordBatch) -> pa.Table:
    return rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])


def _positions(rows: pa.Table) -> list[tuple[str, int, int]]:
    """Each row's (topic, partition, offset). Python objects: only on the rare replay paths."""
    return list(zip(rows["topic"].to_pylist(), rows["partition"].to_pylist(), rows["offset"].to_pylist(), strict=True))


def _in(rows: pa.Table, keys: set[tuple[str, int, int]]) -> pa.Array:
    """Per row: whether its (topic, partition, offset) is in ``keys``."""
    return pa.array([key in keys for key in _positions(rows)], pa.bool_())


def _in_windows(rows: pa.Table, windows: Mapping[TopicPartitionKey, tuple[int, int]]) -> pa.Array:
    return pa.array(
        [(tp := (t, p)) in windows and windows[tp][0] < o <= windows[tp][1] for t, p, o in _positions(rows)],
        pa.bool_(),
    )


def settle(
    scores: pa.Table | pa.RecordBatch,
    quarantined: pa.Table | pa.RecordBatch,
    *,
    through: Mapping[TopicPartitionKey, int],
    scores_sink: OffsetTrackedDeltaSink,
    quarantine_sink: OffsetTrackedDeltaSink,
) -> SettledBatch:
    """Route the rows of a batch covering ``through`` so that offsets in a window (module docs)
    keep the first run's quarantine. Costs a few dictionary lookups when there is no window."""
    scores_t, quarantined_t = _table(scores), _table(quarantined)
    windows: dict[TopicPartitionKey, tuple[int, int]] = {}
    for topic, partition in through:
        high = quarantine_sink.recorded(topic, partition, own=True)
        low = scores_sink.recorded(topic, partition)
        if high is not None and (low is None or high > low):
            windows[(topic, int(partition))] = (-1 if low is None else low, high)
    if not windows:
        return SettledBatch(scores_t, quarantined_t, quarantined_t.schema.empty_table())

    held = quarantine_sink.offsets_held(windows)
    scored_there = pc.and_(_in_windows(scores_t, windows), _in(scores_t, held))
    kept = int(pc.sum(scored_there).as_py() or 0)
    missing = pc.and_(_in_windows(quarantined_t, windows), pc.invert(_in(quarantined_t, held)))
    settled = SettledBatch(
        scores=scores_t.filter(pc.invert(scored_there)),
        quarantined=quarantined_t.filter(pc.invert(missing)),
        quarantine_missing=quarantined_t.filter(missing),
        kept_in_quarantine=kept,
        windows=windows,
    )
    log.warning(
        "resuming after a crash between a batch's quarantine and scores commits: the quarantine table's"
        " rows in the window keep their place",
        extra={
            "windows": {f"{t}[{p}]": [low, high] for (t, p), (low, high) in windows.items()},
            "held_in_quarantine": len(held),
            "scored_by_replay_but_quarantined_before": kept,
            "quarantined_by_replay_only": settled.quarantine_missing.num_rows,
        },
    )
    return settled


@dataclass(frozen=True)
class ReplayedBatch:
    """A batch id's rows once the scores table's content has settled them (:func:`settle_batch_replay`)."""

    #: Rows the replay scored that the scores table lacks: append them unfiltered.
    scores_missing: pa.Table
    #: Rows for the quarantine table (those the scores table holds are left out).
    quarantined: pa.Table
    #: Rows the replay quarantined that the scores table holds: left out of the quarantine.
    kept_in_scores: int = 0


def _batch_windows(*tables: pa.Table) -> dict[TopicPartitionKey, tuple[int, int]]:
    """Per partition, ``(first offset - 1, last offset]`` over the rows of ``tables``."""
    windows: dict[TopicPartitionKey, tuple[int, int]] = {}
    for rows in tables:
        for t, p, o in _positions(rows):
            low, high = windows.get((t, p), (o - 1, o))
            windows[(t, p)] = (min(low, o - 1), max(high, o))
    return windows


def settle_batch_replay(
    scores: pa.Table | pa.RecordBatch,
    quarantined: pa.Table | pa.RecordBatch,
    *,
    scores_sink: OffsetTrackedDeltaSink,
) -> ReplayedBatch:
    """The Spark stream's case: it commits a batch id to the scores table, then (if the batch has
    quarantined rows) to the quarantine table. A replay of a batch id the scores table holds but the
    quarantine table does not has no record of the first run's quarantine. The scores table's rows
    decide: a row it holds stays there; a row it lacks was quarantined by the first run, whose
    quarantine commit never landed, and goes where the replay sends it (to the scores table by an
    unfiltered append, or to the quarantine table). Reads the scores table for the batch's offsets:
    only on such a replay."""
    scores_t, quarantined_t = _table(scores), _table(quarantined)
    held = scores_sink.offsets_held(_batch_windows(scores_t, quarantined_t))
    missing = pc.invert(_in(scores_t, held))
    in_scores = _in(quarantined_t, held)
    settled = ReplayedBatch(
        scores_missing=scores_t.filter(missing),
        quarantined=quarantined_t.filter(pc.invert(in_scores)),
        kept_in_scores=int(pc.sum(in_scores).as_py() or 0),
    )
    if settled.scores_missing.num_rows or settled.kept_in_scores:
        log.warning(
            "replaying a batch whose scores commit landed but whose quarantine commit did not, with other"
            " verdicts: each row goes where the scores table says",
            extra={
                "scored_now": settled.scores_missing.num_rows,
                "quarantined_by_replay_but_scored_before": settled.kept_in_scores,
            },
        )
    return settled
