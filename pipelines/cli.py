"""The ``sluice`` command.

Also the ``spark-submit`` entry point: ``spark-submit --py-files dist/sluice.zip pipelines/cli.py
backfill ...`` runs the same code with the cluster's session. Heavy imports (Spark, torch) happen
inside the commands so ``sluice --help`` answers at once. Every failure sluice understands ends as
one line on stderr and a non-zero exit code (see ``transforms.errors``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if __package__ in (None, ""):
    # Run as a script (spark-submit pipelines/cli.py): the package comes from --py-files; fall
    # back to the checkout this file sits in.
    try:
        import transforms  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transforms.errors import SluiceError

if TYPE_CHECKING:
    from transforms.sinks.feast_online import FeastConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

app = typer.Typer(
    help="sluice: batch and streaming inference with PyTorch models over Delta tables and Kafka topics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
demo_app = typer.Typer(help="Create seeded sample data.", no_args_is_help=True)
lookup_app = typer.Typer(help="Read features back from the Feast online store.", no_args_is_help=True)
dev_app = typer.Typer(help="Local services for development (a real Kafka broker).", no_args_is_help=True)
models_app = typer.Typer(help="The CTR model registry: promote a version to running streams.", no_args_is_help=True)
app.add_typer(demo_app, name="demo-data")
app.add_typer(lookup_app, name="lookup")
app.add_typer(dev_app, name="dev")
app.add_typer(models_app, name="models")


def _feast_beside_target(given: FeastConfig | None, target: str, *, enabled: bool | None) -> FeastConfig | None:
    """A job's Feast config: off with ``--no-feast``; else the keys its config set over the local
    registry and SQLite store beside the target, which is where ``sluice lookup`` looks for them."""
    from transforms.sinks.feast_online import FeastConfig

    if enabled is False:
        return None
    return FeastConfig.for_table(target, given.model_dump(exclude_unset=True) if given is not None else None)


def _fail(exc: SluiceError) -> NoReturn:
    typer.echo(f"sluice: error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@demo_app.command("items")
def demo_items(
    table: Annotated[str, typer.Option("--table", help="Delta table to create (path or URI)")],
    rows: Annotated[int, typer.Option("--rows", min=1, help="number of items")] = 20_000,
    seed: Annotated[int, typer.Option("--seed", help="same seed, same table")] = 7,
    bad_fraction: Annotated[
        float, typer.Option("--bad-fraction", min=0.0, max=1.0, help="rows with empty/null text")
    ] = 0.005,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing table")] = False,
) -> None:
    """Write a seeded table of realistic ad/product texts (heavy-tailed lengths, CDF enabled)."""
    from pipelines.demo_data import generate_items, write_items_table

    try:
        version = write_items_table(
            table,
            generate_items(rows, seed=seed, bad_fraction=bad_fraction),
            mode="overwrite" if overwrite else "error",
        )
    except SluiceError as exc:
        _fail(exc)
    typer.echo(f"wrote {rows:,} items to {table} (Delta version {version}, seed {seed})")


@demo_app.command("mutate-items")
def demo_mutate(
    table: Annotated[str, typer.Option("--table", help="existing items table")],
    update_fraction: Annotated[float, typer.Option("--update-fraction", min=0.0, max=1.0)] = 0.01,
    insert_rows: Annotated[int, typer.Option("--insert-rows", min=0)] = 100,
    delete_rows: Annotated[int, typer.Option("--delete-rows", min=0)] = 10,
    seed: Annotated[int, typer.Option("--seed")] = 11,
) -> None:
    """Update, insert and delete some items in one commit (to try --mode incremental)."""
    from pipelines.demo_data import mutate_items

    try:
        s = mutate_items(
            table,
            update_fraction=update_fraction,
            insert_rows=insert_rows,
            delete_rows=delete_rows,
            seed=seed,
        )
    except SluiceError as exc:
        _fail(exc)
    typer.echo(
        f"{table}: {len(s.updated_ids)} updated, {len(s.inserted_ids)} inserted, {len(s.deleted_ids)} deleted "
        f"(Delta version {s.version})"
    )


@app.command("backfill")
def backfill(
    source: Annotated[str | None, typer.Option("--source", help="Delta table of items")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Delta table of embeddings")] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="full: every row; incremental: rows changed since the last run (CDF); "
            "stale: rows not yet embedded by the current model",
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config; flags override it")] = None,
    quarantine: Annotated[
        str | None, typer.Option("--quarantine", help="quarantine table (default <target>_quarantine)")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="builtin:NAME, HF directory, TorchScript or safetensors")
    ] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="auto, fp32, bf16 (GPU, AMX CPU), fp16 (GPU), int8 (CPU)")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda")] = None,
    master: Annotated[
        str | None, typer.Option("--master", help="Spark master (default local[*] outside spark-submit)")
    ] = None,
    feast: Annotated[bool | None, typer.Option("--feast/--no-feast", help="write the Feast online store")] = None,
    max_quarantine_fraction: Annotated[
        float | None,
        typer.Option(
            "--max-quarantine-fraction",
            min=0.0,
            max=1.0,
            help="fail the run, publishing nothing, when a larger fraction of rows is quarantined "
            "(validation.max_quarantine_fraction)",
        ),
    ] = None,
    summary_json: Annotated[
        Path | None, typer.Option("--summary-json", help="also write the summary here as JSON")
    ] = None,
) -> None:
    """Embed every (or every changed, or every stale) item and publish to Delta and Feast."""
    from pipelines import logs
    from pipelines.config import load_config

    logs.configure()
    overrides: dict[str, Any] = {}
    if source:
        overrides.setdefault("source", {})["uri"] = source
    if target:
        overrides.setdefault("target", {})["uri"] = target
    if quarantine:
        overrides.setdefault("target", {})["quarantine_uri"] = quarantine
    if mode:
        overrides["mode"] = mode
    for key, value in (("source", model), ("precision", precision), ("device", device)):
        if value is not None:
            overrides.setdefault("model", {})[key] = value
    if master:
        overrides.setdefault("spark", {})["master"] = master
    if max_quarantine_fraction is not None:
        overrides.setdefault("validation", {})["max_quarantine_fraction"] = max_quarantine_fraction
    try:
        from pipelines.config import BackfillConfig

        cfg = load_config(config, overrides=overrides, schema=BackfillConfig)
        cfg = cfg.model_copy(update={"feast": _feast_beside_target(cfg.feast, cfg.target.uri, enabled=feast)})
        from pipelines.backfill import preflight, run_backfill
        from pipelines.summary import as_json, render
        from transforms.spark.session import get_session

        checked = preflight(cfg)
        spark = get_session(app_name=cfg.spark.app_name, master=cfg.spark.master, conf=cfg.spark.conf)
        result = run_backfill(cfg, spark, checked=checked)
    except SluiceError as exc:
        _fail(exc)
    render(result)
    logging.getLogger("sluice.backfill").info("backfill finished", extra={"summary": json.loads(as_json(result))})
    if summary_json:
        summary_json.write_text(as_json(result))
    if cfg.feast is not None and result.rows_out:
        typer.echo(f"look an item up:  sluice lookup item item-0000001 --target {cfg.target.uri}")


# --- the ad-scoring job ------------------------------------------------------------------------------


@dev_app.command("kafka")
def dev_kafka(
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="PLAINTEXT listener on 127.0.0.1")] = 9092,
    data_dir: Annotated[Path, typer.Option("--data-dir", help="topics, offsets and logs; kept across restarts")] = Path(
        "data/kafka"
    ),
) -> None:
    """Run an Apache Kafka broker (KRaft, one node) in the foreground until Ctrl-C / SIGTERM."""
    from pipelines.dev_kafka import run_foreground

    try:
        code = run_foreground(port, data_dir)
    except SluiceError as exc:
        _fail(exc)
    raise typer.Exit(code)


@demo_app.command("ad-requests")
def demo_ad_requests(
    bootstrap: Annotated[str, typer.Option("--bootstrap", help="Kafka host:port")],
    topic: Annotated[str, typer.Option("--topic", help="topic to produce to")],
    events: Annotated[int, typer.Option("--events", min=1, help="number of messages")] = 10_000,
    rate: Annotated[
        float | None, typer.Option("--rate", min=0.001, help="events per second (default: as fast as possible)")
    ] = None,
    poison_fraction: Annotated[
        float, typer.Option("--poison-fraction", min=0.0, max=1.0, help="share of bad messages, of every kind")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="same seed, same stream")] = 7,
    codec: Annotated[str, typer.Option("--codec", help="json or avro")] = "json",
    partitions: Annotated[
        int | None, typer.Option("--partitions", min=1, help="create the topic with this many partitions")
    ] = None,
) -> None:
    """Produce a seeded stream of ad requests (per-user sequence numbers; optional poison)."""
    from pipelines.demo_ad_requests import demo_ad_requests_command

    try:
        line = demo_ad_requests_command(
            bootstrap,
            topic,
            events=events,
            rate=rate,
            poison_fraction=poison_fraction,
            seed=seed,
            codec=codec,
            partitions=partitions,
        )
    except SluiceError as exc:
        _fail(exc)
    typer.echo(line)


@app.command("train-ctr")
def train_ctr_cmd(
    out: Annotated[Path | None, typer.Option("--out", help="write the artifact to this directory")] = None,
    registry: Annotated[
        Path | None,
        typer.Option("--registry", help="add the artifact to this model registry (see `sluice models`)"),
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="make it the registry's CURRENT model (the first one always is)")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="seed of the synthetic click log and of training")] = 7,
    rows: Annotated[int, typer.Option("--rows", min=100, help="click-log rows (10% held out)")] = 2_000_000,
    summary_json: Annotated[Path | None, typer.Option("--summary-json", help="also write the report as JSON")] = None,
) -> None:
    """Train the DLRM-style CTR model on a seeded synthetic click log with a known ground truth,
    report held-out AUC and log-loss against that ground truth, and export the artifact."""
    import tempfile

    from pipelines.train_ctr import train_ctr
    from transforms.errors import ConfigError
    from transforms.models import ctr_registry

    try:
        if (out is None) == (registry is None):
            raise ConfigError("give exactly one of --out DIR (a plain artifact) or --registry DIR")
        target = out
        if registry is not None:
            registry.mkdir(parents=True, exist_ok=True)
            target = Path(tempfile.mkdtemp(prefix=".training-", dir=registry)) / "artifact"
        assert target is not None
        report = train_ctr(target, seed=seed, rows=rows)
        report.render()
        if registry is not None:
            version = ctr_registry.add(registry, target, make_current=promote)
            target.parent.rmdir()
            current = ctr_registry.read_pointer(registry)
            typer.echo(f"registered {version} in {registry}; CURRENT is {current}")
    except SluiceError as exc:
        _fail(exc)
    if summary_json:
        summary_json.write_text(json.dumps(report.as_dict(), default=str, indent=2))


@models_app.command("promote")
def models_promote(
    registry: Annotated[Path, typer.Option("--registry", help="the model registry directory")],
    version: Annotated[str, typer.Argument(help="a version directory in the registry")],
) -> None:
    """Point the registry's CURRENT at VERSION: running streams switch at their next batch."""
    from transforms.models import ctr_registry

    try:
        ctr_registry.promote(registry, version)
    except SluiceError as exc:
        _fail(exc)
    typer.echo(f"{registry}: CURRENT is now {version}")


