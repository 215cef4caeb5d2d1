"""The ad-scoring job on Spark Structured Streaming: ``sluice score-stream --engine spark``.

Spark's own Kafka source (``readStream.format("kafka")``) feeds ``foreachBatch``; each micro-batch
is scored once through the engine-free core (``mapInArrow``, :mod:`transforms.spark.score`), its
outputs are collected to the driver as Arrow in the same job (the Kafka transaction needs them there
anyway), and published in this order:

1. **Delta** scores and quarantine tables, each append carrying the Delta app transaction
   ``(txnAppId = this stream's id, txnVersion = batch id)``: a micro-batch Spark replays after a
   driver crash (same batch id, same offsets, from the checkpoint's offset log) is skipped. The
   appends are made by delta-rs from the driver (:meth:`OffsetTrackedDeltaSink.append_once`), the
   same sink the consumer runner uses: delta-spark looks an app id up by reconstructing the table's
   state with three Spark jobs, ~1 s per append on 2 cores whatever the batch size (4-5 s in a fresh
   JVM), against ~80 ms for delta-rs to append 75k rows. Readers see an ordinary Delta table.
2. **Feast** online store: keyed upserts of the latest score per (user, ad); a replay rewrites
   the same values.
3. **Kafka** scores topic and dead letters, in one Kafka transaction whose completion is recorded
   in the scores table's log as app transaction ``<stream id>:topics`` = batch id; a replayed batch
   whose transaction already committed is found (in the log, or on recovery in the topics
   themselves) and not sent again (:mod:`transforms.sinks.kafka_ledger`).

Everything a micro-batch publishes passes through the driver, so its size is bounded by
``spark.max_offsets_per_trigger`` (set it on a busy topic: availableNow without it takes the whole
backlog as one batch).

Spark then commits the batch to its checkpoint. The stream's id is derived from the checkpoint
location, so a restart from the same checkpoint is the same stream, and a new checkpoint is a new
one. Triggers: ``processingTime`` (runs until stopped) and ``availableNow`` (processes what is in
the topic now, then stops: a scheduled batch job over a stream).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.score_config import KafkaConfig, ScoreConfig
from pipelines.step_times import StepClock
from schemas.scores import SCORES_PARTITION_COLUMNS, SCORES_QUARANTINE_SCHEMA, SCORES_SCHEMA
from transforms.crashpoints import crash_point
from transforms.score_requests import ScoringSpec
from transforms.sinks import split_commit
from transforms.sinks.delta_compaction import PartitionCompactor
from transforms.sinks.delta_offsets import OffsetTrackedDeltaSink
from transforms.spark import delta_io
from transforms.spark.score import (
    DEAD_LETTER,
    QUARANTINED,
    SCORED,
    combined_schema,
    make_score_fn,
    split_outputs,
    warm_workers,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, DataFrameReader, SparkSession
    from pyspark.sql.streaming import DataStreamReader, StreamingQuery

_Reader = TypeVar("_Reader", "DataFrameReader", "DataStreamReader")

log = logging.getLogger("sluice.score_stream")


@dataclass
class StreamSummary:
    """What a stream run did (summed over its micro-batches); the one-screen summary at exit."""

    stream_id: str
    topic: str
    target_uri: str
    quarantine_uri: str
    checkpoint: str
    trigger: str
    #: The Spark master the stream ran on (local[N]: N task slots).
    master: str = ""
    batches: int = 0
    records: int = 0
    scored: int = 0
    dead_lettered: int = 0
    quarantined: int = 0
    online_written: int = 0
    topic_batches_skipped: int = 0
    #: Micro-batches whose Delta appends were skipped: already committed before a crash.
    delta_batches_skipped: int = 0
    compactions: int = 0
    model_versions: list[str] = field(default_factory=list)
    #: Driver seconds per step, summed over micro-batches: score (the scoring job, its outputs
    #: collected), delta (both appends), feast, kafka (the ledgered transaction).
    step_seconds: dict[str, float] = field(default_factory=dict)
    #: Wall time of the run, query start-up included (JVM start is not: the session exists).
    seconds: float = 0.0
    #: Epoch seconds when the first micro-batch started and the last one was published.
    first_batch_at: float | None = None
    last_batch_at: float | None = None
    stopped_because: str = ""

    @property
    def streaming_seconds(self) -> float:
        if self.first_batch_at is None or self.last_batch_at is None:
            return 0.0
        return self.last_batch_at - self.first_batch_at

    @property
    def records_per_second(self) -> float:
        """Throughput over the micro-batches (first batch start to last batch published)."""
        return self.records / self.streaming_seconds if self.streaming_seconds else 0.0


def stream_id(checkpoint: str) -> str:
    return "sluice-stream:" + hashlib.sha256(checkpoint.encode()).hexdigest()[:16]


def checkpoint_location(cfg: ScoreConfig) -> str:
    return cfg.spark.checkpoint or cfg.target.uri.rstrip("/") + "_checkpoint"


def _spec(cfg: ScoreConfig) -> ScoringSpec:
    return ScoringSpec(
        model_path=cfg.model.path,
        codec=cfg.kafka.codec,
        device=cfg.model.device if cfg.model.device != "auto" else "cpu",
        model_sha256=cfg.model.sha256,
        model_poll_seconds=cfg.model.poll_seconds,
        mean_ratio_bounds=cfg.validation.mean_ratio_bounds,
        min_rows_for_mean=cfg.validation.min_rows_for_mean,
    )


#: The Kafka source's columns the scoring function reads (KAFKA_RECORD_SCHEMA's order).
_SOURCE_COLUMNS = ("key", "value", "topic", "partition", "offset", "timestamp")


def _with_kafka_options(reader: _Reader, k: KafkaConfig) -> _Reader:
    """A stream or batch Kafka reader on ``k``'s topic, with its client settings (security...)."""
    reader = reader.format("kafka").option("kafka.bootstrap.servers", k.bootstrap).option("subscribe", k.topic)
    for key, value in k.client.items():
        reader = reader.option(f"kafka.{key}", value)
    return reader


