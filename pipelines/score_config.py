"""The ad-scoring jobs' configuration (the consumer group and the Spark stream share it).

Loaded like the backfill's (:func:`pipelines.config.load_config`: defaults < YAML < ``SLUICE__``
environment < flags, unknown keys are errors). Kafka security (SASL/TLS) is plain librdkafka
settings under ``kafka.client``, passed to every consumer and producer the job makes; the Spark
runner hands the same settings to Spark's Kafka source as ``kafka.``-prefixed options.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from pipelines.config import SparkConfig, _absolute_uri, _Strict
from schemas.expectations import DEFAULT_MEAN_RATIO_BOUNDS
from schemas.scores import dlq_topic
from transforms.score_validation import DEFAULT_MIN_ROWS_FOR_MEAN
from transforms.sinks.delta_compaction import PartitionCompactor
from transforms.sinks.feast_online import FeastConfig


class KafkaConfig(_Strict):
    bootstrap: str = Field("localhost:9092", description="host:port[,host:port...] of the brokers")
    topic: str = Field("ad-requests", description="the topic of ad requests")
    group: str = Field("sluice-scorer", description="consumer group (the consumer runner)")
    instance_id: str | None = Field(
        None,
        description="stable name of this consumer process (its Kafka transactional.id and static group "
        "membership); default: <hostname>-<n> where n is --instance (0)",
    )
    codec: Literal["json", "avro"] = "json"
    scores_topic: str | None = Field(None, description="default <topic>.scores")
    dlq_topic: str | None = Field(None, description="default <topic>.dlq")
    client: dict[str, str] = Field(
        default_factory=dict, description="extra librdkafka settings, e.g. security.protocol, sasl.*, ssl.*"
    )
    transaction_timeout_s: float = Field(
        60.0,
        ge=1,
        le=900,
        description="the output Kafka transactions' timeout (transaction.timeout.ms, and the bound on each "
        "commit and abort): a broker outage longer than this fails the batch, and a producer stuck in "
        "librdkafka is given up on 10 s after it",
    )
    outage_tolerance_s: float = Field(
        300.0,
        ge=0,
        description="consumer runner: how long batches whose Kafka transaction fails (broker down, producer "
        "stuck) are replayed before the consumer exits non-zero; 0: exit on the first such failure",
    )

    @property
    def scores(self) -> str:
        return self.scores_topic or f"{self.topic}.scores"

    @property
    def dlq(self) -> str:
        return self.dlq_topic or dlq_topic(self.topic)


class CtrModelConfig(_Strict):
    path: Annotated[str, AfterValidator(_absolute_uri)] = Field(
        ..., description="a CTR artifact directory, or a registry directory whose CURRENT names one"
    )
    sha256: str | None = Field(None, description="pin the model version (a fixed artifact only)")
    poll_seconds: float = Field(5.0, gt=0, description="how often a registry's CURRENT pointer is checked")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(
        1,
        ge=1,
        description="torch intra-op threads per consumer process (scale out with processes instead: on "
        "2 cores shared with a broker, the model step ran ~1.5x faster with 1 thread than with 2); null: torch's "
        "default. "
        "Spark matches them to spark.task.cpus",
    )


class ScoreTargetConfig(_Strict):
    uri: Annotated[str, AfterValidator(_absolute_uri)] = Field(..., description="the Delta scores table")
    quarantine_uri: Annotated[str, AfterValidator(_absolute_uri)] | None = Field(
        None, description="defaults to <target>_quarantine"
    )
    storage_options: dict[str, str] = Field(default_factory=dict)
    compact_every_s: float = Field(
        600.0,
        ge=0,
        description="both runners compact the date partitions they wrote this often (0: never by time; with "
        "compact_every_commits also 0, run OPTIMIZE yourself: every commit's cost grows with the table's "
        "file count, ~90 us per file)",
    )
    compact_every_commits: int = Field(
        100,
        ge=0,
        description="...and as soon as this many commits with rows were made since the last compaction (0: "
        "by time only). Bounds the file count whatever the commit rate",
    )
    compact_small_file_mb: int = Field(
        4,
        ge=1,
        description="a compaction triggered by the commit count merges only files below this size, so it "
        "rewrites at most this much; the timed one merges up to delta-rs's 100 MB target",
    )
    vacuum_retention_hours: int | None = Field(
        None,
        ge=0,
        description="the timed compaction also deletes files replaced more than this long ago (VACUUM). "
        "null: never (Delta's own retention is 7 days; then VACUUM yourself: at 10k events/s with a commit "
        "every ~0.15 s the compactions replace an estimated 20-30 GB a day). Readers of older snapshots "
        "must finish within it",
    )
    log_retention_minutes: int | None = Field(
        5,
        ge=1,
        description="delta.logRetentionDuration of the scores and quarantine tables, set when they are "
        "created and on start when it differs. Every commit lists the table's _delta_log, ~12 us per "
        "log file on a local disk (delta-rs/object_store list the whole directory), and a stream commits "
        "several times a second, so Delta's default of 30 days would make commits slower by the hour "
        "(measured: +12 ms per 1,000 commits; at 10k events/s the consumer's p50 latency rose from 0.19 to "
        "0.35 s over 10 minutes with 15 minutes of log, and stayed at ~0.21 s with 2). The tables are "
        "append-only: time travel shows nothing a filter on scored_at does not; Delta stream readers of "
        "them must not fall further behind than this. null: leave the table's own setting",
    )

    deleted_file_retention_minutes: int | None = Field(
        60,
        ge=1,
        description="delta.deletedFileRetentionDuration of the scores and quarantine tables (set like "
        "log_retention_minutes). Every checkpoint carries one tombstone per file a compaction replaced within "
        "it, ~1.5 us each to write: with Delta's default of 7 days, a stream at 10k events/s would carry "
        "~770k per day of age, and each checkpoint would take >1 s and tens of MB. It is also the default "
        "retention of a plain VACUUM (readers of snapshots older than it may then lose files). null: leave "
        "the table's own setting",
    )

    maintenance_nice: int | None = Field(
        10,
        ge=0,
        le=19,
        description="compaction, checkpoints and VACUUM run in a child process at this niceness, so the "
        "stream's own threads win the cores (in the consumer's process at 10k events/s, each compaction "
        "slowed the batches committed meanwhile from ~25 ms to 200-330 ms in their Delta step). null: on a "
        "thread of the runner's process",
    )

    def compactor(self) -> PartitionCompactor:
        """The background maintenance both runners run over the scores and quarantine tables:
        compaction, and the checkpoints their commits skip (:attr:`checkpoints`)."""
        return PartitionCompactor(
            [self.uri, self.quarantine],
            self.storage_options,
            self.compact_every_s,
            every_commits=self.compact_every_commits,
            small_file_bytes=self.compact_small_file_mb << 20,
            vacuum_retention_hours=self.vacuum_retention_hours,
            checkpoints=self.checkpoints == "by_maintenance",
            nice=self.maintenance_nice,
        )

    @property
    def checkpoints(self) -> Literal["on_commit", "by_maintenance"]:
        """Where the runners' Delta sinks leave checkpoints: to the compactor when it runs by commit
        count (so after every ``compact_every_commits`` commits), else to delta-rs's own commit hook."""
        return "by_maintenance" if self.compact_every_commits > 0 else "on_commit"

    @property
    def table_properties(self) -> dict[str, str]:
        """Delta table properties both runners set on the tables they write."""
        props = {}
        if self.log_retention_minutes is not None:
            props["delta.logRetentionDuration"] = f"interval {self.log_retention_minutes} minutes"
        if self.deleted_file_retention_minutes is not None:
            props["delta.deletedFileRetentionDuration"] = f"interval {self.deleted_file_retention_minutes} minutes"
        return props

    @property
    def quarantine(self) -> str:
        return self.quarantine_uri or self.uri.rstrip("/") + "_quarantine"


