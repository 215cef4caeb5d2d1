"""The driver's split of a collected micro-batch back into the three scoring outputs."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pyarrow as pa
import pytest

from schemas.scores import DEAD_LETTER_SCHEMA, SCORES_QUARANTINE_SCHEMA, SCORES_SCHEMA
from transforms.errors import SinkError
from transforms.spark.score import DEAD_LETTER, QUARANTINED, SCORED, _combine, combined_schema, split_outputs

T = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _rows(schema: pa.Schema, n: int) -> pa.Table:
    """``n`` rows of ``schema`` with a value in every column (types taken from the schema)."""
    samples = {
        pa.string(): "x",
        pa.binary(): b"v",
        pa.int64(): 7,
        pa.int32(): 3,
        pa.float32(): 0.25,
        pa.timestamp("us", tz="UTC"): T,
        pa.date32(): date(2026, 3, 1),
    }
    return pa.table({f.name: pa.array([samples[f.type]] * n, f.type) for f in schema}, schema=schema)


def test_split_undoes_the_workers_combination() -> None:
    parts = {
        SCORED: _rows(SCORES_SCHEMA, 3),
        DEAD_LETTER: _rows(DEAD_LETTER_SCHEMA, 2),
        QUARANTINED: _rows(SCORES_QUARANTINE_SCHEMA, 1),
    }
    combined = pa.Table.from_batches([_combine({k: t.to_batches()[0] for k, t in parts.items()}, combined_schema())])

    out = split_outputs(combined)

    for kind, table in parts.items():
        assert out[kind].schema.equals(table.schema, check_metadata=True), kind
        assert out[kind].equals(table), kind


def test_an_empty_output_comes_back_empty_in_its_schema() -> None:
    combined = pa.Table.from_batches([_combine({SCORED: _rows(SCORES_SCHEMA, 2).to_batches()[0]}, combined_schema())])

    out = split_outputs(combined)

    assert out[SCORED].num_rows == 2
    assert out[QUARANTINED].num_rows == 0 and out[QUARANTINED].schema.equals(SCORES_QUARANTINE_SCHEMA)


def test_a_null_where_the_output_forbids_one_fails_before_any_write() -> None:
    scores = _rows(SCORES_SCHEMA, 2)
    broken = scores.set_column(
        scores.schema.get_field_index("request_id"), pa.field("request_id", pa.string()), pa.array(["r", None])
    )
    combined = pa.Table.from_batches([_combine({SCORED: broken.to_batches()[0]}, combined_schema())])

    with pytest.raises(SinkError, match=r"score rows .*request_id"):
        split_outputs(combined)
