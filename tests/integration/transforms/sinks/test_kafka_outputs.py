"""The transactional Kafka sink against a real broker (Apache Kafka 4.4, KRaft).

What the consumer runner's last step relies on: a committed transaction is visible to
``read_committed`` readers with the right keys, values and headers; an aborted one never is; the
offsets sent in the transaction are the group's committed offsets afterwards; a second producer with
the same ``transactional.id`` fences the first and aborts its open transaction; an unreachable
broker is one clear error in bounded time.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from pipelines.dev_kafka import KafkaBroker, free_port
from schemas.scores import (
    DEAD_LETTER_SCHEMA,
    DLQ_HEADER_ERROR_CLASS,
    DLQ_HEADER_ERROR_MESSAGE,
    DLQ_HEADER_MODEL_VERSION,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_SOURCE_TOPIC,
    DLQ_HEADER_STAGE,
    SCORES_SCHEMA,
    dlq_topic,
)
from tests.fixtures.kafka_broker import unique_topic
from transforms.errors import SinkError
from transforms.kafka_admin import ensure_topics, watermarks
from transforms.sinks import kafka_outputs
from transforms.sinks.kafka_outputs import ProducerFenced, TransactionalKafkaSink

PARTITIONS = 3
EVENT = datetime(2026, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)
SCORED = datetime(2026, 3, 1, 12, 30, 46, tzinfo=UTC)


def score_rows(ids: list[str], *, source: str = "ad-requests") -> pa.Table:
    n = len(ids)
    return pa.Table.from_pydict(
        {
            "request_id": ids,
            "user_id": [f"user-{i}" for i in range(n)],
            "ad_id": ['ad "quoted" \\ é'] * n,
            "seq": list(range(n)),
            "score": [0.1] * n,
            "model_name": ["ctr"] * n,
            "model_version": ["m-abc"] * n,
            "topic": [source] * n,
            "partition": [1] * n,
            "offset": list(range(100, 100 + n)),
            "event_time": [EVENT] * n,
            "scored_at": [SCORED] * n,
            "event_date": [EVENT.date()] * n,
        },
        schema=SCORES_SCHEMA,
    )


def dead_letter_rows() -> pa.Table:
    return pa.Table.from_pydict(
        {
            "key": [b"user-1", None],
            "value": [b"\xff\xfe not json", None],
            "topic": ["ad-requests", "ad-requests"],
            "partition": [2, 0],
            "offset": [41, 7],
            "stage": ["decode", "model"],
            "error_class": ["DecodeError", "ValueError"],
            "error_message": ["invalid JSON at byte 0", "bid_floor_usd out of range: 1e9"],
            "model_version": [None, "m-abc"],
        },
        schema=DEAD_LETTER_SCHEMA,
    )


def topics(bootstrap: str) -> tuple[str, str]:
    scores = unique_topic("scores")
    ensure_topics(bootstrap, {scores: PARTITIONS, dlq_topic(scores): PARTITIONS})
    return scores, dlq_topic(scores)


def read_committed(bootstrap: str, *names: str, timeout_s: float = 30.0) -> list[Any]:
    """Every message a read_committed reader sees on these topics, read up to each partition's end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique_topic("reader"),
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        ends: dict[tuple[str, int], int] = {}
        for name in names:
            for p in consumer.list_topics(name, timeout=10).topics[name].partitions:
                ends[(name, p)] = watermarks(consumer, name, p, timeout_s=10)[1]
        consumer.assign([TopicPartition(t, p, 0) for t, p in ends])
        pending = {tp for tp, end in ends.items() if end > 0}
        out = []
        deadline = time.monotonic() + timeout_s
        while pending:
            assert time.monotonic() < deadline, f"partitions {pending} not read to their end"
            for msg in consumer.consume(num_messages=1000, timeout=0.2):
                tp = (msg.topic(), msg.partition())
                if msg.error() is not None:
                    assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                    if msg.offset() >= ends[tp]:
                        pending.discard(tp)
                    continue
                out.append(msg)
                if msg.offset() >= ends[tp] - 1:
                    pending.discard(tp)
        return out
    finally:
        consumer.close()


def new_sink(bootstrap: str, scores: str, *, txn_id: str | None = None, **kwargs: Any) -> TransactionalKafkaSink:
    return TransactionalKafkaSink(
        bootstrap,
        transactional_id=txn_id or unique_topic("txn"),
        scores_topic=scores,
        dlq_topic=dlq_topic(scores),
        **kwargs,
    )


