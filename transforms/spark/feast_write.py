"""Writing a DataFrame of embeddings to the Feast online store from the executors.

Rows go executor -> store directly in Arrow batches (``mapInArrow``), never through the driver.
SQLite is a single file on one machine, so its writes are funnelled through one task; Redis takes
one writer per partition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from transforms.sinks.feast_online import FeastConfig, FeastOnlineSink, SqliteOnlineStoreConfig

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def _writer(sink: FeastOnlineSink) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def write_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        written = 0
        for batch in batches:
            written += sink.write(batch)
        yield pa.RecordBatch.from_pydict({"written": [written]})

    return write_partition


def online_sink(cfg: FeastConfig, table_uri: str, dim: int) -> FeastOnlineSink:
    return FeastOnlineSink(cfg, embeddings_table_uri=table_uri, dim=dim)


def write_online(df: DataFrame, cfg: FeastConfig, table_uri: str, dim: int) -> int:
    """Upsert every row of ``df`` (embeddings columns) into the online store; returns rows written."""
    from pyspark.sql import functions as F

    sink = online_sink(cfg, table_uri, dim)
    if isinstance(cfg.online_store, SqliteOnlineStoreConfig):
        df = df.coalesce(1)
    total = df.mapInArrow(_writer(sink), "written long").agg(F.sum("written")).collect()[0][0]
    return int(total or 0)