def kafka_source(spark: SparkSession, cfg: ScoreConfig) -> DataFrame:
    reader = _with_kafka_options(spark.readStream, cfg.kafka).option("startingOffsets", "earliest")
    if cfg.spark.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(cfg.spark.max_offsets_per_trigger))
    return reader.load().select(*_SOURCE_COLUMNS)


class _BatchPublisher:
    """The ``foreachBatch`` function: score once, then Delta, Feast, Kafka (module docs)."""

    def __init__(self, spark: SparkSession, cfg: ScoreConfig, summary: StreamSummary) -> None:
        from pyspark.sql.pandas.types import from_arrow_schema

        self.spark = spark
        self.cfg = cfg
        self.summary = summary
        self.app = summary.stream_id
        self.spec = _spec(cfg)
        self.out_type = from_arrow_schema(combined_schema())
        self._feast: Any = None
        self._kafka: Any = None
        self._scores: OffsetTrackedDeltaSink | None = None
        self._quarantine: OffsetTrackedDeltaSink | None = None
        self._compactor: PartitionCompactor | None = None
        self.lock = threading.Lock()

    def open(self) -> None:
        """Sinks that can fail on bad config fail here, before the query starts."""
        from schemas.scores import OUTPUT_TOPIC_PARTITIONS
        from transforms.kafka_admin import ensure_topics
        from transforms.sinks.kafka_ledger import LedgeredKafkaPublisher

        cfg, k = self.cfg, self.cfg.kafka
        delta_io.check_writable(cfg.target.uri)
        delta_io.check_writable(cfg.target.quarantine)
        # Both tables exist before the first micro-batch, so readers (and the Kafka ledger, which
        # records on the scores table) always find them, even while nothing was quarantined.
        storage = cfg.target.storage_options or None
        self._scores = OffsetTrackedDeltaSink(
            cfg.target.uri,
            SCORES_SCHEMA,
            app_prefix=self.app,
            partition_by=SCORES_PARTITION_COLUMNS,
            storage_options=storage,
            table_properties=cfg.target.table_properties,
            checkpoints=cfg.target.checkpoints,
        )
        self._quarantine = OffsetTrackedDeltaSink(
            cfg.target.quarantine,
            SCORES_QUARANTINE_SCHEMA,
            app_prefix=self.app,
            storage_options=storage,
            table_properties=cfg.target.table_properties,
            checkpoints=cfg.target.checkpoints,
        )
        self._scores.ensure_table()
        self._quarantine.ensure_table()
        ensure_topics(
            k.bootstrap, {k.scores: OUTPUT_TOPIC_PARTITIONS, k.dlq: OUTPUT_TOPIC_PARTITIONS}, client_config=k.client
        )
        if cfg.feast is not None and cfg.feast.enabled:
            from transforms.sinks.feast_scores import FeastScoresSink

            self._feast = FeastScoresSink(cfg.feast, scores_table_uri=cfg.target.uri)
            self._feast.apply()
        self._kafka = LedgeredKafkaPublisher(
            k.bootstrap,
            transactional_id=f"sluice-{self.app.split(':', 1)[1]}",
            scores_topic=k.scores,
            dlq_topic=k.dlq,
            ledger_uri=cfg.target.uri,
            ledger_app_id=f"{self.app}:topics",
            client_config=k.client,
            storage_options=cfg.target.storage_options,
            transaction_timeout_s=k.transaction_timeout_s,
            ledger_checkpoints=cfg.target.checkpoints,
        )

        self._compactor = cfg.target.compactor()

    def close(self) -> None:
        if self._compactor is not None:
            self._compactor.stop()
            self.summary.compactions = self._compactor.runs
        if self._kafka is not None:
            self._kafka.close()

    def __call__(self, batch_df: DataFrame, batch_id: int) -> None:
        from transforms.spark.accumulators import dict_sum_accumulator

        assert self._scores is not None and self._quarantine is not None, "open() first"
        started = time.time()
        steps: dict[str, float] = {}
        clock = StepClock(steps)
        acc = self.spark.sparkContext.accumulator({}, dict_sum_accumulator())
        # One Spark job: score, and bring every output to the driver as Arrow (module docs).
        parts = split_outputs(batch_df.mapInArrow(make_score_fn(self.spec, acc), self.out_type).toArrow())
        counts = {kind: part.num_rows for kind, part in parts.items() if part.num_rows}
        clock.lap("score")
        crash_point("stream:after_scoring")
        meta = {"sluice": {"job": "score-stream", "stream": self.app, "batch_id": batch_id}}
        scores, quarantine = parts[SCORED], parts[QUARANTINED]
        written = self._scores.append_once(scores, app=self.app, version=batch_id, metadata=meta)
        kept_in_scores = 0
        if written.version is None and (
            (quarantined_through := self._quarantine.version_of(self.app, refresh=True)) is None
            or quarantined_through < batch_id
        ):
            # A replay of a batch id whose scores commit landed: the scores table's rows decide where
            # each row goes, whatever this replay's verdicts (split_commit). Rare: replays only.
            settled = split_commit.settle_batch_replay(scores, quarantine, scores_sink=self._scores)
            if settled.scores_missing.num_rows:
                self._scores.append_unrecorded(settled.scores_missing, metadata=meta)
            quarantine, kept_in_scores = settled.quarantined, settled.kept_in_scores
            counts[QUARANTINED] = quarantine.num_rows
        if quarantine.num_rows:
            # An empty append would be a whole Delta commit recording nothing: a replay of this
            # batch id reads the same offsets, so it quarantines the same (no) rows again.
            self._quarantine.append_once(quarantine, app=self.app, version=batch_id, metadata=meta)
        if self._compactor is not None and scores.num_rows:
            self._compactor.saw_rows(scores)
        clock.lap("delta")
        crash_point("stream:after_delta_commit")
        n_scored = scores.num_rows
        online = self._feast.write(scores) if self._feast is not None and n_scored else 0
        clock.lap("feast")
        crash_point("stream:after_online_write")
        published = self._kafka.publish(batch_id, scores, parts[DEAD_LETTER])
        clock.lap("kafka")
        crash_point("stream:after_kafka_commit")
        stats: dict[str, float] = acc.value
        with self.lock:
            s = self.summary
            if s.first_batch_at is None:
                s.first_batch_at = started
            s.last_batch_at = time.time()
            s.batches += 1
            s.scored += n_scored + kept_in_scores
            s.dead_lettered += counts.get(DEAD_LETTER, 0)
            s.quarantined += counts.get(QUARANTINED, 0)
            s.records += n_scored + kept_in_scores + counts.get(DEAD_LETTER, 0) + counts.get(QUARANTINED, 0)
            s.online_written += online
            if not published:
                s.topic_batches_skipped += 1
            if written.version is None:
                s.delta_batches_skipped += 1
            for step, seconds in steps.items():
                s.step_seconds[step] = s.step_seconds.get(step, 0.0) + seconds
            for key in stats:
                if key.startswith("model:") and key[6:] not in s.model_versions:
                    s.model_versions.append(key[6:])
        log.info(
            "micro-batch published",
            extra={
                "batch_id": batch_id,
                "counts": counts,
                "kafka_published": published,
                "stream": self.app,
                "step_seconds": {k: round(v, 3) for k, v in steps.items()},
                # Summed over the batch's tasks: where the executors' Python time went.
                "core_seconds": {k: round(v, 3) for k, v in stats.items() if k.endswith("_seconds")},
            },
        )


