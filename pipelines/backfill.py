"""The embedding backfill on Spark: Delta items -> text encoder -> validated Delta + Feast.

The order of the steps is the exactly-once argument (DESIGN.md, invariant 2):

1. Pre-flight on the driver — config, source table and schema, model artifact (loaded once here to
   fail fast on a bad file), target writability — before any Spark work.
2. If the target already holds this run's app transaction (same source, model and source
   version), the Delta part is done: only the online store is repaired, then the run ends.
3. Select rows by mode, embed them with ``mapInArrow`` (persisted once), split outputs from
   quarantined rows, apply the quality gate.
4. Append quarantined rows (idempotent), MERGE outputs (idempotent; the commit records progress),
   then write the online store (keyed upserts). A crash anywhere replays harmlessly.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.items import ACCEPTED_ID_TYPES, ACCEPTED_TEXT_TYPES
from schemas.quarantine import QUARANTINE_SCHEMA
from transforms import delta_lineage
from transforms.crashpoints import crash_point
from transforms.embed_items import EmbedSpec
from transforms.errors import QualityGateError, SourceError
from transforms.models.spec import load_encoder
from transforms.models.text_encoder import TextEncoder
from transforms.spark import delta_io
from transforms.spark.accumulators import dict_sum_accumulator
from transforms.spark.embed import OK, QUARANTINED, STATUS, make_embed_fn
from transforms.spark.feast_write import online_sink, write_online
from transforms.spark.progress import stage_progress

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from pipelines.config import BackfillConfig
    from transforms.sinks.feast_online import FeastOnlineSink

log = logging.getLogger("sluice.backfill")
JOB = "backfill"
#: The quarantine ``check`` of rows whose id appears more than once in the source.
DUPLICATE_ID_CHECK = "id_unique"


@dataclass
class BackfillSummary:
    """What a run did; printed as the one-screen summary and returned to callers (Airflow, tests)."""

    run_id: str
    mode: str
    source_uri: str
    source_version: int
    target_uri: str
    quarantine_uri: str
    model_name: str
    model_version: str
    precision: str
    device: str
    rows_in: int = 0
    rows_out: int = 0
    rows_deleted: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    #: Stale mode: rows without an embedding left out because the quarantine already holds their
    #: outcome (same id, text and model version); not counted in ``rows_in``.
    rows_settled: int = 0
    online_written: int = 0
    #: Items the run's commit deleted from the embeddings table that the online store had.
    online_deleted: int = 0
    skipped_reason: str | None = None
    inference_seconds: float = 0.0
    total_seconds: float = 0.0
    padding_efficiency: float | None = None
    oom_retries: int = 0
    target_version: int | None = None
    online_store: str | None = None

    @property
    def rows_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def rows_per_second(self) -> float:
        return self.rows_in / self.inference_seconds if self.inference_seconds else 0.0


@dataclass(frozen=True)
class _Selection:
    rows: DataFrame | None  # with ``_op``; None when there is nothing to do
    nothing_reason: str | None = None
    delete_missing: bool = False  # full pass: target ids absent from the source go
    has_deletes: bool = False  # change-feed rows: some may carry ``_op = delete``
    #: stale: this model version's quarantine records; rows they already account for are left out
    quarantined_before: DataFrame | None = None


def _select_rows(
    spark: SparkSession, cfg: BackfillConfig, source: delta_lineage.TableInfo, model_version: str
) -> _Selection:
    from pyspark.sql import functions as F

    id_col = cfg.source.id_column
    version = source.version

    def snapshot() -> DataFrame:
        return delta_io.read_snapshot(spark, cfg.source.uri, version).withColumn(delta_io.OP, F.lit(delta_io.UPSERT))

    if cfg.mode == "full":
        return _Selection(snapshot(), delete_missing=True)
    if cfg.mode == "incremental":
        last = delta_lineage.last_processed_version(cfg.target.uri, source.table_id, JOB, cfg.target.storage_options)
        if last is None:
            log.info("no earlier run recorded in the target: incremental starts with a full pass")
            return _Selection(snapshot(), delete_missing=True)
        if last >= version:
            return _Selection(None, f"source version {version} already processed")
        if not source.cdf_enabled:
            raise SourceError(
                f"source table {cfg.source.uri} has no change data feed, so --mode incremental cannot "
                "find changed rows: enable delta.enableChangeDataFeed on it or use --mode full"
            )
        changes = delta_io.read_latest_changes(spark, cfg.source.uri, start=last + 1, end=version, id_column=id_col)
        return _Selection(changes, has_deletes=True)
    # stale: rows with no embedding from the current model (never embedded, or embedded by another)
    rows = snapshot()
    if delta_lineage.table_exists(cfg.target.uri, cfg.target.storage_options):
        current = (
            spark.read.format("delta")
            .load(cfg.target.uri)
            .filter(F.col("model_version") == model_version)
            .select(F.col("item_id").alias(id_col))
        )
        rows = rows.join(current, on=id_col, how="left_anti")
    if not delta_lineage.table_exists(cfg.target.quarantine, cfg.target.storage_options):
        return _Selection(rows)
    records = (
        spark.read.format("delta")
        .load(cfg.target.quarantine)
        .filter(F.col("model_version") == model_version)
        .select(
            F.col("item_id").alias("_q_id"),
            F.col("text").alias("_q_text"),
            (F.col("check") == DUPLICATE_ID_CHECK).alias("_q_duplicate"),
        )
        .distinct()
    )
    return _Selection(rows, quarantined_before=records)


def _split_settled(
    rows: DataFrame, records: DataFrame, id_col: str, text_col: str, *, duplicated: bool
) -> tuple[DataFrame, DataFrame]:
    """(rows to process, rows whose outcome ``records`` already hold), for rows whose ids are all
    unique in the selection (``duplicated=False``) or all duplicated in it (``duplicated=True``).

    Right after a full run, the rows without an embedding are the ones it quarantined: empty text,
    duplicate ids, texts the model or the output checks rejected. Their outcome is a function of
    the text, the model and, for a duplicate, its id's copies, so a stale run would only quarantine
    them again, append the same records, and, as they can be most of a small stale run, trip the
    quality gate over rows an earlier run already accounted for. A row is settled by a record of
    this model version with its id and text (null-safe) of its own kind: a unique row by a record of
    a check on it, a duplicated row by a duplicate-id record. So a changed text, a new model, a
    resolved duplicate (now unique) brings a row back, and a new copy of a settled duplicate is
    quarantined as one (it counts in its id's copies, which are taken before this split).
    """
    from pyspark.sql import functions as F

    kind = records.filter(F.col("_q_duplicate") if duplicated else ~F.col("_q_duplicate")).select("_q_id", "_q_text")
    recorded = F.col(id_col).cast("string").eqNullSafe(F.col("_q_id")) & F.col(text_col).cast("string").eqNullSafe(
        F.col("_q_text")
    )
    return rows.join(kind, recorded, "left_anti"), rows.join(kind, recorded, "left_semi")


def _input_duplicates(rows: DataFrame, id_col: str) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(all rows with their copy count, rows to embed, rows whose id appears more than once).

    The counted frame is persisted by the caller: the row count, the duplicate count and the
    inference all read it, and none of them should re-read the source or redo the shuffle.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    counted = rows.withColumn("_copies", F.count(F.lit(1)).over(Window.partitionBy(id_col)))
    unique = counted.filter((F.col("_copies") == 1) | F.col(id_col).isNull()).drop("_copies")
    dupes = counted.filter((F.col("_copies") > 1) & F.col(id_col).isNotNull())
    return counted, unique, dupes


CALIBRATION_ROWS = 256


def _calibration_sample(spark: SparkSession, cfg: BackfillConfig, source: delta_lineage.TableInfo) -> tuple[str, ...]:
    """A fixed in-domain sample for int8 smoothing: the texts of the ids with the smallest hashes
    in the source snapshot, so every worker, and every later run over a similar table, smooths alike."""
    from pyspark.sql import functions as F

    text = F.col(cfg.source.text_column)
    rows = (
        delta_io.read_snapshot(spark, cfg.source.uri, source.version)
        .filter(text.isNotNull() & (F.length(F.trim(text)) > 0))
        .orderBy(F.xxhash64(F.col(cfg.source.id_column).cast("string")))
        .select(text)
        .limit(CALIBRATION_ROWS)
        .collect()
    )
    return tuple(r[0] for r in rows)


ROWS_PER_TASK = 4096


def _in_background(fn: Callable[[], None], *, on_error: Callable[[BaseException], None]) -> Future[None]:
    """Run ``fn`` on a thread of its own; ``on_error`` runs (on that thread) if it raises."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-prepare")
    try:
        future = pool.submit(fn)
    finally:
        pool.shutdown(wait=False)  # the thread finishes its one call, then exits

    def check(done: Future[None]) -> None:
        exc = done.exception()
        if exc is not None:
            on_error(exc)

    future.add_done_callback(check)
    return future


