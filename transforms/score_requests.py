"""One batch of raw Kafka records in; scores, dead letters and quarantined rows out: the whole
per-record path of the ad-scoring job, engine-free.

Both runners call :meth:`RequestScorer.score` with a :data:`~schemas.scores.KAFKA_RECORD_SCHEMA`
batch (the Spark runner straight from its Kafka source through ``mapInArrow``, the consumer from
librdkafka's messages) and only move the results to sinks. Every input record leaves in exactly
one of the three outputs (invariant 1):

* ``dead_letters``: undecodable messages (stage ``decode``, with the codec's error class) and
  requests the model rejected or raised on (stage ``model``), with the original key and value;
* ``quarantined``: scored rows that failed the scores suite (a non-finite score, missing lineage,
  or a whole batch whose mean strayed from the model's base rate);
* ``scores``: everything else, with its lineage (model version, topic, partition, offset).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.ad_request_codec import CodecName, codec_for
from schemas.expectations import DEFAULT_MEAN_RATIO_BOUNDS
from schemas.scores import DEAD_LETTER_SCHEMA, KAFKA_RECORD_SCHEMA, SCORES_QUARANTINE_SCHEMA, SCORES_SCHEMA
from transforms.models.cache import shared
from transforms.models.ctr_registry import CtrModelSource
from transforms.models.device import configure_threads
from transforms.score_validation import DEFAULT_MIN_ROWS_FOR_MEAN, ScoreValidator
from transforms.validation import CHECK_COLUMN, REASON_COLUMN

STAGE_DECODE = "decode"
STAGE_MODEL = "model"


@dataclass(frozen=True)
class ScoringSpec:
    """Everything a worker needs to score; small and picklable (it ships to Spark executors)."""

    model_path: str
    codec: CodecName = "json"
    device: str = "cpu"
    model_sha256: str | None = None
    model_poll_seconds: float = 5.0
    mean_ratio_bounds: tuple[float, float] = DEFAULT_MEAN_RATIO_BOUNDS
    min_rows_for_mean: int = DEFAULT_MIN_ROWS_FOR_MEAN
    #: torch intra-op threads for this process; None leaves torch's setting alone.
    threads: int | None = None


@dataclass
class ScoreStats:
    """What one call did; summed by the runners into the job summary and metrics."""

    records: int = 0
    scored: int = 0
    dead_lettered_decode: int = 0
    dead_lettered_model: int = 0
    quarantined: int = 0
    decode_seconds: float = 0.0
    model_seconds: float = 0.0
    validate_seconds: float = 0.0

    @property
    def dead_lettered(self) -> int:
        return self.dead_lettered_decode + self.dead_lettered_model

    def add(self, other: ScoreStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ScoreOutcome:
    scores: pa.RecordBatch
    dead_letters: pa.RecordBatch
    quarantined: pa.RecordBatch
    stats: ScoreStats
    model_name: str
    model_version: str
    #: Loud, batch-level problems (a quarantined batch mean); the runner logs them as warnings.
    warnings: list[str] = field(default_factory=list)


def _dead_letters(
    records: pa.RecordBatch,
    positions: list[int],
    *,
    stage: str,
    classes: list[str],
    messages: list[str],
    model_version: str | None,
) -> pa.RecordBatch:
    idx = pa.array(positions, type=pa.int64())
    n = len(positions)
    return pa.RecordBatch.from_arrays(
        [
            records.column("key").take(idx),
            records.column("value").take(idx),
            records.column("topic").take(idx),
            records.column("partition").take(idx),
            records.column("offset").take(idx),
            pa.array([stage] * n, pa.string()),
            pa.array(classes, pa.string()),
            pa.array(messages, pa.string()),
            pa.array([model_version] * n, pa.string()),
        ],
        schema=DEAD_LETTER_SCHEMA,
    )


def _as_records(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """The input as one record batch of exactly :data:`KAFKA_RECORD_SCHEMA` (Spark hands over more
    columns, and may type ``partition`` or ``timestamp`` differently)."""
    columns = []
    for f in KAFKA_RECORD_SCHEMA:
        col = batch.column(f.name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        columns.append(col if col.type == f.type else pc.cast(col, f.type))
    return pa.RecordBatch.from_arrays(columns, schema=KAFKA_RECORD_SCHEMA)


def _timestamps(n: int, at: datetime) -> pa.Array:
    stamp = np.datetime64(at.astimezone(UTC).replace(tzinfo=None), "us")
    return pa.array(np.full(n, stamp), type=pa.timestamp("us", tz="UTC"))


class RequestScorer:
    """The per-process scoring engine: codec, the (hot-swappable) model, the validator."""

    def __init__(self, spec: ScoringSpec) -> None:
        self.spec = spec
        self.codec = codec_for(spec.codec)
        if spec.threads is not None:
            configure_threads(spec.threads)
        self.models = CtrModelSource(
            spec.model_path,
            device=spec.device,
            poll_seconds=spec.model_poll_seconds,
            expected_version=spec.model_sha256,
        )
        self._validators: dict[str, ScoreValidator] = {}
        # Built now, not on the first batch: setting GX up costs seconds, and a stream's first batch
        # should not wait for it (nor should its latency figures).
        model = self.models.current()
        self._validator(model.version, model.base_rate)

    def _validator(self, version: str, base_rate: float) -> ScoreValidator:
        # The batch-mean bounds depend on the model's base rate, so one validator per version.
        if version not in self._validators:
            self._validators[version] = ScoreValidator(
                base_rate=base_rate,
                mean_ratio_bounds=self.spec.mean_ratio_bounds,
                min_rows_for_mean=self.spec.min_rows_for_mean,
            )
        return self._validators[version]

    def score(self, batch: pa.RecordBatch | pa.Table, *, now: datetime | None = None) -> ScoreOutcome:
        """Score one batch of Kafka records. Never raises for a bad record."""
        records = _as_records(batch)
        model = self.models.current()  # one model per batch: every row of it names this version
        stats = ScoreStats(records=records.num_rows)
        now = now or datetime.now(UTC)

        t0 = time.perf_counter()
        decoded = self.codec.decode_batch(records.column("value").to_pylist())
        stats.decode_seconds = time.perf_counter() - t0
        dead = [
            _dead_letters(
                records,
                [f.index for f in decoded.failures],
                stage=STAGE_DECODE,
                classes=[str(f.error_class) for f in decoded.failures],
                messages=[f.message for f in decoded.failures],
                model_version=None,
            )
        ]
        stats.dead_lettered_decode = len(decoded.failures)

        requests = decoded.records
        t0 = time.perf_counter()
        result = model.score(requests)
        stats.model_seconds = time.perf_counter() - t0
        rejected = sorted(result.rejected)
        if rejected:
            dead.append(
                _dead_letters(
                    records,
                    [int(decoded.indices[r]) for r in rejected],
                    stage=STAGE_MODEL,
                    classes=[result.rejected[r][0] for r in rejected],
                    messages=[result.rejected[r][1] for r in rejected],
                    model_version=model.version,
                )
            )
        stats.dead_lettered_model = len(rejected)

        keep = np.ones(requests.num_rows, dtype=bool)
        keep[rejected] = False
        mask = pa.array(keep, type=pa.bool_())
        scored_requests = requests.filter(mask)
        positions = pa.array(decoded.indices[keep], type=pa.int64())
        n = scored_requests.num_rows
        event_time = pc.cast(scored_requests.column("event_time"), pa.timestamp("us", tz="UTC"))
        rows = pa.RecordBatch.from_arrays(
            [
                scored_requests.column("request_id"),
                scored_requests.column("user_id"),
                scored_requests.column("ad_id"),
                scored_requests.column("seq"),
                pa.array(result.scores[keep], type=pa.float32()),
                pa.array([model.name] * n, pa.string()),
                pa.array([model.version] * n, pa.string()),
                records.column("topic").take(positions),
                records.column("partition").take(positions),
                records.column("offset").take(positions),
                event_time,
                _timestamps(n, now),
                pc.cast(event_time, pa.date32()),
            ],
            schema=SCORES_SCHEMA,
        )

        t0 = time.perf_counter()
        checked = self._validator(model.version, model.base_rate).validate(rows)
        stats.validate_seconds = time.perf_counter() - t0
        warnings: list[str] = []
        q = checked.rejected
        if q.num_rows and "batch_mean" in checked.counts and checked.counts["batch_mean"]:
            first_reason = q.column(REASON_COLUMN)[0].as_py()
            warnings.append(
                f"quarantined a whole batch of {q.num_rows} scores from model {model.version}: {first_reason}"
            )
        quarantined = pa.RecordBatch.from_arrays(
            [
                q.column("request_id"),
                q.column("user_id"),
                q.column("ad_id"),
                q.column("seq"),
                q.column("score"),
                q.column(CHECK_COLUMN),
                q.column(REASON_COLUMN),
                q.column("model_version"),
                q.column("topic"),
                q.column("partition"),
                q.column("offset"),
                _timestamps(q.num_rows, now),
            ],
            schema=SCORES_QUARANTINE_SCHEMA,
        )
        stats.quarantined = q.num_rows
        stats.scored = checked.valid.num_rows
        dead_batch = dead[0] if len(dead) == 1 else pa.concat_batches(dead)
        return ScoreOutcome(
            scores=checked.valid,
            dead_letters=dead_batch,
            quarantined=quarantined,
            stats=stats,
            model_name=model.name,
            model_version=model.version,
            warnings=warnings,
        )


def scorer_for(spec: ScoringSpec) -> RequestScorer:
    """The process-wide scorer for ``spec`` (invariant 4: one model per worker process)."""
    return shared(("ctr-scorer", spec), lambda: RequestScorer(spec))
