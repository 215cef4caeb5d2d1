"""The backfill against real Spark, real Delta tables on disk and a real Feast SQLite store."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from pipelines.backfill import run_backfill
from pipelines.config import BackfillConfig, load_config
from pipelines.demo_data import generate_items, mutate_items, write_items_table
from transforms.errors import ModelLoadError, QualityGateError, SinkError, SourceError
from transforms.models.artifact import resolve_artifact
from transforms.sinks.feast_online import FeastConfig, FeastOnlineSink

pytestmark = pytest.mark.spark

ROWS = 120
BAD = 0.04  # 5 rows with empty/null text


def _cfg(tmp: Path, **over: Any) -> BackfillConfig:
    data: dict[str, Any] = {
        "source": {"uri": str(tmp / "items")},
        "target": {"uri": str(tmp / "embeddings")},
        "feast": FeastConfig.local(tmp).model_dump(),
        "spark": {"progress": False, "partitions": 2},
    }
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return load_config(overrides=data, environ={})


def _target(tmp: Path) -> pa.Table:
    return DeltaTable(str(tmp / "embeddings")).to_pyarrow_table().sort_by("item_id")


@pytest.fixture
def items(tmp_path: Path) -> pa.Table:
    table = generate_items(ROWS, seed=3, bad_fraction=BAD)
    write_items_table(str(tmp_path / "items"), table)
    return table


def _good_ids(table: pa.Table) -> set[str]:
    return {r["item_id"] for r in table.to_pylist() if r["text"] and r["text"].strip()}


def test_full_run_accounts_for_every_row_and_publishes_to_delta_and_feast(spark, tmp_path, items) -> None:
    cfg = _cfg(tmp_path)
    s = run_backfill(cfg, spark)
    assert s.rows_in == ROWS
    assert s.rows_out + s.rows_quarantined == ROWS
    assert s.quarantined == {"input": ROWS - len(_good_ids(items))}

    out = _target(tmp_path)
    assert set(out.column("item_id").to_pylist()) == _good_ids(items)
    assert out.num_rows == len(_good_ids(items))  # no duplicates
    vectors = np.array(out.column("embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == (out.num_rows, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert set(out.column("model_version").to_pylist()) == {resolve_artifact("builtin:all-MiniLM-L6-v2").version}
    assert set(out.column("source_version").to_pylist()) == {0}

    q = DeltaTable(cfg.target.quarantine).to_pyarrow_table()
    assert q.num_rows == s.rows_quarantined
    assert set(q.column("check").to_pylist()) <= {"text_not_null", "text_not_empty"}
    assert all(r for r in q.column("reason").to_pylist())

    assert cfg.feast is not None
    sink = FeastOnlineSink(cfg.feast, embeddings_table_uri=cfg.target.uri, dim=384)
    ids = out.column("item_id").to_pylist()[:25]
    online = sink.lookup(ids)
    for row, vec in zip(online, vectors[:25], strict=True):
        assert row is not None
        np.testing.assert_array_equal(np.asarray(row["embedding"], dtype=np.float32), vec)


def test_rerun_is_a_no_op(spark, tmp_path, items) -> None:
    cfg = _cfg(tmp_path)
    run_backfill(cfg, spark)
    version = DeltaTable(cfg.target.uri).version()
    q_version = DeltaTable(cfg.target.quarantine).version()
    again = run_backfill(cfg, spark)
    assert again.skipped_reason is not None
    assert again.rows_in == 0
    assert DeltaTable(cfg.target.uri).version() == version
    assert DeltaTable(cfg.target.quarantine).version() == q_version
    # The online store was marked as holding that commit in full: nothing is rewritten either.
    assert again.online_written == 0 and again.online_deleted == 0
    assert _online(cfg).published_version() == version


def test_incremental_touches_only_changed_rows(spark, tmp_path, items) -> None:
    cfg = _cfg(tmp_path, mode="incremental")
    first = run_backfill(cfg, spark)  # no earlier run: a full pass
    assert first.rows_in == ROWS
    before = {r["item_id"]: r for r in _target(tmp_path).to_pylist()}

    change = mutate_items(cfg.source.uri, update_fraction=0.05, insert_rows=4, delete_rows=3, seed=5)
    s = run_backfill(cfg, spark)
    touched = set(change.updated_ids) | set(change.inserted_ids)
    assert s.rows_in == len(touched)
    assert s.rows_deleted == len(change.deleted_ids)
    after = {r["item_id"]: r for r in _target(tmp_path).to_pylist()}
    assert not set(change.deleted_ids) & set(after)
    assert set(change.inserted_ids) <= set(after)
    for item_id, row in after.items():
        if item_id in touched:
            assert row["source_version"] == change.version
        else:
            assert row == before[item_id]  # untouched rows are byte-for-byte the same
    # The online store follows the deletes too (a deleted id that was quarantined had no row).
    gone = sorted(set(change.deleted_ids) & set(before))
    assert gone and s.online_deleted == len(gone)
    assert _online(cfg).lookup(gone) == [None] * len(gone)

    # No new data: nothing read, nothing written.
    version = DeltaTable(cfg.target.uri).version()
    again = run_backfill(cfg, spark)
    assert again.skipped_reason is not None and again.rows_in == 0
    assert DeltaTable(cfg.target.uri).version() == version


def _online(cfg: BackfillConfig) -> FeastOnlineSink:
    assert cfg.feast is not None
    return FeastOnlineSink(cfg.feast, embeddings_table_uri=cfg.target.uri, dim=384)


def test_a_full_run_deletes_vanished_items_from_the_online_store(spark, tmp_path, items) -> None:
    cfg = _cfg(tmp_path, mode="full")
    run_backfill(cfg, spark)
    before = set(_target(tmp_path).column("item_id").to_pylist())
    change = mutate_items(cfg.source.uri, update_fraction=0.0, insert_rows=0, delete_rows=4, seed=8)
    s = run_backfill(cfg, spark)
    gone = sorted(set(change.deleted_ids) & before)
    assert gone and s.online_deleted == len(gone)
    assert _online(cfg).lookup(gone) == [None] * len(gone)
    kept = sorted(before - set(gone))
    assert None not in _online(cfg).lookup(kept)


def test_an_online_store_left_behind_by_a_crash_catches_up_with_the_deletes(spark, tmp_path, items) -> None:
    """A run killed after its Delta commit leaves the online store behind; the next run repairs it,
    deletes included (read back from the commit's change feed), and a replay changes nothing."""
    cfg = _cfg(tmp_path, mode="incremental")
    run_backfill(cfg, spark)
    before = set(_target(tmp_path).column("item_id").to_pylist())
    change = mutate_items(cfg.source.uri, update_fraction=0.02, insert_rows=0, delete_rows=5, seed=9)
    assert cfg.feast is not None
    delta_only = cfg.model_copy(update={"feast": cfg.feast.model_copy(update={"enabled": False})})
    run_backfill(delta_only, spark)  # what the crashed run published
    gone = sorted(set(change.deleted_ids) & before)
    assert gone and None not in _online(cfg).lookup(gone)  # still served: the store is behind

    repaired = run_backfill(cfg, spark)
    assert repaired.skipped_reason is not None
    assert repaired.online_written == len(set(change.updated_ids) & before)  # that commit's rows
    assert repaired.online_deleted == len(gone)
    assert _online(cfg).lookup(gone) == [None] * len(gone)
    replay = run_backfill(cfg, spark)
    assert (replay.online_written, replay.online_deleted) == (0, 0)


def _model_copy(tmp: Path) -> Path:
    """The same weights under a different content version (a changed config key)."""
    src = resolve_artifact("builtin:all-MiniLM-L6-v2").path
    dst = tmp / "minilm-v2"
    shutil.copytree(src, dst)
    cfg = (dst / "config.json").read_text().replace('"use_cache": true', '"use_cache": false')
    (dst / "config.json").write_text(cfg)
    return dst


def test_stale_reembeds_only_rows_of_another_model(spark, tmp_path, items) -> None:
    run_backfill(_cfg(tmp_path, mode="full"), spark)
    new_model = _model_copy(tmp_path)
    change = mutate_items(str(tmp_path / "items"), update_fraction=0.05, insert_rows=0, seed=9)
    inc = run_backfill(_cfg(tmp_path, mode="incremental", model={"source": str(new_model)}), spark)
    assert inc.rows_in == len(change.updated_ids)
    new_version = inc.model_version

    stale = run_backfill(_cfg(tmp_path, mode="stale", model={"source": str(new_model)}), spark)
    assert stale.rows_in == len(_good_ids(items)) - len(change.updated_ids) + len(_bad_ids(items))
    out = _target(tmp_path)
    assert set(out.column("model_version").to_pylist()) == {new_version}
    again = run_backfill(_cfg(tmp_path, mode="stale", model={"source": str(new_model)}), spark)
    assert again.skipped_reason is not None or again.rows_out == 0


def test_stale_leaves_rows_already_quarantined_by_this_model_alone_until_their_text_changes(
    spark, tmp_path, items
) -> None:
    """Right after a full run, every row without an embedding is one the run quarantined: a stale run
    used to re-embed just those, quarantine them again (duplicate records) and fail the quality gate
    at 100%. Now it leaves them out and says so; a fixed text brings its row back."""
    from delta.tables import DeltaTable as SparkDeltaTable

    full = run_backfill(_cfg(tmp_path, mode="full"), spark)
    bad = sorted(_bad_ids(items))
    assert full.rows_quarantined == len(bad) > 1
    quarantine = str(tmp_path / "embeddings_quarantine")

    # With progress on, as the CLI runs it: an empty stage once divided by zero in the pace.
    stale = run_backfill(_cfg(tmp_path, mode="stale", spark={"progress": True}), spark)

    assert (stale.rows_in, stale.rows_quarantined, stale.rows_settled) == (0, 0, len(bad))
    assert DeltaTable(quarantine).to_pyarrow_table().num_rows == len(bad)

    fixed = bad[0]
    SparkDeltaTable.forPath(spark, str(tmp_path / "items")).update(
        f"item_id = '{fixed}'", {"text": "'Stainless steel water bottle, 750 ml'"}
    )
    again = run_backfill(_cfg(tmp_path, mode="stale"), spark)

    assert (again.rows_in, again.rows_out, again.rows_settled) == (1, 1, len(bad) - 1)
    assert fixed in set(_target(tmp_path).column("item_id").to_pylist())


def test_stale_leaves_duplicate_ids_out_only_while_their_copies_stay_as_recorded(spark, tmp_path) -> None:
    from delta.tables import DeltaTable as SparkDeltaTable

    table = generate_items(20, seed=1)
    copies = _with_text_suffix(table.slice(0, 2), " (copy)")
    items = str(tmp_path / "items")
    write_items_table(items, pa.concat_tables([table, copies]))
    assert run_backfill(
        _cfg(tmp_path, mode="full", validation={"max_quarantine_fraction": 0.5}), spark
    ).quarantined == {"input": 4}
    stale_cfg = _cfg(tmp_path, mode="stale", validation={"max_quarantine_fraction": 1.0})

    unchanged = run_backfill(stale_cfg, spark)
    assert (unchanged.rows_in, unchanged.rows_settled) == (0, 4)

    # A third copy: the id is still duplicated, so the new row is quarantined as one, not embedded
    # as the id's only row, and the two recorded copies stay settled.
    third = _with_text_suffix(table.slice(0, 1), " (third)")
    write_deltalake(items, third, mode="append")
    joined = run_backfill(stale_cfg, spark)
    assert (joined.rows_in, joined.quarantined, joined.rows_settled) == (1, {"input": 1}, 4)
    duplicated_id = table.column("item_id")[0].as_py()
    assert duplicated_id not in set(_target(tmp_path).column("item_id").to_pylist())

    SparkDeltaTable.forPath(spark, items).delete("text LIKE '% (copy)' OR text LIKE '% (third)'")
    resolved = run_backfill(stale_cfg, spark)

    assert (resolved.rows_in, resolved.rows_out, resolved.rows_settled) == (2, 2, 0)
    assert set(copies.column("item_id").to_pylist()) <= set(_target(tmp_path).column("item_id").to_pylist())


def _with_text_suffix(rows: pa.Table, suffix: str) -> pa.Table:
    texts = pa.array([f"{t}{suffix}" for t in rows.column("text").to_pylist()])
    return rows.set_column(rows.schema.get_field_index("text"), "text", texts)


def _bad_ids(table: pa.Table) -> set[str]:
    return {r["item_id"] for r in table.to_pylist()} - _good_ids(table)


def test_quality_gate_publishes_nothing_but_the_quarantine(spark, tmp_path, items) -> None:
    cfg = _cfg(tmp_path, validation={"max_quarantine_fraction": 0.01})
    with pytest.raises(QualityGateError, match="quarantined"):
        run_backfill(cfg, spark)
    assert not DeltaTable.is_deltatable(cfg.target.uri)
    assert DeltaTable(cfg.target.quarantine).to_pyarrow_table().num_rows == len(_bad_ids(items))


def test_duplicate_source_ids_are_quarantined_not_published(spark, tmp_path) -> None:
    table = generate_items(20, seed=1)
    dup = pa.concat_tables([table, table.slice(0, 2)])
    write_items_table(str(tmp_path / "items"), dup)
    s = run_backfill(_cfg(tmp_path, validation={"max_quarantine_fraction": 0.5}), spark)
    assert s.rows_out == 18 and s.quarantined == {"input": 4}
    q = DeltaTable(str(tmp_path / "embeddings_quarantine")).to_pyarrow_table()
    assert set(q.column("check").to_pylist()) == {"id_unique"}


def test_bad_inputs_fail_before_writing(spark, tmp_path, items) -> None:
    with pytest.raises(SourceError, match="no Delta table"):
        run_backfill(_cfg(tmp_path, source={"uri": str(tmp_path / "missing")}), spark)
    with pytest.raises(SourceError, match="missing column 'body'"):
        run_backfill(_cfg(tmp_path, source={"text_column": "body"}), spark)
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        run_backfill(
            _cfg(
                tmp_path,
                model={
                    "source": str(bad_model),
                    "tokenizer": str(bad_model),
                    "model_class": "torch.nn:Linear",
                },
            ),
            spark,
        )
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SinkError, match="not writable"):
        run_backfill(_cfg(tmp_path, target={"uri": str(blocker / "embeddings")}), spark)
    assert not DeltaTable.is_deltatable(str(tmp_path / "embeddings"))