def test_a_committed_transaction_is_visible_with_keys_values_and_headers(kafka: KafkaBroker) -> None:
    scores, dlq = topics(kafka.bootstrap)
    sink = new_sink(kafka.bootstrap, scores)
    try:
        sink.begin()
        assert sink.produce_scores(score_rows(["r1", "r2", "r3"]), headers={"sluice.batch": "s:7"}) == 3
        assert sink.produce_dead_letters(dead_letter_rows()) == 2
        sink.commit()
    finally:
        sink.close()

    by_key = {m.key(): m for m in read_committed(kafka.bootstrap, scores)}
    assert sorted(by_key) == [b"r1", b"r2", b"r3"]
    assert json.loads(by_key[b"r2"].value()) == {
        "request_id": "r2",
        "user_id": "user-1",
        "ad_id": 'ad "quoted" \\ é',
        "seq": 1,
        "score": 0.1,
        "model_name": "ctr",
        "model_version": "m-abc",
        "topic": "ad-requests",
        "partition": 1,
        "offset": 101,
        "event_time": "2026-03-01T12:30:45.123456Z",
        "scored_at": "2026-03-01T12:30:46.000000Z",
        "event_date": "2026-03-01",
    }
    assert by_key[b"r1"].headers() == [("sluice.batch", b"s:7")]

    dead = sorted(read_committed(kafka.bootstrap, dlq), key=lambda m: int(dict(m.headers())[DLQ_HEADER_SOURCE_OFFSET]))
    assert [(m.key(), m.value()) for m in dead] == [(None, None), (b"user-1", b"\xff\xfe not json")]
    assert dict(dead[1].headers()) == {
        DLQ_HEADER_ERROR_CLASS: b"DecodeError",
        DLQ_HEADER_ERROR_MESSAGE: b"invalid JSON at byte 0",
        DLQ_HEADER_STAGE: b"decode",
        DLQ_HEADER_SOURCE_TOPIC: b"ad-requests",
        DLQ_HEADER_SOURCE_PARTITION: b"2",
        DLQ_HEADER_SOURCE_OFFSET: b"41",
        DLQ_HEADER_MODEL_VERSION: b"",
    }
    assert dict(dead[0].headers())[DLQ_HEADER_MODEL_VERSION] == b"m-abc"


def test_an_aborted_transaction_is_never_visible(kafka: KafkaBroker) -> None:
    scores, dlq = topics(kafka.bootstrap)
    sink = new_sink(kafka.bootstrap, scores)
    try:
        sink.begin()
        sink.produce_scores(score_rows([f"aborted-{i}" for i in range(50)]))
        sink.produce_dead_letters(dead_letter_rows())
        sink.abort()
        sink.begin()
        sink.produce_scores(score_rows([f"kept-{i}" for i in range(50)]))
        sink.commit()
    finally:
        sink.close()

    # Read to the end of every partition: past the aborted messages, not just up to them.
    seen = read_committed(kafka.bootstrap, scores, dlq)
    assert sorted(m.key().decode() for m in seen) == sorted(f"kept-{i}" for i in range(50))


def test_offsets_sent_in_the_transaction_become_the_groups_committed_offsets(kafka: KafkaBroker) -> None:
    scores, _ = topics(kafka.bootstrap)
    source, group = unique_topic("source"), unique_topic("group")
    ensure_topics(kafka.bootstrap, {source: 2})
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group, "enable.auto.commit": False})
    sink = new_sink(kafka.bootstrap, scores)
    try:
        consumer.assign([TopicPartition(source, 0), TopicPartition(source, 1)])
        sink.begin()
        sink.produce_scores(score_rows(["r1"]))
        sink.commit([TopicPartition(source, 0, 42), TopicPartition(source, 1, 7)], consumer.consumer_group_metadata())

        committed = consumer.committed([TopicPartition(source, 0), TopicPartition(source, 1)], timeout=10)
        assert [(tp.partition, tp.offset) for tp in committed] == [(0, 42), (1, 7)]
        # Without offsets the group does not move.
        sink.begin()
        sink.produce_scores(score_rows(["r2"]))
        sink.commit()
        committed = consumer.committed([TopicPartition(source, 0)], timeout=10)
        assert committed[0].offset == 42
    finally:
        sink.close()
        consumer.close()


def test_a_second_producer_with_the_same_id_fences_the_first(kafka: KafkaBroker) -> None:
    scores, _ = topics(kafka.bootstrap)
    txn_id = unique_topic("instance")
    old = new_sink(kafka.bootstrap, scores, txn_id=txn_id)
    old.begin()
    old.produce_scores(score_rows([f"zombie-{i}" for i in range(20)]))
    old._producer.flush(10)  # the zombie's messages are on the broker, in its open transaction

    new = new_sink(kafka.bootstrap, scores, txn_id=txn_id)  # init_transactions: fences, aborts the open one
    try:
        with pytest.raises(ProducerFenced, match="fenced"):
            old.commit()
        with pytest.raises(ProducerFenced, match="unusable"):
            old.begin()
        new.begin()
        new.produce_scores(score_rows(["successor"]))
        new.commit()
    finally:
        old.close()
        new.close()

    assert [m.key() for m in read_committed(kafka.bootstrap, scores)] == [b"successor"]


def test_an_unreachable_broker_is_a_clear_error_in_bounded_time() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(SinkError, match=rf"cannot start a Kafka transactional producer on {bootstrap} within 3 s"):
        TransactionalKafkaSink(
            bootstrap, transactional_id="nobody", scores_topic="s", dlq_topic="s.dlq", init_timeout_s=3.0
        )
    assert time.monotonic() - started < 10


