"""Expectation suite of the embedding backfill's outputs, as plain data.

The suite is written down here, next to the Arrow schemas, because it is part of the output
contract: a row that breaks it never reaches Delta, Feast or Kafka and goes to the quarantine
table instead, with ``check`` and ``reason`` taken from these specs. It is data and not Great
Expectations objects so that ``schemas`` stays importable without GX (an Airflow scheduler or a
docs build reads it) and so that the same list can drive another engine's checks later.

The expectations do not run on the vectors themselves: GX's pandas engine would see a column of
Python lists. They run on a small frame of per-row facts the validator derives from each batch
with vectorised Arrow/numpy code (:data:`DERIVED_COLUMNS`), one row per output row, in order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

EXPECTATIONS_VERSION = 1

#: The id as it is in the batch (``None`` where null).
ID = "item_id"
#: Number of values in the vector; null where the vector itself is null.
EMBEDDING_LENGTH = "embedding_length"
#: Number of NaN, ±Inf or null values inside the vector (0 for a null vector).
EMBEDDING_NONFINITE = "embedding_nonfinite"
#: L2 norm of the vector; NaN (that is, null to GX) where the vector is null or not finite, so those
#: rows are reported by the check that names their real problem and not also as "norm off".
EMBEDDING_L2_NORM = "embedding_l2_norm"

DERIVED_COLUMNS: tuple[str, ...] = (ID, EMBEDDING_LENGTH, EMBEDDING_NONFINITE, EMBEDDING_L2_NORM)

#: Extra fields a reason template may use besides the derived columns. They are computed only for
#: the rows that failed, because they cost more than the derived columns and are rarely needed.
EMBEDDING_NAN = "embedding_nan"
EMBEDDING_INF = "embedding_inf"
ID_OCCURRENCES = "id_occurrences"

REASON_FIELDS: tuple[str, ...] = (*DERIVED_COLUMNS, EMBEDDING_NAN, EMBEDDING_INF, ID_OCCURRENCES)

DEFAULT_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExpectationSpec:
    """One output expectation.

    ``check`` is the stable name written to the quarantine table's ``check`` column and used as
    the key of per-check counts; dashboards and alerts filter on it, so it never changes once
    published. ``expectation`` is the Great Expectations 1.x class name in
    ``great_expectations.expectations`` and ``kwargs`` its constructor arguments (columns refer to
    :data:`DERIVED_COLUMNS`). ``reason`` is a :meth:`str.format` template over
    :data:`REASON_FIELDS`, rendered per failing row so the quarantine says which value was wrong.
    """

    check: str
    expectation: str
    kwargs: Mapping[str, Any]
    reason: str


@dataclass(frozen=True)
class EmbeddingExpectations:
    """The suite for one vector width and norm tolerance, in the order checks are reported."""

    name: str
    dim: int
    norm_tolerance: float
    specs: tuple[ExpectationSpec, ...]

    @property
    def checks(self) -> tuple[str, ...]:
        return tuple(s.check for s in self.specs)


def _spec(check: str, expectation: str, reason: str, **kwargs: Any) -> ExpectationSpec:
    # A read-only view: the specs are shared process-wide and must not be edited in place.
    return ExpectationSpec(check, expectation, MappingProxyType(dict(kwargs)), reason)


def embedding_expectations(dim: int, norm_tolerance: float = DEFAULT_NORM_TOLERANCE) -> EmbeddingExpectations:
    """Build the suite; ``norm_tolerance`` is relative to the expected norm of 1.

    The model L2-normalises its outputs, so any norm outside ``1 ± tolerance`` means a broken
    normalisation step or a degenerate (all-zero) vector, which would silently break cosine search
    downstream.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not (isinstance(norm_tolerance, int | float) and math.isfinite(norm_tolerance)) or not (0 < norm_tolerance < 1):
        raise ValueError(f"norm_tolerance must be a number in (0, 1), got {norm_tolerance!r}")
    tol = float(norm_tolerance)
    specs = (
        _spec("id_not_null", "ExpectColumnValuesToNotBeNull", "item_id is null", column=ID),
        _spec(
            "id_unique",
            "ExpectColumnValuesToBeUnique",
            f"item_id {{{ID}!r}} occurs {{{ID_OCCURRENCES}}} times in this batch",
            column=ID,
        ),
        _spec(
            "embedding_not_null",
            "ExpectColumnValuesToNotBeNull",
            "embedding is null",
            column=EMBEDDING_LENGTH,
        ),
        _spec(
            "dimension",
            "ExpectColumnValuesToBeBetween",
            f"embedding has {{{EMBEDDING_LENGTH}}} values, expected {dim}",
            column=EMBEDDING_LENGTH,
            min_value=dim,
            max_value=dim,
        ),
        _spec(
            "finite",
            "ExpectColumnValuesToBeBetween",
            f"embedding has {{{EMBEDDING_NONFINITE}}} non-finite values "
            f"({{{EMBEDDING_NAN}}} NaN or null, {{{EMBEDDING_INF}}} infinite)",
            column=EMBEDDING_NONFINITE,
            min_value=0,
            max_value=0,
        ),
        _spec(
            "unit_norm",
            "ExpectColumnValuesToBeBetween",
            f"embedding L2 norm is {{{EMBEDDING_L2_NORM}:.6g}}, expected 1 ± {tol:g}",
            column=EMBEDDING_L2_NORM,
            min_value=1.0 - tol,
            max_value=1.0 + tol,
        ),
    )
    return EmbeddingExpectations(
        name=f"sluice.embeddings.v{EXPECTATIONS_VERSION}.dim{dim}",
        dim=dim,
        norm_tolerance=tol,
        specs=specs,
    )
