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
from transforms.errors import SinkError
from transforms.sinks.kafka_outputs import ProducerFenced


class _Out:
    usable = True


class _Consumer:
    def __init__(self) -> None:
        self.seeks: list[Any] = []

    def assignment(self) -> list[Any]:
        return []

    def seek(self, p: Any) -> None:
        self.seeks.append(p)

    def consumer_group_metadata(self) -> object:
        return object()


def _runner(tmp_path: Any, *, pipelined: bool) -> tuple[ConsumerRunner, list[int]]:
    cfg = ScoreConfig.model_validate(
        {
            "model": {"path": str(tmp_path / "model")},
            "target": {"uri": str(tmp_path / "scores")},
            "batching": {"pipeline": pipelined},
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


@pytest.mark.parametrize(
    "error", [ProducerFenced("fenced by a newer instance"), SinkError("Delta commit failed: disk full")]
)
def test_other_publish_failures_stop_the_consumer(tmp_path: Any, error: SinkError) -> None:
    runner, _ = _runner(tmp_path, pipelined=True)

    def publish(_: _Scored) -> None:
        raise error

    runner._publish = publish  # type: ignore[method-assign,assignment]
    runner._hand_over(_scored(runner, 99))
    with pytest.raises(type(error)):
        runner._settle()
