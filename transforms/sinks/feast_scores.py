"""Feast online-store sink of the ad-scoring job: the latest CTR score of each (user, ad) pair.

Every scored request is a row of ``schemas.scores.SCORES_SCHEMA``; online, only the newest score of
a pair matters, so a batch is first cut down to its last row per ``(user_id, ad_id)`` in
``(partition, offset)`` order. That order is event order: the requests topic is keyed by
``user_id``, so all of a user's requests (and hence all of a pair's) share a partition, and a
partition's offsets are its order. Across batches the order is the runner's: it writes batches in
offset order and a replay rewrites the same batch, and the store is last write wins
(:mod:`transforms.sinks.feast_online`), so the stored score is the pair's latest.

Throughput: in the Redis profile the chunk's Arrow columns go to sluice's Redis store as they are
(:mod:`transforms.sinks.feast_redis_store`, which builds keys, values and the pipeline for the whole
chunk), since Feast's own per-row write cost ten times the job's budget. Other stores take protos;
building them is kept to a few C-level conversions per row: entity keys are parsed from bytes Arrow
concatenates for the whole chunk (a third of the cost of building them), and the model version and
scoring time (one per batch) are shared protos.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.sinks.feast_online import WRITE_CHUNK_ROWS, FeastConfig, FeastViewSink, OnlineRow, protobuf_varint
from transforms.sinks.feast_repo import (
    AD_KEY_COLUMN,
    MODEL_VERSION_FEATURE,
    SCORE_FEATURE,
    SCORES_FEATURES,
    SCORES_TIMESTAMP_COLUMN,
    USER_KEY_COLUMN,
    build_score_definitions,
)

if TYPE_CHECKING:
    from feast import Entity, FeatureView

PARTITION_COLUMN = "partition"
OFFSET_COLUMN = "offset"
#: Feast sorts a view's join keys when it serialises an entity key, so keys are built in that order.
_JOIN_KEYS = tuple(sorted((USER_KEY_COLUMN, AD_KEY_COLUMN)))


class FeastScoresSink(FeastViewSink):
    """Upserts the latest score of each (user, ad) pair into a Feast online store."""

    join_keys = (USER_KEY_COLUMN, AD_KEY_COLUMN)
    features = SCORES_FEATURES
    input_contract = "schemas.scores.SCORES_SCHEMA"
    publisher = "`sluice score-stream`"

    def __init__(self, config: FeastConfig, *, scores_table_uri: str, write_chunk_rows: int = WRITE_CHUNK_ROWS) -> None:
        super().__init__(
            config,
            table_uri=scores_table_uri,
            feature_view=config.scores_feature_view,
            write_chunk_rows=write_chunk_rows,
        )

    def lookup(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any] | None]:
        """The stored score of each ``(user_id, ad_id)``, in order; ``None`` where there is none.

        Rows hold ``user_id``, ``ad_id``, ``score``, ``model_version`` and ``scored_at`` (an aware
        UTC datetime truncated to the second: the row's event time in Feast), read as a serving
        client reads them.
        """
        if isinstance(pairs, str | bytes) or any(isinstance(p, str | bytes) or len(p) != 2 for p in pairs):
            raise TypeError("lookup takes a sequence of (user_id, ad_id) pairs")
        return self._lookup_rows(pairs, timestamp_column=SCORES_TIMESTAMP_COLUMN)

    def _definitions(self) -> tuple[list[Entity], FeatureView]:
        user, ad, view = build_score_definitions(scores_table_uri=self._table_uri, feature_view_name=self._view_name)
        return [user, ad], view

    def _prepared(self, batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
        self._check_columns(
            batch,
            {
                USER_KEY_COLUMN: "string",
                AD_KEY_COLUMN: "string",
                SCORE_FEATURE: "float32",
                MODEL_VERSION_FEATURE: "string",
                PARTITION_COLUMN: "int32",
                OFFSET_COLUMN: "int64",
                SCORES_TIMESTAMP_COLUMN: "timestamp",
            },
        )
        return latest_per_pair(batch)

    def _to_protos(self, chunk: pa.RecordBatch) -> list[OnlineRow]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        keys = map(EntityKeyProto.FromString, _serialized_entity_keys(chunk).to_pylist())
        scores = [ValueProto(float_val=score) for score in chunk.column(SCORE_FEATURE).to_pylist()]
        versions = self._interned(chunk.column(MODEL_VERSION_FEATURE), "string_val")
        times = self._utc_datetimes(chunk.column(SCORES_TIMESTAMP_COLUMN))
        return [
            (key, {SCORE_FEATURE: score, MODEL_VERSION_FEATURE: version}, at, None)
            for key, score, version, at in zip(keys, scores, versions, times, strict=True)
        ]


def latest_per_pair(rows: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """The last row of each ``(user_id, ad_id)`` in ``(partition, offset)`` order; ``rows`` itself
    when no pair repeats. Kept rows stay in their input order."""
    n = rows.num_rows
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
    order = pc.sort_indices(table, sort_keys=[(PARTITION_COLUMN, "ascending"), (OFFSET_COLUMN, "ascending")])
    ranked = table.select([USER_KEY_COLUMN, AD_KEY_COLUMN]).take(order)
    ranked = ranked.append_column("_rank", pa.array(np.arange(n, dtype=np.int64)))
    last = ranked.group_by([USER_KEY_COLUMN, AD_KEY_COLUMN]).aggregate([("_rank", "max")]).column("_rank_max")
    if len(last) == n:
        return rows
    keep = np.sort(np.asarray(order)[np.asarray(last)])
    return rows.take(pa.array(keep))


def _serialized_entity_keys(chunk: pa.RecordBatch) -> pa.Array:
    """Each row's ``EntityKey`` proto, serialised, built for the whole chunk by Arrow kernels.

    ``EntityKey{join_keys: [ad_id, user_id], entity_values: [Value{string_val: id}, ...]}`` in
    protobuf's wire format: a constant head naming the join keys, then per id a tag, a length, the
    nested tag, a length and the id's bytes. Parsing that is one C call per row, against three
    Python proto constructors (otherwise the largest part of the sink's own cost per row).
    """
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    def tag(message: Any, field: str) -> bytes:  # a length-delimited field's key: number << 3 | 2
        return protobuf_varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)

    head = b"".join(tag(EntityKeyProto, "join_keys") + protobuf_varint(len(k)) + k.encode() for k in _JOIN_KEYS)
    value_tag, string_tag = tag(EntityKeyProto, "entity_values"), tag(ValueProto, "string_val")
    parts: list[pa.Array | bytes] = [head]
    for name in _JOIN_KEYS:
        ids = pc.cast(chunk.column(name), pa.binary())
        lengths = np.asarray(pc.binary_length(ids), dtype=np.int64)
        inner = _varint_column(lengths)
        value_size = len(string_tag) + np.asarray(pc.binary_length(inner), dtype=np.int64) + lengths
        parts += [value_tag, _varint_column(value_size), string_tag, inner, ids]
    return pc.binary_join_element_wise(*parts, b"")


def _varint_column(values: np.ndarray) -> pa.Array:
    """Protobuf varints of non-negative ints, as a binary array (1 byte below 128, then 7 bits a byte)."""
    sizes = np.ones(len(values), dtype=np.int64)
    rest = values >> 7
    while rest.any():
        sizes += rest > 0
        rest >>= 7
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    remaining = values.copy()
    for byte in range(int(sizes.max(initial=0))):
        live = sizes > byte
        more = sizes > byte + 1
        data[offsets[:-1][live] + byte] = (remaining[live] & 0x7F) | np.where(more[live], 0x80, 0)
        remaining >>= 7
    return pa.Array.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def lookup_ad_score(user: str, ad: str, *, target: str = "data/scores", config: Path | None = None) -> dict[str, Any]:
    """``sluice lookup ad-score``: the score Feast serves for one (user, ad), as a JSON-ready dict.

    The store is the ``feast`` section of ``config`` (the scoring job's YAML) when it has one, else
    the local layout the job defaults to: registry and SQLite file under ``feast/`` next to the
    ``target`` scores table. Always has ``user_id``, ``ad_id`` and ``found``; when found, also
    ``score``, ``model_version`` and ``scored_at`` (ISO 8601, UTC).
    """
    feast_config = FeastConfig.from_file(config, table_uri=target)
    (row,) = FeastScoresSink(feast_config, scores_table_uri=target).lookup([(user, ad)])
    out: dict[str, Any] = {USER_KEY_COLUMN: user, AD_KEY_COLUMN: ad, "found": row is not None}
    if row is not None:
        scored_at: datetime = row[SCORES_TIMESTAMP_COLUMN]
        out.update(
            {
                SCORE_FEATURE: row[SCORE_FEATURE],
                MODEL_VERSION_FEATURE: row[MODEL_VERSION_FEATURE],
                SCORES_TIMESTAMP_COLUMN: scored_at.isoformat(),
            }
        )
    return out
