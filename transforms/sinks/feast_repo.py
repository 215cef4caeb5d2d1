"""The Feast definitions of the embeddings feature view, in one place.

Both the job's online sink and the ``infra/feast`` repo that users ``feast apply`` build their
objects here, so the registry the CLI writes and the protos the sink writes can never disagree on
names, types or the vector length. Feast is imported inside :func:`build_definitions` only, so the
sink's config (which imports the column names below) loads without the ``[feast]`` extra.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from schemas.embeddings import KEY_COLUMN, VECTOR_COLUMN

if TYPE_CHECKING:
    from feast import Entity, FeatureView

#: Columns of the embeddings table that go online, besides the key and the vector. ``model_name`` and
#: the source position stay in Delta: an online reader needs the version to detect a stale vector,
#: not the full lineage.
MODEL_VERSION_FEATURE = "model_version"
SOURCE_VERSION_FEATURE = "source_version"
EVENT_TIMESTAMP_COLUMN = "processed_at"
#: The feature view's features, in the order lookups return them.
FEATURES = (VECTOR_COLUMN, MODEL_VERSION_FEATURE, SOURCE_VERSION_FEATURE)


def build_definitions(
    *,
    embeddings_table_uri: str,
    dim: int,
    entity_name: str = "item",
    feature_view_name: str = "item_embeddings",
) -> tuple[Entity, FeatureView]:
    """The entity and feature view over the Delta embeddings table.

    The batch source points at the Delta table the job writes, so ``feast materialize`` (or a
    point-in-time join) can rebuild the online store from it without the job.
    """
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.data_format import DeltaFormat
    from feast.types import Array, Float32, Int64, String

    if dim <= 0:
        raise ValueError(f"embedding dimension must be positive, got {dim}")
    entity = Entity(
        name=entity_name,
        join_keys=[KEY_COLUMN],
        value_type=ValueType.STRING,
        description="An item of the items table; embedded by the embedding backfill.",
    )
    source = FileSource(
        name=f"{feature_view_name}_delta",
        path=embeddings_table_uri,
        file_format=DeltaFormat(),
        timestamp_field=EVENT_TIMESTAMP_COLUMN,
        description="Delta embeddings table written by the sluice embedding backfill.",
    )
    view = FeatureView(
        name=feature_view_name,
        entities=[entity],
        # A zero TTL means "never expires": an item's vector stays valid until the item changes.
        ttl=timedelta(0),
        schema=[
            Field(name=KEY_COLUMN, dtype=String),
            # vector_length documents the width in the registry; vector_index stays off because
            # the online stores here are key-value lookups, not ANN indexes.
            Field(name=VECTOR_COLUMN, dtype=Array(Float32), vector_length=dim),
            Field(name=MODEL_VERSION_FEATURE, dtype=String),
            Field(name=SOURCE_VERSION_FEATURE, dtype=Int64),
        ],
        source=source,
        online=True,
        tags={"sluice.schema": "embeddings", "sluice.dim": str(dim)},
    )
    return entity, view
