"""``mapInArrow`` over :meth:`transforms.score_requests.RequestScorer.score`: the Spark side of ad scoring.

Spark's Kafka source hands each task Arrow batches with exactly the columns the core takes
(:data:`~schemas.scores.KAFKA_RECORD_SCHEMA`), so the adapter only calls the core and puts its
three outputs into one schema: ``mapInArrow`` has a single output schema, and the driver collects
the micro-batch's result once, as Arrow, and splits it by ``_kind`` (:func:`split_outputs`), so no
record is scored twice. The scorer
(and its model) is loaded once per Python worker and reused across tasks and micro-batches
(invariant 4); it watches the model registry, so a promotion reaches running executors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas.scores import DEAD_LETTER_SCHEMA, SCORES_QUARANTINE_SCHEMA, SCORES_SCHEMA
from transforms.crashpoints import crash_point
from transforms.errors import ModelLoadError, SinkError
from transforms.score_requests import ScoreStats, ScoringSpec, scorer_for

if TYPE_CHECKING:
    from pyspark import Accumulator
    from pyspark.sql import SparkSession

KIND = "_kind"
SCORED = "score"
DEAD_LETTER = "dead_letter"
QUARANTINED = "quarantine"
_PARTS = ((SCORED, SCORES_SCHEMA), (DEAD_LETTER, DEAD_LETTER_SCHEMA), (QUARANTINED, SCORES_QUARANTINE_SCHEMA))


def combined_schema() -> pa.Schema:
    """Every column of the three outputs, once, all nullable, after ``_kind``."""
    fields: dict[str, pa.Field] = {}
    for _, schema in _PARTS:
        for f in schema:
            if f.name in fields and fields[f.name].type != f.type:
                raise TypeError(f"column {f.name} has two types across the scoring outputs")
            fields.setdefault(f.name, f.with_nullable(True))
    return pa.schema([pa.field(KIND, pa.string()), *fields.values()])


def _combine(parts: dict[str, pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    columns = []
    for f in schema:
        pieces = []
        for kind, batch in parts.items():
            if f.name == KIND:
                pieces.append(pa.array([kind] * batch.num_rows, pa.string()))
            elif f.name in batch.schema.names:
                pieces.append(batch.column(f.name).cast(f.type))
            else:
                pieces.append(pa.nulls(batch.num_rows, f.type))
        columns.append(pa.concat_arrays(pieces))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def split_outputs(combined: pa.Table) -> dict[str, pa.Table]:
    """A micro-batch's scored records, collected on the driver (``_kind`` and every column), as the
    three outputs in their own schemas: the inverse of the worker-side combination. A null in a
    column its output declares non-null fails here, before anything is written."""
    kinds = combined.column(KIND)
    out: dict[str, pa.Table] = {}
    for kind, schema in _PARTS:
        try:
            out[kind] = combined.filter(pc.equal(kinds, kind)).select(schema.names).cast(schema)
        except (ValueError, pa.ArrowInvalid) as exc:
            raise SinkError(f"the {kind} rows of a micro-batch do not fit their table: {exc}") from exc
    return out


def make_score_fn(
    spec: ScoringSpec, stats: Accumulator[Any] | None = None, *, crash_points: bool = True
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ``mapInArrow`` function of a micro-batch. ``crash_points=False`` for runs whose output is
    thrown away (the source warm-up), so a crash test's named point is only reached in a real batch."""
    schema = combined_schema()

    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer = scorer_for(spec)
        total = ScoreStats()
        versions: set[str] = set()
        for batch in batches:
            if batch.num_rows == 0:
                continue
            outcome = scorer.score(batch)
            total.add(outcome.stats)
            versions.add(outcome.model_version)
            yield _combine(
                {SCORED: outcome.scores, DEAD_LETTER: outcome.dead_letters, QUARANTINED: outcome.quarantined},
                schema,
            )
            if crash_points:
                crash_point("stream:mid_scoring")
        if stats is not None:
            stats.add({**total.as_dict(), **{f"model:{v}": 1 for v in versions}})

    return score_partition


def warm_workers(spark: SparkSession, spec: ScoringSpec) -> int:
    """Load the scorer in every Python worker slot before the stream starts; returns the slots.

    Python workers are reused across tasks, and each keeps its scorer (invariant 4), but starting
    one (torch, pandas, Great Expectations, the model) takes 5-15 s: without this the first
    micro-batch pays it, which is 15 s of latency on a stream that promised one second.
    """
    slots = max(1, spark.sparkContext.defaultParallelism)

    def load(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        version = scorer_for(spec).models.current().version
        yield pa.RecordBatch.from_pydict({"version": [version]})

    try:
        spark.range(slots, numPartitions=slots).mapInArrow(load, "version string").collect()
    except Exception as exc:
        # Our own errors already say what and where: drop their class path from the line.
        line = re.sub(r"^transforms\.errors\.\w+: ", "", python_error_line(str(exc)))
        raise ModelLoadError(f"the Spark workers could not load the scorer: {line}") from exc
    return slots


def python_error_line(text: str) -> str:
    """The Python exception a worker raised (``module.Class: message``), out of Spark's report of
    it (a Python traceback wrapped in JVM stack frames); the report's first line if none is found."""
    found = [
        line.strip()
        for line in text.splitlines()
        if _PY_ERROR.match(line.strip()) and not line.strip().startswith(("org.", "java.", "py4j.", "scala."))
    ]
    if found:
        return found[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


_PY_ERROR = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b[\w.]*: \S")
