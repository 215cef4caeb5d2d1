"""Output validation against real Great Expectations (no mocks).

The expected verdicts come from a plain-Python oracle over ``to_pylist()`` rows, so the tests
check GX's row attribution and the vectorised per-row facts against an independent reading of
the suite's rules, not against the implementation's own arithmetic.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from schemas.embeddings import embeddings_schema
from schemas.expectations import embedding_expectations
from transforms.errors import ConfigError, SluiceError
from transforms.validation import (
    CHECK_COLUMN,
    REASON_COLUMN,
    EmbeddingValidator,
    ValidationOutcome,
    _GxRuntime,
)

DIM = 8
TOL = 1e-3
CHECKS = ("id_not_null", "id_unique", "embedding_not_null", "dimension", "finite", "unit_norm")


@pytest.fixture(scope="module")
def validator() -> EmbeddingValidator:
    return EmbeddingValidator(dim=DIM, norm_tolerance=TOL)


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def vector_type(kind: str, dim: int) -> pa.DataType:
    return {
        "fixed": pa.list_(pa.float32(), dim),
        "list": pa.list_(pa.float32()),
        "large_list": pa.large_list(pa.float32()),
    }[kind]


def make_rows(n: int, dim: int = DIM, seed: int = 0) -> list[dict[str, Any]]:
    vectors = unit_vectors(n, dim, seed)
    return [
        {
            "item_id": f"item-{i}",
            "embedding": [float(x) for x in vectors[i]],
            "model_name": "minilm",
            "source_version": 7,
            "payload": {"a": i, "b": [i, i + 1]},
        }
        for i in range(n)
    ]


def to_batch(rows: list[dict[str, Any]], kind: str = "list", dim: int = DIM) -> pa.RecordBatch:
    schema = pa.schema(
        [
            pa.field("item_id", pa.string()),
            pa.field("embedding", vector_type(kind, dim)),
            pa.field("model_name", pa.string()),
            pa.field("source_version", pa.int64()),
            pa.field("payload", pa.struct([("a", pa.int64()), ("b", pa.list_(pa.int64()))])),
        ],
        metadata={"sluice.schema": "test"},
    )
    return pa.RecordBatch.from_pylist(rows, schema=schema)


def oracle(rows: list[dict[str, Any]], dim: int = DIM, tol: float = TOL) -> list[list[str]]:
    """The failed checks of each row, in suite order, read straight off the rules."""
    id_counts = Counter(r["item_id"] for r in rows if r["item_id"] is not None)
    verdicts = []
    for r in rows:
        failed = []
        if r["item_id"] is None:
            failed.append("id_not_null")
        elif id_counts[r["item_id"]] > 1:
            failed.append("id_unique")
        vec = r["embedding"]
        if vec is None:
            failed.append("embedding_not_null")
        else:
            if len(vec) != dim:
                failed.append("dimension")
            if any(x is None or not math.isfinite(x) for x in vec):
                failed.append("finite")
            elif abs(math.sqrt(sum(x * x for x in vec)) - 1.0) > tol:
                failed.append("unit_norm")
        verdicts.append(failed)
    return verdicts


def assert_matches_oracle(outcome: ValidationOutcome, batch: pa.RecordBatch, rows: list[dict[str, Any]]) -> None:
    expected = oracle(rows)
    assert outcome.valid.num_rows + outcome.rejected.num_rows == batch.num_rows
    assert outcome.valid.schema == batch.schema
    assert outcome.rejected.schema.names == [*batch.schema.names, CHECK_COLUMN, REASON_COLUMN]

    expected_valid = [r for r, f in zip(rows, expected, strict=True) if not f]
    expected_rejected = [(r, f) for r, f in zip(rows, expected, strict=True) if f]
    assert outcome.valid.to_pylist() == batch.filter(pa.array([not f for f in expected])).to_pylist()
    assert len(expected_valid) == outcome.valid.num_rows

    rejected = outcome.rejected.to_pylist()
    assert [r[CHECK_COLUMN].split(",") for r in rejected] == [f for _, f in expected_rejected]
    for got, (_, failed) in zip(rejected, expected_rejected, strict=True):
        assert len(got[REASON_COLUMN].split("; ")) == len(failed)
    assert dict(outcome.counts) == {c: sum(c in f for f in expected) for c in CHECKS}


def rejected_by_id(outcome: ValidationOutcome) -> dict[str | None, dict[str, Any]]:
    return {r["item_id"]: r for r in outcome.rejected.to_pylist()}


@pytest.mark.parametrize("kind", ["fixed", "list", "large_list"])
def test_clean_batch_passes_wholly(validator: EmbeddingValidator, kind: str) -> None:
    rows = make_rows(50)
    batch = to_batch(rows, kind)
    outcome = validator.validate(batch)
    assert outcome.ok
    assert outcome.valid.equals(batch)
    assert outcome.valid.schema.metadata == batch.schema.metadata
    assert outcome.rejected.num_rows == 0
    assert dict(outcome.counts) == dict.fromkeys(CHECKS, 0)


def test_core_output_schema_passes(validator: EmbeddingValidator) -> None:
    schema = embeddings_schema(DIM)
    vectors = unit_vectors(3, DIM)
    batch = pa.RecordBatch.from_pydict(
        {
            "item_id": ["a", "b", "c"],
            "embedding": [list(map(float, v)) for v in vectors],
            "model_name": ["m"] * 3,
            "model_version": ["sha256:0"] * 3,
            "source_version": [1, 1, 1],
            "processed_at": [0, 0, 0],
        },
        schema=schema,
    )
    outcome = validator.validate(batch)
    assert outcome.ok and outcome.valid.schema == schema


def test_null_id(validator: EmbeddingValidator) -> None:
    rows = make_rows(5)
    rows[2]["item_id"] = None
    outcome = validator.validate(to_batch(rows))
    [bad] = outcome.rejected.to_pylist()
    assert bad[CHECK_COLUMN] == "id_not_null"
    assert bad[REASON_COLUMN] == "item_id is null"
    assert bad["embedding"] == pytest.approx(rows[2]["embedding"])


def test_all_copies_of_a_duplicate_id_are_rejected(validator: EmbeddingValidator) -> None:
    rows = make_rows(6)
    rows[1]["item_id"] = rows[4]["item_id"] = rows[5]["item_id"] = "dup"
    rows[2]["item_id"] = rows[3]["item_id"] = None  # several nulls are not duplicates of each other
    outcome = validator.validate(to_batch(rows))
    rejected = outcome.rejected.to_pylist()
    assert [r[CHECK_COLUMN] for r in rejected] == ["id_unique", "id_not_null", "id_not_null"] + ["id_unique"] * 2
    assert rejected[0][REASON_COLUMN] == "item_id 'dup' occurs 3 times in this batch"
    assert outcome.counts["id_unique"] == 3 and outcome.counts["id_not_null"] == 2
    assert outcome.valid.column("item_id").to_pylist() == ["item-0"]


def test_wrong_length_in_list_column(validator: EmbeddingValidator) -> None:
    rows = make_rows(4)
    short = unit_vectors(1, DIM - 1, seed=9)[0]
    rows[1]["embedding"] = [float(x) for x in short]  # unit norm, only the length is wrong
    rows[3]["embedding"] = []
    outcome = validator.validate(to_batch(rows))
    got = rejected_by_id(outcome)
    assert got["item-1"][CHECK_COLUMN] == "dimension"
    assert got["item-1"][REASON_COLUMN] == f"embedding has {DIM - 1} values, expected {DIM}"
    assert got["item-3"][CHECK_COLUMN] == "dimension,unit_norm"
    assert got["item-3"][REASON_COLUMN].startswith(f"embedding has 0 values, expected {DIM}; ")


def test_fixed_size_list_of_the_wrong_width_fails_every_row(validator: EmbeddingValidator) -> None:
    batch = to_batch(make_rows(3, dim=DIM + 1), kind="fixed", dim=DIM + 1)
    outcome = validator.validate(batch)
    assert outcome.valid.num_rows == 0
    assert outcome.counts["dimension"] == 3
    assert set(outcome.rejected.column(CHECK_COLUMN).to_pylist()) == {"dimension"}


@pytest.mark.parametrize("kind", ["fixed", "list"])
def test_nan_inf_and_null_values(validator: EmbeddingValidator, kind: str) -> None:
    rows = make_rows(5)
    rows[0]["embedding"][3] = float("nan")
    rows[1]["embedding"][0] = float("inf")
    rows[2]["embedding"][1] = float("-inf")
    rows[2]["embedding"][5] = float("nan")
    rows[3]["embedding"][2] = None
    outcome = validator.validate(to_batch(rows, kind))
    got = rejected_by_id(outcome)
    assert {k: v[CHECK_COLUMN] for k, v in got.items()} == dict.fromkeys(
        ["item-0", "item-1", "item-2", "item-3"], "finite"
    )
    assert got["item-0"][REASON_COLUMN] == "embedding has 1 non-finite values (1 NaN or null, 0 infinite)"
    assert got["item-1"][REASON_COLUMN] == "embedding has 1 non-finite values (0 NaN or null, 1 infinite)"
    assert got["item-2"][REASON_COLUMN] == "embedding has 2 non-finite values (1 NaN or null, 1 infinite)"
    assert got["item-3"][REASON_COLUMN] == "embedding has 1 non-finite values (1 NaN or null, 0 infinite)"
    assert outcome.counts["unit_norm"] == 0  # a non-finite vector is not also reported as norm off
    assert outcome.valid.column("item_id").to_pylist() == ["item-4"]


@pytest.mark.parametrize("kind", ["fixed", "list"])
def test_norm_off(validator: EmbeddingValidator, kind: str) -> None:
    rows = make_rows(4)
    rows[0]["embedding"] = [2.0 * x for x in rows[0]["embedding"]]
    rows[1]["embedding"] = [0.0] * DIM
    rows[2]["embedding"] = [(1 + 5 * TOL) * x for x in rows[2]["embedding"]]
    rows[3]["embedding"] = [(1 + 0.5 * TOL) * x for x in rows[3]["embedding"]]  # within tolerance
    outcome = validator.validate(to_batch(rows, kind))
    got = rejected_by_id(outcome)
    assert set(got) == {"item-0", "item-1", "item-2"}
    assert got["item-0"][REASON_COLUMN] == "embedding L2 norm is 2, expected 1 ± 0.001"
    assert got["item-1"][REASON_COLUMN] == "embedding L2 norm is 0, expected 1 ± 0.001"
    assert got["item-2"][REASON_COLUMN] == "embedding L2 norm is 1.005, expected 1 ± 0.001"
    assert all(r[CHECK_COLUMN] == "unit_norm" for r in got.values())


@pytest.mark.parametrize("kind", ["fixed", "list"])
def test_null_embedding(validator: EmbeddingValidator, kind: str) -> None:
    rows = make_rows(3)
    rows[1]["embedding"] = None
    outcome = validator.validate(to_batch(rows, kind))
    [bad] = outcome.rejected.to_pylist()
    assert (bad["item_id"], bad[CHECK_COLUMN], bad[REASON_COLUMN]) == (
        "item-1",
        "embedding_not_null",
        "embedding is null",
    )


def test_row_failing_several_checks_appears_once(validator: EmbeddingValidator) -> None:
    rows = make_rows(4)
    rows[0]["item_id"] = None
    rows[0]["embedding"] = [3.0] * (DIM + 2)
    rows[2]["item_id"] = rows[3]["item_id"] = "twin"
    rows[3]["embedding"][0] = float("nan")
    outcome = validator.validate(to_batch(rows))
    rejected = outcome.rejected.to_pylist()
    assert len(rejected) == 3
    first = rejected[0]
    assert first[CHECK_COLUMN] == "id_not_null,dimension,unit_norm"
    assert first[REASON_COLUMN] == (
        f"item_id is null; embedding has {DIM + 2} values, expected {DIM}; "
        f"embedding L2 norm is {math.sqrt(9 * (DIM + 2)):.6g}, expected 1 ± 0.001"
    )
    assert rejected[2][CHECK_COLUMN] == "id_unique,finite"
    assert rejected[2][REASON_COLUMN].split("; ")[0] == "item_id 'twin' occurs 2 times in this batch"


def test_pass_through_columns_are_preserved(validator: EmbeddingValidator) -> None:
    rows = make_rows(6)
    rows[3]["embedding"] = None
    batch = to_batch(rows)
    outcome = validator.validate(batch)
    for kept, source in zip(outcome.valid.to_pylist(), [r for i, r in enumerate(rows) if i != 3], strict=True):
        assert {k: kept[k] for k in ("item_id", "model_name", "source_version", "payload")} == {
            k: source[k] for k in ("item_id", "model_name", "source_version", "payload")
        }
    [bad] = outcome.rejected.to_pylist()
    assert bad["payload"] == rows[3]["payload"] and bad["source_version"] == 7
    assert outcome.rejected.schema.field(CHECK_COLUMN).type == pa.string()


@pytest.mark.parametrize("kind", ["fixed", "list"])
def test_empty_batch(validator: EmbeddingValidator, kind: str) -> None:
    batch = to_batch([], kind)
    outcome = validator.validate(batch)
    assert outcome.valid.num_rows == 0 and outcome.rejected.num_rows == 0
    assert outcome.valid.schema == batch.schema
    assert outcome.rejected.schema.names[-2:] == [CHECK_COLUMN, REASON_COLUMN]
    assert dict(outcome.counts) == dict.fromkeys(CHECKS, 0)


def test_sliced_batch_uses_its_own_rows(validator: EmbeddingValidator) -> None:
    rows = make_rows(10)
    rows[1]["embedding"][0] = float("nan")
    rows[6]["embedding"] = rows[6]["embedding"][:3]
    batch = to_batch(rows).slice(4, 4)
    outcome = validator.validate(batch)
    assert_matches_oracle(outcome, batch, rows[4:8])
    assert outcome.rejected.column("item_id").to_pylist() == ["item-6"]


def _corrupt(rows: list[dict[str, Any]], rng: np.random.Generator, allow_length: bool) -> None:
    kinds = ["null_id", "dup_id", "null_vec", "nan", "inf", "null_value", "scale", "zero"]
    if allow_length:
        kinds += ["short", "long"]
    for _ in range(int(rng.integers(0, len(rows) + 1))):
        i = int(rng.integers(len(rows)))
        kind = kinds[int(rng.integers(len(kinds)))]
        row = rows[i]
        vec = row["embedding"]
        if kind == "null_id":
            row["item_id"] = None
        elif kind == "dup_id":
            row["item_id"] = rows[int(rng.integers(len(rows)))]["item_id"]
        elif kind == "null_vec":
            row["embedding"] = None
        elif vec is None:
            continue
        elif kind in ("nan", "inf", "null_value") and len(vec) > 0:
            j = int(rng.integers(len(vec)))
            vec[j] = {"nan": float("nan"), "inf": float("-inf"), "null_value": None}[kind]
        elif kind == "scale":
            row["embedding"] = [None if x is None else x * float(rng.choice([0.5, 1.5, 10.0])) for x in vec]
        elif kind == "zero":
            row["embedding"] = [0.0] * len(vec)
        elif kind == "short":
            row["embedding"] = vec[: int(rng.integers(0, DIM))]
        elif kind == "long":
            row["embedding"] = vec + [0.0] * int(rng.integers(1, 4))


@pytest.mark.parametrize("seed", range(12))
def test_random_corruptions_match_the_oracle(validator: EmbeddingValidator, seed: int) -> None:
    rng = np.random.default_rng(seed)
    kind = ["list", "fixed", "large_list"][seed % 3]
    rows = make_rows(int(rng.integers(1, 60)), seed=seed)
    _corrupt(rows, rng, allow_length=kind != "fixed")
    batch = to_batch(rows, kind)
    outcome = validator.validate(batch)
    assert_matches_oracle(outcome, batch, rows)


def test_every_row_bad(validator: EmbeddingValidator) -> None:
    rows = make_rows(5)
    for r in rows:
        r["item_id"] = None
        r["embedding"] = None
    outcome = validator.validate(to_batch(rows))
    assert outcome.valid.num_rows == 0
    assert set(outcome.rejected.column(CHECK_COLUMN).to_pylist()) == {"id_not_null,embedding_not_null"}


def test_real_width_batch(validator: EmbeddingValidator) -> None:
    validator384 = EmbeddingValidator(dim=384)
    rows = make_rows(200, dim=384)
    rows[17]["embedding"][100] = float("nan")
    outcome = validator384.validate(to_batch(rows, "fixed", dim=384))
    assert outcome.rejected.column("item_id").to_pylist() == ["item-17"]
    assert outcome.valid.num_rows == 199


def test_gx_runtime_is_shared_and_not_growing() -> None:
    first = EmbeddingValidator(dim=DIM)
    second = EmbeddingValidator(dim=16, norm_tolerance=1e-2)
    runtime = _GxRuntime.get()
    assert first._runner._gx is runtime and second._runner._gx is runtime
    for _ in range(3):
        first.validate(to_batch(make_rows(5)))
    assert len(runtime.context.data_sources.all()) == 1
    assert len(runtime.context.suites.all()) == 0  # suites are never saved
    assert len(runtime.context.validation_results_store.list_keys()) == 0


def test_concurrent_validation_from_threads(validator: EmbeddingValidator) -> None:
    batches = []
    for seed in range(6):
        rows = make_rows(30 + seed, seed=seed)
        _corrupt(rows, np.random.default_rng(100 + seed), allow_length=True)
        batches.append((to_batch(rows), rows))
    errors: list[BaseException] = []

    def work(batch: pa.RecordBatch, rows: list[dict[str, Any]]) -> None:
        try:
            for _ in range(3):
                assert_matches_oracle(validator.validate(batch), batch, rows)
        except BaseException as exc:  # collected and re-raised on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=b) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="dim must be a positive integer"):
        EmbeddingValidator(dim=0)
    with pytest.raises(ConfigError, match="norm_tolerance"):
        EmbeddingValidator(dim=4, norm_tolerance=0.0)


def test_bad_batch_schema(validator: EmbeddingValidator) -> None:
    with pytest.raises(SluiceError, match="no 'embedding' column"):
        validator.validate(pa.RecordBatch.from_pydict({"item_id": ["a"]}))
    with pytest.raises(SluiceError, match="expected a list or fixed_size_list"):
        validator.validate(pa.RecordBatch.from_pydict({"item_id": ["a"], "embedding": [["x"]]}))
    batch = to_batch(make_rows(1))
    with pytest.raises(SluiceError, match="already has a 'check' column"):
        validator.validate(batch.append_column("check", pa.array(["x"])))


def test_suite_spec_is_plain_data() -> None:
    suite = embedding_expectations(384)
    assert suite.checks == CHECKS
    assert suite.dim == 384 and suite.norm_tolerance == 1e-3
    norm = next(s for s in suite.specs if s.check == "unit_norm")
    assert norm.kwargs["min_value"] == pytest.approx(0.999)
    assert norm.kwargs["max_value"] == pytest.approx(1.001)
    with pytest.raises(TypeError):
        norm.kwargs["min_value"] = 0  # type: ignore[index]


def test_configurations_are_memoised_only_during_a_validation(validator: EmbeddingValidator) -> None:
    from great_expectations.expectations.expectation import Expectation

    runtime = _GxRuntime.get()
    gx_property = Expectation.__dict__["configuration"]
    expectation = validator._runner._expectations[0]
    with runtime.lock, runtime.memoized_configurations():
        first = expectation.configuration
        assert expectation.configuration is first  # computed once
    assert Expectation.__dict__["configuration"] is gx_property  # GX's own property is back
    assert expectation.configuration is not first and expectation.configuration == first

    rows = make_rows(40, seed=3)
    _corrupt(rows, np.random.default_rng(7), allow_length=True)
    assert_matches_oracle(validator.validate(to_batch(rows)), to_batch(rows), rows)
    assert Expectation.__dict__["configuration"] is gx_property