class StreamBatchingConfig(_Strict):
    max_records: int = Field(20_000, ge=1, description="records per micro-batch (consumer)")
    max_wait_ms: int = Field(200, ge=1, description="a micro-batch closes this long after its first record")
    pipeline: bool = Field(
        False,
        description="consumer: publish batch N (Delta, Feast, Kafka) on a thread while batch N+1 is read and "
        "scored. On 2 cores shared with the broker (one pair of runs): p50 latency at 10k events/s 0.6 s against "
        "1.7 s, but peak throughput over a backlog ~14% lower",
    )


class ScoreValidationConfig(_Strict):
    mean_ratio_bounds: tuple[float, float] = Field(
        DEFAULT_MEAN_RATIO_BOUNDS, description="a batch's mean score must lie within these multiples of the base rate"
    )
    min_rows_for_mean: int = Field(DEFAULT_MIN_ROWS_FOR_MEAN, ge=1)


class StreamSparkConfig(SparkConfig):
    master: str | None = Field(
        None, description="default outside spark-submit: local[cores x local_task_slots_per_core]"
    )
    local_task_slots_per_core: int = Field(
        2,
        ge=1,
        description="task slots per core of the embedded local Spark (master unset, not under spark-submit). A "
        "scoring task alternates between the JVM (Kafka fetch, Arrow) and its Python worker (decode, model, GX), "
        "so with one slot per core a core idles whenever its task is on the other side. Measured on 2 cores, "
        "availableNow, two slots against one in five interleaved pairs: +15%, +10%, +2%, -6%, -1% "
        "events/s (a noisy machine: about +4% on average, not proven); each slot's Python worker holds ~1 GB. "
        "On a cluster the same reasoning applies to spark.executor.cores",
    )
    app_name: str = "sluice-score-stream"
    checkpoint: Annotated[str, AfterValidator(_absolute_uri)] | None = Field(
        None, description="Structured Streaming checkpoint; default <target>_checkpoint"
    )
    trigger: Literal["processingTime", "availableNow"] = "processingTime"
    trigger_interval: str = Field("1 second", description="processingTime trigger interval")
    max_offsets_per_trigger: int | None = Field(None, ge=1)
    arrow_batch_records: int = Field(
        50_000,
        ge=1,
        description="records per Arrow batch a scoring task hands the core (Spark's default is 10,000; every "
        "batch pays ~35 ms of Great Expectations set-up, so larger batches score faster); a value in spark.conf "
        "wins",
    )


class ScoreConfig(_Strict):
    kafka: KafkaConfig = KafkaConfig()
    model: CtrModelConfig
    target: ScoreTargetConfig
    feast: FeastConfig | None = None
    batching: StreamBatchingConfig = StreamBatchingConfig()
    validation: ScoreValidationConfig = ScoreValidationConfig()
    spark: StreamSparkConfig = StreamSparkConfig()

    @model_validator(mode="after")
    def _distinct(self) -> ScoreConfig:
        if self.target.uri.rstrip("/") == self.target.quarantine.rstrip("/"):
            raise ValueError("target and quarantine tables must be different locations")
        topics = {self.kafka.topic, self.kafka.scores, self.kafka.dlq}
        if len(topics) != 3:
            raise ValueError("the source, scores and dead-letter topics must be three different topics")
        return self
