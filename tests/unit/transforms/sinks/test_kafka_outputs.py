"""Pure logic of the Kafka sink: the scores' JSON encoding (what the column-wise Arrow encoder
writes must parse back to the row, for strings that need escaping and floats at float32's edges
alike), and the daemon thread that bounds librdkafka calls which ignore their timeout."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, date, datetime

import numpy as np
import pyarrow as pa
import pytest

from schemas.scores import SCORES_SCHEMA
from transforms.errors import SinkError
from transforms.sinks.kafka_outputs import _DaemonCaller, encode_scores

TRICKY = ["plain", 'quote " inside', "back\\slash", "new\nline\ttab\x01ctl", "é ü 漢字 😀", "\u2028sep", ""]
FLOATS = [0.1, 1e-7, 3.4028235e38, 1.17549435e-38, 0.0, -0.0, 0.5, 0.999999940395]


def rows(n: int) -> pa.Table:
    t = datetime(2026, 3, 1, 0, 0, 0, 1, tzinfo=UTC)
    return pa.Table.from_pydict(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "user_id": [TRICKY[i % len(TRICKY)] for i in range(n)],
            "ad_id": [TRICKY[(i + 3) % len(TRICKY)] for i in range(n)],
            "seq": [2**40 + i for i in range(n)],
            "score": [FLOATS[i % len(FLOATS)] for i in range(n)],
            "model_name": ["ctr"] * n,
            "model_version": ["sha256:abc"] * n,
            "topic": ["ad-requests"] * n,
            "partition": [i % 3 for i in range(n)],
            "offset": list(range(n)),
            "event_time": [t] * n,
            "scored_at": [datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)] * n,
            "event_date": [date(2026, 3, 1)] * n,
        },
        schema=SCORES_SCHEMA,
    )


def test_every_row_parses_back_to_itself() -> None:
    table = rows(40)
    keys, values = encode_scores(table)
    assert keys == table["request_id"].to_pylist()
    for row, value in zip(table.to_pylist(), values, strict=True):
        got = json.loads(value)
        assert list(got) == SCORES_SCHEMA.names  # schema order
        assert np.float32(got.pop("score")) == np.float32(row.pop("score"))
        assert got.pop("event_time") == "2026-03-01T00:00:00.000001Z"
        assert got.pop("scored_at") == "1969-12-31T23:59:59.999999Z"
        assert got.pop("event_date") == "2026-03-01"
        row = {k: v for k, v in row.items() if k not in ("event_time", "scored_at", "event_date")}
        assert got == row


def test_chunked_columns_and_record_batches_encode_alike() -> None:
    table = rows(10)
    chunked = pa.concat_tables([table.slice(0, 4), table.slice(4)])
    assert chunked["user_id"].num_chunks == 2
    assert encode_scores(chunked) == encode_scores(table) == encode_scores(table.to_batches()[0])


def test_scores_use_the_shortest_float32_text() -> None:
    _, values = encode_scores(rows(2))
    assert '"score":0.1,' in values[0] and '"score":1e-7,' in values[1]


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("score", float("nan"), "non-finite score"),
        ("score", float("inf"), "non-finite score"),
        ("user_id", None, "nulls in non-null column"),
        ("event_time", None, "nulls in non-null column"),
    ],
)
def test_values_json_cannot_carry_are_refused(column: str, value: object, message: str) -> None:
    table = rows(3)
    i = table.schema.get_field_index(column)
    field = table.schema.field(i).with_nullable(True)
    col = table[column].to_pylist()
    col[1] = value
    table = table.set_column(i, field, pa.array(col, field.type))
    with pytest.raises(SinkError, match=message):
        encode_scores(table)


def test_a_missing_column_is_refused() -> None:
    with pytest.raises(SinkError, match="lack column"):
        encode_scores(rows(2).drop_columns(["event_date"]))


def test_the_daemon_caller_returns_raises_and_stops_waiting_for_a_stuck_call() -> None:
    caller = _DaemonCaller("test-caller")
    assert caller.call(lambda: 41 + 1, 5.0) == 42
    with pytest.raises(ZeroDivisionError):
        caller.call(lambda: 1 // 0, 5.0)
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(FutureTimeout):
        caller.call(lambda: release.wait(30), 0.2)  # as a librdkafka call that ignores its timeout
    assert time.monotonic() - started < 5
    release.set()
    assert caller.call(lambda: "served after the stuck call ended", 5.0).startswith("served")
    caller.stop()
