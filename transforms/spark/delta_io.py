"""Delta reads and idempotent writes through Spark (the "Delta via Spark" sink adapter).

Writes carry Delta app transactions: DataFrame writes through the ``txnAppId``/``txnVersion``
options, MERGE through the equivalent session confs, which Delta honours for DML since 2.3. A write
whose ``(app_id, version)`` the table has already seen is skipped by Delta, so a replay after a
crash never writes twice (invariant 2).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.embeddings import VECTOR_COLUMN, dimension_constraint
from transforms.errors import SinkError, SourceError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

OP = "_op"
UPSERT = "upsert"
DELETE = "delete"

_TXN_APP = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"
_USER_META = "spark.databricks.delta.commitInfo.userMetadata"


def _quoted(uri: str) -> str:
    return "delta.`" + uri.replace("`", "``") + "`"


def check_writable(uri: str) -> None:
    """Fail before any work when a local target cannot be created or written."""
    if "://" in uri and not uri.startswith("file://"):
        return  # object stores: the first write tells; nothing is half-written by a failed commit
    path = Path(uri.removeprefix("file://"))
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SinkError(f"target {uri} is not writable ({probe} is not a writable directory): choose another path")


def read_snapshot(spark: SparkSession, uri: str, version: int) -> DataFrame:
    return spark.read.format("delta").option("versionAsOf", version).load(uri)


def read_latest_changes(spark: SparkSession, uri: str, *, start: int, end: int, id_column: str) -> DataFrame:
    """The last change per id between two versions (CDF), as rows with ``_op`` upsert/delete."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    try:
        changes = (
            spark.read.format("delta")
            .option("readChangeFeed", "true")
            .option("startingVersion", start)
            .option("endingVersion", end)
            .load(uri)
        )
        changes.schema  # noqa: B018 - resolves the plan now, so a CDF gap fails here with context
    except AnalysisException as exc:
        raise SourceError(
            f"cannot read the change data feed of {uri} for versions {start}..{end}: "
            f"{str(exc).splitlines()[0]} — enable it (ALTER TABLE ... SET TBLPROPERTIES "
            "(delta.enableChangeDataFeed = true)) or run --mode full"
        ) from exc
    rank = F.when(F.col("_change_type") == "delete", 0).otherwise(1)
    w = Window.partitionBy(id_column).orderBy(F.col("_commit_version").desc(), rank.desc())
    return (
        changes.filter(F.col("_change_type") != "update_preimage")
        .withColumn("_rn", F.row_number().over(w))
        .filter(F.col("_rn") == 1)
        .withColumn(OP, F.when(F.col("_change_type") == "delete", F.lit(DELETE)).otherwise(F.lit(UPSERT)))
        .drop("_rn", "_change_type", "_commit_version", "_commit_timestamp")
    )


@contextlib.contextmanager
def session_txn(spark: SparkSession, app_id: str, version: int, user_metadata: str) -> Iterator[None]:
    """Make the next Delta DML in this session idempotent under ``(app_id, version)``."""
    spark.conf.set(_TXN_APP, app_id)
    spark.conf.set(_TXN_VERSION, str(version))
    spark.conf.set(_USER_META, user_metadata)
    try:
        yield
    finally:
        for key in (_TXN_APP, _TXN_VERSION, _USER_META):
            spark.conf.unset(key)


def _table_ready(uri: str, dim: int, constraint: str) -> bool:
    from deltalake import DeltaTable

    try:
        if not DeltaTable.is_deltatable(uri):
            return False
        conf = DeltaTable(uri).metadata().configuration
    except Exception:  # unreadable here (e.g. object store credentials only Spark has): ask Spark
        return False
    return conf.get("sluice.dim") == str(dim) and f"delta.constraints.{constraint}" in conf


