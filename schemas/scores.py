"""Output contracts of the ad-scoring job: the Delta scores table, the scores topic, the dead-letter.

Every scored request becomes one row of :data:`SCORES_SCHEMA` (partitioned by ``event_date``) with
its lineage: the model version that scored it and the Kafka position it came from (DESIGN.md,
invariant 3). The scores topic carries the same row as JSON, keyed by ``request_id``. A message
that cannot be scored goes, unchanged, to ``<topic>.dlq`` with the :data:`DLQ_HEADERS` saying why
and from where.
"""

from __future__ import annotations

import pyarrow as pa

SCORES_SCHEMA_VERSION = 1

SCORES_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("event_date", pa.date32(), nullable=False),
    ],
    metadata={"sluice.schema": "scores", "sluice.schema_version": str(SCORES_SCHEMA_VERSION)},
)
SCORES_PARTITION_COLUMNS: tuple[str, ...] = ("event_date",)

#: Rows whose scores failed validation (or whose whole batch did), with why and from where.
SCORES_QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("ad_id", pa.string()),
        pa.field("seq", pa.int64()),
        pa.field("score", pa.float32()),
        pa.field("check", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"sluice.schema": "scores_quarantine", "sluice.schema_version": str(SCORES_SCHEMA_VERSION)},
)

#: Raw Kafka records as both runners hand them to the scoring core: exactly the columns Spark's Kafka
#: source produces (``timestampType`` and headers left out), so the Spark runner passes its batches
#: through unchanged and the consumer builds the same batch from librdkafka's messages.
KAFKA_RECORD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("timestamp", pa.timestamp("ms", tz="UTC")),
    ],
    metadata={"sluice.schema": "kafka_records", "sluice.schema_version": "1"},
)

#: A message that could not be scored, as it goes to ``<topic>.dlq``: the original key and value
#: untouched, and why (``stage`` is ``decode`` or ``model``) and from where, carried as headers.
DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_class", pa.string(), nullable=False),
        pa.field("error_message", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
    ],
    metadata={"sluice.schema": "dead_letter", "sluice.schema_version": str(SCORES_SCHEMA_VERSION)},
)

#: Kafka headers on every dead-lettered message (values are UTF-8 strings).
DLQ_HEADER_ERROR_CLASS = "sluice.error.class"
DLQ_HEADER_ERROR_MESSAGE = "sluice.error.message"
DLQ_HEADER_STAGE = "sluice.stage"  # "decode" or "model"
DLQ_HEADER_SOURCE_TOPIC = "sluice.source.topic"
DLQ_HEADER_SOURCE_PARTITION = "sluice.source.partition"
DLQ_HEADER_SOURCE_OFFSET = "sluice.source.offset"
DLQ_HEADER_MODEL_VERSION = "sluice.model.version"  # empty when the message never reached a model
DLQ_HEADERS: tuple[str, ...] = (
    DLQ_HEADER_ERROR_CLASS,
    DLQ_HEADER_ERROR_MESSAGE,
    DLQ_HEADER_STAGE,
    DLQ_HEADER_SOURCE_TOPIC,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_MODEL_VERSION,
)


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


#: Partitions of the scores and dead-letter topics when a runner creates them (both runners).
OUTPUT_TOPIC_PARTITIONS = 4
