"""``mapInArrow`` over :func:`transforms.embed_items.embed_items`: the Spark side of the backfill.

mapInArrow has one output schema, so each output batch carries both kinds of rows, told apart by
``_status`` (``ok`` or ``quarantined``); the driver persists the result once and splits it, so the
model never runs twice over a row. Each Python worker gets its GPU (if any) from the task's
resource assignment and its thread count from ``spark.task.cpus``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas.embeddings import embeddings_storage_schema
from schemas.quarantine import QUARANTINE_SCHEMA
from transforms import heap
from transforms.crashpoints import crash_point
from transforms.embed_items import EmbedSpec, embed_batches
from transforms.inference import EncodeStats

if TYPE_CHECKING:
    from pyspark import Accumulator

STATUS = "_status"
OK = "ok"
QUARANTINED = "quarantined"
_QUARANTINE_ONLY = [f for f in QUARANTINE_SCHEMA if f.name not in ("item_id", "model_version", "source_version")]


def combined_schema(dim: int) -> pa.Schema:
    """Output rows and quarantined rows in one schema (every column nullable for the other kind)."""
    fields = [pa.field(STATUS, pa.string())]
    fields += [f.with_nullable(True) for f in embeddings_storage_schema(dim)]
    fields += [f.with_nullable(True) for f in _QUARANTINE_ONLY]
    return pa.schema(fields)


def _to_combined(outcome_output: pa.RecordBatch, quarantine: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    n_ok, n_q = outcome_output.num_rows, quarantine.num_rows
    columns = []
    for f in schema:
        if f.name == STATUS:
            columns.append(pa.array([OK] * n_ok + [QUARANTINED] * n_q, pa.string()))
            continue
        ok_col = (
            pc.cast(outcome_output.column(f.name), f.type)
            if f.name in outcome_output.schema.names
            else pa.nulls(n_ok, f.type)
        )
        q_col = (
            pc.cast(quarantine.column(f.name), f.type) if f.name in quarantine.schema.names else pa.nulls(n_q, f.type)
        )
        columns.append(pa.concat_arrays([ok_col, q_col]))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def task_resources() -> tuple[str | None, int | None]:
    """(GPU address, cores) Spark assigned to the running task, if any."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return None, None
    gpus = ctx.resources().get("gpu")
    address = gpus.addresses[0] if gpus is not None and gpus.addresses else None
    return address, ctx.cpus()


_heap_frozen = False


def _freeze_worker_heap() -> None:
    """Once per Python worker, after its first batch (torch, GX and the tokenizer build some state
    lazily): keep its ~460k start-up objects out of the collector's full passes. Unfrozen, each
    task of ~3.3k rows triggered one full collection of ~0.3 s in each worker, ~1% of its time
    (2-core Xeon, MiniLM; :mod:`transforms.heap`). Workers are Spark's processes, reused across
    tasks and never handed back to other code, so nothing needs unfreezing."""
    global _heap_frozen
    if not _heap_frozen:
        heap.freeze(collect=True)
        _heap_frozen = True


def make_embed_fn(
    spec: EmbedSpec, dim: int, stats: Accumulator[Any] | None = None
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    schema = combined_schema(dim)

    def embed_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from transforms import validation

        validation.prewarm()  # a no-op thread once the worker's GX context exists
        gpu, cores = task_resources()
        total = EncodeStats()
        for i, outcome in enumerate(embed_batches(spec, batches, gpu_address=gpu, cores=cores)):
            total.add(outcome.stats)
            yield _to_combined(outcome.output, outcome.quarantine, schema)
            if i == 0:
                crash_point("mid_inference")
                _freeze_worker_heap()
        if stats is not None:
            stats.add({k: getattr(total, k) for k in total.__dataclass_fields__})

    return embed_partition
