"""What a Delta table says about where sluice's outputs came from, read with delta-rs.

Progress and idempotency live in the target table's own log, not in a side store that could
disagree with it (invariant 2):

* every commit sluice makes carries ``userMetadata`` naming the source table, the source version
  it read and the model version — so an incremental run starts after the last source version any
  earlier run published;
* every commit carries a Delta app transaction ``(app_id, version)`` with ``app_id`` naming the job,
  source and model and ``version`` the source version, so a replay after a crash is skipped by
  Delta itself, whichever engine writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from transforms.errors import SourceError

META_KEY = "sluice"


@dataclass(frozen=True)
class TableInfo:
    uri: str
    table_id: str
    version: int
    schema: pa.Schema
    cdf_enabled: bool


def _open(uri: str, storage_options: dict[str, str] | None) -> Any:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, storage_options=storage_options or None)
    except TableNotFoundError as exc:
        raise SourceError(f"no Delta table at {uri}: check the path (and storage options for object stores)") from exc
    except OSError as exc:
        raise SourceError(f"Delta table at {uri} cannot be read: {exc}") from exc


def table_exists(uri: str, storage_options: dict[str, str] | None = None) -> bool:
    from deltalake import DeltaTable

    return bool(DeltaTable.is_deltatable(uri, storage_options=storage_options or None))


def describe_table(uri: str, storage_options: dict[str, str] | None = None) -> TableInfo:
    dt = _open(uri, storage_options)
    meta = dt.metadata()
    cdf = str(meta.configuration.get("delta.enableChangeDataFeed", "false")).lower() == "true"
    schema = pa.schema(dt.schema().to_arrow())  # type: ignore[call-overload]
    return TableInfo(uri=uri, table_id=meta.id, version=dt.version(), schema=schema, cdf_enabled=cdf)


def check_columns(info: TableInfo, required: dict[str, tuple[pa.DataType, ...]]) -> None:
    """Raise one SourceError naming every missing or mistyped column."""
    problems = []
    for name, accepted in required.items():
        if name not in info.schema.names:
            problems.append(f"missing column {name!r}")
            continue
        got = info.schema.field(name).type
        if not any(got.equals(t) for t in accepted):
            problems.append(f"column {name!r} is {got}, expected one of {', '.join(map(str, accepted))}")
    if problems:
        cols = ", ".join(info.schema.names)
        raise SourceError(f"source table {info.uri} has the wrong schema: {'; '.join(problems)} (columns: {cols})")


def app_id(job: str, mode: str, source_id: str, model_version: str) -> str:
    """One idempotency stream per (job, mode, source, model): a stale pass after an incremental
    one at the same source version is new work, a second identical run is not."""
    return f"sluice/{job}/{mode}/{source_id}/{model_version}"


def committed_txn_version(uri: str, app: str, storage_options: dict[str, str] | None = None) -> int | None:
    """The last version committed under ``app`` in table ``uri`` (None if none or no table)."""
    if not table_exists(uri, storage_options):
        return None
    version = _open(uri, storage_options).transaction_version(app)
    return int(version) if version is not None else None


def commit_metadata(
    *, job: str, source: TableInfo, source_version: int, model_version: str, run_id: str, mode: str
) -> str:
    return json.dumps(
        {
            META_KEY: {
                "job": job,
                "source_id": source.table_id,
                "source_uri": source.uri,
                "source_version": source_version,
                "model_version": model_version,
                "run_id": run_id,
                "mode": mode,
            }
        },
        sort_keys=True,
    )


def sluice_commits(
    uri: str, storage_options: dict[str, str] | None = None, *, limit: int | None = None
) -> list[dict[str, Any]]:
    """The sluice metadata of each commit of ``uri``, newest first."""
    if not table_exists(uri, storage_options):
        return []
    out = []
    for entry in _open(uri, storage_options).history(limit):
        raw = entry.get("userMetadata")
        if not raw:
            continue
        try:
            meta = json.loads(raw).get(META_KEY)
        except (ValueError, AttributeError):
            continue
        if isinstance(meta, dict):
            out.append(
                {
                    **meta,
                    "table_version": entry.get("version"),
                    "operation": entry.get("operation"),
                    "operation_parameters": entry.get("operationParameters") or {},
                    "operation_metrics": entry.get("operationMetrics") or {},
                }
            )
    return out


def last_processed_version(
    target_uri: str, source_id: str, job: str, storage_options: dict[str, str] | None = None
) -> int | None:
    """Highest source version any run of ``job`` has published from ``source_id`` into the target."""
    versions = [
        int(c["source_version"])
        for c in sluice_commits(target_uri, storage_options)
        if c.get("source_id") == source_id and c.get("job") == job
    ]
    return max(versions) if versions else None


def published_commit(
    uri: str,
    *,
    job: str,
    source_id: str,
    source_version: int,
    model_version: str,
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """The newest commit (as :func:`sluice_commits` gives it) that published ``source_version`` of
    ``source_id`` with ``model_version``, or None if none did."""
    for commit in sluice_commits(uri, storage_options):
        if (
            commit.get("job") == job
            and commit.get("source_id") == source_id
            and commit.get("source_version") == source_version
            and commit.get("model_version") == model_version
        ):
            return commit
    return None


def deleted_nothing(commit: dict[str, Any]) -> bool:
    """Whether a commit's own record shows it deleted no row: an append, or a MERGE counting none.
    Anything else (metrics missing, another operation) is not known to be free of deletes."""
    metrics = commit.get("operation_metrics") or {}
    if commit.get("operation") == "WRITE":
        return str((commit.get("operation_parameters") or {}).get("mode", "")).lower() == "append"
    if commit.get("operation") == "MERGE" and "numTargetRowsDeleted" in metrics:
        return int(metrics["numTargetRowsDeleted"]) == 0
    return False


def deleted_keys(uri: str, version: int, key_column: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """The keys of the rows commit ``version`` of ``uri`` deleted, from the table's Change Data Feed.

    What a downstream copy of the table (an online store) must delete to follow that commit; it
    covers deletes of every kind (a source delete applied, a full run's rows whose item left).
    """
    keys: list[str] = []
    try:
        reader = _open(uri, storage_options).load_cdf(
            starting_version=version, ending_version=version, columns=[key_column, "_change_type"]
        )
        # delta-rs hands back an arro3 reader: pyarrow takes it through the Arrow stream interface.
        # Strings may come as string_view, which pyarrow's compute kernels do not all take.
        for batch in pa.RecordBatchReader.from_stream(reader):
            deleted = pc.equal(batch.column("_change_type").cast(pa.string()), "delete")
            ids = batch.column(key_column).cast(pa.string()).filter(deleted)
            keys.extend(str(k) for k in ids.to_pylist() if k is not None)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise SourceError(
            f"cannot read which rows version {version} of {uri} deleted from its Change Data Feed ({exc}): "
            "was the table vacuumed past it? A --mode full run rewrites the online store's rows"
        ) from exc
    return keys
