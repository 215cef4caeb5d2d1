"""The ad-scoring job as a plain Kafka consumer group: ``sluice consume``.

One process is one member of the group. Scale out by starting more (``--instance 1``, ``2``...):
Kafka splits the topic's partitions between them. Each micro-batch (bounded by
``batching.max_records`` and ``batching.max_wait_ms``) goes through the engine-free core
(:mod:`transforms.score_requests`) and then, in this order, which is the exactly-once argument
(DESIGN.md, invariant 2):

1. **Delta** (scores and quarantine tables, via delta-rs): an append carrying a Delta app
   transaction per source partition (``app_id`` = group/topic/partition, ``version`` = the last
   offset of that partition in the batch). Rows at or below an offset the table already recorded
   are dropped, so a replay after a crash, whatever its batch boundaries, writes nothing twice.
   Quarantined rows, when the batch has any, are appended first; the scores commit then records
   the quarantine table's progress as well (``covers``), so a batch without quarantined rows costs
   one Delta commit, not two. After a crash between a batch's two commits, the quarantine table's
   rows decide where the replayed offsets go, whatever the replay's verdicts
   (:mod:`transforms.sinks.split_commit`).
2. **Feast** online store: keyed upserts of the latest score per (user, ad); a replay rewrites the
   same values.
3. **One Kafka transaction** holding the scores-topic messages, the dead letters and the
   consumer's offsets (``send_offsets_to_transaction``). Its messages are queued before step 1,
   so they travel to the broker while Delta and Feast are written; it is committed last: until it is, no
   read_committed reader sees the outputs and the group's offsets have not moved, so a crash
   anywhere before it replays the batch, and a crash after it replays nothing.

On (re)assignment a partition resumes from the group's committed offset. If the group has none
(a new group, offsets expired on the broker) it resumes after the last offset recorded in Delta *as
published to Kafka*: each Delta commit also carries, per partition, the offsets whose Kafka
transaction had committed by then (app id ``...:kafka:<topic>:<partition>``). Resuming after the
offsets of the *rows* in Delta instead would skip the dead letters and scores-topic messages of a
batch that crashed between its Delta commit and its Kafka commit. With neither, it starts at the
beginning: nothing of this group reached Kafka, and Delta skips the rows it already holds. An offset
the broker fails to return (its coordinator restarting) is asked for again, up to
``kafka.outage_tolerance_s``, never taken for "none": Delta's record lags the group's offsets by a
batch, and resuming there would publish that batch twice. SIGTERM/SIGINT
drain: the batch in hand is finished and committed, the consumer leaves the group, the process
prints its summary and exits 0. A transactional id fenced by a newer instance means another
process took this one's place: it stops without committing. Any other failed batch (the broker
down, a producer stuck in librdkafka, Redis unreachable) is aborted and replayed by this consumer,
with a new producer or a new group member where the old one is unusable, for up to
``kafka.outage_tolerance_s``; after that the process exits non-zero.

Batches can be pipelined (``batching.pipeline``, off by default: on 2 cores shared with the broker it
measured 14% slower): batch N is published (steps 1-3) on
a thread while batch N+1 is read and scored, so the publish's waits (the Delta and Kafka commits,
Redis round trips) overlap the scoring's CPU. The order of the commits is unchanged: one batch
publishes at a time, in offset order. If a batch is dropped (its Kafka commit refused after a
rebalance), everything read after it is dropped too and the partitions rewind to the group's
committed offsets; a rebalance callback first waits for the batch being published.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.score_config import ScoreConfig
from pipelines.step_times import StepClock
from schemas.scores import (
    KAFKA_RECORD_SCHEMA,
    OUTPUT_TOPIC_PARTITIONS,
    SCORES_PARTITION_COLUMNS,
    SCORES_QUARANTINE_SCHEMA,
    SCORES_SCHEMA,
)
from transforms import heap
from transforms.crashpoints import crash_point
from transforms.errors import SinkError, SourceError
from transforms.score_requests import RequestScorer, ScoreOutcome, ScoreStats, ScoringSpec
from transforms.sinks import split_commit
from transforms.sinks.delta_compaction import PartitionCompactor
from transforms.sinks.kafka_outputs import ProducerFenced, TransactionalKafkaSink

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message, TopicPartition

    from transforms.sinks.delta_offsets import OffsetTrackedDeltaSink
    from transforms.sinks.feast_scores import FeastScoresSink

log = logging.getLogger("sluice.consume")

_POLL_S = 0.05
#: Fatal consumer errors tolerated within ``kafka.outage_tolerance_s`` (at least a minute).
_MAX_CONSUMER_RESTARTS = 3


def default_instance_id(index: int = 0) -> str:
    return f"{socket.gethostname()}-{index}"


@dataclass
class ConsumeSummary:
    """What a consumer process did; its one-screen summary at exit (and JSON for tests/Airflow)."""

    group: str
    topic: str
    instance_id: str
    target_uri: str
    quarantine_uri: str
    scores_topic: str
    dlq_topic: str
    stats: ScoreStats = field(default_factory=ScoreStats)
    batches: int = 0
    delta_rows_written: int = 0
    online_written: int = 0
    replayed_rows_skipped: int = 0
    #: Seconds per step, summed over batches: read (building the batch), score (the core), delta,
    #: feast, kafka (the transaction: produce + commit).
    step_seconds: dict[str, float] = field(default_factory=dict)
    model_versions: list[str] = field(default_factory=list)
    rebalances: int = 0
    #: Batches whose Kafka transaction failed (a rebalance refused the commit, the broker was down):
    #: they are replayed, by this consumer or the partitions' next owner.
    batches_dropped: int = 0
    #: Transactional producers replaced after one became unusable (stuck, or its abort failed).
    producers_recreated: int = 0
    #: Group members replaced after a fatal consumer error (e.g. fenced after a broker restart).
    consumers_recreated: int = 0
    compactions: int = 0
    #: Wall time of the whole run, start-up (model, Feast, group join) included.
    seconds: float = 0.0
    #: From the first record read to the last batch committed: the throughput window.
    streaming_seconds: float = 0.0
    #: Wall-clock (epoch seconds) of the first record read and of the last batch committed.
    first_record_at: float | None = None
    last_commit_at: float | None = None
    stopped_because: str = ""

    @property
    def records_per_second(self) -> float:
        return self.stats.records / self.streaming_seconds if self.streaming_seconds else 0.0


@dataclass
class _Scored:
    """A scored batch on its way to the publisher, and the assignment epoch it was read under."""

    outcome: ScoreOutcome
    through: dict[tuple[str, int], int]
    epoch: int
    #: The consumer's group metadata (generation) as of reading: taken on the main thread, since
    #: the client serialises calls and a rebalance callback waiting for the publisher holds it.
    group_metadata: Any = None


def _records(messages: list[Message]) -> pa.RecordBatch:
    """librdkafka messages as one :data:`KAFKA_RECORD_SCHEMA` batch (the core's input)."""
    from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

    stamps = []
    for m in messages:
        kind, ms = m.timestamp()
        stamps.append(None if kind == TIMESTAMP_NOT_AVAILABLE else ms)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([m.key() for m in messages], pa.binary()),
            pa.array([m.value() for m in messages], pa.binary()),
            pa.array([m.topic() for m in messages], pa.string()),
            pa.array([m.partition() for m in messages], pa.int32()),
            pa.array([m.offset() for m in messages], pa.int64()),
            pa.array(stamps, pa.timestamp("ms", tz="UTC")),
        ],
        schema=KAFKA_RECORD_SCHEMA,
    )


