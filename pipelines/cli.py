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
from typing import Annotated, Any, NoReturn

import typer

if __package__ in (None, ""):
    # Run as a script (spark-submit pipelines/cli.py): the package comes from --py-files; fall
    # back to the checkout this file sits in.
    try:
        import transforms  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transforms.errors import SluiceError

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
app.add_typer(demo_app, name="demo-data")
app.add_typer(lookup_app, name="lookup")


def _fail(exc: SluiceError) -> NoReturn:
    typer.echo(f"sluice: error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


def _default_feast(target: str) -> dict[str, Any]:
    """Local runs keep the Feast registry and SQLite store next to the target table."""
    base = Path(target).parent if "://" not in target else Path("data")
    feast_dir = base / "feast"
    return {
        "registry": str(feast_dir / "registry.db"),
        "online_store": {"type": "sqlite", "path": str(feast_dir / "online.db")},
    }


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
        float | None, typer.Option("--max-quarantine-fraction", min=0.0, max=1.0)
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
        cfg = load_config(config, overrides=overrides)
        if cfg.feast is None and feast is not False:
            from transforms.sinks.feast_online import FeastConfig

            cfg = cfg.model_copy(update={"feast": FeastConfig.model_validate(_default_feast(cfg.target.uri))})
        elif cfg.feast is not None and feast is False:
            cfg = cfg.model_copy(update={"feast": None})
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
    import yaml

    from transforms.sinks.feast_online import FeastConfig, FeastOnlineSink

    try:
        feast_cfg = None
        if config is not None:
            feast_section = (yaml.safe_load(config.read_text()) or {}).get("feast")
            if feast_section:
                feast_cfg = FeastConfig.model_validate(feast_section)
        feast_cfg = feast_cfg or FeastConfig.model_validate(_default_feast(target))
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
