"""Which existing Delta tables the offset-tracked sink accepts (pure logic over Arrow schemas)."""

from __future__ import annotations

import pyarrow as pa

from transforms.sinks.delta_offsets import app_id, schema_problems

WANTED = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("note", pa.string()),
    ]
)


def test_the_same_logical_types_in_other_arrow_spellings_are_accepted() -> None:
    # What delta-rs reads back (large/view strings, another UTC spelling), and Spark's all-nullable columns.
    table = pa.schema(
        [
            pa.field("id", pa.string_view()),
            pa.field("at", pa.timestamp("us", tz="+00:00")),
            pa.field("note", pa.large_string()),
        ]
    )
    assert schema_problems(table, WANTED, [], []) == []


def test_each_incompatibility_is_named() -> None:
    table = pa.schema(
        [
            pa.field("id", pa.int64()),
            pa.field("at", pa.timestamp("us")),
            pa.field("note", pa.string(), nullable=False),
            pa.field("extra", pa.int8()),
        ]
    )
    assert schema_problems(table, WANTED, ["id"], []) == [
        "column 'id' is int64, expected string",
        "column 'at' is timestamp[us], expected timestamp[us, tz=UTC]",
        "column 'note' is NOT NULL in the table but nullable here",
        "unexpected column(s) 'extra'",
        "partitioned by ['id'], expected []",
    ]
    assert schema_problems(WANTED.remove(2), WANTED, [], []) == ["missing column 'note'"]


def test_app_ids_name_the_partition() -> None:
    assert app_id("sluice-consume:g", "ad-requests", 3) == "sluice-consume:g:ad-requests:3"