class ConsumerRunner:
    """One member of the scoring consumer group. ``run()`` until stopped; see the module docs."""

    def __init__(self, cfg: ScoreConfig, *, instance_id: str | None = None, progress: bool = False) -> None:
        self.cfg = cfg
        self.instance_id = instance_id or cfg.kafka.instance_id or default_instance_id()
        self.progress = progress
        self.stop_requested = threading.Event()
        k = cfg.kafka
        self.summary = ConsumeSummary(
            group=k.group,
            topic=k.topic,
            instance_id=self.instance_id,
            target_uri=cfg.target.uri,
            quarantine_uri=cfg.target.quarantine,
            scores_topic=k.scores,
            dlq_topic=k.dlq,
        )
        self._buffer: list[Message] = []
        self._published_since_last_delta: dict[tuple[str, int], int] = {}
        self._consumer: Consumer | None = None
        self._scores: OffsetTrackedDeltaSink | None = None
        self._quarantine: OffsetTrackedDeltaSink | None = None
        self._feast: FeastScoresSink | None = None
        self._kafka_out: TransactionalKafkaSink | None = None
        self._scorer: RequestScorer | None = None
        self._compactor: PartitionCompactor | None = None
        self._publisher: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        #: Bumped whenever what was read so far must not be published (a dropped batch: the
        #: partitions rewind); a scored batch from an older epoch is discarded at hand-over.
        self._epoch = 0
        #: Since when batches have been failing (not by a rebalance), None after a published one.
        self._failing_since: float | None = None
        #: When the consumer was last replaced after a fatal error (within the tolerance window).
        self._consumer_restarts: list[float] = []

    # -- set-up -----------------------------------------------------------------------------------

    def _app_prefix(self) -> str:
        return f"sluice-consume:{self.cfg.kafka.group}"

    def _open(self) -> None:
        """Everything that can fail on bad input fails here, before the group is joined."""
        from transforms.kafka_admin import ensure_topics
        from transforms.sinks.delta_offsets import OffsetTrackedDeltaSink

        cfg, k = self.cfg, self.cfg.kafka
        device = (
            "cuda"
            if cfg.model.device == "auto" and _cuda()
            else ("cpu" if cfg.model.device == "auto" else cfg.model.device)
        )
        self._scorer = RequestScorer(
            ScoringSpec(
                model_path=cfg.model.path,
                codec=k.codec,
                device=device,
                model_sha256=cfg.model.sha256,
                model_poll_seconds=cfg.model.poll_seconds,
                threads=cfg.model.threads,
                mean_ratio_bounds=cfg.validation.mean_ratio_bounds,
                min_rows_for_mean=cfg.validation.min_rows_for_mean,
            )
        )
        self._check_source_topic()
        ensure_topics(
            k.bootstrap, {k.scores: OUTPUT_TOPIC_PARTITIONS, k.dlq: OUTPUT_TOPIC_PARTITIONS}, client_config=k.client
        )
        self._scores = OffsetTrackedDeltaSink(
            cfg.target.uri,
            SCORES_SCHEMA,
            app_prefix=self._app_prefix(),
            partition_by=SCORES_PARTITION_COLUMNS,
            storage_options=cfg.target.storage_options,
            table_properties=cfg.target.table_properties,
            checkpoints=cfg.target.checkpoints,
        )
        self._quarantine = OffsetTrackedDeltaSink(
            cfg.target.quarantine,
            SCORES_QUARANTINE_SCHEMA,
            app_prefix=self._app_prefix(),
            storage_options=cfg.target.storage_options,
            table_properties=cfg.target.table_properties,
            checkpoints=cfg.target.checkpoints,
            # A batch with no quarantined row (nearly all) records the quarantine's progress in the
            # scores commit: one Delta commit per batch instead of two.
            recorded_also_by=self._scores,
        )
        self._scores.ensure_table()
        self._quarantine.ensure_table()
        self._compactor = cfg.target.compactor()
        if cfg.feast is not None and cfg.feast.enabled:
            from transforms.sinks.feast_scores import FeastScoresSink

            self._feast = FeastScoresSink(cfg.feast, scores_table_uri=cfg.target.uri)
            self._feast.apply()
        self._kafka_out = self._new_kafka_sink()
        if cfg.batching.pipeline:
            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="sluice-publish")
        self._consumer = self._new_consumer()

    def _new_consumer(self) -> Consumer:
        """This instance's member of the group, subscribed (it joins on its first poll)."""
        from confluent_kafka import Consumer

        k = self.cfg.kafka
        consumer = Consumer(
            {
                **k.client,
                "bootstrap.servers": k.bootstrap,
                "group.id": k.group,
                # Static membership: a restarted instance gets its partitions back without a rebalance.
                "group.instance.id": self.instance_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "session.timeout.ms": 10_000,
                "fetch.min.bytes": 1,
                "queued.max.messages.kbytes": 65_536,
            },
            logger=logging.getLogger("sluice.consume.librdkafka"),
        )
        consumer.subscribe([k.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        return consumer

    def _new_kafka_sink(self) -> TransactionalKafkaSink:
        """The instance's transactional producer; creating it aborts what a predecessor left open."""
        k = self.cfg.kafka
        return TransactionalKafkaSink(
            k.bootstrap,
            transactional_id=f"sluice-{k.group}-{self.instance_id}",
            scores_topic=k.scores,
            dlq_topic=k.dlq,
            client_config=k.client,
            transaction_timeout_s=k.transaction_timeout_s,
        )

    def _check_source_topic(self) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        k = self.cfg.kafka
        admin = AdminClient({**k.client, "bootstrap.servers": k.bootstrap})
        try:
            topics = admin.list_topics(timeout=10).topics
        except KafkaException as exc:
            raise SourceError(f"cannot reach Kafka at {k.bootstrap}: {exc}") from exc
        if k.topic not in topics:
            raise SourceError(f"Kafka topic {k.topic} does not exist on {k.bootstrap}: check kafka.topic")

    # -- rebalances -------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Resume each partition at the group's committed offset, else after Delta's record."""
        self._settle(in_callback=True)
        self.summary.rebalances += 1
        self._resume_positions_when_known(consumer, partitions)
        log.info(
            "partitions assigned",
            extra={"partitions": {f"{p.topic}[{p.partition}]": p.offset for p in partitions}},
        )
        consumer.assign(partitions)

    def _resume_positions_when_known(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """:meth:`_resume_positions`, retried while the coordinator cannot tell (it is restarting,
        loading its offsets) for up to ``kafka.outage_tolerance_s``: a guess would lose or repeat a batch."""
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + self.cfg.kafka.outage_tolerance_s
        while True:
            try:
                self._resume_positions(consumer, partitions)
                return
            except (SourceError, KafkaException) as exc:
                if time.monotonic() >= deadline:
                    raise SourceError(
                        f"cannot tell where to resume {', '.join(f'{p.topic}[{p.partition}]' for p in partitions)}"
                        f" within kafka.outage_tolerance_s ({self.cfg.kafka.outage_tolerance_s:g} s): {exc}"
                    ) from exc
                log.warning("cannot tell where to resume the assigned partitions yet: %s", exc)
                time.sleep(1.0)

    def _resume_positions(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Set each partition's offset to where this group resumes it (module docs)."""
        from confluent_kafka import OFFSET_INVALID

        assert self._scores is not None and self._quarantine is not None
        tps = [(p.topic, p.partition) for p in partitions]
        self._scores.refresh(tps)
        self._quarantine.refresh(tps)
        self._scores.refresh_published(tps)
        committed = consumer.committed(partitions, timeout=10)
        # A partition the broker answered with an error has an offset of -1001 too: taking that for
        # "no committed offset" would resume after Delta's published record, which lags the group's
        # offsets by a batch, and publish that batch a second time.
        failed = [f"{c.topic}[{c.partition}]: {c.error.str()}" for c in committed if c.error is not None]
        if failed:
            raise SourceError(f"cannot read the group's committed offsets of {', '.join(failed)}")
        for p, c in zip(partitions, committed, strict=True):
            if c.offset == OFFSET_INVALID or c.offset < 0:
                published = self._scores.published(p.topic, p.partition)
                if published is not None:
                    p.offset = published + 1
            else:
                p.offset = c.offset

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Drop what was read but not processed: the partition's next owner re-reads it from the
        committed offset. The batch being published finishes (or is dropped) first."""
        self._settle(in_callback=True)
        gone = {(p.topic, p.partition) for p in partitions}
        self._buffer = [m for m in self._buffer if (m.topic(), m.partition()) not in gone]
        for tp in gone:  # the next owner records its own progress for these
            self._published_since_last_delta.pop(tp, None)
        log.info("partitions revoked", extra={"partitions": sorted(f"{t}[{p}]" for t, p in gone)})
        consumer.unassign()

    # -- the loop ---------------------------------------------------------------------------------

    def _fill(self, deadline_s: float) -> None:
        """Read into the buffer until it holds max_records or the batch's max wait has passed."""
        from confluent_kafka import KafkaError

        assert self._consumer is not None
        b = self.cfg.batching
        first_at: float | None = time.monotonic() if self._buffer else None
        while len(self._buffer) < b.max_records and not self.stop_requested.is_set():
            now = time.monotonic()
            if first_at is not None and now - first_at >= b.max_wait_ms / 1000:
                return
            if now >= deadline_s:
                return
            timeout = _POLL_S if first_at is None else min(_POLL_S, b.max_wait_ms / 1000 - (now - first_at))
            msgs = self._consumer.consume(num_messages=b.max_records - len(self._buffer), timeout=max(timeout, 0.001))
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.fatal() or err.code() == KafkaError._FATAL:
                        self._restart_consumer(err.str())
                        return
                    log.warning("kafka: %s", err.str())
                    continue
                self._buffer.append(m)
            if msgs and first_at is None:
                first_at = time.monotonic()

    def _restart_consumer(self, reason: str) -> None:
        """Replace a consumer that hit a fatal error with a new member of the group.

        A broker restart can leave a static member's session expired and its next join refused as
        "fenced by another consumer with the same group.instance.id"; librdkafka makes that fatal
        and the consumer then reads nothing, ever. What was read but not published is dropped:
        the new member's assignment resumes at the group's committed offsets. A consumer that keeps
        failing (say, a second process really uses this instance id) stops the process instead.
        """
        assert self._consumer is not None
        now = time.monotonic()
        window = max(self.cfg.kafka.outage_tolerance_s, 60.0)
        self._consumer_restarts = [t for t in self._consumer_restarts if now - t < window]
        if self.cfg.kafka.outage_tolerance_s == 0 or len(self._consumer_restarts) >= _MAX_CONSUMER_RESTARTS:
            raise SourceError(
                f"Kafka consumer failed: {reason} ({len(self._consumer_restarts) + 1} times within {window:g} s; is"
                f" another consumer running with instance id {self.instance_id}?)"
            )
        self._consumer_restarts.append(now)
        log.error("Kafka consumer failed, rejoining the group with a new one: %s", reason)
        self.summary.consumers_recreated += 1
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except SinkError as exc:
                self._dropped(exc, in_callback=True)  # the new member's assignment sets the positions
        self._epoch += 1
        self._buffer = []
        try:
            self._consumer.close()
        except Exception as exc:  # it is broken: what matters is the new one
            log.warning("closing the failed consumer: %s", exc)
        self._consumer = self._new_consumer()

    def _score(self, messages: list[Message]) -> _Scored:
        assert self._scorer is not None
        clock = StepClock(self.summary.step_seconds)
        records = _records(messages)
        clock.lap("read")
        crash_point("consume:after_read")
        outcome = self._scorer.score(records)
        clock.lap("score")
        for warning in outcome.warnings:
            log.warning(warning, extra={"model_version": outcome.model_version})
        through: dict[tuple[str, int], int] = {}
        for topic, partition, offset in zip(
            records.column("topic").to_pylist(),
            records.column("partition").to_pylist(),
            records.column("offset").to_pylist(),
            strict=True,
        ):
            tp = (topic, partition)
            if offset > through.get(tp, -1):
                through[tp] = offset
        clock.lap("score")
        return _Scored(outcome, through, self._epoch)

    def _hand_over(self, scored: _Scored) -> None:
        """Publish ``scored`` once the batch before it is published (on the publisher thread when
        pipelined): unless a dropped batch before it made it stale."""
        self._settle()
        if scored.epoch != self._epoch:
            return  # read before a dropped batch's rewind: its records will be read again
        assert self._consumer is not None
        # A rebalance after this makes the commit fail (old generation): the batch is dropped.
        scored.group_metadata = self._consumer.consumer_group_metadata()
        if self._publisher is None:
            try:
                self._publish(scored)
            except SinkError as exc:
                self._dropped(exc, in_callback=False)
        else:
            self._pending = self._publisher.submit(self._publish, scored)

    def _settle(self, *, in_callback: bool = False) -> None:
        """Wait for the batch being published; a refused commit after a rebalance drops it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except SinkError as exc:
            self._dropped(exc, in_callback=in_callback)

    def _dropped(self, exc: SinkError, *, in_callback: bool) -> None:
        """A batch's Kafka transaction was aborted (or abandoned): nothing of it is on the topics and
        the group's offsets did not move. It is replayed (Delta skips the rows it already holds), so
        nothing read after it may be published: drop that too and rewind.

        After a rebalance the partitions' owner replays it. Any other failure (the broker down, a
        producer stuck in librdkafka) is retried here, with a new producer if the old one is
        unusable, for up to ``kafka.outage_tolerance_s`` of failing batches; then the consumer exits
        non-zero rather than spin."""
        assert self._kafka_out is not None and self._consumer is not None
        if isinstance(exc, ProducerFenced):
            raise exc
        rebalanced = self._kafka_out.usable and _rebalanced(exc)
        if rebalanced:
            log.warning("batch dropped, the group rebalanced under it: %s", exc)
        else:
            self._check_tolerance(exc)
            log.warning("batch dropped, its Kafka transaction failed; replaying it: %s", exc)
            if not self._kafka_out.usable:
                self._recreate_kafka_sink()
        self.summary.batches_dropped += 1
        self._epoch += 1
        self._buffer = []
        if in_callback:
            return  # the assignment that follows sets the positions
        while True:
            try:
                self._rewind()
                return
            except Exception as rewind_error:
                if rebalanced:  # the rebalance under way sets the positions anyway
                    log.warning("could not rewind after the dropped batch (the rebalance will): %s", rewind_error)
                    return
                # Reading on from where the dropped batch ended would lose its Kafka outputs.
                self._check_tolerance(SinkError(f"cannot rewind after a dropped batch: {rewind_error}"))
                log.warning("cannot rewind after the dropped batch yet: %s", rewind_error)
                time.sleep(1.0)

    def _rewind(self) -> None:
        """Seek every assigned partition back to where the group resumes it (module docs)."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        assert self._consumer is not None
        partitions = self._consumer.assignment()
        if not partitions:
            return
        self._resume_positions(self._consumer, partitions)
        for p in partitions:
            # Neither a committed offset nor a published one: nothing of it reached Kafka yet.
            self._consumer.seek(p if p.offset >= 0 else TopicPartition(p.topic, p.partition, OFFSET_BEGINNING))

    def _check_tolerance(self, exc: SinkError) -> None:
        """Raise once batches have kept failing for longer than ``kafka.outage_tolerance_s``."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        tolerance = self.cfg.kafka.outage_tolerance_s
        if now - self._failing_since >= tolerance:
            raise SinkError(
                f"{exc} (batches kept failing for {now - self._failing_since:.0f} s, kafka.outage_tolerance_s is"
                f" {tolerance:g})"
            ) from exc

    def _recreate_kafka_sink(self) -> None:
        """Replace an unusable producer: the new one, same transactional id, aborts the old one's
        transaction (init_transactions) before the replay produces again."""
        assert self._kafka_out is not None
        self._kafka_out.close()
        while True:
            try:
                self._kafka_out = self._new_kafka_sink()
                self.summary.producers_recreated += 1
                return
            except ProducerFenced:
                raise
            except SinkError as exc:
                self._check_tolerance(exc)
                log.warning("cannot recreate the Kafka producer yet: %s", exc)
                time.sleep(1.0)

    def _publish(self, scored: _Scored) -> None:
        """Delta, then Feast, then the Kafka transaction with the offsets (module docs)."""
        assert self._scores and self._quarantine and self._kafka_out
        from confluent_kafka import TopicPartition

        steps: dict[str, float] = {}
        clock = StepClock(steps)
        outcome, through = scored.outcome, scored.through
        meta = {
            "sluice.job": "consume",
            "sluice.instance": self.instance_id,
            "sluice.model_version": outcome.model_version,
        }
        # The batch's messages are queued first, inside its transaction: librdkafka sends them while
        # Delta and Feast are written, so the commit at the end no longer waits for them. None of
        # them is visible to a read_committed reader before that commit, and a crash before it
        # leaves an open transaction that the instance's next start aborts (init_transactions).
        out = self._kafka_out
        out.begin()
        try:
            # After a crash between a batch's two commits, the quarantine table's rows decide where
            # the offsets between them go, whatever this replay's verdicts (split_commit).
            settled = split_commit.settle(
                outcome.scores,
                outcome.quarantined,
                through=through,
                scores_sink=self._scores,
                quarantine_sink=self._quarantine,
            )
            if settled.kept_in_quarantine:
                outcome.stats.scored -= settled.kept_in_quarantine
                outcome.stats.quarantined += settled.kept_in_quarantine
            out.produce_scores(settled.scores)
            out.produce_dead_letters(outcome.dead_letters)
            clock.lap("kafka")
            if settled.quarantine_missing.num_rows:
                self._quarantine.append_unrecorded(settled.quarantine_missing, metadata=meta)
            # Quarantined rows first: the scores commit then records the quarantine's progress too
            # (``covers``), and a batch without any needs no quarantine commit at all.
            if settled.quarantined.num_rows:
                self._quarantine.append(settled.quarantined, through=through, metadata=meta)
            crash_point("consume:between_quarantine_and_scores_commits")
            written = self._scores.append(
                settled.scores,
                through=through,
                metadata=meta,
                published=self._published_since_last_delta,
                covers=self._quarantine,
            )
            if self._compactor is not None and settled.scores.num_rows:
                self._compactor.saw_rows(settled.scores)
            clock.lap("delta")
            crash_point("consume:after_delta_commit")
            if self._feast is not None and settled.scores.num_rows:
                self.summary.online_written += self._feast.write(settled.scores)
            clock.lap("feast")
            crash_point("consume:after_online_write")
            crash_point("consume:before_kafka_commit")
            offsets = [TopicPartition(t, p, o + 1) for (t, p), o in through.items()]
            out.commit(offsets, scored.group_metadata)
            # Recorded in Delta with the next batch's commit: where a group without offsets resumes.
            self._published_since_last_delta = dict(through)
        except BaseException:
            # Nothing of a failed batch may stay open: its replay begins a new transaction.
            try:
                out.abort()
            except ProducerFenced:
                raise
            except SinkError as abort_error:
                log.warning("could not abort the failed batch's Kafka transaction: %s", abort_error)
            raise
        clock.lap("kafka")
        crash_point("consume:after_kafka_commit")
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch published",
                extra={
                    "scored": settled.scores.num_rows,
                    "dead_lettered": outcome.dead_letters.num_rows,
                    "quarantined": outcome.quarantined.num_rows,
                    "through": {f"{t}[{p}]": o for (t, p), o in through.items()},
                    "step_seconds": {k: round(v, 4) for k, v in steps.items()},
                },
            )

        self._failing_since = None
        s = self.summary
        s.stats.add(outcome.stats)
        for step, seconds in steps.items():
            s.step_seconds[step] = s.step_seconds.get(step, 0.0) + seconds
        s.batches += 1
        s.delta_rows_written += written.rows_written
        s.replayed_rows_skipped += written.rows_skipped
        if outcome.model_version not in s.model_versions:
            s.model_versions.append(outcome.model_version)
        s.last_commit_at = time.time()
        if s.first_record_at is not None:
            s.streaming_seconds = s.last_commit_at - s.first_record_at

    def run(self, *, max_records: int | None = None, idle_exit_s: float | None = None) -> ConsumeSummary:
        """Consume until SIGTERM/SIGINT (or ``max_records`` records, or ``idle_exit_s`` without any)."""
        t0 = time.monotonic()
        self._open()
        heap.freeze(collect=True)
        heap_frozen_again = False
        assert self._consumer is not None and self._kafka_out is not None
        last_data = time.monotonic()
        reporter = _Reporter(self) if self.progress else None
        try:
            while not self.stop_requested.is_set():
                self._fill(deadline_s=time.monotonic() + 1.0)
                if self._buffer:
                    if self.summary.first_record_at is None:
                        self.summary.first_record_at = time.time()
                    batch, self._buffer = self._buffer, []
                    self._hand_over(self._score(batch))
                    last_data = time.monotonic()
                    if not heap_frozen_again and self.summary.batches:
                        heap.freeze(collect=False)  # what the first batch built lazily (heap.py)
                        heap_frozen_again = True
                    if reporter:
                        reporter.update()
                elif self._pending is not None and self._pending.done():
                    self._settle()  # idle: surface the last batch's outcome now
                if max_records is not None and self.summary.stats.records >= max_records:
                    self.summary.stopped_because = f"read {max_records} records"
                    break
                if idle_exit_s is not None and time.monotonic() - last_data >= idle_exit_s:
                    self.summary.stopped_because = f"no records for {idle_exit_s:g} s"
                    break
            else:
                self.summary.stopped_because = "stop requested (SIGTERM/SIGINT): drained"
            self._settle()
            self._record_published()
        finally:
            self._abandon_pending()
            if reporter:
                reporter.close()
            self._close()
            self.summary.seconds = time.monotonic() - t0
        return self.summary

    def _record_published(self) -> None:
        """On a clean stop, record where the last batch's Kafka outputs end (normally that rides on
        the next batch's Delta commit): a group whose broker-side offsets later expire resumes there."""
        if self._scores is None or not self._published_since_last_delta:
            return
        try:
            self._scores.append(SCORES_SCHEMA.empty_table(), through={}, published=self._published_since_last_delta)
            self._published_since_last_delta = {}
        except SinkError as exc:
            log.warning("could not record the published offsets on stop: %s", exc)

    def _abandon_pending(self) -> None:
        """On the way out after an error: let a batch being published finish before the clients
        close under it (its outcome no longer matters: the group replays what is uncommitted)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as exc:
                log.warning("the batch being published when the consumer stopped failed: %s", exc)
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
            self._publisher = None

    def _close(self) -> None:
        heap.unfreeze()
        if self._compactor is not None:
            self._compactor.stop()
            self.summary.compactions = self._compactor.runs
        if self._consumer is not None:
            try:
                self._consumer.close()  # leaves the group: partitions move to the others at once
            except Exception as exc:  # closing must not mask the error that got us here
                log.warning("consumer close failed: %s", exc)
        if self._kafka_out is not None:
            self._kafka_out.close()

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _: FrameType | None) -> None:
            log.info("signal %s: draining the batch in hand, then stopping", signal.Signals(signum).name)
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def _rebalanced(exc: BaseException) -> bool:
    text = str(exc)
    return any(code in text for code in ("ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "REBALANCE_IN_PROGRESS"))


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class _Reporter:
    """A live one-line view of the consumer on a terminal (rich), refreshed per batch."""

    def __init__(self, runner: ConsumerRunner) -> None:
        from rich.live import Live

        self.runner = runner
        self.t0 = time.monotonic()
        self.live = Live(self._render(), refresh_per_second=4, transient=True)
        self.live.start()

    def _render(self) -> Any:
        from rich.text import Text

        s = self.runner.summary
        st = s.stats
        rate = st.records / max(time.monotonic() - self.t0, 1e-9)
        return Text(
            f"consumed {st.records:,}  scored {st.scored:,}  dead-lettered {st.dead_lettered:,}  "
            f"quarantined {st.quarantined:,}  ·  {rate:,.0f} rec/s  ·  batches {s.batches:,}  ·  "
            f"model {', '.join(s.model_versions) or '-'}"
        )

    def update(self) -> None:
        self.live.update(self._render())

    def close(self) -> None:
        self.live.stop()


def run_consumer(
    cfg: ScoreConfig,
    *,
    instance_id: str | None = None,
    max_records: int | None = None,
    idle_exit_s: float | None = None,
    progress: bool = False,
    on_start: Callable[[ConsumerRunner], None] | None = None,
) -> ConsumeSummary:
    runner = ConsumerRunner(cfg, instance_id=instance_id, progress=progress)
    runner.install_signal_handlers()
    if on_start is not None:
        on_start(runner)
    try:
        return runner.run(max_records=max_records, idle_exit_s=idle_exit_s)
    except SinkError:
        raise
    finally:
        log.info("consumer stopped", extra={"pid": os.getpid(), "instance": runner.instance_id})
