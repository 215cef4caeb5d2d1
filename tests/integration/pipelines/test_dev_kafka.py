"""The dev/test Kafka broker (pipelines/dev_kafka.py) and ensure_topics (transforms/kafka_admin.py).

Everything the ad-scoring job's recovery relies on is checked against the real broker: records and
consumer group offsets survive a graceful restart and a SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipelines.dev_kafka import KafkaBroker, free_port
from tests.fixtures.kafka_broker import unique_topic
from transforms.errors import ConfigError, SinkError, SourceError
from transforms.kafka_admin import ensure_topics

REPO = Path(__file__).resolve().parents[3]


def _produce(bootstrap: str, topic: str, values: list[str]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    for v in values:
        producer.produce(topic, key=v.encode(), value=v.encode())
    assert producer.flush(30) == 0, "not every record was acknowledged"


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )


def _consume(consumer: Consumer, n: int, timeout_s: float = 30.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        got.append(msg.value().decode())
    return got


def _partitions(bootstrap: str, topic: str) -> int:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic=topic, timeout=10)
    return len(meta.topics[topic].partitions)


def test_produce_consume_round_trip(kafka: KafkaBroker) -> None:
    topic = unique_topic("round-trip")
    ensure_topics(kafka.bootstrap, {topic: 1})
    values = [f"v{i:03d}" for i in range(100)]
    _produce(kafka.bootstrap, topic, values)

    consumer = _consumer(kafka.bootstrap, unique_topic("group"))
    consumer.subscribe([topic])
    try:
        assert _consume(consumer, len(values)) == values  # one partition: order kept
    finally:
        consumer.close()


def test_ensure_topics_is_idempotent_and_keeps_partition_counts(kafka: KafkaBroker) -> None:
    a, b = unique_topic("scores"), unique_topic("dlq")
    ensure_topics(kafka.bootstrap, {a: 3, b: 1})
    assert (_partitions(kafka.bootstrap, a), _partitions(kafka.bootstrap, b)) == (3, 1)

    ensure_topics(kafka.bootstrap, {a: 3, b: 1})
    ensure_topics(kafka.bootstrap, {a: 5})  # existing topics are never repartitioned
    assert (_partitions(kafka.bootstrap, a), _partitions(kafka.bootstrap, b)) == (3, 1)

    # Usable at once: ensure_topics returns only when the partitions have leaders.
    _produce(kafka.bootstrap, a, ["x"])


def test_ensure_topics_rejects_bad_requests(kafka: KafkaBroker) -> None:
    with pytest.raises(ConfigError, match="at least 1 partition"):
        ensure_topics(kafka.bootstrap, {unique_topic(): 0})
    with pytest.raises(SinkError, match="cannot create Kafka topic"):
        ensure_topics(kafka.bootstrap, {"bad topic name!": 1})
    with pytest.raises(SinkError, match="cannot reach Kafka"):
        ensure_topics(f"127.0.0.1:{free_port()}", {unique_topic(): 1}, timeout_s=1.0)


def test_graceful_restart_keeps_records_and_committed_offsets(kafka: KafkaBroker) -> None:
    topic, group = unique_topic("restart"), unique_topic("group")
    ensure_topics(kafka.bootstrap, {topic: 2})
    first = [f"a{i}" for i in range(20)]
    _produce(kafka.bootstrap, topic, first)

    consumer = _consumer(kafka.bootstrap, group)
    consumer.subscribe([topic])
    assert sorted(_consume(consumer, len(first))) == sorted(first)
    consumer.commit(asynchronous=False)
    consumer.close()

    port = kafka.port
    kafka.restart()
    assert kafka.port == port and kafka.running

    second = [f"b{i}" for i in range(10)]
    _produce(kafka.bootstrap, topic, second)
    consumer = _consumer(kafka.bootstrap, group)
    consumer.subscribe([topic])
    try:
        # Resumes after the committed offsets: only the new records, nothing replayed.
        assert sorted(_consume(consumer, len(second))) == sorted(second)
        assert _consume(consumer, 1, timeout_s=2.0) == []
        committed = consumer.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
        assert sum(tp.offset for tp in committed) == len(first)
    finally:
        consumer.close()


def test_sigkill_and_restart_recovers_acknowledged_records(kafka: KafkaBroker) -> None:
    topic, group = unique_topic("crash"), unique_topic("group")
    ensure_topics(kafka.bootstrap, {topic: 1})
    values = [f"c{i:03d}" for i in range(50)]
    _produce(kafka.bootstrap, topic, values)
    consumer = _consumer(kafka.bootstrap, group)
    consumer.subscribe([topic])
    assert _consume(consumer, 10) == values[:10]
    consumer.commit(asynchronous=False)
    consumer.close()

    kafka.kill()
    assert not kafka.running
    kafka.start()

    consumer = _consumer(kafka.bootstrap, group)
    consumer.subscribe([topic])
    try:
        assert _consume(consumer, 40) == values[10:]
    finally:
        consumer.close()
    fresh = _consumer(kafka.bootstrap, unique_topic("group"))
    fresh.subscribe([topic])
    try:
        assert _consume(fresh, 50) == values
    finally:
        fresh.close()


def test_start_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is taken"):
            KafkaBroker(port, tmp_path / "kafka").start()


def test_start_refuses_a_data_directory_in_use(kafka: KafkaBroker) -> None:
    with pytest.raises(ConfigError, match="in use by another broker"):
        KafkaBroker(free_port(), kafka.data_dir).start()
    assert kafka.running


def test_a_broker_dying_at_start_says_why(tmp_path: Path) -> None:
    broker = KafkaBroker(free_port(), tmp_path / "kafka", jvm_opts=["-XX:+NoSuchOption"])
    with pytest.raises(SourceError, match=r"exited with code 1 while starting.*NoSuchOption"):
        broker.start()
    assert not broker.running


def test_missing_jars_say_run_make_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run `make install`"):
        KafkaBroker(free_port(), tmp_path / "kafka", jars_dir=tmp_path / "nojars").start()


def test_foreground_runner_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    """`python -m pipelines.dev_kafka` (what `make kafka` and `sluice dev kafka` run)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.dev_kafka", "--port", str(port), "--data-dir", str(tmp_path / "kafka")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in banner, banner
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert "stopping Kafka" in rest
    # The JVM is gone with it: the port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
