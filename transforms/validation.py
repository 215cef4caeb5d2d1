"""Validation of every embedding output batch with Great Expectations, before any sink sees it.

Rows that break the suite in :mod:`schemas.expectations` are split off into a ``rejected`` batch
(bound for the quarantine table with ``check`` and ``reason``) and the rest pass on untouched;
together they are always exactly the input (invariant 1 of DESIGN.md).

Why it is built the way it is:

* GX's pandas engine cannot look inside a column of vectors cheaply, so each batch is first
  reduced, with vectorised Arrow/numpy code, to a few facts per row (id, length, non-finite count,
  L2 norm; see :data:`schemas.expectations.DERIVED_COLUMNS`) and GX validates that small frame.
  The vectors never become Python objects.
* GX's cost is a fixed ~3 ms per expectation per call for building its metric graph, independent
  of row count, and asking for ``COMPLETE`` results (which carry the failing row indices) doubles
  it. A clean batch, the common case, therefore runs the suite with ``BOOLEAN_ONLY``; only the
  expectations that failed are re-run with ``COMPLETE`` to learn which rows failed.
* The GX context, data source, asset and batch definition are created once per process and reused
  for every batch (a Spark or Beam worker validates thousands). Nothing is saved: no checkpoint,
  no validation-definition run (that would keep every result in the in-memory results store), no
  data docs, no actions.
* GX is imported on first use, not at import time: it takes seconds to import and is needed only
  where batches are actually validated.
* While a batch is validated, ``Expectation.configuration`` is memoised per expectation object
  (:meth:`_GxRuntime.memoized_configurations`). GX rebuilds that configuration (a pydantic ``dict()``
  and a regex over the class name) every time it is read, ~50 times per expectation per call: 45% of
  a clean batch's validation, measured. The objects involved are built by GX for the one call and
  never changed during it, so the memo cannot go stale.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from schemas.embeddings import KEY_COLUMN, VECTOR_COLUMN
from schemas.expectations import (
    DEFAULT_NORM_TOLERANCE,
    EMBEDDING_INF,
    EMBEDDING_L2_NORM,
    EMBEDDING_LENGTH,
    EMBEDDING_NAN,
    EMBEDDING_NONFINITE,
    ID,
    ID_OCCURRENCES,
    SuiteSpec,
    embedding_expectations,
)
from transforms.errors import ConfigError, SluiceError

if TYPE_CHECKING:
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.expectations import Expectation

__all__ = ["CHECK_COLUMN", "REASON_COLUMN", "EmbeddingValidator", "SuiteRunner", "ValidationOutcome"]

CHECK_COLUMN = "check"
REASON_COLUMN = "reason"
CHECK_SEPARATOR = ","
REASON_SEPARATOR = "; "

_GX_DATASOURCE = "sluice_validation"
_GX_ASSET = "embedding_output_facts"
_GX_BATCH_DEFINITION = "whole_batch"
_META_CHECK = "sluice_check"


@dataclass(frozen=True)
class ValidationOutcome:
    """The split of one batch.

    ``valid`` has exactly the input schema. ``rejected`` has the input columns plus ``check`` and
    ``reason``; a row that failed several checks appears once, with the check names joined by
    ``","`` and the reasons by ``"; "`` in suite order. ``counts`` maps every check of the suite to
    the number of rows that failed it (0 included), so a row failing two checks counts in both and
    ``sum(counts.values())`` can exceed ``rejected.num_rows``.
    """

    valid: pa.RecordBatch
    rejected: pa.RecordBatch
    counts: Mapping[str, int]

    @property
    def ok(self) -> bool:
        return self.rejected.num_rows == 0


class _GxRuntime:
    """The process's one GX context and the batch definition every validation goes through.

    One lock serialises all GX calls: the pandas execution engine keeps the batch it is working on
    as shared state, and every batch of a whole-dataframe asset gets the same batch id, so two
    threads (Beam runs bundles on threads) validating at once would read each other's frames. The
    calls hold the GIL almost throughout, so the lock costs no parallelism.
    """

    _instance: _GxRuntime | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        gx = _import_gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.lock = threading.Lock()
        self.context = gx.get_context(mode="ephemeral")
        # tqdm bars would interleave with Spark/Beam worker logs; off for this context only.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        datasource = self.context.data_sources.add_pandas(_GX_DATASOURCE)
        asset = datasource.add_dataframe_asset(_GX_ASSET)
        self.batch_definition: BatchDefinition = asset.add_batch_definition_whole_dataframe(_GX_BATCH_DEFINITION)

    @contextmanager
    def memoized_configurations(self) -> Iterator[None]:
        """For the duration of one validation (under :attr:`lock`), compute each expectation
        object's ``configuration`` once (module docs). The memo holds the object itself, so an id
        cannot be reused by another object while it is alive; it is dropped, and GX's property put
        back, on exit."""
        from great_expectations.expectations.expectation import Expectation

        original = Expectation.__dict__["configuration"]
        memo: dict[int, tuple[Any, Any]] = {}

        def configuration(expectation: Any) -> Any:
            hit = memo.get(id(expectation))
            if hit is not None and hit[0] is expectation:
                return hit[1]
            value = original.fget(expectation)
            memo[id(expectation)] = (expectation, value)
            return value

        Expectation.configuration = property(configuration)  # type: ignore[assignment,method-assign]
        try:
            yield
        finally:
            Expectation.configuration = original  # type: ignore[method-assign]

    @classmethod
    def get(cls) -> _GxRuntime:
        if cls._instance is None:
            with cls._instance_lock:
                if cls._instance is None:
                    cls._instance = cls()
        return cls._instance

    def build(self, suite: SuiteSpec) -> list[Expectation]:
        module = self.gx.expectations
        built: list[Expectation] = []
        for spec in suite.specs:
            cls = getattr(module, spec.expectation, None)
            if cls is None:
                raise SluiceError(
                    f"expectation suite {suite.name}: check {spec.check!r} names "
                    f"{spec.expectation!r}, which great_expectations.expectations does not have"
                )
            # The check name rides along in ``meta`` so results are matched to checks by name, not
            # by position (GX does not promise to return results in suite order).
            built.append(cls(**dict(spec.kwargs), meta={_META_CHECK: spec.check}))
        return built


def prewarm() -> threading.Thread:
    """Start importing GX and building its context in the background.

    The import costs seconds per worker process; an engine calls this when a worker starts, so
    it overlaps the first batch's tokenisation and model call instead of following them.
    """
    thread = threading.Thread(target=_GxRuntime.get, name="sluice-gx-prewarm", daemon=True)
    thread.start()
    return thread


def _import_gx() -> Any:
    """Import GX, turning its silent exit under ``python -c`` into an error.

    GX imports ``pyspark.sql.connect`` when pyspark is installed, and pyspark (without grpcio) calls
    ``sys.exit(0)`` from that import when ``__main__`` has neither ``__spec__`` nor ``__file__``,
    i.e. under ``python -c`` or a script piped to stdin, mistaking it for a doctest run. A job that
    exits 0 having validated nothing is the worst outcome, so it becomes a loud error instead.
    """
    root = logging.getLogger("great_expectations")
    quiet = root.level == logging.NOTSET  # not configured by the user: keep GX out of worker logs
    if quiet:
        root.setLevel(logging.WARNING)
    try:
        import great_expectations as gx
    except SystemExit as exc:
        raise SluiceError(
            "great_expectations could not be imported: pyspark's Spark Connect check exited the "
            f"process (code {exc.code}) because it was started with `python -c` or from stdin and "
            "grpcio is missing; run sluice from a script or `python -m`"
        ) from exc
    # This module logger forces itself to INFO on import and announces every ephemeral context's
    # temporary docs directory; it goes back to inheriting from "great_expectations".
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.NOTSET)
    return gx


@dataclass(frozen=True)
class _Facts:
    """What the validator derives from one batch: the GX frame plus the reason-only extras."""

    frame: pd.DataFrame
    nan: np.ndarray
    inf: np.ndarray


def _derive(batch: pa.RecordBatch) -> _Facts:
    """Per-row facts of the batch, vectorised over the flattened vector values.

    The sum of squares is taken first, in float64 (no overflow for float32 inputs): it is non-finite
    exactly for the rows that hold a NaN or Inf (or absurdly large values), so the costlier NaN/Inf
    counts are computed only for those rows. When every vector has the same length, the common
    case for both fixed_size_list and Spark's list<float>, the values are a plain matrix.
    """
    n = batch.num_rows
    vectors = batch.column(VECTOR_COLUMN)
    lengths_arrow = pc.list_value_length(vectors)
    null_vector = lengths_arrow.is_null().to_numpy(zero_copy_only=False)
    lengths = lengths_arrow.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    # Null values inside a vector come out as NaN here, and so count as "NaN or null".
    values = pc.list_flatten(vectors).to_numpy(zero_copy_only=False)
    nan = np.zeros(n, dtype=np.int64)
    inf = np.zeros(n, dtype=np.int64)

    width = int(lengths[0]) if n else 0
    if width > 0 and not null_vector.any() and values.size == n * width and (lengths == width).all():
        matrix = values.reshape(n, width)
        sumsq = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)
        suspicious = np.flatnonzero(~np.isfinite(sumsq))
        if suspicious.size:
            nan[suspicious] = np.isnan(matrix[suspicious]).sum(axis=1)
            inf[suspicious] = np.isinf(matrix[suspicious]).sum(axis=1)
    else:
        parents = pc.list_parent_indices(vectors).to_numpy(zero_copy_only=False)
        squares = values.astype(np.float64)
        np.multiply(squares, squares, out=squares)
        sumsq = np.bincount(parents, weights=squares, minlength=n)
        if not np.isfinite(sumsq).all():
            nan = np.bincount(parents[np.isnan(values)], minlength=n).astype(np.int64)
            inf = np.bincount(parents[np.isinf(values)], minlength=n).astype(np.int64)

    nonfinite = nan + inf
    norm = np.sqrt(sumsq)
    norm[(nonfinite > 0) | null_vector] = np.nan

    frame = pd.DataFrame(
        {
            ID: batch.column(KEY_COLUMN).to_pandas(),
            # Nullable, so a null vector fails only ``embedding_not_null`` and not also ``dimension``.
            EMBEDDING_LENGTH: pd.arrays.IntegerArray(lengths, null_vector),
            EMBEDDING_NONFINITE: nonfinite,
            EMBEDDING_L2_NORM: norm,
        }
    )
    return _Facts(frame=frame, nan=nan, inf=inf)


def _check_schema(schema: pa.Schema) -> None:
    names = schema.names
    for required in (KEY_COLUMN, VECTOR_COLUMN):
        if required not in names:
            raise SluiceError(
                f"output batch has no {required!r} column (columns: {', '.join(names)}); "
                "the model adapter must emit the embeddings output contract"
            )
    for clash in (CHECK_COLUMN, REASON_COLUMN):
        if clash in names:
            raise SluiceError(
                f"output batch already has a {clash!r} column, which validation adds to rejected "
                "rows; rename it before validation"
            )
    vtype = schema.field(VECTOR_COLUMN).type
    is_list = pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype)
    if not is_list or not pa.types.is_floating(vtype.value_type):
        raise SluiceError(
            f"output column {VECTOR_COLUMN!r} has type {vtype}; expected a list or fixed_size_list of float16/32/64"
        )


class SuiteRunner:
    """Runs one suite over a frame of derived facts and says which rows failed which check.

    Built once per worker process (building the GX expectations is not free) and reused for every
    batch; the GX context behind it is shared by every runner in the process.
    """

    def __init__(self, suite: SuiteSpec) -> None:
        self.suite = suite
        self._gx = _GxRuntime.get()
        # Under the lock: no GX object may be built while another thread's validation has GX's
        # configuration property memoised.
        with self._gx.lock:
            self._expectations = self._gx.build(suite)
            # Not added to the context: a suite that is never saved keeps no store or results around.
            self._gx_suite = self._gx.gx.ExpectationSuite(name=suite.name, expectations=self._expectations)
            self._row_only_suite = self._gx.gx.ExpectationSuite(
                name=f"{suite.name}.rows",
                expectations=[e for e, s in zip(self._expectations, suite.specs, strict=True) if s.scope == "row"],
            )

    def failures(self, frame: pd.DataFrame, *, batch_checks: bool = True) -> np.ndarray:
        """GX's verdict as a rows x checks boolean matrix of failures.

        A failed ``batch``-scope check marks every row. ``batch_checks=False`` leaves those checks
        out (a batch too small for its mean to mean anything).
        """
        specs = self.suite.specs
        failed = np.zeros((len(frame), len(specs)), dtype=bool)
        with self._gx.lock, self._gx.memoized_configurations():
            gx_batch = self._gx.batch_definition.get_batch(batch_parameters={"dataframe": frame})
            suite = self._gx_suite if batch_checks else self._row_only_suite
            summary = gx_batch.validate(suite, result_format="BOOLEAN_ONLY")
            if summary.success:
                return failed
            column_of = {check: j for j, check in enumerate(self.suite.checks)}
            for result in summary.results:
                check = (result.expectation_config.meta or {}).get(_META_CHECK)
                if check not in column_of:
                    raise SluiceError(f"validation: GX returned a result for an unknown check {check!r}")
                self._raise_if_errored(check, result)
                if result.success:
                    continue
                j = column_of[check]
                if specs[j].scope == "batch":
                    failed[:, j] = True
                    continue
                detail = gx_batch.validate(self._expectations[j], result_format="COMPLETE")
                self._raise_if_errored(check, detail)
                rows = detail.result.get("unexpected_index_list")
                if rows is None:
                    raise SluiceError(f"validation: GX returned no unexpected_index_list for check {check!r}")
                failed[np.asarray(rows, dtype=np.int64), j] = True
        return failed

    def _raise_if_errored(self, check: str, result: Any) -> None:
        # GX catches exceptions inside an expectation and reports them as a failed result; that
        # must not read as "every row is bad" (or, worse, as "no row is bad").
        info = result.exception_info or {}
        if info.get("raised_exception"):
            message = info.get("exception_message") or "unknown error"
            raise SluiceError(f"validation: GX could not evaluate check {check!r}: {message}")


def reject_column(rejected_rows: pa.RecordBatch, checks: list[str], reasons: list[str]) -> pa.RecordBatch:
    """``rejected_rows`` with the ``check`` and ``reason`` columns appended."""
    return rejected_rows.append_column(
        pa.field(CHECK_COLUMN, pa.string(), nullable=False), pa.array(checks, type=pa.string())
    ).append_column(pa.field(REASON_COLUMN, pa.string(), nullable=False), pa.array(reasons, type=pa.string()))


class EmbeddingValidator:
    """Splits embedding output batches into valid and rejected rows.

    Build one per worker process and reuse it: construction builds the GX expectations, and the
    GX context behind it is shared by every validator in the process.
    """

    def __init__(self, *, dim: int, norm_tolerance: float = DEFAULT_NORM_TOLERANCE) -> None:
        try:
            self.suite = embedding_expectations(dim, norm_tolerance)
        except ValueError as exc:
            raise ConfigError(f"validation: {exc}") from exc
        self._runner = SuiteRunner(self.suite)

    @property
    def checks(self) -> tuple[str, ...]:
        return self.suite.checks

    def validate(self, batch: pa.RecordBatch) -> ValidationOutcome:
        """Validate one batch. Uniqueness is within the batch; all copies of a duplicate fail."""
        _check_schema(batch.schema)
        n = batch.num_rows
        if n == 0:
            return self._outcome(batch, np.zeros((0, len(self.suite.specs)), dtype=bool), None)
        facts = _derive(batch)
        failed = self._runner.failures(facts.frame)
        return self._outcome(batch, failed, facts)

    def _outcome(self, batch: pa.RecordBatch, failed: np.ndarray, facts: _Facts | None) -> ValidationOutcome:
        counts = MappingProxyType({spec.check: int(failed[:, j].sum()) for j, spec in enumerate(self.suite.specs)})
        bad = failed.any(axis=1)
        valid = batch.filter(pa.array(~bad, type=pa.bool_()))
        rejected_rows = batch.filter(pa.array(bad, type=pa.bool_()))
        checks, reasons = self._explain(failed[bad], np.flatnonzero(bad), facts)
        return ValidationOutcome(valid=valid, rejected=reject_column(rejected_rows, checks, reasons), counts=counts)

    def _explain(self, failed: np.ndarray, positions: np.ndarray, facts: _Facts | None) -> tuple[list[str], list[str]]:
        """Check names and rendered reasons of the failing rows only (usually few or none)."""
        if facts is None or len(positions) == 0:
            return [], []
        frame = facts.frame
        ids = frame[ID]
        occurrences = ids.iloc[positions].map(ids.value_counts()).fillna(0).astype(np.int64).to_numpy()
        sub = frame.iloc[positions]
        columns = {name: sub[name].to_numpy(dtype=object) for name in frame.columns}
        checks: list[str] = []
        reasons: list[str] = []
        specs = self.suite.specs
        for i, pos in enumerate(positions):
            fields: dict[str, Any] = {name: col[i] for name, col in columns.items()}
            fields[EMBEDDING_NAN] = int(facts.nan[pos])
            fields[EMBEDDING_INF] = int(facts.inf[pos])
            fields[ID_OCCURRENCES] = occurrences[i]
            hit = np.flatnonzero(failed[i])
            checks.append(CHECK_SEPARATOR.join(specs[j].check for j in hit))
            reasons.append(REASON_SEPARATOR.join(specs[j].reason.format(**fields) for j in hit))
        return checks, reasons