def _warm_source(spark: SparkSession, cfg: ScoreConfig, publisher: _BatchPublisher, *, per_partition: int = 200) -> int:
    """Run the micro-batch's scoring job once over the first few records of each partition, and
    throw the result away; returns the records read.

    The stream's first micro-batch with data pays the JVM's first Kafka fetches and code generation
    for the source plan: twice a later batch's score step on 2 cores (measured: 7.2 s against 3.4 s
    per 100k). A batch read of the same topic through the same plan pays most of that here, before
    the query starts (micro-batch 0's score step over 300k events: 4.4-5.7 s in three runs with
    it, 7.2 s in the one run without it whose log was kept). Nothing is published, so
    this cannot affect what the stream writes. An empty topic (nothing to read yet) is skipped.
    """
    from confluent_kafka import Consumer

    from transforms.kafka_admin import watermarks

    k = cfg.kafka
    consumer = Consumer(
        {
            **k.client,
            "bootstrap.servers": k.bootstrap,
            "group.id": f"{publisher.app}:warm-up",
            "enable.auto.commit": False,
        }
    )
    try:
        topic = consumer.list_topics(k.topic, timeout=10).topics.get(k.topic)
        ranges = {}
        for p in sorted(topic.partitions if topic is not None else {}):
            low, high = watermarks(consumer, k.topic, p, timeout_s=10)
            if high > low:
                ranges[p] = (low, min(high, low + per_partition))
    finally:
        consumer.close()
    if not ranges:
        return 0
    df = (
        _with_kafka_options(spark.read, k)
        .option("startingOffsets", json.dumps({k.topic: {str(p): lo for p, (lo, _) in ranges.items()}}))
        .option("endingOffsets", json.dumps({k.topic: {str(p): hi for p, (_, hi) in ranges.items()}}))
        .load()
        .select(*_SOURCE_COLUMNS)
    )
    split_outputs(df.mapInArrow(make_score_fn(publisher.spec, crash_points=False), publisher.out_type).toArrow())
    return sum(hi - lo for lo, hi in ranges.values())


