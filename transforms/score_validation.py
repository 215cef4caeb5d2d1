"""Validation of every CTR scores batch with Great Expectations, before any sink sees it.

The same machinery as the embeddings' (:class:`transforms.validation.SuiteRunner`): each batch is
reduced with vectorised Arrow/numpy code to a few facts per row (:data:`SCORE_DERIVED_COLUMNS`),
GX validates that small frame against :func:`schemas.expectations.score_expectations`, and the
batch splits into rows that pass and rows bound for the quarantine table with ``check`` and
``reason``. The batch-mean check is only asked of batches of at least ``min_rows_for_mean`` rows:
the mean of a handful of scores says nothing about calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from schemas.expectations import (
    BATCH_MEAN,
    BATCH_ROWS,
    DEFAULT_MEAN_RATIO_BOUNDS,
    MISSING_FIELDS,
    REQUEST_ID,
    SCORE,
    SCORE_FINITE,
    score_expectations,
)
from transforms.errors import ConfigError
from transforms.validation import CHECK_SEPARATOR, REASON_SEPARATOR, SuiteRunner, ValidationOutcome, reject_column

#: Fields a served score must carry (DESIGN.md, invariant 3: lineage on every row).
LINEAGE_FIELDS: tuple[str, ...] = ("user_id", "ad_id", "model_version", "topic", "partition", "offset", "event_time")

DEFAULT_MIN_ROWS_FOR_MEAN = 200


def _missing_counts(batch: pa.RecordBatch) -> np.ndarray:
    missing = np.zeros(batch.num_rows, dtype=np.int64)
    for name in LINEAGE_FIELDS:
        column = batch.column(name)
        bad = pc.is_null(column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            bad = pc.or_(bad, pc.equal(pc.fill_null(pc.utf8_length(column), 0), 0))
        missing += bad.to_numpy(zero_copy_only=False).astype(np.int64)
    return missing


class ScoreValidator:
    """Splits scores batches into valid and quarantined rows; one per worker process."""

    def __init__(
        self,
        *,
        base_rate: float,
        mean_ratio_bounds: tuple[float, float] = DEFAULT_MEAN_RATIO_BOUNDS,
        min_rows_for_mean: int = DEFAULT_MIN_ROWS_FOR_MEAN,
    ) -> None:
        try:
            self.suite = score_expectations(base_rate, mean_ratio_bounds)
        except ValueError as exc:
            raise ConfigError(f"validation: {exc}") from exc
        self.min_rows_for_mean = min_rows_for_mean
        self._runner = SuiteRunner(self.suite)

    @property
    def checks(self) -> tuple[str, ...]:
        return self.suite.checks

    def validate(self, batch: pa.RecordBatch) -> ValidationOutcome:
        """Validate one batch of scored rows (the scores contract's columns; ``score`` may be NaN)."""
        n = batch.num_rows
        scores = batch.column(SCORE).to_numpy(zero_copy_only=False).astype(np.float64)
        finite = np.isfinite(scores)
        frame = pd.DataFrame(
            {
                REQUEST_ID: batch.column(REQUEST_ID).to_pandas(),
                SCORE: scores,
                SCORE_FINITE: finite.astype(np.int64),
                MISSING_FIELDS: _missing_counts(batch) if n else np.zeros(0, dtype=np.int64),
            }
        )
        if n == 0:
            failed = np.zeros((0, len(self.suite.specs)), dtype=bool)
        else:
            failed = self._runner.failures(frame, batch_checks=n >= self.min_rows_for_mean)
        counts: Mapping[str, int] = MappingProxyType(
            {spec.check: int(failed[:, j].sum()) for j, spec in enumerate(self.suite.specs)}
        )
        bad = failed.any(axis=1)
        valid = batch.filter(pa.array(~bad, type=pa.bool_()))
        positions = np.flatnonzero(bad)
        extras: dict[str, Any] = {
            BATCH_ROWS: n,
            BATCH_MEAN: float(scores[finite].mean()) if finite.any() else float("nan"),
        }
        checks: list[str] = []
        reasons: list[str] = []
        specs = self.suite.specs
        for pos in positions:
            fields = {name: frame[name].iat[pos] for name in frame.columns} | extras
            hit = np.flatnonzero(failed[pos])
            checks.append(CHECK_SEPARATOR.join(specs[j].check for j in hit))
            reasons.append(REASON_SEPARATOR.join(specs[j].reason.format(**fields) for j in hit))
        rejected = reject_column(batch.filter(pa.array(bad, type=pa.bool_())), checks, reasons)
        return ValidationOutcome(valid=valid, rejected=rejected, counts=counts)