def ensure_embeddings_table(spark: SparkSession, uri: str, dim: int) -> None:
    """Create the target if needed, with the vector length pinned by a CHECK constraint."""
    from pyspark.errors import PySparkException

    name, expr = dimension_constraint(dim)
    if _table_ready(uri, dim, name):
        return  # the common case on every run after the first: no Spark SQL round trips
    try:
        spark.sql(
            f"CREATE TABLE IF NOT EXISTS {_quoted(uri)} ("
            "item_id STRING NOT NULL, embedding ARRAY<FLOAT> NOT NULL, model_name STRING NOT NULL, "
            "model_version STRING NOT NULL, source_version BIGINT NOT NULL, processed_at TIMESTAMP NOT NULL"
            f") USING DELTA TBLPROPERTIES ('delta.enableChangeDataFeed' = 'true', 'sluice.dim' = '{dim}')"
        )
        props = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {_quoted(uri)}").collect()}
    except PySparkException as exc:
        raise SinkError(f"target {uri} cannot be created or read as Delta: {str(exc).splitlines()[0]}") from exc
    existing_dim = props.get("sluice.dim")
    if existing_dim is not None and existing_dim != str(dim):
        raise SinkError(
            f"target {uri} holds {existing_dim}-d vectors but the model makes {dim}-d ones: use a new target table"
        )
    if f"delta.constraints.{name}" not in props:
        spark.sql(f"ALTER TABLE {_quoted(uri)} ADD CONSTRAINT {name} CHECK ({expr})")


def remove_if_empty(uri: str) -> bool:
    """Delete the local Delta table at ``uri`` if it holds no data files (a target this run created
    but never published to). Object stores are left alone: an empty table there is harmless and
    deleting prefixes is not this job's business. Returns whether it removed anything."""
    import shutil

    if "://" in uri and not uri.startswith("file://"):
        return False
    if not holds_no_rows(uri):
        return False
    shutil.rmtree(uri.removeprefix("file://"), ignore_errors=True)
    return True


def holds_no_rows(uri: str, storage_options: dict[str, str] | None = None) -> bool:
    """True when the Delta table at ``uri`` exists and its latest snapshot has no data files.

    Read with delta-rs from the log alone (no Spark job). ``False`` whenever that cannot be told,
    e.g. object-store credentials only Spark has: callers then take the general path.
    """
    from deltalake import DeltaTable

    try:
        return len(DeltaTable(uri, storage_options=storage_options or None).file_uris()) == 0
    except Exception:
        return False


def merge_embeddings(
    spark: SparkSession,
    uri: str,
    changes: DataFrame,
    *,
    delete_missing: bool,
    app_id: str,
    version: int,
    user_metadata: str,
    storage_options: dict[str, str] | None = None,
) -> None:
    """Upsert rows with ``_op = upsert``, delete ids with ``_op = delete``, in one commit.

    ``delete_missing`` (full mode) also removes target rows whose id is absent from ``changes``,
    so the target mirrors the source snapshot.

    Into a table that holds no rows yet (the first backfill of a new target, by far the largest) a
    MERGE is only a join against nothing: the upserts are appended instead, in one commit under the
    same app transaction, which saves the join and the target scan. The ids in ``changes`` are
    unique (duplicates are quarantined before inference), so the result is the same table.
    """
    from delta.tables import DeltaTable
    from pyspark.sql import Column

    cols = ["item_id", VECTOR_COLUMN, "model_name", "model_version", "source_version", "processed_at"]
    values: dict[str, str | Column] = {c: f"s.{c}" for c in cols}
    if holds_no_rows(uri, storage_options):
        from pyspark.sql import functions as F

        upserts = changes.filter(F.col(OP) == UPSERT).select(*cols)
        append_idempotent(upserts, uri, app_id=app_id, version=version, user_metadata=user_metadata)
        return
    target = DeltaTable.forPath(spark, uri)
    merge = (
        target.alias("t")
        .merge(changes.alias("s"), "t.item_id = s.item_id")
        .whenMatchedDelete(condition=f"s.{OP} = '{DELETE}'")
        .whenMatchedUpdate(condition=f"s.{OP} = '{UPSERT}'", set=values)
        .whenNotMatchedInsert(condition=f"s.{OP} = '{UPSERT}'", values=values)
    )
    if delete_missing:
        merge = merge.whenNotMatchedBySourceDelete()
    with session_txn(spark, app_id, version, user_metadata):
        merge.execute()


def append_idempotent(
    df: DataFrame,
    uri: str,
    *,
    app_id: str,
    version: int,
    user_metadata: str,
    partition_by: tuple[str, ...] = (),
) -> None:
    """Append ``df`` to the Delta table at ``uri`` (created if missing), once per (app_id, version)."""
    writer = (
        df.write.format("delta")
        .mode("append")
        .option("txnAppId", app_id)
        .option("txnVersion", str(version))
        .option("userMetadata", user_metadata)
    )
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.save(uri)
