"""An append-only Delta sink whose own log records how far into each Kafka partition it has written.

The consumer runner's exactly-once argument (DESIGN.md, invariant 2) needs the Delta append and the
source progress to be one atomic fact. Delta gives that for free: every commit can carry *app
transactions* ``(appId, version)``, and they are part of the same atomic log entry as the data
files. So each append carries one transaction per source partition, ``appId =
"<app_prefix>:<topic>:<partition>"`` and ``version`` = the last offset the micro-batch covered, and
before writing, rows at or below the offset already recorded for their partition are dropped. A
replay after a crash — whatever its batch boundaries, since Kafka re-reads from the committed
offset, not from where the crashed batch began — therefore writes every offset exactly once.

Concurrency: consumers of one group own disjoint partitions, so their commits are blind appends
with disjoint app ids, which delta-rs's conflict checker lets through (it retries on the next
version, up to ``max_commit_retries``; data files are written once, only the log entry is
retried). Two writers committing the *same* app id — a consumer that lost a partition in a
rebalance but finishes its batch while the new owner already wrote — is a conflict
(``ConcurrentTransaction``): delta-rs refuses the later commit, and this sink re-reads the
partitions' progress from the log and filters again, so the zombie's rows are dropped rather than
duplicated.

Log health: every commit is one small JSON file in ``_delta_log``; delta-rs writes a checkpoint
after every ``delta.checkpointInterval`` commits (100 unless the table says otherwise) in the
committing process, so readers and :meth:`OffsetTrackedDeltaSink.refresh` replay at most that many
JSON files. That commit pays for the checkpoint, which holds every *tombstone* (a file removed by a
compaction) younger than ``delta.deletedFileRetentionDuration`` (7 days by default), ~1.5 us each,
plus the log cleanup: at 10k events/s a day's compactions leave ~770k tombstones, >1 s on one
commit in a hundred. So a sink built with ``checkpoints="by_maintenance"`` skips both and the
runners' compactor does them after each run, and the runners set a short tombstone retention. Two
costs still grow with a streaming table's age, on every commit of the writer itself
(delta-rs 1.6, measured on a local disk): ~90 us per live data file (delta-rs keeps every live file
in its snapshot: 9 ms at 100 files, 70 ms at 800) and ~12 us per file in ``_delta_log`` (it lists
the whole directory to find the latest version). Small data files are compacted (OPTIMIZE; the
runners do it after every N commits, :mod:`transforms.sinks.delta_compaction`; its commits do not
conflict with the appends), and log files expire after ``delta.logRetentionDuration`` (30 days by
default; the runners set a short one through ``table_properties``, removed at checkpoint time).

The sink keeps one ``DeltaTable`` object: delta-rs advances it to each commit it makes, and a
commit made while other writers moved the table on only reads *their* new log entries, so an append
never re-reads the whole log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from transforms.errors import SinkError

if TYPE_CHECKING:
    from deltalake import DeltaTable

_log = logging.getLogger(__name__)

#: Commit attempts delta-rs makes when other writers took the next log version first. Each attempt
#: only re-reads the log entries that appeared since; 15 (the default) can run out when a dozen
#: consumers share a table on a slow object store.
MAX_COMMIT_RETRIES = 100
#: How often a commit refused because another writer recorded the same partition is filtered again
#: and retried. One retry settles it (the second attempt reads the other writer's progress); more
#: only happen while two processes keep fighting over a partition, which a rebalance ends.
_CONFLICT_ATTEMPTS = 5
#: Key of the commit-info entry holding the offsets a commit covers, ``{"topic:partition": offset}``.
THROUGH_KEY = "sluice.through"

TopicPartitionKey = tuple[str, int]


@dataclass(frozen=True)
class AppendResult:
    """What one :meth:`OffsetTrackedDeltaSink.append` did."""

    rows_written: int
    #: Rows dropped because their offset was already recorded (a replay).
    rows_skipped: int
    #: The table version of the commit, or None when there was nothing to commit.
    version: int | None


def app_id(app_prefix: str, topic: str, partition: int) -> str:
    """The Delta app id recording progress in one Kafka partition (topic names cannot hold ``:``)."""
    return f"{app_prefix}:{topic}:{partition}"


def schema_problems(
    table_schema: pa.Schema, wanted: pa.Schema, table_partitions: Sequence[str], wanted_partitions: Sequence[str]
) -> list[str]:
    """Why rows of ``wanted`` cannot be appended to a table of ``table_schema`` (empty if they can).

    Compatible means: the same columns, each of the same logical type (Delta has one string, one
    binary and one UTC timestamp type, so Arrow's string/large_string/string_view etc. are alike),
    no column the table declares NOT NULL that our rows may leave null, and the same partitioning.
    A table whose columns are all nullable (as Spark creates them) takes our non-null rows.
    """
    problems = []
    have = {f.name: f for f in table_schema}
    for field in wanted:
        got = have.get(field.name)
        if got is None:
            problems.append(f"missing column {field.name!r}")
            continue
        if _logical(got.type) != _logical(field.type):
            problems.append(f"column {field.name!r} is {got.type}, expected {field.type}")
        elif not got.nullable and field.nullable:
            problems.append(f"column {field.name!r} is NOT NULL in the table but nullable here")
    extra = [name for name in table_schema.names if name not in wanted.names]
    if extra:
        problems.append(f"unexpected column(s) {', '.join(map(repr, extra))}")
    if list(table_partitions) != list(wanted_partitions):
        problems.append(f"partitioned by {list(table_partitions)}, expected {list(wanted_partitions)}")
    return problems


def _logical(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_timestamp(t):
        return "timestamp" if t.tz is not None else "timestamp_ntz"  # type: ignore[attr-defined]
    return str(t)


class OffsetTrackedDeltaSink:
    """Appends rows carrying Kafka positions (``topic``, ``partition``, ``offset``) exactly once.

    Generic over the schema: the scores table and the quarantine table each get one. Not
    thread-safe; one instance per writer process.
    """

    def __init__(
        self,
        uri: str,
        schema: pa.Schema,
        *,
        app_prefix: str,
        partition_by: Sequence[str] = (),
        storage_options: dict[str, str] | None = None,
        table_properties: Mapping[str, str] | None = None,
        recorded_also_by: OffsetTrackedDeltaSink | None = None,
        checkpoints: Literal["on_commit", "by_maintenance"] = "on_commit",
    ) -> None:
        if not app_prefix:
            raise ValueError("app_prefix must not be empty")
        self.uri = uri
        self.schema = schema
        self.app_prefix = app_prefix
        self.partition_by = tuple(partition_by)
        self.storage_options = dict(storage_options) if storage_options else None
        #: Delta table properties the writer needs (e.g. ``delta.logRetentionDuration``): set when
        #: :meth:`ensure_table` creates the table, and set again on an existing table that differs.
        self.table_properties = dict(table_properties or {})
        #: A sink whose commits may record this sink's progress too (``append(covers=self)``): a
        #: batch with no row for this table then needs no commit here. :meth:`recorded` is the
        #: later of the two records.
        self.recorded_also_by = recorded_also_by
        #: ``by_maintenance``: commits leave checkpoints and log cleanup to a maintenance process
        #: (:class:`~transforms.sinks.delta_compaction.PartitionCompactor`) instead of doing them in
        #: the commit that lands on a multiple of ``delta.checkpointInterval`` (module docs).
        self.checkpoints = checkpoints
        self._dt: DeltaTable | None = None
        # Offsets recorded per partition, as of table version ``_seen``: valid only for the snapshot
        # the next commit is checked against, so they are dropped whenever the snapshot moves past
        # commits of other writers (see :meth:`_moved`).
        self._recorded: dict[TopicPartitionKey, int | None] = {}
        # Offsets the writer says reached Kafka (its transaction committed): a consumer group that
        # lost its broker-side offsets resumes after these (see pipelines/consume.py).
        self._published: dict[TopicPartitionKey, int | None] = {}
        # Progress this table records for other sinks it covers, by app id (see ``covers``).
        self._marks: dict[str, int | None] = {}
        self._seen: int | None = None

    @classmethod
    def for_existing_table(
        cls,
        uri: str,
        *,
        app_prefix: str,
        storage_options: dict[str, str] | None = None,
        checkpoints: Literal["on_commit", "by_maintenance"] = "on_commit",
    ) -> OffsetTrackedDeltaSink:
        """A sink over an existing table taking its schema as it is: for recording progress only
        (:meth:`record_progress`), as the Spark runner's Kafka ledger does on the scores table."""
        dt = _open(uri, storage_options)
        sink = cls(
            uri,
            pa.schema(dt.schema().to_arrow()),  # type: ignore[call-overload]
            app_prefix=app_prefix,
            partition_by=dt.metadata().partition_columns,
            storage_options=storage_options,
            checkpoints=checkpoints,
        )
        sink._adopt(dt)
        return sink

    # -- the table ---------------------------------------------------------------------------------

    def ensure_table(self) -> None:
        """Create the table if it is missing; refuse (SinkError) an existing one of another shape.

        Idempotent, and safe when several processes start at once: whoever loses the race to write
        version 0 finds the winner's table and checks it like any existing one.
        """
        from deltalake import DeltaTable

        if not _exists(self.uri, self.storage_options):
            try:
                DeltaTable.create(
                    self.uri,
                    self.schema,
                    mode="ignore",
                    partition_by=list(self.partition_by) or None,
                    storage_options=self.storage_options,
                    configuration=self.table_properties or None,
                )
            except Exception as exc:  # lost the creation race, or the path is unwritable
                if not _exists(self.uri, self.storage_options):
                    raise SinkError(f"cannot create Delta table {self.uri}: {exc}") from exc
        dt = _open(self.uri, self.storage_options)
        problems = schema_problems(
            pa.schema(dt.schema().to_arrow()),  # type: ignore[call-overload]
            self.schema,
            dt.metadata().partition_columns,
            self.partition_by,
        )
        if problems:
            raise SinkError(
                f"Delta table {self.uri} exists with an incompatible schema: {'; '.join(problems)}"
                " (write to another path, or migrate the table)"
            )
        self._reconcile_properties(dt)
        self._adopt(dt)

    def _reconcile_properties(self, dt: DeltaTable) -> None:
        """Bring an existing table's properties to :attr:`table_properties` (a metadata commit, only
        when one differs: a table created by an older sluice or by hand, or a changed setting)."""
        current = dt.metadata().configuration
        changed = {k: v for k, v in self.table_properties.items() if current.get(k) != v}
        if not changed:
            return
        try:
            dt.alter.set_table_properties(changed, raise_if_not_exists=False)
        except Exception as exc:
            raise SinkError(
                f"cannot set {', '.join(f'{k}={v!r}' for k, v in changed.items())} on Delta table {self.uri}: {exc}"
            ) from exc
        _log.info(
            "set table properties of %s",
            self.uri,
            extra={"properties": changed, "was": {k: current.get(k) for k in changed}},
        )

    @property
    def table(self) -> DeltaTable:
        """The sink's ``DeltaTable`` (opened on first use), at the version of its last commit or refresh."""
        if self._dt is None:
            self._adopt(_open(self.uri, self.storage_options))
        assert self._dt is not None
        return self._dt

    # -- progress ----------------------------------------------------------------------------------

    def app_id(self, topic: str, partition: int) -> str:
        return app_id(self.app_prefix, topic, partition)

    def recorded(self, topic: str, partition: int, *, own: bool = False) -> int | None:
        """The last offset of ``topic[partition]`` the table records (None: none yet), or the one
        :attr:`recorded_also_by` records for it, whichever is later (``own``: this table's record
        alone). Cached: read from the log once, then kept up to date by this sink's own commits;
        :meth:`refresh` re-reads."""
        key = (topic, int(partition))
        if key not in self._recorded:
            self._recorded[key] = self.version_of(self.app_id(*key))
        mine = self._recorded[key]
        if own or self.recorded_also_by is None:
            return mine
        other = self.recorded_also_by.mark(self.covered_app_id(*key))
        return mine if other is None else other if mine is None else max(mine, other)

    def covered_app_id(self, topic: str, partition: int) -> str:
        """The app id under which a covering sink records this sink's progress in *its* table."""
        return app_id(f"{self.app_prefix}:covered", topic, partition)

    def mark(self, app: str) -> int | None:
        """The version this table records for another sink's app id (cached like :meth:`recorded`)."""
        if app not in self._marks:
            self._marks[app] = self.version_of(app)
        return self._marks[app]

    def published_app_id(self, topic: str, partition: int) -> str:
        return app_id(f"{self.app_prefix}:kafka", topic, partition)

    def published(self, topic: str, partition: int) -> int | None:
        """The last offset of ``topic[partition]`` recorded as published to Kafka (None: none)."""
        key = (topic, int(partition))
        if key not in self._published:
            self._published[key] = self.version_of(self.published_app_id(*key))
        return self._published[key]

    def refresh_published(self, partitions: Iterable[tuple[str, int]]) -> None:
        self._update()
        for topic, partition in partitions:
            key = (topic, int(partition))
            self._published[key] = self.version_of(self.published_app_id(*key))

    def refresh(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Re-read these partitions' progress from the latest log (after a rebalance: another process
        may have written them since this one last did)."""
        self._update()
        self._marks.clear()
        if self.recorded_also_by is not None and self.recorded_also_by is not self:
            self.recorded_also_by.refresh(partitions)
        for topic, partition in partitions:
            key = (topic, int(partition))
            self._recorded[key] = self.version_of(self.app_id(*key))

    def version_of(self, app: str, *, refresh: bool = False) -> int | None:
        """The version recorded for any app id, as of the sink's table version (or the latest log)."""
        if refresh:
            self._update()
        try:
            version = self.table.transaction_version(app)
        except Exception as exc:
            raise SinkError(f"cannot read the log of Delta table {self.uri}: {exc}") from exc
        return int(version) if version is not None else None

    # -- writing -----------------------------------------------------------------------------------

    def append(
        self,
        rows: pa.Table | pa.RecordBatch,
        *,
        through: Mapping[tuple[str, int], int],
        metadata: Mapping[str, str] | None = None,
        published: Mapping[tuple[str, int], int] | None = None,
        covers: OffsetTrackedDeltaSink | None = None,
    ) -> AppendResult:
        """Append the rows not written yet, and record ``through`` — in one commit.

        ``through`` maps each source partition of the micro-batch to the last offset it covered,
        including records that went elsewhere (dead letters, the other table), so progress is
        recorded for partitions with no row here. Rows at or below their partition's recorded
        offset are dropped; partitions not ahead of their record are left out of the commit; when
        nothing remains nothing is committed (``version`` None). ``metadata`` goes into the
        commit's info next to the offsets (:data:`THROUGH_KEY`). ``published`` (partition -> last
        offset whose Kafka outputs are committed) rides along as app transactions of
        :meth:`published_app_id`, where ahead of what the table has. ``covers``: a sink built with
        ``recorded_also_by=self`` whose progress this commit records as ``through`` as well, so that
        a batch with no row for it needs no commit of its own; give it only when that sink has
        nothing of this batch left to write (its rows committed first, or none).
        """
        missing = [c for c in ("topic", "partition", "offset") if c not in self.schema.names]
        if missing:
            raise SinkError(
                f"Delta table {self.uri} has no {', '.join(missing)} column(s): rows must carry their Kafka position"
            )
        table = self._conform(rows)
        through = {(t, int(p)): int(o) for (t, p), o in through.items()}
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            kept, skipped = self._unrecorded(table, through)
            advance = {tp: last for tp, last in through.items() if (rec := self.recorded(*tp)) is None or last > rec}
            marks = {
                (t, int(p)): int(o)
                for (t, p), o in (published or {}).items()
                if (done := self.published(t, p)) is None or o > done
            }
            covered = {}
            if covers is not None:
                covered = {
                    app: last
                    for tp, last in through.items()
                    if (done := self.mark(app := covers.covered_app_id(*tp))) is None or last > done
                }
            if kept.num_rows == 0 and not advance and not marks and not covered:
                return AppendResult(rows_written=0, rows_skipped=skipped, version=None)
            txns = {self.app_id(*tp): last for tp, last in advance.items()}
            txns.update({self.published_app_id(*tp): last for tp, last in marks.items()})
            txns.update(covered)
            try:
                version = self._commit(kept, txns, through, metadata)
            except _Conflict as exc:
                if attempt == _CONFLICT_ATTEMPTS:
                    raise SinkError(
                        f"Delta table {self.uri}: another writer keeps recording the same Kafka partitions"
                        f" ({exc}); is a second consumer with this group's app id running?"
                    ) from exc
                _log.warning(
                    "Delta commit to %s conflicted with another writer (%s): re-reading progress", self.uri, exc
                )
                self.refresh(through)
                continue
            for tp, last in advance.items():
                self._recorded[tp] = last
            for tp, last in marks.items():
                self._published[tp] = last
            self._marks.update(covered)
            return AppendResult(rows_written=kept.num_rows, rows_skipped=skipped, version=version)
        raise AssertionError("unreachable")

    def append_once(
        self,
        rows: pa.Table | pa.RecordBatch,
        *,
        app: str,
        version: int,
        metadata: Mapping[str, Any] | None = None,
    ) -> AppendResult:
        """Append all of ``rows`` in one commit carrying app transaction ``(app, version)``, unless the
        table already records ``app`` at ``version`` or later (then nothing is written).

        Idempotence by batch id rather than by Kafka position: what delta-spark's ``txnAppId`` /
        ``txnVersion`` options do, for the Spark runner, whose micro-batch ids Spark replays with the
        same offsets. Unlike delta-spark, which reconstructs the whole table state with Spark jobs to
        look the app id up (~1 s per append on 2 cores, whatever the batch size), delta-rs reads only
        the log entries that are new since this sink last looked. The log is re-read before the check,
        so a commit another process made under the same app id is seen.
        """
        table = self._conform(rows)
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            done = self.version_of(app, refresh=True)
            if done is not None and done >= version:
                return AppendResult(rows_written=0, rows_skipped=table.num_rows, version=None)
            try:
                committed = self._commit(table, {app: version}, None, metadata)
            except _Conflict as exc:
                if attempt == _CONFLICT_ATTEMPTS:
                    raise SinkError(
                        f"Delta table {self.uri}: another writer keeps committing app id {app} ({exc});"
                        " are two jobs running with the same checkpoint?"
                    ) from exc
                continue
            return AppendResult(rows_written=table.num_rows, rows_skipped=0, version=committed)
        raise AssertionError("unreachable")

    def offsets_held(self, windows: Mapping[TopicPartitionKey, tuple[int, int]]) -> set[tuple[str, int, int]]:
        """The (topic, partition, offset) of the rows the table holds with an offset in ``(low,
        high]`` of their partition's window, read from the latest version. A scan of the table's
        files (with statistics pruning): for the rare replay that needs it (:mod:`split_commit`)."""
        import pyarrow.dataset as ds

        if not windows:
            return set()
        self._update()
        where: Any = None
        for (topic, partition), (low, high) in windows.items():
            one = (
                (ds.field("topic") == topic)
                & (ds.field("partition") == partition)
                & (ds.field("offset") > low)
                & (ds.field("offset") <= high)
            )
            where = one if where is None else where | one
        try:
            held = self.table.to_pyarrow_dataset().to_table(columns=["topic", "partition", "offset"], filter=where)
        except Exception as exc:
            raise SinkError(f"cannot read the rows of Delta table {self.uri}: {exc}") from exc
        return set(
            zip(
                held["topic"].to_pylist(),
                held["partition"].to_pylist(),
                held["offset"].to_pylist(),
                strict=True,
            )
        )

    def append_unrecorded(
        self, rows: pa.Table | pa.RecordBatch, *, metadata: Mapping[str, Any] | None = None
    ) -> int | None:
        """Append ``rows`` whatever the progress recorded for their partitions says, recording no
        progress; returns the version (None: no rows). Only for rows the caller has just checked
        the table lacks (:meth:`offsets_held`): the offset filter of :meth:`append` would drop them."""
        table = self._conform(rows)
        if table.num_rows == 0:
            return None
        try:
            return self._commit(table, {}, None, metadata)
        except _Conflict as exc:  # no app transaction: cannot happen, but never swallow it
            raise SinkError(f"Delta table {self.uri}: {exc}") from exc

    def record_progress(self, versions: Mapping[str, int], *, metadata: Mapping[str, Any] | None = None) -> int:
        """Commit app transactions ``versions`` (app id -> version) with no rows; returns the version.

        For progress that is not a Kafka position of this table's rows: the Spark runner's Kafka
        ledger records "batch N is on the topics" this way. ``metadata`` values must be JSON-able.
        """
        if not versions:
            raise ValueError("record_progress needs at least one app transaction")
        try:
            return self._commit(self.schema.empty_table(), dict(versions), None, metadata)
        except _Conflict as exc:
            raise SinkError(
                f"Delta table {self.uri}: another writer recorded {sorted(versions)} at the same time ({exc})"
            ) from exc

    def compact(
        self, *, partition_filters: list[tuple[str, str, Any]] | None = None, target_size: int | None = None
    ) -> dict[str, Any]:
        """Rewrite small files into larger ones (Delta OPTIMIZE); returns delta-rs's metrics.

        An operator's maintenance step, not part of the write path, e.g. hourly from a separate
        process: its commit does not conflict with the consumers' appends, even in the partition they
        are writing to (``partition_filters`` like ``[("event_date", "=", "2026-01-02")]`` narrow it).
        Data and app transactions are unchanged; the old files stay until VACUUM.
        """
        try:
            metrics: dict[str, Any] = self.table.optimize.compact(
                partition_filters=partition_filters, target_size=target_size
            )
        except Exception as exc:
            raise SinkError(f"cannot compact Delta table {self.uri}: {exc}") from exc
        return metrics

    # -- internals ---------------------------------------------------------------------------------

    def _conform(self, rows: pa.Table | pa.RecordBatch) -> pa.Table:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
        missing = [name for name in self.schema.names if name not in table.column_names]
        if missing:
            raise SinkError(f"rows for Delta table {self.uri} lack column(s) {', '.join(missing)}")
        table = table.select(self.schema.names)
        if not table.schema.equals(self.schema):
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                raise SinkError(f"rows do not fit Delta table {self.uri}: {exc}") from exc
        return table

    def _unrecorded(self, table: pa.Table, through: Mapping[TopicPartitionKey, int]) -> tuple[pa.Table, int]:
        """The rows whose offset is above their partition's record, and how many were dropped."""
        if table.num_rows == 0:
            return table, 0
        topics, parts, offsets = table["topic"], table["partition"], table["offset"]
        covered: Any = None
        drop: Any = None
        for (topic, partition), last in through.items():
            here = pc.and_(pc.equal(topics, topic), pc.equal(parts, partition))
            covered = here if covered is None else pc.or_(covered, here)
            beyond = pc.max(pc.if_else(here, offsets, None)).as_py()
            if beyond is not None and beyond > last:
                raise ValueError(f"a row of {topic}[{partition}] has offset {beyond}, beyond through={last}")
            rec = self.recorded(topic, partition)
            if rec is not None:
                old = pc.and_(here, pc.less_equal(offsets, rec))
                drop = old if drop is None else pc.or_(drop, old)
        if covered is None or pc.sum(covered).as_py() != table.num_rows:
            raise ValueError("some rows come from Kafka partitions missing from `through`")
        if drop is None:
            return table, 0
        n_drop = pc.sum(drop).as_py() or 0
        if n_drop == 0:
            return table, 0
        return table.filter(pc.invert(drop)), int(n_drop)

    def _commit(
        self,
        data: pa.Table,
        txns: Mapping[str, int],
        through: Mapping[TopicPartitionKey, int] | None,
        metadata: Mapping[str, Any] | None,
    ) -> int:
        from deltalake import CommitProperties, PostCommitHookProperties, Transaction, write_deltalake
        from deltalake.exceptions import CommitFailedError

        now_ms = int(time.time() * 1000)
        custom: dict[str, Any] = dict(metadata or {})
        if through is not None:
            custom[THROUGH_KEY] = {f"{t}:{p}": o for (t, p), o in sorted(through.items())}
        props = CommitProperties(
            custom_metadata=custom,
            max_commit_retries=MAX_COMMIT_RETRIES,
            app_transactions=[Transaction(app, version, last_updated=now_ms) for app, version in txns.items()],
        )
        dt = self.table
        try:
            write_deltalake(
                dt,
                data,
                mode="append",
                commit_properties=props,
                post_commithook_properties=PostCommitHookProperties(create_checkpoint=False, cleanup_expired_logs=False)
                if self.checkpoints == "by_maintenance"
                else None,
            )
        except CommitFailedError as exc:
            if "Concurrent transaction" in str(exc):
                raise _Conflict(str(exc).splitlines()[0]) from exc
            raise SinkError(f"cannot commit to Delta table {self.uri}: {exc}") from exc
        except Exception as exc:  # storage errors (OSError, object store), schema errors
            raise SinkError(f"cannot append to Delta table {self.uri}: {exc}") from exc
        version = int(dt.version())
        self._moved(version, own_commit=True)
        return version

    def _adopt(self, dt: DeltaTable) -> None:
        self._dt = dt
        self._seen = dt.version()
        self._recorded.clear()
        self._published.clear()
        self._marks.clear()

    def _moved(self, version: int, *, own_commit: bool) -> None:
        """The sink's snapshot is now at ``version``. Cached records stay valid only if the only
        new log entry is this sink's own commit: a commit of another writer may have recorded one of
        the cached partitions, and a later commit of ours is only conflict-checked against entries
        *after* its snapshot, so a stale cache there would let a replay through twice."""
        expected = (self._seen + 1) if (own_commit and self._seen is not None) else self._seen
        if version != expected:
            self._recorded.clear()
            self._published.clear()
            self._marks.clear()
        self._seen = version

    def _update(self) -> None:
        try:
            self.table.update_incremental()
        except Exception as exc:
            raise SinkError(f"cannot read the log of Delta table {self.uri}: {exc}") from exc
        self._moved(int(self.table.version()), own_commit=False)


class _Conflict(Exception):
    """Another writer committed an app transaction this commit also carries (ConcurrentTransaction)."""


def _exists(uri: str, storage_options: dict[str, str] | None) -> bool:
    from deltalake import DeltaTable

    try:
        return bool(DeltaTable.is_deltatable(uri, storage_options=storage_options))
    except Exception as exc:
        raise SinkError(f"cannot reach Delta table {uri}: {exc}") from exc


def _open(uri: str, storage_options: dict[str, str] | None) -> DeltaTable:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError as exc:
        raise SinkError(f"no Delta table at {uri}: create it first (ensure_table) or check the path") from exc
    except Exception as exc:
        raise SinkError(f"cannot open Delta table {uri}: {exc}") from exc
