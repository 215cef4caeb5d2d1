"""Fill a Kafka topic with seeded ad requests, with poison on demand: the ad-scoring job's input.

``sluice demo-data ad-requests`` and the streaming runners' tests both call
:func:`produce_ad_requests`. What it promises, and why:

* **The valid messages are a prefix of one seeded stream.** They are the first ``valid`` requests
  of ``AdWorld.build(seed).requests(seed)``, whatever the batch size, rate or poison fraction, so
  a test can regenerate them (or use :attr:`ProduceReport.valid_ids`) and check the scores sink
  against them key by key, and each user's ``seq`` runs 0, 1, 2... with no gaps or repeats.
* **Poison is planted, not sprinkled.** ``round(events * poison_fraction)`` messages at seeded
  positions are built from the poison catalogue (:mod:`pipelines.poison`), every kind of the
  codec's catalogue dealt in turn. Their templates come from a *second* request stream of the same
  world, so they never consume a ``seq`` of the valid stream; they are keyed by a real user id
  (landing in real users' partitions, as production poison does), carry ``request_id``
  ``poison-<position>`` where the kind leaves an id, and may repeat a valid message's
  ``(user_id, seq)``: sequence checks belong to valid request ids. The report lists every poison
  message with its bytes and the outcome the runner must reach (dead-letter stage and class).
* **Delivered or failed, never silent.** The producer is idempotent (``enable.idempotence``,
  ``acks=all``): retries never duplicate or reorder a partition. An unreachable broker or a
  missing topic fails within :data:`CONNECT_TIMEOUT_S`; any message that is not acknowledged fails
  the call with one :class:`~transforms.errors.SinkError` line after the final flush.
* **Fast.** Requests are generated and encoded a chunk at a time by vectorised code in a
  background thread, overlapping the produce loop; only delivery *errors* come back to Python
  (``delivery.report.only.error``). With ``rate`` set, chunks are spaced a few milliseconds apart,
  so the load is smooth rather than one burst per second.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.poison import Outcome, PoisonKind, kinds_for, plan_poison
from schemas.ad_request_codec import CODEC_NAMES, codec_for
from schemas.ad_requests import AD_REQUEST_SCHEMA
from transforms.errors import ConfigError, SinkError

__all__ = ["CONNECT_TIMEOUT_S", "PoisonMessage", "ProduceReport", "demo_ad_requests_command", "produce_ad_requests"]

_log = logging.getLogger("sluice.demo")

#: How long to wait for the broker's metadata before failing (an unreachable broker must not hang).
CONNECT_TIMEOUT_S = 10.0
#: librdkafka gives up on a message after this long; the final flush waits a little longer.
_MESSAGE_TIMEOUT_MS = 60_000
_FLUSH_TIMEOUT_S = _MESSAGE_TIMEOUT_MS / 1000 + 15
#: Requests generated and encoded per step without a rate: big enough to amortise the vectorised
#: generator and encoder, small enough that the progress bar moves.
_CHUNK = 4096
#: With a rate, one step covers this much time, so the load is smooth at millisecond scale.
_RATE_STEP_S = 0.005
_LOG_EVERY_S = 10.0
#: Chunks generated ahead of the produce loop (bounded memory: a few thousand encoded messages each).
_PREFETCH = 4
#: Separates the poison templates' stream from the valid one (same world, different requests).
_POISON_STREAM_SALT = 0x5EED_9015

#: Producer settings: the idempotent guarantees, then throughput. Measured against the local dev
#: broker on 2 cores: lz4 costs the producer ~1 us/message more CPU than no compression but saves
#: the broker about as much and cuts the bytes on the wire ~3x (JSON); zstd halved throughput;
#: linger.ms 5..50 made no measurable difference, 20 leaves room for a remote broker's RTT.
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "batch.num.messages": 10_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    "message.timeout.ms": _MESSAGE_TIMEOUT_MS,
    "socket.connection.setup.timeout.ms": int(CONNECT_TIMEOUT_S * 1000),
    "delivery.report.only.error": True,
}


@dataclass(frozen=True)
class PoisonMessage:
    """One planted poison message, as produced, and what the runner must do with it."""

    position: int  # 0-based index in production order
    kind: str
    key: str
    value: bytes | None
    expected: Outcome
    #: ``poison-<position>``; the decoded request_id unless the kind destroys the message.
    request_id: str


@dataclass(frozen=True)
class ProduceReport:
    """What :func:`produce_ad_requests` put on the topic."""

    bootstrap: str
    topic: str
    codec: str
    seed: int
    events: int
    valid: int
    #: ``"valid"`` and every poison kind of the codec (zero where none was planted).
    counts: dict[str, int]
    #: Every planted poison message (empty when ``track_ids=False``; ``counts`` still has them).
    poison: tuple[PoisonMessage, ...]
    seconds: float
    #: ``request_id``, ``user_id``, ``seq`` of every valid message in production order, or ``None``
    #: when ``track_ids=False`` (then: the first ``valid`` requests of the stream of ``seed``).
    valid_ids: pa.Table | None = field(repr=False, default=None)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def valid_request_ids(self) -> set[str]:
        if self.valid_ids is None:
            raise ValueError("valid request ids were not tracked (track_ids=False)")
        return set(self.valid_ids.column("request_id").to_pylist())

    def summary(self) -> str:
        """One line for the CLI."""
        poison = ", ".join(f"{k} {n:,}" for k, n in self.counts.items() if k != "valid" and n)
        return (
            f"produced {self.events:,} ad requests ({self.codec}) to {self.topic} on {self.bootstrap} "
            f"in {self.seconds:.1f} s ({self.events_per_second:,.0f} events/s): {self.valid:,} valid"
            + (f", {self.events - self.valid:,} poison ({poison})" if poison else "")
            + f", seed {self.seed}"
        )


def _check_args(
    events: int, rate: float | None, poison_fraction: float, seed: int, codec: str, partitions: int | None
) -> None:
    if events < 0:
        raise ConfigError(f"events must be >= 0, got {events}")
    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be > 0 events/s, got {rate}")
    if not 0.0 <= poison_fraction <= 1.0:
        raise ConfigError(f"poison fraction must be between 0 and 1, got {poison_fraction}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if codec not in CODEC_NAMES:
        raise ConfigError(f"unknown codec {codec!r}; choose one of {', '.join(CODEC_NAMES)}")
    if partitions is not None and partitions < 1:
        raise ConfigError(f"partitions must be >= 1, got {partitions}")


def _kafka_reason(exc: BaseException) -> str:
    err: Any = exc.args[0] if exc.args else None
    text = err.str() if hasattr(err, "str") else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _connect(bootstrap: str, topic: str, client_config: dict[str, str] | None, on_delivery: Any) -> Any:
    """A producer whose broker answered and whose topic exists, or a one-line SinkError in bounded time."""
    from confluent_kafka import KafkaException, Producer

    conf = {**_PRODUCER_DEFAULTS, **(client_config or {}), "bootstrap.servers": bootstrap, "on_delivery": on_delivery}
    try:
        producer = Producer(conf, logger=_log)
    except KafkaException as exc:
        raise ConfigError(f"invalid Kafka producer configuration: {_kafka_reason(exc)}") from exc
    try:
        meta = producer.list_topics(topic=topic, timeout=CONNECT_TIMEOUT_S)
    except KafkaException as exc:
        raise SinkError(
            f"cannot reach Kafka at {bootstrap} within {CONNECT_TIMEOUT_S:.0f}s: {_kafka_reason(exc)}"
        ) from exc
    tmeta = meta.topics.get(topic)
    error = tmeta.error if tmeta is not None else None
    if tmeta is None or error is not None or not tmeta.partitions:
        reason = error.str() if error is not None else "no partitions"
        raise SinkError(
            f"Kafka topic {topic} is not available on {bootstrap} ({reason}); "
            "create it first or pass partitions (--partitions N) to have it created"
        )
    return producer


@contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Any]:
    """A callable ``update(done)``: a rich bar on a terminal, a log line every 10 s elsewhere."""
    if not enabled:
        yield lambda done: None
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn(f"[bold]{label}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=total, rate="")
            start = time.monotonic()

            def update(done: int) -> None:
                elapsed = time.monotonic() - start
                bar.update(task, completed=done, rate=f"{done / elapsed:,.0f}/s" if elapsed > 0 else "")

            yield update
        return
    last = [time.monotonic()]

    def log_update(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= _LOG_EVERY_S:
            last[0] = now
            _log.info("%s: %d/%d events", label, done, total)

    yield log_update


def produce_ad_requests(
    bootstrap: str,
    topic: str,
    *,
    events: int,
    rate: float | None = None,
    poison_fraction: float = 0.0,
    seed: int = 7,
    codec: str = "json",
    partitions: int | None = None,
    client_config: dict[str, str] | None = None,
    progress: bool = True,
    start_time_ms: int | None = None,
    track_ids: bool = True,
) -> ProduceReport:
    """Produce ``events`` ad requests (valid and poison) to ``topic``, keyed by ``user_id``.

    ``rate`` caps events/s (``None``: as fast as the broker takes them). ``partitions`` creates
    the topic when missing (an existing topic is used as it is). ``client_config`` adds or
    overrides producer settings (security, tuning). ``start_time_ms`` is the event time of the
    stream's start (default: the AdWorld's fixed epoch, so runs are reproducible).
    ``track_ids=False`` keeps the report small for very large runs.
    """
    _check_args(events, rate, poison_fraction, seed, codec, partitions)
    from pipelines.ad_world import AdWorld
    from transforms.kafka_admin import ensure_topics

    positions, kinds = plan_poison(events, poison_fraction, codec=codec, seed=seed)
    if partitions is not None:
        ensure_topics(bootstrap, {topic: partitions}, client_config=client_config)
    failures: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        # Only failed deliveries reach Python (delivery.report.only.error).
        if err is not None:
            failures.append(err.str())

    producer = _connect(bootstrap, topic, client_config, on_delivery)

    messages = _Messages(AdWorld.build(seed), seed, codec, positions, kinds, start_time_ms, track_ids)
    chunk = _CHUNK if rate is None else max(1, min(_CHUNK, round(rate * _RATE_STEP_S)))
    produce = producer.produce
    poll = producer.poll
    poison_out: list[PoisonMessage] = []
    counts: Counter[str] = Counter()
    valid_ids: list[pa.RecordBatch] = []
    sent = 0
    start = time.monotonic()

    with _progress(progress, events, f"producing to {topic}") as update:
        for item in _prefetched(messages.chunks(events, chunk), depth=_PREFETCH):
            if rate is not None:
                due = start + sent / rate
                while (wait := due - time.monotonic()) > 0:
                    poll(min(wait, 0.05))
            for value, key in zip(item.values, item.keys, strict=True):
                try:
                    produce(topic, value, key)
                except BufferError:
                    _produce_when_room(producer, topic, value, key)
            counts.update(p.kind for p in item.poison)
            if track_ids:
                poison_out += item.poison
            if item.ids is not None:
                valid_ids.append(item.ids)
            sent = item.end
            poll(0)
            update(sent)
            if failures:
                break
        remaining = producer.flush(_FLUSH_TIMEOUT_S)
    seconds = time.monotonic() - start

    if failures:
        raise SinkError(
            f"{len(failures):,} of {sent:,} messages to Kafka topic {topic} on {bootstrap} "
            f"failed delivery: {failures[0]}"
        )
    if remaining:
        raise SinkError(
            f"{remaining:,} of {events:,} messages to Kafka topic {topic} on {bootstrap} "
            f"were not acknowledged within {_FLUSH_TIMEOUT_S:.0f}s"
        )

    valid = events - sum(counts.values())
    return ProduceReport(
        bootstrap=bootstrap,
        topic=topic,
        codec=codec,
        seed=seed,
        events=events,
        valid=valid,
        counts={"valid": valid, **{k.name: counts.get(k.name, 0) for k in kinds_for(codec)}},
        poison=tuple(poison_out),
        seconds=seconds,
        valid_ids=_ids_table(valid_ids) if track_ids else None,
    )


def _produce_when_room(producer: Any, topic: str, value: bytes | None, key: str) -> None:
    """librdkafka's queue is full: serve it until the message fits (bounded by message.timeout.ms)."""
    while True:
        producer.poll(0.05)
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            continue


