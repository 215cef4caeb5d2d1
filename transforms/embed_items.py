"""One batch of items in, embeddings and quarantined rows out: the whole per-record path of the
embedding backfill, engine-free.

Every input row leaves in exactly one of the two outputs (invariant 1): rows with no id or no text
are quarantined before the model (stage ``input``), rows the model raises on are isolated and
quarantined (stage ``model``), and outputs failing an expectation are quarantined (stage
``validation``). The engines only move batches in and out.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.embeddings import embeddings_schema
from schemas.quarantine import QUARANTINE_SCHEMA
from transforms.batching import BatchLimits
from transforms.inference import EncodeResult, EncodeStats, Tokenized, encode_tokens, tokenize
from transforms.models.spec import ModelConfig, load_encoder
from transforms.models.text_encoder import TextEncoder
from transforms.validation import EmbeddingValidator

_ROW = "_sluice_row"


@dataclass(frozen=True)
class EmbedSpec:
    """Everything a worker needs to embed a batch; small and picklable (it ships to executors)."""

    model: ModelConfig
    source_version: int
    run_id: str
    limits: BatchLimits = field(default_factory=BatchLimits)
    id_column: str = "item_id"
    text_column: str = "text"
    norm_tolerance: float = 1e-3


@dataclass
class EmbedOutcome:
    output: pa.RecordBatch
    quarantine: pa.RecordBatch
    stats: EncodeStats = field(default_factory=EncodeStats)


def _quarantine_rows(
    ids: pa.Array,
    texts: pa.Array,
    rows: np.ndarray,
    *,
    stage: str,
    checks: list[str],
    reasons: list[str],
    model_version: str | None,
    spec: EmbedSpec,
    now: datetime,
) -> pa.RecordBatch:
    n = len(rows)
    idx = pa.array(rows, type=pa.int64())
    return pa.RecordBatch.from_arrays(
        [
            ids.take(idx),
            texts.take(idx),
            pa.array([stage] * n, pa.string()),
            pa.array(checks, pa.string()),
            pa.array(reasons, pa.string()),
            pa.array([model_version] * n, pa.string()),
            pa.array([spec.source_version] * n, pa.int64()),
            pa.array([spec.run_id] * n, pa.string()),
            pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        ],
        schema=QUARANTINE_SCHEMA,
    )


def _input_problems(ids: pa.Array, texts: pa.Array) -> tuple[np.ndarray, list[str], list[str]]:
    """Rows the model must never see, found with vectorised Arrow kernels."""
    id_null = pc.is_null(ids).to_numpy(zero_copy_only=False)
    text_null = pc.is_null(texts).to_numpy(zero_copy_only=False)
    stripped = pc.utf8_trim_whitespace(pc.fill_null(texts, ""))
    text_empty = pc.equal(pc.utf8_length(stripped), 0).to_numpy(zero_copy_only=False) & ~text_null
    bad = np.flatnonzero(id_null | text_null | text_empty)
    checks: list[str] = []
    reasons: list[str] = []
    for r in bad:
        if id_null[r]:
            checks.append("id_not_null")
            reasons.append("item id is null")
        elif text_null[r]:
            checks.append("text_not_null")
            reasons.append("text is null")
        else:
            checks.append("text_not_empty")
            reasons.append("text is empty or whitespace only")
    return bad, checks, reasons


@functools.lru_cache(maxsize=8)
def _validator(dim: int, norm_tolerance: float) -> EmbeddingValidator:
    """One validator per worker process and shape: building one builds its GX expectations and
    suites, which each batch would otherwise pay again."""
    return EmbeddingValidator(dim=dim, norm_tolerance=norm_tolerance)


@dataclass
class _Prepared:
    """A batch after the checks that need no model and after tokenising: the work that can run on
    a helper thread while the previous batch is in the model."""

    ids: pa.Array
    texts: pa.Array
    bad: np.ndarray
    checks: list[str]
    reasons: list[str]
    good: np.ndarray
    tokens: Tokenized
    tokenize_seconds: float


def _prepare(spec: EmbedSpec, encoder: TextEncoder, batch: pa.RecordBatch) -> _Prepared:
    ids = pc.cast(batch.column(spec.id_column), pa.string())
    texts = pc.cast(batch.column(spec.text_column), pa.string())
    bad, checks, reasons = _input_problems(ids, texts)
    good = np.setdiff1d(np.arange(len(batch)), bad, assume_unique=True)
    t0 = time.perf_counter()
    tokens = tokenize(encoder, texts.take(pa.array(good, type=pa.int64())))
    return _Prepared(ids, texts, bad, checks, reasons, good, tokens, time.perf_counter() - t0)


def _encode(spec: EmbedSpec, encoder: TextEncoder, prepared: _Prepared) -> EncodeResult:
    return encode_tokens(encoder, prepared.tokens, limits=spec.limits, tokenize_seconds=prepared.tokenize_seconds)


def _finish(spec: EmbedSpec, encoder: TextEncoder, prepared: _Prepared, result: EncodeResult) -> EmbedOutcome:
    """Everything after the model: quarantine records, the output batch, GX validation."""
    model_name = spec.model.name or encoder.name
    now = datetime.now(UTC)
    ids, texts, good = prepared.ids, prepared.texts, prepared.good
    parts = []
    if len(prepared.bad):
        parts.append(
            _quarantine_rows(
                ids,
                texts,
                prepared.bad,
                stage="input",
                checks=prepared.checks,
                reasons=prepared.reasons,
                model_version=encoder.version,
                spec=spec,
                now=now,
            )
        )
    if result.failed:
        failed_local = np.array(sorted(result.failed), dtype=np.int64)
        parts.append(
            _quarantine_rows(
                ids,
                texts,
                good[failed_local],
                stage="model",
                checks=[result.failed[int(i)][0] for i in failed_local],
                reasons=[result.failed[int(i)][1] for i in failed_local],
                model_version=encoder.version,
                spec=spec,
                now=now,
            )
        )
        keep_local = np.setdiff1d(np.arange(len(good)), failed_local, assume_unique=True)
    else:
        keep_local = np.arange(len(good))

    rows = good[keep_local]
    vectors = result.embeddings[keep_local]
    n = len(rows)
    dim = encoder.dim
    schema = embeddings_schema(dim)
    candidate = pa.RecordBatch.from_arrays(
        [
            ids.take(pa.array(rows, type=pa.int64())),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
            pa.array([model_name] * n, pa.string()),
            pa.array([encoder.version] * n, pa.string()),
            pa.array([spec.source_version] * n, pa.int64()),
            pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            pa.array(rows, pa.int64()),
        ],
        schema=schema.append(pa.field(_ROW, pa.int64())),
    )
    outcome = _validator(dim, spec.norm_tolerance).validate(candidate)
    if outcome.rejected.num_rows:
        rej = outcome.rejected
        parts.append(
            _quarantine_rows(
                ids,
                texts,
                rej.column(_ROW).to_numpy(),
                stage="validation",
                checks=rej.column("check").to_pylist(),
                reasons=rej.column("reason").to_pylist(),
                model_version=encoder.version,
                spec=spec,
                now=now,
            )
        )
    valid = outcome.valid
    output = pa.RecordBatch.from_arrays([valid.column(f.name) for f in schema], schema=schema)
    quarantine = (
        pa.Table.from_batches(parts, schema=QUARANTINE_SCHEMA).combine_chunks().to_batches()[0]
        if parts
        else pa.RecordBatch.from_pylist([], schema=QUARANTINE_SCHEMA)
    )
    return EmbedOutcome(output=output, quarantine=quarantine, stats=result.stats)


def embed_items(
    spec: EmbedSpec,
    batch: pa.RecordBatch,
    *,
    gpu_address: str | None = None,
    cores: int | None = None,
) -> EmbedOutcome:
    """Embed one batch of items. ``len(output) + len(quarantine) == len(batch)``, always."""
    encoder = load_encoder(spec.model, gpu_address=gpu_address, cores=cores)
    prepared = _prepare(spec, encoder, batch)
    return _finish(spec, encoder, prepared, _encode(spec, encoder, prepared))


def embed_batches(
    spec: EmbedSpec,
    batches: Iterable[pa.RecordBatch],
    *,
    gpu_address: str | None = None,
    cores: int | None = None,
    overlap_finish: bool | None = None,
) -> Iterator[EmbedOutcome]:
    """:func:`embed_items` over a stream of batches (empty ones skipped), one outcome per batch, in order.

    Batch k+1 is checked and tokenised on a helper thread while batch k is in the model. The
    tokenizer is Rust and releases the GIL, so this overlaps for real; on a GPU it was a third of
    the host's time per batch, time in which the device sat idle.

    On a GPU, batch k's validation and output building (GX, Arrow) also run on a second helper
    thread while batch k+1 is in the model: the model loop mostly waits on the device with the
    GIL released, so the two interleave. On a CPU the model already uses every core the task owns,
    and the same work run alongside it only competes for them, so it stays inline there
    (``overlap_finish`` None); True or False forces either way.
    """
    encoder = load_encoder(spec.model, gpu_address=gpu_address, cores=cores)
    if overlap_finish is None:
        overlap_finish = encoder.device.type != "cpu"
    pending = (b for b in batches if b.num_rows)
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-tokenize") as prepare_pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-validate") as finish_pool,
    ):
        first = next(pending, None)
        ahead = prepare_pool.submit(_prepare, spec, encoder, first) if first is not None else None
        finishing: Future[EmbedOutcome] | None = None
        while ahead is not None:
            prepared = ahead.result()
            following = next(pending, None)
            ahead = prepare_pool.submit(_prepare, spec, encoder, following) if following is not None else None
            result = _encode(spec, encoder, prepared)
            if not overlap_finish:
                yield _finish(spec, encoder, prepared, result)
                continue
            if finishing is not None:
                yield finishing.result()
            finishing = finish_pool.submit(_finish, spec, encoder, prepared, result)
        if finishing is not None:
            yield finishing.result()
