"""What every scoring runner's end-to-end tests check after the dust settles (shared by the
consumer and the Spark stream tests, so both are held to the same invariants).

* Delta holds every valid request exactly once (count, distinct ids, the exact id set), and per
  user the sequence numbers have no gaps and no repeats.
* The dead-letter topic holds exactly the poison messages, once each, with their reasons.
* The scores topic (read_committed) holds every valid request exactly once.
* Every input is accounted for: scored + quarantined + dead-lettered == produced.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from deltalake import DeltaTable

from pipelines.demo_ad_requests import ProduceReport
from schemas.scores import (
    DLQ_HEADER_ERROR_CLASS,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_STAGE,
)


@dataclass
class TopicMessage:
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    headers: dict[str, str]


def read_topic(bootstrap: str, topic: str, *, timeout_s: float = 30.0) -> list[TopicMessage]:
    """Every committed message of ``topic`` (read_committed, from the beginning to the end)."""
    import time
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from transforms.kafka_admin import watermarks

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = sorted(meta.partitions)
        ends = {}
        for p in parts:
            _, high = watermarks(consumer, topic, p, timeout_s=10)
            ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[TopicMessage] = []
        done = {p for p in parts if ends[p] == 0}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(parts) and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=0.5):
                if m.error():
                    continue
                headers = {k: (v or b"").decode() for k, v in (m.headers() or [])}
                out.append(TopicMessage(m.key(), m.value(), m.partition(), m.offset(), headers))
                if m.offset() >= ends[m.partition()] - 1:
                    done.add(m.partition())
            for p in parts:  # transaction markers occupy offsets: the position tells the truth
                if p not in done and consumer.position([TopicPartition(topic, p)])[0].offset >= ends[p]:
                    done.add(p)
        assert len(done) == len(parts), f"could not read {topic} to its end within {timeout_s} s"
        return out
    finally:
        consumer.close()


def check_outputs(
    report: ProduceReport,
    *,
    bootstrap: str,
    target: Path,
    scores_topic: str,
    dlq_topic: str,
    quarantine: Path | None = None,
) -> dict[str, Any]:
    """Assert the runner's outputs are exactly right for what ``report`` says was produced."""
    assert report.valid_ids is not None
    valid = report.valid_request_ids()
    table = DeltaTable(str(target)).to_pyarrow_table(columns=["request_id", "user_id", "seq", "model_version"])
    ids = table.column("request_id").to_pylist()
    counts = Counter(ids)
    dupes = [i for i, n in counts.items() if n > 1]
    assert not dupes, f"{len(dupes)} requests are in Delta more than once, e.g. {dupes[:5]}"
    quarantined: set[str] = set()
    if quarantine is not None and DeltaTable.is_deltatable(str(quarantine)):
        q = DeltaTable(str(quarantine)).to_pyarrow_table(columns=["request_id"])
        quarantined = set(q.column("request_id").to_pylist())
    assert set(ids) | quarantined == valid, (
        f"Delta+quarantine differ from the valid requests: {len(valid - set(ids) - quarantined)} missing, "
        f"{len(set(ids) - valid)} unexpected"
    )
    _check_sequences(table)

    poison = report.poison
    dlq = read_topic(bootstrap, dlq_topic)
    scored = read_topic(bootstrap, scores_topic)
    topic_ids = Counter((m.key or b"").decode() for m in scored)
    got = Counter((m.value, m.headers.get(DLQ_HEADER_STAGE), m.headers.get(DLQ_HEADER_ERROR_CLASS)) for m in dlq)
    want = Counter((p.value, p.expected.stage, p.expected.error_class) for p in poison)
    assert got == want, (
        f"DLQ differs from the poison produced: {len(dlq)} messages vs {len(poison)} poison;"
        f" {_dlq_difference(dlq, got, want, topic_ids)}"
    )
    positions = [(m.headers[DLQ_HEADER_SOURCE_PARTITION], m.headers[DLQ_HEADER_SOURCE_OFFSET]) for m in dlq]
    assert len(set(positions)) == len(positions), "a source position was dead-lettered twice"

    twice = sorted(i for i, n in topic_ids.items() if n > 1)
    assert not twice, f"{len(twice)} requests are on the scores topic more than once, e.g. {twice[:5]}"
    assert set(topic_ids) == set(ids), "the scores topic and Delta disagree"
    assert len(ids) + len(quarantined) + len(dlq) == report.events
    return {"delta": len(ids), "quarantined": len(quarantined), "dlq": len(dlq), "scores_topic": len(topic_ids)}


def _dlq_difference(dlq: list[TopicMessage], got: Counter[Any], want: Counter[Any], topic_ids: Counter[str]) -> str:
    """Which dead letters are extra or missing, where they came from and where they landed, and
    whether the scores topic has repeats too: a replayed batch shows on both, a repeated input
    message only on the DLQ (different source offsets), a repeated produce at the same source
    offset."""
    extra, missing = got - want, want - got
    where = [
        f"{m.value!r:.60} from {m.headers.get(DLQ_HEADER_SOURCE_PARTITION)}@{m.headers.get(DLQ_HEADER_SOURCE_OFFSET)}"
        f" at dlq[{m.partition}]@{m.offset} headers {sorted(m.headers.items())}"
        for m in dlq
        if (m.value, m.headers.get(DLQ_HEADER_STAGE), m.headers.get(DLQ_HEADER_ERROR_CLASS)) in extra
    ]
    repeats = sum(1 for n in topic_ids.values() if n > 1)
    return (
        f"{sum(extra.values())} extra, {sum(missing.values())} missing; the extra ones' copies: {where[:6]};"
        f" requests on the scores topic more than once: {repeats}"
    )


def _check_sequences(table: pa.Table) -> None:
    by_user: dict[str, list[int]] = {}
    for user, seq in zip(table.column("user_id").to_pylist(), table.column("seq").to_pylist(), strict=True):
        by_user.setdefault(user, []).append(seq)
    for user, seqs in by_user.items():
        seqs.sort()
        assert seqs == list(range(len(seqs))), f"user {user}: sequence numbers have gaps or repeats: {seqs[:20]}"


def check_run_outputs(report: ProduceReport, *, bootstrap: str, tmp: Path, topic: str) -> dict[str, Any]:
    """:func:`check_outputs` on the tables and topics the recovery tests' configs name for ``topic``:
    ``tmp/scores`` (+ ``_quarantine``), ``<topic>.scores`` and ``<topic>.dlq``."""
    return check_outputs(
        report,
        bootstrap=bootstrap,
        target=tmp / "scores",
        quarantine=tmp / "scores_quarantine",
        scores_topic=f"{topic}.scores",
        dlq_topic=f"{topic}.dlq",
    )


def write_config(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path