def start_stream(cfg: ScoreConfig, spark: SparkSession) -> tuple[StreamingQuery, StreamSummary, _BatchPublisher]:
    checkpoint = checkpoint_location(cfg)
    summary = StreamSummary(
        stream_id=stream_id(checkpoint),
        topic=cfg.kafka.topic,
        target_uri=cfg.target.uri,
        quarantine_uri=cfg.target.quarantine,
        checkpoint=checkpoint,
        trigger=cfg.spark.trigger,
        master=spark.sparkContext.master or "",
    )
    arrow_batch = "spark.sql.execution.arrow.maxRecordsPerBatch"
    spark.conf.set(arrow_batch, cfg.spark.conf.get(arrow_batch, str(cfg.spark.arrow_batch_records)))
    publisher = _BatchPublisher(spark, cfg, summary)
    publisher.open()
    try:
        warm_workers(spark, publisher.spec)
        try:
            _warm_source(spark, cfg, publisher)
        except Exception as exc:  # only a head start: the query reports real problems itself
            log.warning("warming the Kafka source up was skipped: %s", str(exc).splitlines()[0] if str(exc) else exc)
    except BaseException:
        publisher.close()
        raise
    writer = kafka_source(spark, cfg).writeStream.foreachBatch(publisher).option("checkpointLocation", checkpoint)
    if cfg.spark.trigger == "availableNow":
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=cfg.spark.trigger_interval)
    query = writer.queryName(f"sluice_score_{summary.stream_id[-8:]}").start()
    return query, summary, publisher


def run_stream(cfg: ScoreConfig, spark: SparkSession, *, timeout_s: float | None = None) -> StreamSummary:
    """Run until the query ends (availableNow), is stopped (SIGTERM/SIGINT), or ``timeout_s``."""
    t0 = time.monotonic()
    query, summary, publisher = start_stream(cfg, spark)
    try:
        finished = query.awaitTermination(math.ceil(timeout_s)) if timeout_s is not None else query.awaitTermination()
        if finished is False:
            summary.stopped_because = f"stopped after {timeout_s:g} s"
            query.stop()
        else:
            summary.stopped_because = (
                "all available data processed" if cfg.spark.trigger == "availableNow" else "query ended"
            )
    except KeyboardInterrupt:
        summary.stopped_because = "interrupted: stopped after the micro-batch in hand"
        query.stop()
    finally:
        publisher.close()
        summary.seconds = time.monotonic() - t0
    exc = query.exception()
    if exc is not None:
        from transforms.errors import SinkError

        raise SinkError(f"the scoring stream failed: {str(exc).splitlines()[0]}")
    return summary
