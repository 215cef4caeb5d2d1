"""Expectation suites of sluice's outputs (embeddings, CTR scores), as plain data.

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
from typing import Any, Literal

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
    #: ``row``: GX names the failing rows. ``batch``: a property of the whole batch (a mean, say):
    #: when it fails, every row of the batch fails it.
    scope: Literal["row", "batch"] = "row"


@dataclass(frozen=True)
class SuiteSpec:
    """A named suite, in the order its checks are reported."""

    name: str
    specs: tuple[ExpectationSpec, ...]

    @property
    def checks(self) -> tuple[str, ...]:
        return tuple(s.check for s in self.specs)


@dataclass(frozen=True)
class EmbeddingExpectations(SuiteSpec):
    """The suite for one vector width and norm tolerance."""

    dim: int = 0
    norm_tolerance: float = DEFAULT_NORM_TOLERANCE


def _spec(
    check: str, expectation: str, reason: str, *, scope: Literal["row", "batch"] = "row", **kwargs: Any
) -> ExpectationSpec:
    # A read-only view: the specs are shared process-wide and must not be edited in place.
    return ExpectationSpec(check, expectation, MappingProxyType(dict(kwargs)), reason, scope)


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
        specs=specs,
        dim=dim,
        norm_tolerance=tol,
    )


# --- CTR scores (the ad-scoring job) ------------------------------------------------------------

#: Derived per-row facts of a scores batch (see ``transforms.score_validation``).
REQUEST_ID = "request_id"
SCORE = "score"
#: 1 where the score is a finite number, else 0 (GX's pandas engine reads NaN as "missing" and
#: would let it pass a range check, so finiteness is its own fact).
SCORE_FINITE = "score_finite"
#: How many of the lineage fields a served score needs (user_id, ad_id, model_version, topic,
#: partition, offset, event_time) are null or empty.
MISSING_FIELDS = "missing_fields"
SCORE_DERIVED_COLUMNS: tuple[str, ...] = (REQUEST_ID, SCORE, SCORE_FINITE, MISSING_FIELDS)
#: Batch-level reason fields.
BATCH_ROWS = "batch_rows"
BATCH_MEAN = "batch_mean"

DEFAULT_MEAN_RATIO_BOUNDS = (1 / 3, 3.0)


@dataclass(frozen=True)
class ScoreExpectations(SuiteSpec):
    """The suite for one model's scores; the batch-mean bounds scale with its base rate."""

    base_rate: float = 0.0
    mean_bounds: tuple[float, float] = (0.0, 1.0)


def score_expectations(
    base_rate: float, mean_ratio_bounds: tuple[float, float] = DEFAULT_MEAN_RATIO_BOUNDS
) -> ScoreExpectations:
    """Row checks (a finite probability, lineage present) and one batch check: the batch's mean
    score within ``mean_ratio_bounds`` times the training base rate.

    A CTR model whose mean prediction drifts far from the rate it was trained on is miscalibrated
    or fed garbage (a broken upstream feature, a new traffic source): serving those scores would
    move bids, so the whole batch is held back in quarantine and the runner warns loudly.
    """
    if not (isinstance(base_rate, int | float) and math.isfinite(base_rate)) or not (0 < base_rate < 1):
        raise ValueError(f"base_rate must be a number in (0, 1), got {base_rate!r}")
    lo_ratio, hi_ratio = mean_ratio_bounds
    if not (0 <= lo_ratio < 1 < hi_ratio):
        raise ValueError(f"mean_ratio_bounds must be (low < 1, high > 1), got {mean_ratio_bounds!r}")
    lo, hi = base_rate * lo_ratio, min(1.0, base_rate * hi_ratio)
    specs = (
        _spec("request_id_not_null", "ExpectColumnValuesToNotBeNull", "request_id is null", column=REQUEST_ID),
        _spec(
            "score_finite",
            "ExpectColumnValuesToBeBetween",
            f"score is {{{SCORE}!r}}, not a finite number",
            column=SCORE_FINITE,
            min_value=1,
            max_value=1,
        ),
        _spec(
            "score_in_unit_interval",
            "ExpectColumnValuesToBeBetween",
            f"score is {{{SCORE}!r}}, outside [0, 1]",
            column=SCORE,
            min_value=0.0,
            max_value=1.0,
        ),
        _spec(
            "lineage_present",
            "ExpectColumnValuesToBeBetween",
            f"{{{MISSING_FIELDS}}} lineage fields (user_id, ad_id, model_version, topic, partition, offset, "
            "event_time) are null or empty",
            column=MISSING_FIELDS,
            min_value=0,
            max_value=0,
        ),
        _spec(
            "batch_mean",
            "ExpectColumnMeanToBeBetween",
            f"the batch of {{{BATCH_ROWS}}} scores has mean {{{BATCH_MEAN}:.4g}}, outside [{lo:.4g}, {hi:.4g}] "
            f"= {lo_ratio:g}x..{hi_ratio:g}x the model's base rate {base_rate:.4g}",
            scope="batch",
            column=SCORE,
            min_value=lo,
            max_value=hi,
        ),
    )
    return ScoreExpectations(
        name=f"sluice.scores.v{EXPECTATIONS_VERSION}",
        specs=specs,
        base_rate=float(base_rate),
        mean_bounds=(lo, hi),
    )
