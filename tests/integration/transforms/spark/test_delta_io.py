"""Idempotent Delta writes through real Spark (transforms/spark/delta_io.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from deltalake import DeltaTable

from transforms.spark import delta_io

pytestmark = pytest.mark.spark

DIM = 4


def _changes(spark, rows: list[tuple[str, str, float]]):  # type: ignore[no-untyped-def]
    now = datetime(2026, 1, 1, tzinfo=UTC)
    data = [(i, [v] * DIM, "m", "v1", 1, now, op) for i, op, v in rows]
    return spark.createDataFrame(
        data,
        "item_id string, embedding array<float>, model_name string, model_version string, "
        "source_version long, processed_at timestamp, _op string",
    )


def _merge(spark, uri: str, rows: list[tuple[str, str, float]], version: int, *, delete_missing: bool = False) -> None:  # type: ignore[no-untyped-def]
    delta_io.merge_embeddings(
        spark,
        uri,
        _changes(spark, rows),
        delete_missing=delete_missing,
        app_id="test-app",
        version=version,
        user_metadata="{}",
    )


def _state(uri: str) -> dict[str, float]:
    t = DeltaTable(uri).to_pyarrow_table()
    return {r["item_id"]: r["embedding"][0] for r in t.to_pylist()}


def test_first_write_appends_then_merges_and_replays_are_skipped(spark, tmp_path: Path) -> None:
    uri = str(tmp_path / "emb")
    delta_io.ensure_embeddings_table(spark, uri, DIM)
    assert delta_io.holds_no_rows(uri)

    _merge(spark, uri, [("a", delta_io.UPSERT, 1.0), ("b", delta_io.UPSERT, 2.0), ("z", delta_io.DELETE, 0.0)], 1)
    history = DeltaTable(uri).history()
    assert history[0]["operation"] == "WRITE", "an empty target takes a plain append, not a MERGE"
    assert _state(uri) == {"a": 1.0, "b": 2.0}, "deletes against an empty table delete nothing"
    assert not delta_io.holds_no_rows(uri)

    before = DeltaTable(uri).version()
    _merge(spark, uri, [("a", delta_io.UPSERT, 9.0)], 1)  # replay of the same app transaction
    assert DeltaTable(uri).version() == before and _state(uri) == {"a": 1.0, "b": 2.0}

    _merge(spark, uri, [("a", delta_io.UPSERT, 3.0), ("b", delta_io.DELETE, 0.0), ("c", delta_io.UPSERT, 4.0)], 2)
    assert DeltaTable(uri).history()[0]["operation"] == "MERGE"
    assert _state(uri) == {"a": 3.0, "c": 4.0}

    _merge(spark, uri, [("c", delta_io.UPSERT, 5.0)], 3, delete_missing=True)
    assert _state(uri) == {"c": 5.0}


def test_holds_no_rows_is_false_where_it_cannot_tell(tmp_path: Path) -> None:
    assert not delta_io.holds_no_rows(str(tmp_path / "missing"))
