"""Input contract of the embedding backfill: a Delta table of items with an id and a text."""

from __future__ import annotations

import pyarrow as pa

ITEMS_SCHEMA_VERSION = 1

#: The columns the backfill reads. Other columns may exist and are ignored; the names of these two
#: can be remapped in the job config (``source.id_column`` / ``source.text_column``).
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("category", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"sluice.schema": "items", "sluice.schema_version": str(ITEMS_SCHEMA_VERSION)},
)

#: Arrow types accepted for the id and text columns of a source table. Ids are compared as strings
#: everywhere downstream (Feast entity keys, Delta merge keys), so integer ids are cast once on read.
ACCEPTED_ID_TYPES = (pa.string(), pa.large_string(), pa.int32(), pa.int64())
ACCEPTED_TEXT_TYPES = (pa.string(), pa.large_string())