def test_a_second_target_beside_the_first_cannot_take_over_its_feature_view(
    spark, tmp_path, items, caplog: pytest.LogCaptureFixture
) -> None:
    """The default Feast registry lives beside the target, so two targets in one directory share
    it: the second run once re-pointed the view and overwrote the first's online rows."""
    first = _cfg(tmp_path)
    run_backfill(first, spark)
    assert first.feast is not None
    sink = FeastOnlineSink(first.feast, embeddings_table_uri=first.target.uri, dim=384)
    ids = _target(tmp_path).column("item_id").to_pylist()
    before = sink.lookup(ids)

    second = _cfg(tmp_path, target={"uri": str(tmp_path / "embeddings_b")})
    with pytest.raises(SinkError, match=r"already serves .*/embeddings, not .*/embeddings_b: give this table"):
        run_backfill(second, spark)

    # The refusal stopped the embedding jobs and published nothing anywhere.
    assert any("cancelling the run's Spark jobs" in r.getMessage() for r in caplog.records)
    assert not DeltaTable.is_deltatable(second.target.uri)
    assert not DeltaTable.is_deltatable(second.target.quarantine)
    assert sink.lookup(ids) == before
    # The session is fine after the cancellation, and the same target with its own view runs.
    assert second.feast is not None
    own = second.model_copy(update={"feast": second.feast.model_copy(update={"feature_view": "item_embeddings_b"})})
    assert run_backfill(own, spark).rows_out == len(_good_ids(items))


def test_redis_profile_serves_the_same_vectors_as_delta(spark, tmp_path, items, redis_server) -> None:
    feast = FeastConfig.local(tmp_path, online_store={"type": "redis", "connection_string": redis_server})
    cfg = _cfg(tmp_path, feast=feast.model_dump())
    s = run_backfill(cfg, spark)
    assert s.online_written == s.rows_out
    out = _target(tmp_path)
    sink = FeastOnlineSink(feast, embeddings_table_uri=cfg.target.uri, dim=384)
    ids = out.column("item_id").to_pylist()
    online = sink.lookup(ids)
    expected = np.array(out.column("embedding").to_pylist(), dtype=np.float32)
    got = np.array([row["embedding"] for row in online if row is not None], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