@models_app.command("list")
def models_list(registry: Annotated[Path, typer.Option("--registry", help="the model registry directory")]) -> None:
    """The versions in a registry; the current one is marked."""
    from transforms.models import ctr_registry

    try:
        current = ctr_registry.read_pointer(registry)
    except SluiceError as exc:
        _fail(exc)
    for child in sorted(p for p in registry.iterdir() if p.is_dir() and not p.name.startswith(".")):
        typer.echo(("* " if child.name == current else "  ") + child.name)


def _score_overrides(
    bootstrap: str | None,
    topic: str | None,
    target: str | None,
    model: str | None,
    group: str | None = None,
    codec: str | None = None,
) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for section, key, value in (
        ("kafka", "bootstrap", bootstrap),
        ("kafka", "topic", topic),
        ("kafka", "group", group),
        ("kafka", "codec", codec),
        ("target", "uri", target),
        ("model", "path", model),
    ):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return overrides


def _load_score_config(config: Path | None, overrides: dict[str, Any], feast: bool | None) -> Any:
    from pipelines.config import load_config
    from pipelines.score_config import ScoreConfig

    cfg = load_config(config, overrides=overrides, schema=ScoreConfig)
    return cfg.model_copy(update={"feast": _feast_beside_target(cfg.feast, cfg.target.uri, enabled=feast)})


