"""The Spark runner's ledgered Kafka publisher against a real broker and a real Delta ledger.

A micro-batch id is published to the topics once, whatever Spark replays: a second publish of the
same id sends nothing (the ledger says so), and a crash between the Kafka commit and the ledger
entry is recovered from the topics themselves (the batch's header is found there), after which
the stream goes on normally.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from pipelines.dev_kafka import KafkaBroker
from schemas.scores import DEAD_LETTER_SCHEMA, SCORES_PARTITION_COLUMNS, SCORES_SCHEMA
from tests.fixtures.kafka_broker import unique_topic
from tests.integration.transforms.sinks.test_kafka_outputs import dead_letter_rows, read_committed, score_rows, topics
from transforms.sinks import kafka_outputs
from transforms.sinks.delta_offsets import OffsetTrackedDeltaSink
from transforms.sinks.kafka_ledger import BATCH_HEADER, LEDGER_KEY, START, LedgeredKafkaPublisher

APP = "sluice-stream:0123456789abcdef:topics"


class Stream:
    """One stream's ids and outputs: a fresh publisher per (re)start, as a restarted driver makes."""

    def __init__(self, bootstrap: str, ledger: Path) -> None:
        self.bootstrap = bootstrap
        self.ledger = str(ledger)
        OffsetTrackedDeltaSink(
            self.ledger, SCORES_SCHEMA, app_prefix="spark", partition_by=SCORES_PARTITION_COLUMNS
        ).ensure_table()
        self.scores, self.dlq = topics(bootstrap)
        self.txn_id = unique_topic("sluice-stream")

    def publisher(self) -> LedgeredKafkaPublisher:
        return LedgeredKafkaPublisher(
            self.bootstrap,
            transactional_id=self.txn_id,
            scores_topic=self.scores,
            dlq_topic=self.dlq,
            ledger_uri=self.ledger,
            ledger_app_id=APP,
        )

    def batch(self, batch_id: int, n: int = 5) -> tuple[pa.Table, pa.Table]:
        return score_rows([f"b{batch_id}-r{i}" for i in range(n)]), dead_letter_rows()

    def published(self) -> Counter[str]:
        """Messages on both topics per batch header (read_committed)."""
        seen = read_committed(self.bootstrap, self.scores, self.dlq)
        return Counter(dict(m.headers() or [])[BATCH_HEADER].decode() for m in seen)

    def ledger_version(self) -> int | None:
        return DeltaTable(self.ledger).transaction_version(APP)


@pytest.fixture
def stream(kafka: KafkaBroker, tmp_path: Path) -> Stream:
    return Stream(kafka.bootstrap, tmp_path / "scores")


def test_a_batch_published_twice_is_on_the_topics_once(stream: Stream) -> None:
    pub = stream.publisher()
    try:
        assert pub.publish(0, *stream.batch(0)) is True
        assert pub.publish(0, *stream.batch(0)) is False
    finally:
        pub.close()
    restarted = stream.publisher()
    try:
        assert restarted.publish(0, *stream.batch(0)) is False
        assert restarted.publish(1, *stream.batch(1, n=3)) is True
    finally:
        restarted.close()

    assert stream.published() == {f"{APP}:0": 5 + 2, f"{APP}:1": 3 + 2}
    assert stream.ledger_version() == 1


def test_the_ledger_opens_with_the_topics_ends_before_the_first_batch(stream: Stream) -> None:
    # Another job's messages already on the scores topic: the first scan must never have to read them.
    other = kafka_outputs.TransactionalKafkaSink(
        stream.bootstrap, transactional_id=unique_topic("other"), scores_topic=stream.scores, dlq_topic=stream.dlq
    )
    other.begin()
    other.produce_scores(score_rows([f"other-{i}" for i in range(40)]))
    other.commit()
    other.close()

    pub = stream.publisher()
    try:
        pub.publish(0, *stream.batch(0))
    finally:
        pub.close()

    entries = [c[LEDGER_KEY] for c in DeltaTable(stream.ledger).history() if LEDGER_KEY in c]
    assert [e["batch_id"] for e in entries] == [0, START]
    start_offsets = entries[1]["end_offsets"]
    assert sum(start_offsets[stream.scores].values()) >= 40  # the other job's messages (+ commit markers)
    assert set(start_offsets) == {stream.scores, stream.dlq}


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "restarted-driver"])
def test_a_crash_between_the_kafka_commit_and_the_ledger_is_recovered_from_the_topics(
    stream: Stream, monkeypatch: pytest.MonkeyPatch, restart: bool
) -> None:
    pub = stream.publisher()
    assert pub.publish(0, *stream.batch(0)) is True

    real_record = LedgeredKafkaPublisher._record
    crashed: list[int] = []

    def crash_once(self: LedgeredKafkaPublisher, batch_id: int, ends: Any) -> None:
        if batch_id == 1 and not crashed:
            crashed.append(batch_id)
            raise RuntimeError("driver crashed after the Kafka commit")
        real_record(self, batch_id, ends)

    monkeypatch.setattr(LedgeredKafkaPublisher, "_record", crash_once)
    with pytest.raises(RuntimeError, match="driver crashed"):
        pub.publish(1, *stream.batch(1))
    assert stream.ledger_version() == 0
    assert stream.published()[f"{APP}:1"] == 5 + 2  # batch 1 is on the topics, unrecorded

    if restart:
        pub.close()
        pub = stream.publisher()
    try:
        assert pub.publish(1, *stream.batch(1)) is False  # Spark's replay of batch 1: found, not resent
        assert stream.ledger_version() == 1
        assert pub.publish(2, *stream.batch(2)) is True
    finally:
        pub.close()

    assert stream.published() == {f"{APP}:0": 7, f"{APP}:1": 7, f"{APP}:2": 7}
    assert stream.ledger_version() == 2


def test_a_crash_before_the_kafka_commit_publishes_the_replay(stream: Stream, monkeypatch: pytest.MonkeyPatch) -> None:
    pub = stream.publisher()
    real_commit = kafka_outputs.TransactionalKafkaSink.commit

    def crash(self: kafka_outputs.TransactionalKafkaSink, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("driver crashed before the Kafka commit")

    monkeypatch.setattr(kafka_outputs.TransactionalKafkaSink, "commit", crash)
    with pytest.raises(RuntimeError, match="before the Kafka commit"):
        pub.publish(0, *stream.batch(0))
    pub.close()  # the open transaction is aborted, as a restart's init_transactions would
    monkeypatch.setattr(kafka_outputs.TransactionalKafkaSink, "commit", real_commit)

    pub = stream.publisher()
    try:
        assert pub.publish(0, *stream.batch(0)) is True  # scanned, not found: sent
    finally:
        pub.close()
    assert stream.published() == {f"{APP}:0": 7}


def test_an_empty_batch_is_recorded_too(stream: Stream) -> None:
    pub = stream.publisher()
    try:
        assert pub.publish(0, SCORES_SCHEMA.empty_table(), DEAD_LETTER_SCHEMA.empty_table()) is True
        assert pub.publish(0, SCORES_SCHEMA.empty_table(), DEAD_LETTER_SCHEMA.empty_table()) is False
    finally:
        pub.close()
    assert stream.ledger_version() == 0
    assert stream.published() == {}
