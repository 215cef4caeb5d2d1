"""Writing a DataFrame of embeddings to the Feast online store.

Two routes, chosen by where the work is cheapest:

* **From the driver** when Spark runs locally (always the case for a SQLite store, which is one
  file on one machine). The driver already has Feast imported and connected, because it registered
  the feature view while the executors embedded; an executor's Python worker would first have to
  import Feast, which alone costs 4-8 s, more than writing 20k vectors (0.5 s). Rows come back in
  Arrow chunks of bounded size, never as Python Row objects.
* **From the executors** on a cluster (Redis): one writer per partition via ``mapInArrow``, so rows
  go executor -> store directly and never through the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

from transforms.sinks.feast_online import FeastConfig, FeastOnlineSink, SqliteOnlineStoreConfig

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


class OnlineSink(Protocol):
    """What this module needs of a Feast sink (the embeddings' or the scores')."""

    @property
    def config(self) -> FeastConfig: ...

    def write(self, batch: pa.RecordBatch | pa.Table) -> int: ...


#: Rows per driver-side chunk: ~150 MB of 384-d float32 vectors, so the driver's memory stays bounded.
DRIVER_CHUNK_ROWS = 100_000


def _writer(sink: OnlineSink) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def write_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        written = 0
        for batch in batches:
            written += sink.write(batch)
        yield pa.RecordBatch.from_pydict({"written": [written]})

    return write_partition


def online_sink(cfg: FeastConfig, table_uri: str, dim: int) -> FeastOnlineSink:
    return FeastOnlineSink(cfg, embeddings_table_uri=table_uri, dim=dim)


def _writes_from_driver(df: DataFrame, sink: OnlineSink) -> bool:
    """Whether :func:`write_online` writes from the driver (module docs) rather than the executors."""
    local = (df.sparkSession.sparkContext.master or "").startswith("local")
    return local or isinstance(sink.config.online_store, SqliteOnlineStoreConfig)


def _write_from_driver(df: DataFrame, sink: OnlineSink, rows: int, key_column: str) -> int:
    from pyspark.sql import functions as F

    chunks = max(1, -(-rows // DRIVER_CHUNK_ROWS))
    if chunks == 1:
        return sink.write(df.toArrow())
    tagged = df.withColumn("_chunk", F.pmod(F.xxhash64(key_column), F.lit(chunks)))
    written = 0
    for k in range(chunks):
        written += sink.write(tagged.filter(F.col("_chunk") == k).drop("_chunk").toArrow())
    return written


def write_online(df: DataFrame, sink: OnlineSink, *, rows: int, key_column: str = "item_id") -> int:
    """Upsert every row of ``df`` (the sink's columns, about ``rows`` of them) into the online
    store through ``sink`` (on the driver, already applied); returns rows written. ``key_column``
    splits large driver-side writes into chunks."""
    from pyspark.sql import functions as F

    if _writes_from_driver(df, sink):
        return _write_from_driver(df, sink, rows, key_column)
    total = df.mapInArrow(_writer(sink), "written long").agg(F.sum("written")).collect()[0][0]
    return int(total or 0)
