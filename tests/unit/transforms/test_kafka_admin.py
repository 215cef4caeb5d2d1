"""Topic creation's retry logic, against a scripted admin client (the real broker is in
tests/integration/pipelines/test_dev_kafka.py)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from transforms import kafka_admin
from transforms.errors import SinkError


class _ScriptedAdmin:
    """Answers each ``create_topics`` call with the next scripted outcome per topic."""

    def __init__(self, script: list[dict[str, int | None]]) -> None:
        self.script = script
        self.calls: list[list[str]] = []

    def create_topics(self, new_topics: list[Any], request_timeout: float) -> dict[str, Future[None]]:
        assert request_timeout >= 1.0
        outcomes = self.script.pop(0)
        self.calls.append([t.topic for t in new_topics])
        futures: dict[str, Future[None]] = {}
        for topic in new_topics:
            future: Future[None] = Future()
            code = outcomes[topic.topic]
            if code is None:
                future.set_result(None)
            else:
                future.set_exception(KafkaException(KafkaError(code, "scripted")))
            futures[topic.topic] = future
        return futures


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_admin.time, "sleep", lambda _s: None)


def test_a_fenced_broker_is_asked_again_and_only_for_the_topics_still_missing() -> None:
    admin = _ScriptedAdmin(
        [
            {"a": None, "b": KafkaError.INVALID_REPLICATION_FACTOR},  # b: "all brokers are fenced"
            {"b": KafkaError._TIMED_OUT},
            {"b": KafkaError.TOPIC_ALREADY_EXISTS},  # the timed-out request did create it
        ]
    )
    kafka_admin._create(admin, {"a": 2, "b": 1}, "h:1", time.monotonic() + 30)
    assert admin.calls == [["a", "b"], ["b"], ["b"]]


def test_a_permanent_error_fails_at_once_naming_the_topic() -> None:
    admin = _ScriptedAdmin([{"bad name!": KafkaError.TOPIC_EXCEPTION}])
    with pytest.raises(SinkError, match=r"cannot create Kafka topic bad name! on h:1"):
        kafka_admin._create(admin, {"bad name!": 1}, "h:1", time.monotonic() + 30)
    assert len(admin.calls) == 1


def test_a_transient_error_that_outlasts_the_deadline_fails() -> None:
    admin = _ScriptedAdmin([{"b": KafkaError.INVALID_REPLICATION_FACTOR}] * 3)
    with pytest.raises(SinkError, match="cannot create Kafka topic b"):
        kafka_admin._create(admin, {"b": 1}, "h:1", time.monotonic() - 1)
    assert len(admin.calls) == 1


class _FlakyWatermarks:
    """get_watermark_offsets failing with ``errors`` first, then answering ``marks``."""

    def __init__(self, errors: list[int], marks: tuple[int, int] | None = (3, 9)) -> None:
        self.errors = list(errors)
        self.marks = marks
        self.calls = 0

    def get_watermark_offsets(self, tp: object, timeout: float, cached: bool) -> tuple[int, int] | None:
        from confluent_kafka import KafkaError, KafkaException

        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return self.marks


def test_watermarks_ask_again_while_a_new_partition_is_still_loading() -> None:
    from confluent_kafka import KafkaError

    from transforms.kafka_admin import watermarks

    consumer = _FlakyWatermarks([KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART])
    assert watermarks(consumer, "t", 0, timeout_s=5) == (3, 9)
    assert consumer.calls == 3


def test_watermarks_raise_what_is_not_transient_and_say_when_there_is_no_answer() -> None:
    from confluent_kafka import KafkaError, KafkaException

    from transforms.errors import SinkError
    from transforms.kafka_admin import watermarks

    consumer = _FlakyWatermarks([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException):
        watermarks(consumer, "t", 0, timeout_s=5)
    assert consumer.calls == 1
    with pytest.raises(SinkError, match=r"no watermarks for t\[0\]"):
        watermarks(_FlakyWatermarks([], marks=None), "t", 0, timeout_s=5)
    stuck = _FlakyWatermarks([KafkaError.NOT_LEADER_FOR_PARTITION] * 1000)
    with pytest.raises(KafkaException):
        watermarks(stuck, "t", 0, timeout_s=0.5)  # gives up at the deadline