@app.command("consume")
def consume(
    bootstrap: Annotated[str | None, typer.Option("--bootstrap", help="Kafka host:port")] = None,
    topic: Annotated[str | None, typer.Option("--topic", help="topic of ad requests")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Delta scores table")] = None,
    model: Annotated[str | None, typer.Option("--model", help="CTR artifact or model registry directory")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config; flags override it")] = None,
    group: Annotated[str | None, typer.Option("--group", help="consumer group")] = None,
    codec: Annotated[str | None, typer.Option("--codec", help="json or avro")] = None,
    instance: Annotated[
        int, typer.Option("--instance", min=0, help="this process's index among the group's members on this host")
    ] = 0,
    feast: Annotated[bool | None, typer.Option("--feast/--no-feast", help="write the Feast online store")] = None,
    max_records: Annotated[int | None, typer.Option("--max-records", min=1, help="stop after this many")] = None,
    idle_exit: Annotated[
        float | None, typer.Option("--idle-exit", min=0.1, help="stop after this many seconds without records")
    ] = None,
    summary_json: Annotated[Path | None, typer.Option("--summary-json", help="also write the summary as JSON")] = None,
) -> None:
    """Score ad requests as a member of a Kafka consumer group, exactly once into Delta, Feast and
    the scores topic; SIGTERM drains the batch in hand and exits 0."""
    import sys

    from pipelines import logs
    from pipelines.consume import default_instance_id, run_consumer
    from pipelines.stream_summary import consume_as_json, render_consume

    logs.configure()
    try:
        cfg = _load_score_config(config, _score_overrides(bootstrap, topic, target, model, group, codec), feast)
        instance_id = cfg.kafka.instance_id or default_instance_id(instance)
        summary = run_consumer(
            cfg,
            instance_id=instance_id,
            max_records=max_records,
            idle_exit_s=idle_exit,
            progress=sys.stderr.isatty(),
        )
    except SluiceError as exc:
        _fail(exc)
    render_consume(summary)
    if summary_json:
        summary_json.write_text(consume_as_json(summary))


@app.command("score-stream")
def score_stream(
    engine: Annotated[str, typer.Option("--engine", help="spark (Structured Streaming)")] = "spark",
    bootstrap: Annotated[str | None, typer.Option("--bootstrap", help="Kafka host:port")] = None,
    topic: Annotated[str | None, typer.Option("--topic", help="topic of ad requests")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Delta scores table")] = None,
    model: Annotated[str | None, typer.Option("--model", help="CTR artifact or model registry directory")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config; flags override it")] = None,
    trigger: Annotated[
        str | None, typer.Option("--trigger", help="processingTime (runs until stopped) or availableNow")
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", help="Spark checkpoint (default <target>_checkpoint)")
    ] = None,
    master: Annotated[
        str | None,
        typer.Option("--master", help="Spark master (default outside spark-submit: local[2 x cores])"),
    ] = None,
    codec: Annotated[str | None, typer.Option("--codec", help="json or avro")] = None,
    feast: Annotated[bool | None, typer.Option("--feast/--no-feast", help="write the Feast online store")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=1, help="stop after this many seconds")] = None,
    summary_json: Annotated[Path | None, typer.Option("--summary-json", help="also write the summary as JSON")] = None,
) -> None:
    """Score ad requests with Spark Structured Streaming (Spark's Kafka source, foreachBatch):
    exactly once into Delta, Feast and the scores topic across driver restarts."""
    from pipelines import logs
    from pipelines.stream_summary import render_stream, stream_as_json
    from transforms.errors import ConfigError

    logs.configure()
    overrides = _score_overrides(bootstrap, topic, target, model, None, codec)
    for key, value in (("trigger", trigger), ("checkpoint", checkpoint), ("master", master)):
        if value is not None:
            overrides.setdefault("spark", {})[key] = value
    try:
        if engine != "spark":
            raise ConfigError(f"--engine {engine!r} is not available: use spark (or `sluice consume`)")
        cfg = _load_score_config(config, overrides, feast)
        from pipelines.score_stream import run_stream
        from transforms.spark.session import get_session

        spark = get_session(
            app_name=cfg.spark.app_name,
            master=cfg.spark.master,
            conf=cfg.spark.conf,
            local_slots_per_core=cfg.spark.local_task_slots_per_core,
        )
        summary = run_stream(cfg, spark, timeout_s=timeout)
    except SluiceError as exc:
        _fail(exc)
    render_stream(summary)
    if summary_json:
        summary_json.write_text(stream_as_json(summary))


@lookup_app.command("item")
def lookup_item(
    ids: Annotated[list[str], typer.Argument(help="item ids")],
    target: Annotated[
        str, typer.Option("--target", help="the embeddings table the store was filled from")
    ] = "data/embeddings",
    config: Annotated[Path | None, typer.Option("--config", help="backfill YAML config with a feast section")] = None,
    full: Annotated[bool, typer.Option("--full", help="print whole vectors")] = False,
) -> None:
    """Print the vectors Feast serves for these items (as a serving client would read them)."""
    from transforms.sinks.feast_online import FeastConfig, FeastOnlineSink

    try:
        feast_cfg = FeastConfig.from_file(config, table_uri=target)
        sink = FeastOnlineSink(feast_cfg, embeddings_table_uri=target, dim=1)
        rows = sink.lookup(ids)
    except SluiceError as exc:
        _fail(exc)
    for item_id, row in zip(ids, rows, strict=True):
        if row is None:
            typer.echo(json.dumps({"item_id": item_id, "found": False}))
            continue
        vec = row.get("embedding") or []
        shown = vec if full else [round(v, 5) for v in vec[:8]]
        out = {
            "item_id": item_id,
            "found": True,
            "dim": len(vec),
            "embedding" if full else "embedding_head": shown,
        }
        out.update({k: v for k, v in row.items() if k not in ("embedding", "item_id")})
        typer.echo(json.dumps(out, default=str))


@lookup_app.command("ad-score")
def lookup_ad_score_cmd(
    user: Annotated[str, typer.Option("--user", help="user_id")],
    ad: Annotated[str, typer.Option("--ad", help="ad_id")],
    target: Annotated[
        str, typer.Option("--target", help="the Delta scores table the store is fed from")
    ] = "data/scores",
    config: Annotated[Path | None, typer.Option("--config", help="scoring YAML config with a feast section")] = None,
) -> None:
    """Print the latest score Feast serves for (user, ad), as a bidder would read it."""
    from transforms.sinks.feast_scores import lookup_ad_score

    try:
        out = lookup_ad_score(user, ad, target=target, config=config)
    except SluiceError as exc:
        _fail(exc)
    typer.echo(json.dumps(out, default=str))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
