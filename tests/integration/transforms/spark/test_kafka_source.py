"""Spark's own Kafka source (spark-sql-kafka-0-10 from infra/maven/pom.xml) against the real broker.

Proves the connector jars load next to pyspark's without classpath clashes, in batch and in
Structured Streaming, and that a streaming checkpoint resumes where it stopped (the property the
ad-scoring job's exactly-once story builds on).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Producer
from deltalake import DeltaTable

from pipelines.dev_kafka import KafkaBroker
from tests.fixtures.kafka_broker import unique_topic
from transforms.kafka_admin import ensure_topics

pytestmark = pytest.mark.spark


def _produce(bootstrap: str, topic: str, values: list[str]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for v in values:
        producer.produce(topic, key=v.encode(), value=v.encode())
    assert producer.flush(30) == 0


def test_batch_read_sees_every_record(spark, kafka: KafkaBroker) -> None:  # type: ignore[no-untyped-def]
    topic = unique_topic("spark-batch")
    ensure_topics(kafka.bootstrap, {topic: 3})
    values = [f"r{i:03d}" for i in range(60)]
    _produce(kafka.bootstrap, topic, values)

    df = (
        spark.read.format("kafka")
        .option("kafka.bootstrap.servers", kafka.bootstrap)
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .option("endingOffsets", "latest")
        .load()
    )
    rows = df.selectExpr("CAST(value AS STRING) AS v", "partition", "offset").collect()
    assert sorted(r.v for r in rows) == values
    assert {r.partition for r in rows} <= {0, 1, 2}
    assert len({(r.partition, r.offset) for r in rows}) == len(values)


def test_stream_available_now_into_delta_resumes_from_checkpoint(spark, kafka: KafkaBroker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    topic = unique_topic("spark-stream")
    ensure_topics(kafka.bootstrap, {topic: 2})
    table, checkpoint = str(tmp_path / "table"), str(tmp_path / "checkpoint")

    def run_once() -> None:
        stream = (
            spark.readStream.format("kafka")
            .option("kafka.bootstrap.servers", kafka.bootstrap)
            .option("subscribe", topic)
            .option("startingOffsets", "earliest")
            .load()
            .selectExpr("CAST(value AS STRING) AS v", "partition", "offset")
        )
        query = (
            stream.writeStream.format("delta")
            .option("checkpointLocation", checkpoint)
            .trigger(availableNow=True)
            .start(table)
        )
        assert query.awaitTermination(120), "the availableNow query did not finish"
        assert query.exception() is None

    first = [f"s{i:03d}" for i in range(40)]
    _produce(kafka.bootstrap, topic, first)
    run_once()
    assert sorted(DeltaTable(table).to_pyarrow_table().column("v").to_pylist()) == first

    second = [f"t{i:03d}" for i in range(15)]
    _produce(kafka.bootstrap, topic, second)
    run_once()
    got = DeltaTable(table).to_pyarrow_table().column("v").to_pylist()
    assert sorted(got) == sorted(first + second)  # nothing lost, nothing read twice
