"""Create the Kafka topics a job writes to, before it writes.

Brokers run with ``auto.create.topics.enable=false`` (a mistyped topic must fail, not become an
empty topic that nobody reads), so the runners create their dead-letter and scores topics
themselves at start-up. That has to be idempotent — every run and every restart calls it — and
must not return before the broker serves the new topic's partitions, or the first produce races
the topic's creation and fails with "unknown topic".

Even then a partition's leader can still be loading it for a moment after the metadata names it,
and answers an offsets request with NOT_LEADER_FOR_PARTITION: :func:`watermarks` asks again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from transforms.errors import ConfigError, SinkError

_log = logging.getLogger(__name__)


def ensure_topics(
    bootstrap: str,
    topics: dict[str, int],
    *,
    client_config: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create each topic of ``topics`` (name -> partition count) that does not exist yet.

    Existing topics are left as they are, whatever their partition count: adding partitions would
    move keys to other partitions under a running job, and Kafka cannot remove any. The
    replication factor is the broker's ``default.replication.factor``. ``client_config`` carries
    security settings (SASL, TLS) for the admin client.
    """
    for name, partitions in topics.items():
        if not name:
            raise ConfigError("Kafka topic names must not be empty")
        if partitions < 1:
            raise ConfigError(f"Kafka topic {name} needs at least 1 partition, got {partitions}")
    if not topics:
        return

    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # librdkafka's own log lines go to Python logging, not straight to stderr.
    admin = AdminClient({**(client_config or {}), "bootstrap.servers": bootstrap}, logger=_log)
    deadline = time.monotonic() + timeout_s
    try:
        existing = set(admin.list_topics(timeout=max(timeout_s, 1.0)).topics)
    except KafkaException as exc:
        raise SinkError(f"cannot reach Kafka at {bootstrap} to create topics {sorted(topics)}: {exc}") from exc
    missing = {name: n for name, n in topics.items() if name not in existing}
    if missing:
        _create(admin, missing, bootstrap, deadline)
        _wait_for_leaders(admin, bootstrap, list(missing), deadline)


def _transient(err: Any) -> bool:
    """Whether a failed topic creation may succeed if asked again shortly.

    A broker that was just (re)started answers before its controller has unfenced it, and then
    refuses new topics with INVALID_REPLICATION_FACTOR ("All brokers are currently fenced"); a
    runner started next to a restarting broker must wait that out, not exit. A replication
    factor that is really wrong fails the same way, only at the deadline.
    """
    from confluent_kafka import KafkaError

    if not isinstance(err, KafkaError):
        return False
    return bool(err.retriable()) or err.code() in {
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_CONTROLLER,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.INVALID_REPLICATION_FACTOR,
    }


def _create(admin: Any, missing: dict[str, int], bootstrap: str, deadline: float) -> None:
    """Create ``missing`` (name -> partitions), asking again on transient errors until ``deadline``."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    pending = dict(missing)
    backoff = 0.1
    while pending:
        request_timeout = max(deadline - time.monotonic(), 1.0)
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=n, replication_factor=-1) for name, n in pending.items()],
            request_timeout=request_timeout,
        )
        retry: dict[str, str] = {}  # name -> why
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    pending.pop(name)  # another runner created it in between: that is the goal
                    continue
                reason = err.str() if isinstance(err, KafkaError) else str(exc)
                if _transient(err) and time.monotonic() < deadline:
                    retry[name] = reason
                    continue
                raise SinkError(f"cannot create Kafka topic {name} on {bootstrap}: {reason}") from exc
            _log.info("created Kafka topic %s with %d partitions on %s", name, pending.pop(name), bootstrap)
        if retry:
            _log.warning(
                "Kafka at %s cannot create topics %s yet (%s); asking again",
                bootstrap,
                sorted(retry),
                next(iter(retry.values())),
            )
            time.sleep(min(backoff, max(deadline - time.monotonic(), 0.0)))
            backoff = min(backoff * 2, 2.0)


def _wait_for_leaders(admin: Any, bootstrap: str, names: list[str], deadline: float) -> None:
    """Return once every partition of ``names`` has a leader in the broker's metadata."""
    pending = list(names)
    while pending:
        name = pending[0]
        try:
            meta = admin.list_topics(topic=name, timeout=1.0).topics.get(name)
        except Exception:  # KafkaException: metadata not served yet
            meta = None
        if (
            meta is not None
            and meta.error is None
            and meta.partitions
            and all(p.leader >= 0 and p.error is None for p in meta.partitions.values())
        ):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise SinkError(f"Kafka topic {name} was created on {bootstrap} but has no partition leader yet")
        time.sleep(0.05)


def watermarks(consumer: Any, topic: str, partition: int, *, timeout_s: float, cached: bool = False) -> tuple[int, int]:
    """(low, high) offsets of one partition, asking again while the broker's answer is transient
    (a leader still loading a new partition, a broker restarting) until ``timeout_s`` has passed."""
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    deadline = time.monotonic() + timeout_s
    backoff = 0.05
    while True:
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            marks = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=remaining, cached=cached)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            loading = isinstance(err, KafkaError) and err.code() in {
                KafkaError.NOT_LEADER_FOR_PARTITION,
                KafkaError.UNKNOWN_TOPIC_OR_PART,
            }
            if (loading or _transient(err)) and time.monotonic() + backoff < deadline:
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            raise
        if marks is None:
            raise SinkError(f"no watermarks for {topic}[{partition}] within {timeout_s:g} s")
        return int(marks[0]), int(marks[1])
