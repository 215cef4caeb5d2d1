"""The Feast definitions of sluice's feature views, in one place: item embeddings and ad scores.

Both the jobs' online sinks and the ``infra/feast`` repo that users ``feast apply`` build their
objects here, so the registry the CLI writes and the protos the sinks write can never disagree on
names, types, join keys or the vector length. Feast is imported inside the builders only, so the
sinks' config (which imports the column names below) loads without the ``[feast]`` extra.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from schemas.embeddings import KEY_COLUMN, VECTOR_COLUMN

if TYPE_CHECKING:
    from feast import Entity, FeatureView, Field

#: Columns of the embeddings table that go online, besides the key and the vector. ``model_name`` and
#: the source position stay in Delta: an online reader needs the version to detect a stale vector,
#: not the full lineage.
MODEL_VERSION_FEATURE = "model_version"
SOURCE_VERSION_FEATURE = "source_version"
EVENT_TIMESTAMP_COLUMN = "processed_at"
#: The feature view's features, in the order lookups return them.
FEATURES = (VECTOR_COLUMN, MODEL_VERSION_FEATURE, SOURCE_VERSION_FEATURE)

#: The ad-scores view: the latest CTR score of each (user, ad) pair, keyed by both ids. Column names
#: are those of ``schemas.scores.SCORES_SCHEMA``.
USER_KEY_COLUMN = "user_id"
AD_KEY_COLUMN = "ad_id"
SCORE_FEATURE = "score"
#: The scores view's timestamp field. ``scored_at``, not ``event_time``: a point-in-time join must
#: see a score only from the moment it existed, and a consumer catching up on a backlog scores
#: hours-old requests, so ``event_time`` would leak scores into the past. Being the event timestamp,
#: it is stored with every online row anyway (Redis ``_ts``, SQLite ``event_ts``) and served by
#: ``get_online_features``, so it is not written a second time as a feature.
SCORES_TIMESTAMP_COLUMN = "scored_at"
#: The scores view's features, in the order lookups return them; ``model_version`` lets a reader
#: tell which model's score it got (a promoted model changes scores of pairs it has seen again).
SCORES_FEATURES = (SCORE_FEATURE, MODEL_VERSION_FEATURE)
#: How long a score stays valid for point-in-time joins and ``feast materialize-incremental``'s first
#: window. A week: the CTR model is retrained and promoted on that cadence and ad flights are short,
#: so an older score was made by another model for another context and a training row should see
#: "no score" rather than it; it also bounds what a rebuild of the online store loads (pairs of
#: users and ads grow without end, a week of them does not). Feast's online reads do not filter on
#: TTL: a serving client that cares checks the returned ``scored_at``.
SCORES_TTL = timedelta(days=7)
USER_ENTITY = "user"
AD_ENTITY = "ad"


def _feature_view(
    *,
    name: str,
    entities: list[Entity],
    ttl: timedelta,
    schema: list[Field],
    table_uri: str,
    timestamp_field: str,
    source_description: str,
    tags: dict[str, str],
) -> FeatureView:
    """An online view whose batch source is the Delta table a job writes, so ``feast materialize``
    (or a point-in-time join) can rebuild the online store from it without the job."""
    from feast import FeatureView, FileSource
    from feast.data_format import DeltaFormat

    source = FileSource(
        name=f"{name}_delta",
        path=table_uri,
        file_format=DeltaFormat(),
        timestamp_field=timestamp_field,
        description=source_description,
    )
    return FeatureView(name=name, entities=entities, ttl=ttl, schema=schema, source=source, online=True, tags=tags)


def _string_entity(name: str, join_key: str, description: str) -> Entity:
    from feast import Entity, ValueType

    return Entity(name=name, join_keys=[join_key], value_type=ValueType.STRING, description=description)


def build_definitions(
    *,
    embeddings_table_uri: str,
    dim: int,
    entity_name: str = "item",
    feature_view_name: str = "item_embeddings",
) -> tuple[Entity, FeatureView]:
    """The entity and feature view over the Delta embeddings table."""
    from feast import Field
    from feast.types import Array, Float32, Int64, String

    if dim <= 0:
        raise ValueError(f"embedding dimension must be positive, got {dim}")
    entity = _string_entity(entity_name, KEY_COLUMN, "An item of the items table; embedded by the embedding backfill.")
    view = _feature_view(
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
        table_uri=embeddings_table_uri,
        timestamp_field=EVENT_TIMESTAMP_COLUMN,
        source_description="Delta embeddings table written by the sluice embedding backfill.",
        tags={"sluice.schema": "embeddings", "sluice.dim": str(dim)},
    )
    return entity, view


def build_score_definitions(
    *, scores_table_uri: str, feature_view_name: str = "ad_scores"
) -> tuple[Entity, Entity, FeatureView]:
    """The ``user`` and ``ad`` entities and the scores view over the Delta scores table.

    One entity per id, not a combined ``(user, ad)`` entity: other views (user or ad profiles) key
    on the same entities, and Feast joins a view on the union of its entities' join keys anyway.
    """
    from feast import Field
    from feast.types import Float32, String

    user = _string_entity(USER_ENTITY, USER_KEY_COLUMN, "A user of the ad requests stream.")
    ad = _string_entity(AD_ENTITY, AD_KEY_COLUMN, "An ad of the ad requests stream.")
    view = _feature_view(
        name=feature_view_name,
        entities=[user, ad],
        ttl=SCORES_TTL,
        schema=[
            Field(name=USER_KEY_COLUMN, dtype=String),
            Field(name=AD_KEY_COLUMN, dtype=String),
            Field(name=SCORE_FEATURE, dtype=Float32),
            Field(name=MODEL_VERSION_FEATURE, dtype=String),
        ],
        table_uri=scores_table_uri,
        timestamp_field=SCORES_TIMESTAMP_COLUMN,
        source_description="Delta scores table written by the sluice ad-scoring job.",
        tags={"sluice.schema": "scores"},
    )
    return user, ad, view
