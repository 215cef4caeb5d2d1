"""The consumer's publish pipeline: ordering and what a dropped batch takes with it.

Pure logic: the Kafka clients and sinks are stand-ins here; the e2e tests in
``tests/e2e/test_consume_recovery.py`` run the same code against a real broker.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pipelines.consume import ConsumerRunner, _Scored
from pipelines.score_config import ScoreConfig
from transforms.errors import SinkError, SourceError
from transforms.sinks.kafka_outputs import ProducerFenced


class _Out:
    def __init__(self) -> None:
        self.usable = True
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Consumer:
    def __init__(self) -> None:
        self.seeks: list[Any] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def assignment(self) -> list[Any]:
        return []

    def seek(self, p: Any) -> None:
        self.seeks.append(p)

    def consumer_group_metadata(self) -> object:
        return object()


def _runner(tmp_path: Any, *, pipelined: bool, kafka: dict[str, Any] | None = None) -> tuple[ConsumerRunner, list[int]]:
    cfg = ScoreConfig.model_validate(
        {
            "model": {"path": str(tmp_path / "model")},
            "target": {"uri": str(tmp_path / "scores")},
            "batching": {"pipeline": pipelined},
            "kafka": kafka or {},
        }
    )
    runner = ConsumerRunner(cfg, instance_id="test-0")
    runner._kafka_out = _Out()  # type: ignore[assignment]
    runner._consumer = _Consumer()  # type: ignore[assignment]
    if pipelined:
        runner._publisher = ThreadPoolExecutor(1)
    return runner, []


def _scored(runner: ConsumerRunner, last_offset: int) -> _Scored:
    return _Scored(outcome=None, through={("t", 0): last_offset}, epoch=runner._epoch)  # type: ignore[arg-type]


@pytest.mark.parametrize("pipelined", [True, False])
def test_batches_publish_in_order_one_at_a_time(tmp_path: Any, pipelined: bool) -> None:
    runner, published = _runner(tmp_path, pipelined=pipelined)
    running = threading.Lock()

    def publish(s: _Scored) -> None:
        assert running.acquire(blocking=False), "two batches published at once"
        published.append(s.through[("t", 0)])
        running.release()

    runner._publish = publish  # type: ignore[method-assign,assignment]
    for last in (99, 199, 299):
        runner._hand_over(_scored(runner, last))
    runner._settle()
    assert published == [99, 199, 299]


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_batch_dropped_after_a_rebalance_drops_everything_read_after_it(tmp_path: Any, pipelined: bool) -> None:
    """Publishing batch N+1 after N was dropped would commit offsets past N's records: lost."""
    runner, published = _runner(tmp_path, pipelined=pipelined)
    refused = [199]

    def publish(s: _Scored) -> None:
        if s.through[("t", 0)] in refused:
            refused.remove(s.through[("t", 0)])
            raise SinkError("Kafka commit failed: ILLEGAL_GENERATION")
        published.append(s.through[("t", 0)])

    runner._publish = publish  # type: ignore[method-assign,assignment]
    runner._hand_over(_scored(runner, 99))
    runner._buffer = ["read after 199"]  # type: ignore[list-item]
    runner._hand_over(_scored(runner, 199))  # refused: dropped
    # Pipelined, 299 was scored while 199 was being published; one at a time, after the drop.
    in_hand = _scored(runner, 299)
    runner._hand_over(in_hand)
    runner._settle()
    assert runner.summary.batches_dropped == 1
    assert runner._buffer == [], "records read after the dropped batch were kept"
    if pipelined:
        assert published == [99], "a batch read before the rewind was published"
    runner._hand_over(_scored(runner, 199))  # read again after the rewind: published
    runner._settle()
    assert published[-1] == 199


def test_a_fenced_producer_stops_the_consumer(tmp_path: Any) -> None:
    runner, _ = _runner(tmp_path, pipelined=True)

    def publish(_: _Scored) -> None:
        raise ProducerFenced("fenced by a newer instance")

    runner._publish = publish  # type: ignore[method-assign,assignment]
    runner._hand_over(_scored(runner, 99))
    with pytest.raises(ProducerFenced):
        runner._settle()


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_failed_transaction_is_replayed_with_a_new_producer_when_the_old_one_is_unusable(
    tmp_path: Any, pipelined: bool
) -> None:
    runner, published = _runner(tmp_path, pipelined=pipelined)
    stuck = _Out()
    failures = [SinkError("Kafka producer got stuck sending offsets"), SinkError("Delta commit failed: disk full")]
    fresh = _Out()
    runner._new_kafka_sink = lambda: fresh  # type: ignore[assignment,method-assign,return-value]

    def publish(s: _Scored) -> None:
        if failures:
            if len(failures) == 2:
                runner._kafka_out = stuck  # type: ignore[assignment]
                stuck.usable = False
            raise failures.pop(0)
        published.append(s.through[("t", 0)])

    runner._publish = publish  # type: ignore[method-assign,assignment]
    for _ in range(3):  # the batch, its replay (fails again: usable producer, kept), its second replay
        runner._hand_over(_scored(runner, 99))
        runner._settle()
    assert published == [99]
    assert runner.summary.batches_dropped == 2
    assert runner.summary.producers_recreated == 1 and runner._kafka_out is fresh and stuck.closed


