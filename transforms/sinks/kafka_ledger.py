"""Exactly-once topic publishing for micro-batches that a driver crash makes Spark replay.

Spark identifies each micro-batch by a batch id and, after a driver crash, runs the last
uncommitted batch again with the same id and offsets. Delta appends are skipped on replay by their
app transaction, but a Kafka transaction has no such memory: the replayed batch would be published
twice. :class:`LedgeredKafkaPublisher` gives it one, in the scores table's own log:

1. ``publish(N)`` reads the ledger, Delta app transaction ``ledger_app_id``: if its version is
   ``>= N``, batch N is already on the topics, and nothing is sent.
2. Otherwise the batch goes out in ONE Kafka transaction (:class:`TransactionalKafkaSink`) whose
   every message carries the header ``sluice.batch = "<ledger_app_id>:<N>"``.
3. After the Kafka commit, an empty Delta commit (no rows) carrying only the app transaction
   ``(ledger_app_id, N)`` records it, with the end offsets of every partition of both topics in
   its commit info (:data:`LEDGER_KEY`).

A crash between 2 and 3 leaves batch N on the topics but not in the ledger. So unless this
process itself wrote the latest ledger entry and has committed nothing since, ``publish(N)`` first
reads (``read_committed``) each partition of both topics from the end offsets recorded with the
latest entry up to the high watermark, looking for batch N's header; if it is there, only the
ledger entry is written. The scan is short: it covers what was written since the previous batch.

To keep that true for the very first batch, the ledger opens with a *start* entry (version
``-1``) holding the topics' end offsets before anything was published: a ledger with no entry at
all proves that nothing was ever published under this app id, and the first scan starts at the
start entry's offsets instead of at the beginning of topics that may hold months of another
job's messages.

delta-rs makes an empty commit carrying just an app transaction with an ordinary append of zero
rows (``write_deltalake(..., mode="append")``, which still writes a commit): see
:meth:`~transforms.sinks.delta_offsets.OffsetTrackedDeltaSink.record_progress`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from transforms.crashpoints import crash_point
from transforms.errors import SinkError
from transforms.sinks.delta_offsets import OffsetTrackedDeltaSink
from transforms.sinks.kafka_outputs import TransactionalKafkaSink

if TYPE_CHECKING:
    from confluent_kafka import Consumer

_log = logging.getLogger(__name__)

#: Header on every message a ledgered batch publishes: ``"<ledger_app_id>:<batch_id>"``.
BATCH_HEADER = "sluice.batch"
#: Commit-info key of a ledger entry: ``{"app_id", "batch_id", "end_offsets": {topic: {partition: offset}}}``.
LEDGER_KEY = "sluice.ledger"
#: Version of the start entry, written before a ledger's first transaction.
START = -1
#: History depths searched for the latest entry's commit (it is normally among the last few).
_HISTORY_DEPTHS = (16, 256, None)
_TIMEOUT_S = 10.0

EndOffsets = dict[tuple[str, int], int]


class LedgeredKafkaPublisher:
    """Publishes each batch id to the scores and dead-letter topics once, whatever Spark replays."""

    def __init__(
        self,
        bootstrap: str,
        *,
        transactional_id: str,
        scores_topic: str,
        dlq_topic: str,
        ledger_uri: str,
        ledger_app_id: str,
        client_config: dict[str, str] | None = None,
        storage_options: dict[str, str] | None = None,
        transaction_timeout_s: float = 60.0,
        ledger_checkpoints: Literal["on_commit", "by_maintenance"] = "on_commit",
    ) -> None:
        self.bootstrap = bootstrap
        self.ledger_checkpoints = ledger_checkpoints
        self.topics = (scores_topic, dlq_topic)
        self.ledger_uri = ledger_uri
        self.ledger_app_id = ledger_app_id
        self.client_config = dict(client_config or {})
        self.storage_options = storage_options
        # A recovery scan must outwait a transaction another producer holds open on these topics
        # (read_committed readers stop at it); the broker aborts those after their timeout.
        self.scan_timeout_s = transaction_timeout_s + 30.0
        self._sink = TransactionalKafkaSink(
            bootstrap,
            transactional_id=transactional_id,
            scores_topic=scores_topic,
            dlq_topic=dlq_topic,
            client_config=client_config,
            transaction_timeout_s=transaction_timeout_s,
        )
        self._ledger: OffsetTrackedDeltaSink | None = None
        self._consumer: Consumer | None = None
        # (batch id, end offsets) of the ledger entry this process wrote last, while it has
        # committed no Kafka transaction since: the one state that needs no recovery scan.
        self._clean: tuple[int, EndOffsets] | None = None

    def publish(self, batch_id: int, scores: pa.Table, dead_letters: pa.Table) -> bool:
        """Publish batch ``batch_id`` in one Kafka transaction, unless it already was (False)."""
        if batch_id < 0:
            raise ValueError(f"batch ids start at 0, got {batch_id}")
        ledger = self._ledger_table()
        recorded = ledger.version_of(self.ledger_app_id, refresh=True)
        if recorded is not None and recorded >= batch_id:
            return False
        tag = f"{self.ledger_app_id}:{batch_id}"
        if self._clean is None or self._clean[0] != recorded:
            if recorded is None:
                # No entry, not even a start entry: nothing was ever published under this app id.
                self._record(START, self._end_offsets())
            else:
                found = self._find(tag, self._entry_offsets(recorded))
                if found is not None:
                    _log.info("batch %s is already on %s (found in recovery): recording it", tag, self.topics)
                    self._record(batch_id, found)
                    return False
        self._clean = None  # from here until the ledger entry, a crash leaves batch N unrecorded
        sink = self._sink
        sink.begin()
        try:
            sink.produce_scores(scores, headers={BATCH_HEADER: tag})
            sink.produce_dead_letters(dead_letters, headers={BATCH_HEADER: tag})
        except BaseException:
            with contextlib.suppress(SinkError):  # the error that got us here is the one to report
                sink.abort()
            raise
        sink.commit()
        crash_point("ledger:after_kafka_commit")
        self._record(batch_id, self._end_offsets())
        return True

    def close(self) -> None:
        self._sink.close()
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception as exc:  # closing must not mask the error that got us here
                _log.warning("closing the ledger's scan consumer failed: %s", exc)
            self._consumer = None

    # -- the ledger --------------------------------------------------------------------------------

    def _ledger_table(self) -> OffsetTrackedDeltaSink:
        # Opened on first use, so a publisher can be built before the table it records on exists.
        if self._ledger is None:
            self._ledger = OffsetTrackedDeltaSink.for_existing_table(
                self.ledger_uri,
                app_prefix=self.ledger_app_id,
                storage_options=self.storage_options,
                checkpoints=self.ledger_checkpoints,
            )
        return self._ledger

    def _record(self, batch_id: int, ends: EndOffsets) -> None:
        entry = {
            "app_id": self.ledger_app_id,
            "batch_id": batch_id,
            "end_offsets": _offsets_json(ends),
        }
        self._ledger_table().record_progress({self.ledger_app_id: batch_id}, metadata={LEDGER_KEY: entry})
        self._clean = (batch_id, ends)

    def _entry_offsets(self, batch_id: int) -> EndOffsets:
        """The end offsets recorded with the ledger entry for ``batch_id`` (empty if not found)."""
        dt = self._ledger_table().table
        for depth in _HISTORY_DEPTHS:
            for commit in dt.history(depth):
                entry = commit.get(LEDGER_KEY)
                if (
                    isinstance(entry, dict)
                    and entry.get("app_id") == self.ledger_app_id
                    and entry.get("batch_id") == batch_id
                ):
                    return _offsets_from_json(entry.get("end_offsets") or {})
        _log.warning(
            "ledger entry %s:%s not found in the log of %s (expired?): scanning the topics from their start",
            self.ledger_app_id,
            batch_id,
            self.ledger_uri,
        )
        return {}

    # -- the topics --------------------------------------------------------------------------------

    def _scan_consumer(self) -> Consumer:
        from confluent_kafka import Consumer

        if self._consumer is None:
            self._consumer = Consumer(
                {
                    **self.client_config,
                    "bootstrap.servers": self.bootstrap,
                    "group.id": f"{self.ledger_app_id}:ledger-scan",  # never joined nor committed: assign() only
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                    "auto.offset.reset": "earliest",
                },
                logger=_log,
            )
        return self._consumer

    def _watermarks(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(low, high) watermark of every partition of both topics."""
        from confluent_kafka import KafkaException

        from transforms.kafka_admin import watermarks

        consumer = self._scan_consumer()
        out = {}
        try:
            for topic in self.topics:
                meta = consumer.list_topics(topic, timeout=_TIMEOUT_S).topics.get(topic)
                if meta is None or meta.error is not None or not meta.partitions:
                    raise SinkError(
                        f"Kafka topic {topic} is missing on {self.bootstrap}: {getattr(meta, 'error', None)}"
                    )
                for p in sorted(meta.partitions):
                    out[(topic, p)] = watermarks(consumer, topic, p, timeout_s=_TIMEOUT_S)
        except KafkaException as exc:
            raise SinkError(f"cannot read the offsets of {self.topics} on {self.bootstrap}: {exc}") from exc
        return out

    def _end_offsets(self) -> EndOffsets:
        """Every partition's high watermark: all messages of the batches published from now on lie
        at or after them (the previous batches' messages were acknowledged before their commit)."""
        return {tp: high for tp, (_, high) in self._watermarks().items()}

    def _find(self, tag: str, start: EndOffsets) -> EndOffsets | None:
        """Look (read_committed) between ``start`` and the high watermarks for a message of batch
        ``tag``: the high watermarks (the new end offsets) if there is one, else None."""
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        marks = self._watermarks()
        ranges = {tp: (max(start.get(tp, low), low), high) for tp, (low, high) in marks.items()}
        pending = {tp for tp, (begin, end) in ranges.items() if begin < end}
        ends = {tp: high for tp, (_, high) in marks.items()}
        if not pending:
            return None
        consumer = self._scan_consumer()
        wanted = tag.encode()
        deadline = time.monotonic() + self.scan_timeout_s
        try:
            consumer.assign([TopicPartition(t, p, ranges[(t, p)][0]) for t, p in sorted(pending)])
            while pending:
                if time.monotonic() > deadline:
                    raise SinkError(
                        f"could not read {sorted(pending)} up to their end within {self.scan_timeout_s:g} s to check"
                        f" whether batch {tag} was published: a transaction on these topics stays open"
                    )
                for msg in consumer.consume(num_messages=10_000, timeout=0.2):
                    tp = (str(msg.topic()), int(msg.partition() or 0))
                    offset = int(msg.offset() or 0)
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            raise SinkError(f"reading {tp[0]}[{tp[1]}] to look for batch {tag} failed: {err.str()}")
                        # The end a read_committed reader reaches: past commit markers, and short of
                        # the high watermark while some transaction is still open there.
                        if offset >= ranges[tp][1]:
                            pending.discard(tp)
                        continue
                    if any(h[0] == BATCH_HEADER and h[1] == wanted for h in msg.headers() or []):
                        return ends
                    if offset >= ranges[tp][1] - 1:
                        pending.discard(tp)
        except KafkaException as exc:
            raise SinkError(f"cannot read {self.topics} on {self.bootstrap} to look for batch {tag}: {exc}") from exc
        finally:
            try:
                consumer.unassign()
            except Exception as exc:
                _log.warning("unassigning the ledger's scan consumer failed: %s", exc)
        return None


def _offsets_json(ends: EndOffsets) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(ends.items()):
        out.setdefault(topic, {})[str(partition)] = offset
    return out


def _offsets_from_json(raw: dict[str, Any]) -> EndOffsets:
    return {(topic, int(p)): int(o) for topic, parts in raw.items() for p, o in parts.items()}