def _first_failure(*steps: Future[None] | None) -> BaseException | None:
    """The error of a background step that failed, if any: the story when a run stops."""
    for step in steps:
        if step is not None and step.done() and step.exception() is not None:
            return step.exception()
    return None


def _partitions(cfg: BackfillConfig, spark: SparkSession, rows: int) -> int:
    if cfg.spark.partitions:
        return cfg.spark.partitions
    cores = spark.sparkContext.defaultParallelism
    # At least two waves, to balance heavy-tailed texts across cores and show progress; otherwise
    # ~4k rows per task: each task costs ~0.7 s outside the model (scheduling, Arrow, persist) and
    # bigger tasks pad less (0.98 of tokens real at 4k rows, 0.94 at 1k), which measured 3% faster
    # than 1k-row tasks on the 20k-row demo table. Past 16 waves tasks simply grow.
    tasks = max(2 * cores, min(cores * 16, -(-rows // ROWS_PER_TASK)))
    return -(-tasks // cores) * cores  # whole waves: no last wave with idle cores


@dataclass(frozen=True)
class Preflight:
    """What the driver established before any Spark work: the inputs are sound."""

    source: delta_lineage.TableInfo
    encoder: TextEncoder


def preflight(cfg: BackfillConfig) -> Preflight:
    """Fail on everything that can be wrong with the inputs before a JVM starts or a byte is written:
    missing or mistyped source, unwritable targets, a bad model file, an unreachable online store."""
    source = delta_lineage.describe_table(cfg.source.uri, cfg.source.storage_options)
    delta_lineage.check_columns(
        source, {cfg.source.id_column: ACCEPTED_ID_TYPES, cfg.source.text_column: ACCEPTED_TEXT_TYPES}
    )
    delta_io.check_writable(cfg.target.uri)
    delta_io.check_writable(cfg.target.quarantine)
    encoder = load_encoder(cfg.model)
    if cfg.feast is not None and cfg.feast.enabled:
        online_sink(cfg.feast, cfg.target.uri, encoder.dim).check_reachable()
    return Preflight(source=source, encoder=encoder)


def run_backfill(
    cfg: BackfillConfig, spark: SparkSession, *, checked: Preflight | None = None, run_id: str | None = None
) -> BackfillSummary:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    t_start = time.perf_counter()
    run_id = run_id or uuid.uuid4().hex[:12]

    # 1. Pre-flight (done already by the CLI, before it started Spark).
    checked = checked or preflight(cfg)
    source, encoder = checked.source, checked.encoder
    dim = encoder.dim
    feast_on = cfg.feast is not None and cfg.feast.enabled
    summary = BackfillSummary(
        run_id=run_id,
        mode=cfg.mode,
        source_uri=cfg.source.uri,
        source_version=source.version,
        target_uri=cfg.target.uri,
        quarantine_uri=cfg.target.quarantine,
        model_name=cfg.model.name or encoder.name,
        model_version=encoder.version,
        precision=encoder.precision,
        device=str(encoder.device),
        online_store=cfg.feast.online_store.type if cfg.feast and cfg.feast.enabled else None,
    )
    app = delta_lineage.app_id(JOB, cfg.mode, source.table_id, encoder.version)
    meta = delta_lineage.commit_metadata(
        job=JOB,
        source=source,
        source_version=source.version,
        model_version=encoder.version,
        run_id=run_id,
        mode=cfg.mode,
    )

    # 2. Already published to Delta by an earlier (possibly crashed) run: repair the online store only.
    done = delta_lineage.committed_txn_version(cfg.target.uri, app, cfg.target.storage_options)
    if done is not None and done >= source.version:
        summary.skipped_reason = f"source version {source.version} already committed for model {encoder.version}"
        if feast_on:
            assert cfg.feast is not None
            published = (
                spark.read.format("delta")
                .load(cfg.target.uri)
                .filter((F.col("model_version") == encoder.version) & (F.col("source_version") == source.version))
            )
            repair = online_sink(cfg.feast, cfg.target.uri, dim)
            commit = _published_commit(cfg, source, encoder.version)
            # The store already holds that commit in full (the usual re-run): nothing to rewrite.
            if commit is None or repair.published_version() != int(commit["table_version"]):
                repair.apply()
                summary.online_written = write_online(published, repair, rows=published.count())
                if commit is not None:
                    summary.online_deleted = _delete_online(cfg, repair, commit)
                    repair.mark_published(int(commit["table_version"]))
        summary.total_seconds = time.perf_counter() - t_start
        return summary

    selection = _select_rows(spark, cfg, source, encoder.version)
    rows, delete_missing = selection.rows, selection.delete_missing
    if rows is None:
        summary.skipped_reason = selection.nothing_reason
        summary.total_seconds = time.perf_counter() - t_start
        return summary
    crash_point("after_read")

    id_col, text_col = cfg.source.id_column, cfg.source.text_column
    deletes = rows.filter(F.col(delta_io.OP) == delta_io.DELETE).select(F.col(id_col).cast("string").alias("item_id"))
    upserts = rows.filter(F.col(delta_io.OP) == delta_io.UPSERT)
    counted, unique, dupes = _input_duplicates(upserts.select(id_col, text_col), id_col)
    counted.persist(StorageLevel.MEMORY_AND_DISK)
    n_in = counted.count()
    if selection.quarantined_before is not None:
        records = selection.quarantined_before
        unique, settled_unique = _split_settled(unique, records, id_col, text_col, duplicated=False)
        dupes, settled_dupes = _split_settled(dupes, records, id_col, text_col, duplicated=True)
        summary.rows_settled = settled_unique.count() + settled_dupes.count()
        n_in -= summary.rows_settled
    n_deleted = deletes.count() if selection.has_deletes else 0  # else a needless source re-scan
    summary.rows_in, summary.rows_deleted = n_in, n_deleted

    # 3. Inference, once: persisted, then split.
    model_cfg = cfg.model
    if model_cfg.precision == "int8" and not model_cfg.calibration_texts:
        model_cfg = model_cfg.model_copy(update={"calibration_texts": _calibration_sample(spark, cfg, source)})
    spec = EmbedSpec(
        model=model_cfg,
        source_version=source.version,
        run_id=run_id,
        limits=cfg.batching.limits(),
        id_column="item_id",
        text_column="text",
        norm_tolerance=cfg.validation.norm_tolerance,
    )
    acc = spark.sparkContext.accumulator({}, dict_sum_accumulator())
    from pyspark.sql.pandas.types import from_arrow_schema

    from transforms.spark.embed import combined_schema

    out_type: StructType = from_arrow_schema(combined_schema(dim))
    parts = _partitions(cfg, spark, n_in)
    embedded = (
        unique.select(F.col(id_col).cast("string").alias("item_id"), F.col(text_col).alias("text"))
        .repartition(parts)
        .mapInArrow(make_embed_fn(spec, dim, acc), out_type)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    # Registering the feature view imports Feast (seconds); pre-flight already proved the store is
    # reachable, so the registration runs on a driver thread while the executors embed, and is
    # waited for (its error raised) before anything is published.
    sink = online_sink(cfg.feast, cfg.target.uri, dim) if cfg.feast and feast_on else None

    # Jobs this thread starts from here on carry the run's tag (tags are per thread), so a failed
    # background step cancels this run's jobs and nothing else the application runs.
    run_tag = f"sluice-backfill-{run_id}"

    def stop_embedding(exc: BaseException) -> None:
        # The run cannot publish now: stop the executors instead of embedding for nothing (hours,
        # on a big table); the step's own error is raised below in place of Spark's cancellation.
        log.error("a preparation step failed; cancelling the run's Spark jobs", extra={"error": str(exc)})
        spark.sparkContext.cancelJobsWithTag(run_tag)

    feast_ready = _in_background(sink.apply, on_error=stop_embedding) if sink is not None else None
    # Creating a new target takes three Spark SQL round trips (seconds) on the driver: they run
    # while the executors embed. If the run then publishes nothing (quality gate, an error), the
    # table this run created is removed again, so a failed first run leaves no target behind.
    new_target = not delta_lineage.table_exists(cfg.target.uri, cfg.target.storage_options)
    target_ready = (
        _in_background(lambda: delta_io.ensure_embeddings_table(spark, cfg.target.uri, dim), on_error=stop_embedding)
        if new_target
        else None
    )
    target_published = False
    spark.sparkContext.addJobTag(run_tag)
    try:
        failed = _first_failure(feast_ready, target_ready)  # before the jobs it would have cancelled
        if failed is not None:
            raise failed
        t_inf = time.perf_counter()
        with stage_progress(spark, "embedding", total_rows=n_in, tasks=parts, enabled=cfg.spark.progress):
            counts = {(r[STATUS], r["stage"]): r["count"] for r in embedded.groupBy(STATUS, "stage").count().collect()}
        summary.inference_seconds = time.perf_counter() - t_inf
        stats: dict[str, Any] = acc.value
        if stats.get("padded_tokens"):
            summary.padding_efficiency = stats["real_tokens"] / stats["padded_tokens"]
        summary.oom_retries = int(stats.get("oom_retries", 0))

        n_dupes = dupes.count()
        summary.rows_out = counts.get((OK, None), 0)
        quarantined: dict[str, int] = {}
        for (status, stage), c in counts.items():
            if status == QUARANTINED:
                quarantined[stage] = quarantined.get(stage, 0) + c
        if n_dupes:
            quarantined["input"] = quarantined.get("input", 0) + n_dupes
        summary.quarantined = quarantined
        q_cols = [f.name for f in QUARANTINE_SCHEMA]
        q_rows = embedded.filter(F.col(STATUS) == QUARANTINED).select(*q_cols)
        if n_dupes:
            q_rows = q_rows.unionByName(
                dupes.select(
                    F.col(id_col).cast("string").alias("item_id"),
                    F.col(text_col).cast("string").alias("text"),
                    F.lit("input").alias("stage"),
                    F.lit(DUPLICATE_ID_CHECK).alias("check"),
                    F.concat(
                        F.lit("item id appears "),
                        F.col("_copies").cast("string"),
                        F.lit(" times in the source"),
                    ).alias("reason"),
                    F.lit(encoder.version).alias("model_version"),
                    F.lit(source.version).cast("long").alias("source_version"),
                    F.lit(run_id).alias("run_id"),
                    F.current_timestamp().alias("quarantined_at"),
                )
            )

        if feast_ready is not None:
            feast_ready.result()
        # 4. Publish: quarantine, then the target (its commit is the progress marker), then Feast.
        if summary.rows_quarantined:
            delta_io.append_idempotent(
                q_rows, cfg.target.quarantine, app_id=app, version=source.version, user_metadata=meta
            )
        crash_point("after_quarantine_commit")
        fraction = summary.rows_quarantined / n_in if n_in else 0.0
        if fraction > cfg.validation.max_quarantine_fraction:
            raise QualityGateError(
                f"{summary.rows_quarantined} of {n_in} rows ({fraction:.1%}) were quarantined, above "
                f"validation.max_quarantine_fraction={cfg.validation.max_quarantine_fraction:.1%}: nothing was "
                f"published; see {cfg.target.quarantine} for the reasons"
            )
        ok_rows = embedded.filter(F.col(STATUS) == OK).select(
            "item_id", "embedding", "model_name", "model_version", "source_version", "processed_at"
        )
        changes = ok_rows.withColumn(delta_io.OP, F.lit(delta_io.UPSERT))
        if n_deleted:
            null_cols = {c: F.lit(None).cast(t) for c, t in ok_rows.dtypes if c != "item_id"}
            changes = changes.unionByName(
                deletes.select("item_id", *[v.alias(k) for k, v in null_cols.items()]).withColumn(
                    delta_io.OP, F.lit(delta_io.DELETE)
                )
            )
        if target_ready is not None:
            target_ready.result()
        else:
            delta_io.ensure_embeddings_table(spark, cfg.target.uri, dim)
        crash_point("before_delta_commit")
        delta_io.merge_embeddings(
            spark,
            cfg.target.uri,
            changes,
            delete_missing=delete_missing,
            app_id=app,
            version=source.version,
            user_metadata=meta,
            storage_options=cfg.target.storage_options,
        )
        target_published = True
        crash_point("after_delta_commit")
        summary.target_version = delta_lineage.describe_table(cfg.target.uri, cfg.target.storage_options).version
        if sink is not None and summary.rows_out:
            summary.online_written = write_online(ok_rows, sink, rows=summary.rows_out)
        commit = _published_commit(cfg, source, encoder.version) if sink is not None else None
        if sink is not None and commit is not None:
            summary.online_deleted = _delete_online(cfg, sink, commit)
            sink.mark_published(int(commit["table_version"]))
        crash_point("after_online_write")
    except BaseException as exc:
        if target_ready is not None and not target_published:
            _wait_quietly(target_ready)
            delta_io.remove_if_empty(cfg.target.uri)
        cause = _first_failure(feast_ready, target_ready)
        if cause is not None and cause is not exc:
            raise cause from None  # not "job cancelled": why it was
        raise
    finally:
        spark.sparkContext.removeJobTag(run_tag)
        embedded.unpersist()
        counted.unpersist()
    summary.total_seconds = time.perf_counter() - t_start
    return summary


def _published_commit(
    cfg: BackfillConfig, source: delta_lineage.TableInfo, model_version: str
) -> dict[str, Any] | None:
    """The target's commit that published this source version with this model (this run's, or a
    crashed run's)."""
    return delta_lineage.published_commit(
        cfg.target.uri,
        job=JOB,
        source_id=source.table_id,
        source_version=source.version,
        model_version=model_version,
        storage_options=cfg.target.storage_options,
    )


def _delete_online(cfg: BackfillConfig, sink: FeastOnlineSink, commit: dict[str, Any]) -> int:
    """Delete from the online store what ``commit`` deleted from the target, read back from the
    target's Change Data Feed: every kind of delete (a source delete, a full run's vanished items),
    and the same whether this run committed or a crashed run did. A replay deletes nothing twice."""
    # Most commits say they deleted nothing: no need to read back every id a big first run added.
    if delta_lineage.deleted_nothing(commit):
        return 0
    gone = delta_lineage.deleted_keys(
        cfg.target.uri, int(commit["table_version"]), "item_id", cfg.target.storage_options
    )
    return sink.delete(gone) if gone else 0


def _wait_quietly(future: Future[None]) -> None:
    """Let a background step finish before cleaning up after it; its own error is not the story."""
    try:
        future.result()
    except Exception as exc:
        log.debug("background step failed during clean-up: %s", exc)
