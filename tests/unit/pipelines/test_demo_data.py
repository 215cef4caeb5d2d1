"""The sample items table is the fixture of every backfill test and benchmark, so its promises are
pinned here: determinism, the contract schema, the heavy length tail the bucketing benchmark relies
on, and an exact count of poison rows."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import cache

import numpy as np
import pyarrow as pa
import pytest

from pipelines.demo_data import CATEGORIES, format_item_id, generate_items
from schemas.items import ITEMS_SCHEMA
from transforms.errors import ConfigError


@cache
def _big() -> pa.Table:
    """20k rows: enough for a stable p99 and the size the benchmarks use; generated once."""
    return generate_items(20_000)


def _word_counts(table: pa.Table) -> np.ndarray:
    return np.array([len(t.split()) for t in table.column("text").to_pylist() if t])


def test_same_seed_gives_identical_table() -> None:
    assert generate_items(500, seed=11).equals(generate_items(500, seed=11), check_metadata=True)


def test_different_seed_gives_different_texts() -> None:
    a = generate_items(500, seed=11).column("text").to_pylist()
    b = generate_items(500, seed=12).column("text").to_pylist()
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 490


def test_schema_is_the_items_contract() -> None:
    table = generate_items(50)
    assert table.schema.equals(ITEMS_SCHEMA, check_metadata=True)
    assert generate_items(0).schema.equals(ITEMS_SCHEMA, check_metadata=True)
    assert generate_items(0).num_rows == 0


def test_length_distribution_is_heavy_tailed() -> None:
    words = _word_counts(_big())
    p50, p90, p99 = np.percentile(words, [50, 90, 99])
    assert 15 <= p50 <= 25
    assert 60 <= p90 <= 100
    assert 250 <= p99 <= 400
    assert 400 <= words.max() <= 700
    assert words.min() >= 3


def test_texts_are_varied_listings() -> None:
    texts = [t for t in _big().column("text").to_pylist() if t]
    assert len(set(texts)) / len(texts) > 0.999
    titles = [t.split("\n", 1)[0] for t in texts]
    assert len(set(titles)) / len(titles) > 0.99
    # Descriptions exist for most listings and mention commerce facts, not filler.
    described = [t for t in texts if "\n" in t]
    assert len(described) / len(texts) > 0.7
    assert any("return" in t.lower() for t in described)
    assert any(c in t for t in texts[:200] for c in ("$", "€", "£"))


def test_ids_are_unique_fixed_width_and_contiguous() -> None:
    ids = _big().column("item_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert ids[0] == "item-0000000" and ids[42] == format_item_id(42) == "item-0000042"
    assert ids == sorted(ids)


def test_id_offset_shifts_ids_and_does_not_repeat_texts() -> None:
    base = generate_items(100, seed=7)
    shifted = generate_items(100, seed=7, id_offset=100)
    assert shifted.column("item_id").to_pylist() == [format_item_id(i) for i in range(100, 200)]
    assert not set(base.column("text").to_pylist()) & set(shifted.column("text").to_pylist())


@pytest.mark.parametrize(("rows", "fraction"), [(1000, 0.05), (1000, 0.001), (333, 0.1), (10, 1.0)])
def test_bad_fraction_is_exact_and_split_between_empty_and_null(rows: int, fraction: float) -> None:
    table = generate_items(rows, seed=5, bad_fraction=fraction)
    texts = table.column("text").to_pylist()
    n_bad = round(rows * fraction)
    assert texts.count("") == n_bad // 2
    assert texts.count(None) == n_bad - n_bad // 2


def test_bad_rows_leave_good_rows_untouched_and_are_spread() -> None:
    clean = generate_items(2000, seed=5).column("text").to_pylist()
    dirty = generate_items(2000, seed=5, bad_fraction=0.02).column("text").to_pylist()
    bad_pos = [i for i, t in enumerate(dirty) if not t]
    assert len(bad_pos) == 40
    assert all(d == c for d, c in zip(dirty, clean, strict=True) if d)
    # Spread over the table, not clustered at one end: every batch of a run should see some.
    assert min(bad_pos) < 500 and max(bad_pos) > 1500


def test_categories_and_timestamps_are_in_range() -> None:
    table = _big()
    assert set(table.column("category").to_pylist()) == set(CATEGORIES)
    ts = table.column("updated_at").to_pylist()
    assert min(ts) >= dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    assert max(ts) < dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "call",
    [
        lambda: generate_items(-1),
        lambda: generate_items(5, bad_fraction=1.5),
        lambda: generate_items(5, bad_fraction=-0.1),
        lambda: generate_items(5, bad_fraction=float("nan")),
        lambda: generate_items(5, id_offset=-1),
    ],
)
def test_invalid_arguments_raise_config_error(call: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        call()