@dataclass
class _Chunk:
    """The next messages in production order, ready to hand to librdkafka."""

    end: int  # position after the last message of the chunk
    values: list[bytes | None]
    keys: list[str]
    ids: pa.RecordBatch | None
    poison: list[PoisonMessage]


class _Messages:
    """Every message of a run, valid and poison, chunk by chunk: deterministic for a seed and plan."""

    def __init__(
        self,
        world: Any,
        seed: int,
        codec: str,
        positions: np.ndarray,
        kinds: tuple[PoisonKind, ...],
        start_time_ms: int | None,
        track_ids: bool,
    ) -> None:
        self.codec = codec
        self.encoder = codec_for(codec)
        self.stream = world.requests(seed, start_time_ms=start_time_ms)
        self.templates = world.requests((seed + _POISON_STREAM_SALT) % 2**31, start_time_ms=start_time_ms)
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, _POISON_STREAM_SALT]))
        self.positions = positions.tolist()
        self.kinds = kinds
        self.track_ids = track_ids

    def chunks(self, events: int, size: int) -> Iterator[_Chunk]:
        next_poison = 0
        for begin in range(0, events, size):
            end = min(events, begin + size)
            first = next_poison
            while next_poison < len(self.positions) and self.positions[next_poison] < end:
                next_poison += 1
            here = self.positions[first:next_poison]
            batch = self.stream.next_batch(end - begin - len(here))
            values: list[bytes | None] = list(self.encoder.encode_batch(batch))
            keys: list[str] = batch.column("user_id").to_pylist()
            ids = batch.select(["request_id", "user_id", "seq"]) if self.track_ids else None
            poison: list[PoisonMessage] = []
            if here:
                rows = self.templates.next_batch(len(here)).to_pylist()
                for j, (position, row) in enumerate(zip(here, rows, strict=True)):
                    kind = self.kinds[first + j]
                    request_id = f"poison-{position:012d}"
                    value = kind.make({**row, "request_id": request_id}, self.codec, self.rng)
                    poison.append(
                        PoisonMessage(position, kind.name, row["user_id"], value, kind.expected(self.codec), request_id)
                    )
                # Positions ascend, so inserting in order puts each poison message at its place.
                for p in poison:
                    values.insert(p.position - begin, p.value)
                    keys.insert(p.position - begin, p.key)
            yield _Chunk(end, values, keys, ids, poison)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def _prefetched(chunks: Iterator[_Chunk], depth: int) -> Iterator[_Chunk]:
    """``chunks``, made by a background thread: generating and encoding (numpy/Arrow kernels that
    release the GIL) overlap the produce loop instead of alternating with it."""
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in chunks:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # re-raised in the caller's thread
            put(_Failed(exc))

    thread = threading.Thread(target=work, name="sluice-demo-requests", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def _ids_table(batches: list[pa.RecordBatch]) -> pa.Table:
    schema = pa.schema([AD_REQUEST_SCHEMA.field(n) for n in ("request_id", "user_id", "seq")])
    return pa.Table.from_batches(batches, schema=schema)


def demo_ad_requests_command(
    bootstrap: str,
    topic: str,
    *,
    events: int,
    rate: float | None = None,
    poison_fraction: float = 0.0,
    seed: int = 7,
    codec: str = "json",
    partitions: int | None = None,
) -> str:
    """``sluice demo-data ad-requests``: produce with a progress bar and return the summary line.

    Ids are not tracked (a demo run may be hundreds of millions of events); the valid messages are
    the first ``valid`` requests of the stream of ``seed``, which is enough to regenerate them.
    """
    report = produce_ad_requests(
        bootstrap,
        topic,
        events=events,
        rate=rate,
        poison_fraction=poison_fraction,
        seed=seed,
        codec=codec,
        partitions=partitions,
        progress=True,
        track_ids=False,
    )
    return report.summary()
