"""Output contract of the embedding backfill.

The vector is ``fixed_size_list<float32>[dim]`` in the engine-free core, where Arrow can carry the
length in the type. Spark's Arrow path and Delta have no fixed-size list, so at those boundaries
the same column is ``list<float32>`` (Spark ``array<float>``) and its length is enforced by a Delta
CHECK constraint instead (see :func:`dimension_constraint`).
"""

from __future__ import annotations

import pyarrow as pa

EMBEDDINGS_SCHEMA_VERSION = 1

KEY_COLUMN = "item_id"
VECTOR_COLUMN = "embedding"


def embeddings_schema(dim: int) -> pa.Schema:
    """The core's view: vector length carried in the type."""
    return pa.schema(
        [
            pa.field(KEY_COLUMN, pa.string(), nullable=False),
            pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), dim), nullable=False),
            pa.field("model_name", pa.string(), nullable=False),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("source_version", pa.int64(), nullable=False),
            pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ],
        metadata={
            "sluice.schema": "embeddings",
            "sluice.schema_version": str(EMBEDDINGS_SCHEMA_VERSION),
            "sluice.dim": str(dim),
        },
    )


def embeddings_storage_schema(dim: int) -> pa.Schema:
    """The Delta/Spark view: the same columns with the vector as a variable-length list."""
    core = embeddings_schema(dim)
    fields = [
        pa.field(f.name, pa.list_(pa.float32()), nullable=f.nullable) if f.name == VECTOR_COLUMN else f for f in core
    ]
    return pa.schema(fields, metadata=core.metadata)


def dimension_constraint(dim: int) -> tuple[str, str]:
    """Name and SQL expression of the Delta CHECK constraint that pins the vector length."""
    return "embedding_dim", f"size({VECTOR_COLUMN}) = {dim}"
