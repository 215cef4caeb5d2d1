"""Input contract of the ad-scoring job: one ad request, i.e. one (user, ad) pair to score.

A request on the wire (JSON by default, Avro optionally; see :mod:`schemas.ad_request_codec`) has
exactly these fields. ``slot`` and ``device`` are closed vocabularies: a value outside them is a
malformed message (dead-lettered), because it means the producer and the model disagree about
what the field means. ``user_id``, ``ad_id``, ``campaign_id`` and ``country`` are open: an id the
model never saw is normal traffic (a new user, a new ad) and is scored through the model's
reserved unknown bucket, never rejected.

The Kafka message key is ``user_id`` (so one user's requests stay ordered in one partition) and
``seq`` numbers each user's requests 0, 1, 2, ...: tests use it to show no gaps and no repeats per
key, not just equal totals (DESIGN.md, "Sequence checks").
"""

from __future__ import annotations

import pyarrow as pa

AD_REQUEST_SCHEMA_VERSION = 1

#: Where each request is shown. Closed vocabulary.
SLOTS: tuple[str, ...] = ("feed", "sidebar", "search_top", "search_bottom", "video_preroll", "story")
#: What it is shown on. Closed vocabulary.
DEVICES: tuple[str, ...] = ("ios", "android", "desktop", "tablet", "ctv")

#: Categorical inputs of the CTR model (each gets an embedding table with a reserved unknown bucket).
CATEGORICAL_FEATURES: tuple[str, ...] = ("user_id", "ad_id", "campaign_id", "slot", "device", "country", "hour")
#: Dense inputs of the CTR model. The codec only requires them to be finite numbers; the ranges are
#: what the *model* accepts, checked by the scorer: a request outside them is one "the model
#: rejects" (dead-lettered at stage ``model``), not a malformed message.
DENSE_FEATURES: tuple[str, ...] = ("bid_floor_usd", "user_ctr_7d", "ad_ctr_7d", "session_depth")
DENSE_RANGES: dict[str, tuple[float, float]] = {
    "bid_floor_usd": (0.0, 1_000.0),
    "user_ctr_7d": (0.0, 1.0),
    "ad_ctr_7d": (0.0, 1.0),
    "session_depth": (0.0, 10_000.0),
}

AD_REQUEST_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("campaign_id", pa.string(), nullable=False),
        pa.field("slot", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("country", pa.string(), nullable=False),  # ISO 3166-1 alpha-2, upper case
        pa.field("hour", pa.int8(), nullable=False),  # 0..23, the user's local hour
        pa.field("bid_floor_usd", pa.float32(), nullable=False),
        pa.field("user_ctr_7d", pa.float32(), nullable=False),
        pa.field("ad_ctr_7d", pa.float32(), nullable=False),
        pa.field("session_depth", pa.float32(), nullable=False),
        pa.field("event_time", pa.timestamp("ms", tz="UTC"), nullable=False),
    ],
    metadata={"sluice.schema": "ad_request", "sluice.schema_version": str(AD_REQUEST_SCHEMA_VERSION)},
)

#: Where a decoded request came from; carried next to the request columns through the pipeline.
SOURCE_POSITION_SCHEMA = pa.schema(
    [
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
    ]
)