@pytest.mark.parametrize("tolerance", [0.0, 30.0])
def test_failures_past_the_outage_tolerance_stop_the_consumer(
    tmp_path: Any, tolerance: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, _ = _runner(tmp_path, pipelined=False, kafka={"outage_tolerance_s": tolerance})
    clock = [1000.0]
    monkeypatch.setattr("pipelines.consume.time.monotonic", lambda: clock[0])

    def publish(_: _Scored) -> None:
        raise SinkError("Kafka transaction failed on commit: broker down")

    runner._publish = publish  # type: ignore[method-assign,assignment]
    if tolerance:
        runner._hand_over(_scored(runner, 99))  # the first failure starts the streak: replayed
        clock[0] += tolerance - 1
        runner._hand_over(_scored(runner, 99))
        assert runner.summary.batches_dropped == 2
        clock[0] += 1
    with pytest.raises(SinkError, match=rf"kept failing for {tolerance:.0f} s, kafka.outage_tolerance_s"):
        runner._hand_over(_scored(runner, 99))


def test_a_fatal_consumer_error_rejoins_with_a_new_consumer_a_few_times_then_stops(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, _ = _runner(tmp_path, pipelined=False)
    old = runner._consumer
    created: list[_Consumer] = []

    def new_consumer() -> _Consumer:
        created.append(_Consumer())
        return created[-1]

    runner._new_consumer = new_consumer  # type: ignore[assignment,method-assign]
    runner._buffer = ["read before the error"]  # type: ignore[list-item]
    epoch = runner._epoch
    runner._restart_consumer("Static consumer fenced by other consumer with same group.instance.id")
    assert runner._consumer is created[0] and old.closed  # type: ignore[union-attr]
    assert runner._buffer == [] and runner._epoch == epoch + 1, "what was read before must be read again"
    runner._restart_consumer("again")
    runner._restart_consumer("again")
    with pytest.raises(SourceError, match="is another consumer running with instance id test-0"):
        runner._restart_consumer("again")
    assert runner.summary.consumers_recreated == 3


class _Offsets:
    """The Delta sinks' side of ``_resume_positions``: what the scores table records as published."""

    def __init__(self, published: dict[tuple[str, int], int]) -> None:
        self._published = published

    def refresh(self, tps: Any) -> None:
        pass

    def refresh_published(self, tps: Any) -> None:
        pass

    def published(self, topic: str, partition: int) -> int | None:
        return self._published.get((topic, partition))


class _Committed:
    def __init__(self, topic: str, partition: int, offset: int, error: Any = None) -> None:
        self.topic, self.partition, self.offset, self.error = topic, partition, offset, error


class _OffsetsConsumer(_Consumer):
    """Answers ``committed()`` with the given rounds of results, one round per call."""

    def __init__(self, rounds: list[list[_Committed]]) -> None:
        super().__init__()
        self.rounds = rounds
        self.calls = 0

    def committed(self, partitions: list[Any], timeout: float) -> list[_Committed]:
        self.calls += 1
        return self.rounds.pop(0)


def _resume_runner(tmp_path: Any, published: dict[tuple[str, int], int], **kafka: Any) -> ConsumerRunner:
    runner, _ = _runner(tmp_path, pipelined=False, kafka=kafka)
    runner._scores = _Offsets(published)  # type: ignore[assignment]
    runner._quarantine = _Offsets({})  # type: ignore[assignment]
    return runner


def test_a_partition_without_committed_offset_resumes_after_what_delta_records_as_published(tmp_path: Any) -> None:
    from confluent_kafka import TopicPartition

    runner = _resume_runner(tmp_path, {("t", 1): 41})
    consumer = _OffsetsConsumer([[_Committed("t", 0, 500), _Committed("t", 1, -1001)]])
    parts = [TopicPartition("t", 0), TopicPartition("t", 1)]
    runner._resume_positions(consumer, parts)  # type: ignore[arg-type]
    assert [p.offset for p in parts] == [500, 42]


def test_an_offset_the_broker_could_not_return_is_not_taken_for_no_offset(tmp_path: Any) -> None:
    """An error comes back with offset -1001 as well: resuming after Delta's published record then
    would repeat the batch that Delta has not recorded as published yet."""
    from confluent_kafka import KafkaError, TopicPartition

    runner = _resume_runner(tmp_path, {("t", 0): 41})
    load = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    consumer = _OffsetsConsumer([[_Committed("t", 0, -1001, load)]])
    parts = [TopicPartition("t", 0)]
    with pytest.raises(SourceError, match=r"committed offsets of t\[0\]: .*[Ll]oad"):
        runner._resume_positions(consumer, parts)  # type: ignore[arg-type]
    assert parts[0].offset < 0, "no position may be set from a failed answer"


def test_an_assignment_waits_for_the_committed_offsets_within_the_outage_tolerance(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from confluent_kafka import KafkaError, TopicPartition

    clock = [0.0]
    monkeypatch.setattr("pipelines.consume.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("pipelines.consume.time.sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    load = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    runner = _resume_runner(tmp_path, {("t", 0): 41}, outage_tolerance_s=30)
    consumer = _OffsetsConsumer([[_Committed("t", 0, -1001, load)]] * 3 + [[_Committed("t", 0, 500)]])
    parts = [TopicPartition("t", 0)]
    runner._resume_positions_when_known(consumer, parts)  # type: ignore[arg-type]
    assert parts[0].offset == 500 and consumer.calls == 4

    runner = _resume_runner(tmp_path, {("t", 0): 41}, outage_tolerance_s=5)
    consumer = _OffsetsConsumer([[_Committed("t", 0, -1001, load)]] * 10)
    with pytest.raises(SourceError, match=r"resume t\[0\] within kafka.outage_tolerance_s \(5 s\)"):
        runner._resume_positions_when_known(consumer, [TopicPartition("t", 0)])  # type: ignore[arg-type]
