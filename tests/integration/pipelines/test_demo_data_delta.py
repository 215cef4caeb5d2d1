"""The seeded items table on a real (local) Delta table via delta-rs: written with Change Data Feed
on, refused over an existing path, and mutated in one commit whose CDF the incremental backfill
reads."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from pipelines.demo_data import format_item_id, generate_items, mutate_items, write_items_table
from schemas.items import ITEMS_SCHEMA
from transforms.errors import ConfigError, SinkError, SourceError

_CDF = "delta.enableChangeDataFeed"


def _read(uri: str) -> pa.Table:
    table = DeltaTable(uri).to_pyarrow_table().sort_by("item_id")
    return table.cast(ITEMS_SCHEMA.remove_metadata())


def _changes_by_kind(uri: str, version: int) -> dict[str, set[str]]:
    cdf = pa.table(DeltaTable(uri).load_cdf(starting_version=version, ending_version=version))
    kinds: dict[str, set[str]] = defaultdict(set)
    for item_id, kind in zip(cdf.column("item_id").to_pylist(), cdf.column("_change_type").to_pylist(), strict=True):
        kinds[kind].add(item_id)
    return dict(kinds)


@pytest.fixture
def items_uri(tmp_path: Path) -> str:
    uri = str(tmp_path / "items")
    assert write_items_table(uri, generate_items(300, seed=7, bad_fraction=0.02)) == 0
    return uri


def test_written_table_reads_back_equal_with_cdf_on(items_uri: str) -> None:
    expected = generate_items(300, seed=7, bad_fraction=0.02)
    assert _read(items_uri).equals(expected.cast(ITEMS_SCHEMA.remove_metadata()))
    dt = DeltaTable(items_uri)
    assert dt.metadata().configuration.get(_CDF) == "true"
    assert dt.schema().to_arrow().field("item_id").nullable is False


def test_initial_version_is_all_inserts_in_cdf(items_uri: str) -> None:
    assert _changes_by_kind(items_uri, 0) == {"insert": {format_item_id(i) for i in range(300)}}


def test_mode_error_on_existing_table_raises_one_line_and_writes_nothing(items_uri: str) -> None:
    with pytest.raises(SinkError) as info:
        write_items_table(items_uri, generate_items(10, seed=1))
    message = str(info.value)
    assert "\n" not in message
    assert items_uri in message and "overwrite" in message
    assert DeltaTable(items_uri).version() == 0
    assert DeltaTable(items_uri).count() == 300


def test_mode_overwrite_replaces_rows_and_keeps_cdf(items_uri: str) -> None:
    replacement = generate_items(40, seed=99)
    assert write_items_table(items_uri, replacement, mode="overwrite") == 1
    assert _read(items_uri).equals(replacement.cast(ITEMS_SCHEMA.remove_metadata()))
    assert DeltaTable(items_uri).metadata().configuration.get(_CDF) == "true"


def test_overwrite_turns_cdf_on_for_a_table_created_without_it(tmp_path: Path) -> None:
    uri = str(tmp_path / "plain")
    write_deltalake(uri, generate_items(5, seed=1))
    version = write_items_table(uri, generate_items(8, seed=2), mode="overwrite")
    dt = DeltaTable(uri)
    assert dt.metadata().configuration.get(_CDF) == "true"
    assert version == dt.version() and dt.count() == 8
    assert _changes_by_kind(uri, version)["insert"] == {format_item_id(i) for i in range(8)}


def test_non_delta_directory_is_refused_in_both_modes(tmp_path: Path) -> None:
    target = tmp_path / "not_delta"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    for mode in ("error", "overwrite"):
        with pytest.raises(SinkError, match="not a Delta table"):
            write_items_table(str(target), generate_items(3), mode=mode)  # type: ignore[arg-type]
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_unwritable_path_raises_one_line_sink_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    uri = str(blocker / "items")
    with pytest.raises(SinkError) as info:
        write_items_table(uri, generate_items(3))
    assert "\n" not in str(info.value) and uri in str(info.value)


def test_empty_existing_directory_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert write_items_table(str(tmp_path / "empty"), generate_items(3)) == 0


def test_mutate_items_is_one_commit_with_the_expected_cdf(items_uri: str) -> None:
    before = _read(items_uri)
    summary = mutate_items(items_uri, update_fraction=0.1, insert_rows=15, delete_rows=5, seed=3)

    assert (len(summary.updated_ids), len(summary.inserted_ids), len(summary.deleted_ids)) == (30, 15, 5)
    assert not set(summary.updated_ids) & set(summary.deleted_ids)
    assert summary.inserted_ids == tuple(format_item_id(i) for i in range(300, 315))
    assert summary.upserted_ids == summary.updated_ids + summary.inserted_ids
    assert (summary.previous_version, summary.version) == (0, 1)
    dt = DeltaTable(items_uri)
    assert dt.version() == 1 and dt.history(1)[0]["operation"] == "MERGE"

    assert _changes_by_kind(items_uri, summary.version) == {
        "update_preimage": set(summary.updated_ids),
        "update_postimage": set(summary.updated_ids),
        "insert": set(summary.inserted_ids),
        "delete": set(summary.deleted_ids),
    }

    after = _read(items_uri)
    assert after.num_rows == 300 + 15 - 5
    old = {r["item_id"]: r for r in before.to_pylist()}
    new = {r["item_id"]: r for r in after.to_pylist()}
    assert not set(summary.deleted_ids) & new.keys()
    newest_before = max(r["updated_at"] for r in old.values())
    for item_id in summary.updated_ids:
        assert new[item_id]["text"] and new[item_id]["text"] != old[item_id]["text"]
        assert new[item_id]["category"] == old[item_id]["category"]
        assert new[item_id]["updated_at"] > newest_before
    for item_id in summary.inserted_ids:
        assert new[item_id]["text"] and new[item_id]["updated_at"] > newest_before
    untouched = old.keys() - set(summary.updated_ids) - set(summary.deleted_ids)
    assert all(new[i] == old[i] for i in untouched)


def test_mutate_items_is_deterministic(tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        uri = str(tmp_path / name)
        write_items_table(uri, generate_items(120, seed=4))
        summary = mutate_items(uri, update_fraction=0.25, insert_rows=7, delete_rows=3, seed=9)
        results.append((summary.updated_ids, summary.inserted_ids, summary.deleted_ids, _read(uri)))
    (*ids_a, table_a), (*ids_b, table_b) = results
    assert ids_a == ids_b
    assert table_a.equals(table_b)


def test_successive_mutations_continue_ids_and_versions(items_uri: str) -> None:
    first = mutate_items(items_uri, update_fraction=0.0, insert_rows=4, seed=1)
    second = mutate_items(items_uri, update_fraction=0.05, insert_rows=4, delete_rows=2, seed=2)
    assert first.inserted_ids[-1] == format_item_id(303)
    assert second.inserted_ids[0] == format_item_id(304)
    assert (first.version, second.version) == (1, 2)
    assert _changes_by_kind(items_uri, 1) == {"insert": set(first.inserted_ids)}


def test_mutate_items_with_nothing_to_do_commits_nothing(items_uri: str) -> None:
    summary = mutate_items(items_uri, update_fraction=0.0, insert_rows=0, seed=1)
    assert summary.version == summary.previous_version == 0
    assert DeltaTable(items_uri).version() == 0


def test_mutate_items_on_missing_table_raises_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read items table"):
        mutate_items(str(tmp_path / "missing"), update_fraction=0.1, insert_rows=1, seed=1)


def test_mutate_items_refuses_to_delete_more_than_exists(items_uri: str) -> None:
    with pytest.raises(ConfigError, match="only 300 rows"):
        mutate_items(items_uri, update_fraction=0.5, insert_rows=0, delete_rows=200, seed=1)
    assert DeltaTable(items_uri).version() == 0