def test_the_broker_going_away_mid_transaction_aborts_with_a_clear_error(tmp_path: Path) -> None:
    # A private broker: stopping the session's one would disturb the tests that follow (a restarted
    # KRaft broker answers "not leader" for a while).
    broker = KafkaBroker(free_port(), tmp_path / "kafka")
    broker.start()
    try:
        scores, _ = topics(broker.bootstrap)
        sink = new_sink(broker.bootstrap, scores, transaction_timeout_s=5.0)
        sink.begin()
        sink.produce_scores(score_rows(["lost"]))
        broker.stop()
        started = time.monotonic()
        with pytest.raises(SinkError, match=r"Kafka transaction of .* failed on commit"):
            sink.commit()
        assert time.monotonic() - started < 5 + 5 + 10  # the commit, then the abort, each bounded
        with pytest.raises(SinkError, match="unusable"):
            sink.begin()
        started = time.monotonic()
        sink.close(timeout_s=1.0)
        assert time.monotonic() - started < 5
    finally:
        broker.stop()


def test_producer_settings_pass_through_and_bad_ones_fail_clearly(kafka: KafkaBroker) -> None:
    scores, _ = topics(kafka.bootstrap)
    sink = new_sink(kafka.bootstrap, scores, client_config={"client.id": "sluice-test", "linger.ms": "1"})
    sink.close()
    with pytest.raises(SinkError, match="invalid Kafka producer settings"):
        new_sink(kafka.bootstrap, scores, client_config={"no.such.setting": "1"})


def test_scores_json_rendering_of_dates_and_spark_timestamps(kafka: KafkaBroker) -> None:
    # Spark's toArrow() hands timestamps in the session time zone; the wire format stays UTC.
    scores, _ = topics(kafka.bootstrap)
    rows = score_rows(["r1"])
    local = rows.set_column(
        rows.schema.get_field_index("event_time"),
        "event_time",
        rows["event_time"].cast(pa.timestamp("us", tz="America/New_York")),
    )
    sink = new_sink(kafka.bootstrap, scores)
    try:
        sink.begin()
        sink.produce_scores(local)
        sink.commit()
    finally:
        sink.close()
    (msg,) = read_committed(kafka.bootstrap, scores)
    value = json.loads(msg.value())
    assert value["event_time"] == "2026-03-01T12:30:45.123456Z"
    assert date.fromisoformat(value["event_date"]) == EVENT.date()


def test_a_producer_without_the_sink_sees_nothing_uncommitted(kafka: KafkaBroker) -> None:
    # Guards the reader itself: read_committed must not be satisfied by reading nothing.
    scores, _ = topics(kafka.bootstrap)
    plain = Producer({"bootstrap.servers": kafka.bootstrap})
    plain.produce(scores, b"v", b"k", partition=0)
    plain.flush(10)
    assert [m.key() for m in read_committed(kafka.bootstrap, scores)] == [b"k"]


def test_a_broker_restart_under_a_transaction_with_offsets_never_blocks_past_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """librdkafka's ``send_offsets_to_transaction`` can block forever once the group coordinator's
    broker went away (librdkafka#5456): the commit still ends in bounded time, and a new sink with
    the same id then works, with nothing of the failed transaction visible."""
    monkeypatch.setattr(kafka_outputs, "STUCK_GRACE_S", 2.0)
    broker = KafkaBroker(free_port(), tmp_path / "kafka")  # private: see the test above
    broker.start()
    try:
        scores, _ = topics(broker.bootstrap)
        source, group, txn_id = unique_topic("source"), unique_topic("group"), unique_topic("instance")
        ensure_topics(broker.bootstrap, {source: 1})
        consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False})
        consumer.assign([TopicPartition(source, 0)])
        sink = new_sink(broker.bootstrap, scores, txn_id=txn_id, transaction_timeout_s=5.0)
        # One committed transaction first: the group coordinator is known to the producer.
        sink.begin()
        sink.produce_scores(score_rows(["first"]))
        sink.commit([TopicPartition(source, 0, 1)], consumer.consumer_group_metadata())
        sink.begin()
        sink.produce_scores(score_rows(["lost"]))
        broker.restart()
        started = time.monotonic()
        try:
            sink.commit([TopicPartition(source, 0, 2)], consumer.consumer_group_metadata())
            committed = True
        except SinkError as exc:
            assert "stuck" in str(exc) or "failed on commit" in str(exc), exc
            committed = False
        assert time.monotonic() - started < 5 + 2 + 5 + 10
        sink.close(timeout_s=1.0)

        successor = new_sink(broker.bootstrap, scores, txn_id=txn_id, transaction_timeout_s=5.0)
        try:
            successor.begin()
            successor.produce_scores(score_rows(["successor"]))
            successor.commit([TopicPartition(source, 0, 3)], consumer.consumer_group_metadata())
        finally:
            successor.close()
        consumer.close()
        keys = sorted(m.key() for m in read_committed(broker.bootstrap, scores))
        assert keys == sorted([b"first", b"successor", *([b"lost"] if committed else [])])
    finally:
        broker.stop()
