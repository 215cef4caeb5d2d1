"""The demo producer against a real broker: what lands on the topic is exactly what the report says.

Read back with a plain consumer: the message count, the keys, each user's ``seq`` over the valid
messages (no gaps, no repeats, in order within the partition), the valid request ids, and every
planted poison message with the outcome the catalogue promises for it. Also: an unreachable broker
or a missing topic fails with one line in bounded time, and a rate limit spreads the load evenly.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer

from pipelines.ad_world import AdWorld
from pipelines.demo_ad_requests import CONNECT_TIMEOUT_S, ProduceReport, produce_ad_requests
from pipelines.dev_kafka import KafkaBroker, free_port
from pipelines.poison import kinds_for
from schemas.ad_request_codec import codec_for
from schemas.ad_requests import DENSE_RANGES
from tests.fixtures.kafka_broker import unique_topic
from transforms.errors import SinkError


def _consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 90.0) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique_topic("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=5_000, timeout=0.5):
                assert msg.error() is None, msg.error()
                out.append(msg)
        # Nothing beyond what was produced.
        out += [m for m in consumer.consume(num_messages=100, timeout=1.0) if m.error() is None]
    finally:
        consumer.close()
    return out


def _check_topic(report: ProduceReport, messages: list[Any], codec: str) -> None:
    assert len(messages) == report.events
    c = codec_for(codec)
    decoded = c.decode_batch([m.value() for m in messages])
    keys = [m.key().decode() for m in messages]
    assert all(keys)

    rows = decoded.records.to_pylist()
    valid_pos = [
        int(i) for i, r in zip(decoded.indices, rows, strict=True) if not r["request_id"].startswith("poison-")
    ]
    valid_rows = [r for r in rows if not r["request_id"].startswith("poison-")]
    assert len(valid_rows) == report.valid == report.counts["valid"]
    assert {r["request_id"] for r in valid_rows} == report.valid_request_ids()
    # Valid messages are keyed by their user; each user's seq is 0..n-1, in order in its partition.
    by_user: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for pos, row in zip(valid_pos, valid_rows, strict=True):
        assert keys[pos] == row["user_id"]
        msg = messages[pos]
        by_user[row["user_id"]].append((msg.partition(), msg.offset(), row["seq"]))
    for user, seen in by_user.items():
        assert len({p for p, _, _ in seen}) == 1, f"{user} spread over partitions"
        seqs = [s for _, _, s in sorted(seen)]
        assert seqs == list(range(len(seqs))), f"{user}: seq {seqs[:10]}..."
    # The valid messages are the prefix of the seeded stream.
    expected_stream = AdWorld.build(report.seed).requests(report.seed).next_batch(report.valid)
    assert report.valid_ids is not None
    assert expected_stream.column("request_id").to_pylist() == report.valid_ids.column("request_id").to_pylist()

    # Every other message is a planted poison message, reaching its promised outcome.
    planted = Counter((p.key, p.value) for p in report.poison)
    valid_set = set(valid_pos)
    found = Counter((keys[i], messages[i].value()) for i in range(len(messages)) if i not in valid_set)
    assert found == planted
    assert sum(report.counts.values()) == report.events
    expected_counts = {k.name: 0 for k in kinds_for(codec)}
    expected_counts.update(Counter(p.kind for p in report.poison))
    assert {k: v for k, v in report.counts.items() if k != "valid"} == expected_counts
    for p in report.poison:
        one = c.decode_batch([p.value])
        if p.expected.stage == "decode":
            assert [str(f.error_class) for f in one.failures] == [p.expected.error_class], p.kind
        else:
            (row,) = one.records.to_pylist()
            assert row["request_id"] == p.request_id
            assert any(not lo <= row[n] <= hi for n, (lo, hi) in DENSE_RANGES.items()), p.kind


@pytest.mark.parametrize(("codec", "events"), [("json", 30_000), ("avro", 8_000)])
def test_topic_holds_exactly_what_the_report_says(kafka_broker: KafkaBroker, codec: str, events: int) -> None:
    topic = unique_topic("ad-requests")
    report = produce_ad_requests(
        kafka_broker.bootstrap,
        topic,
        events=events,
        poison_fraction=0.02,
        seed=11,
        codec=codec,
        partitions=3,
        progress=False,
    )
    assert report.events == events and len(report.poison) == round(events * 0.02)
    assert all(report.counts[k.name] >= 1 for k in kinds_for(codec))
    _check_topic(report, _consume_all(kafka_broker.bootstrap, topic, events), codec)


def test_valid_messages_do_not_depend_on_the_poison_fraction(kafka_broker: KafkaBroker) -> None:
    clean = produce_ad_requests(
        kafka_broker.bootstrap, unique_topic("clean"), events=2_000, seed=3, partitions=1, progress=False
    )
    dirty = produce_ad_requests(
        kafka_broker.bootstrap,
        unique_topic("dirty"),
        events=2_000,
        seed=3,
        partitions=1,
        poison_fraction=0.1,
        progress=False,
    )
    assert clean.valid_ids is not None and dirty.valid_ids is not None
    assert dirty.valid_ids.equals(clean.valid_ids.slice(0, dirty.valid))


def test_rate_limit_is_smooth(kafka_broker: KafkaBroker) -> None:
    topic = unique_topic("rate")
    events, rate = 3_000, 5_000.0
    report = produce_ad_requests(kafka_broker.bootstrap, topic, events=events, rate=rate, partitions=1, progress=False)
    assert report.seconds >= events / rate * 0.9
    messages = _consume_all(kafka_broker.bootstrap, topic, events)
    stamps = np.sort(np.array([m.timestamp()[1] for m in messages], dtype=np.int64))
    # Per 50 ms window, the load stays near rate * 0.05 = 250 (a burst per second would put
    # thousands in one window).
    windows = np.bincount((stamps - stamps[0]) // 50)
    assert windows[:-1].max() <= 2.5 * rate * 0.05


def test_unreachable_broker_fails_in_bounded_time() -> None:
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"cannot reach Kafka at 127\.0\.0\.1:\d+ within 10s"):
        produce_ad_requests(f"127.0.0.1:{free_port()}", "nowhere", events=10, progress=False)
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 10


def test_missing_topic_without_partitions_fails_fast(kafka_broker: KafkaBroker) -> None:
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"is not available .* pass partitions"):
        produce_ad_requests(kafka_broker.bootstrap, unique_topic("missing"), events=10, progress=False)
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 5
