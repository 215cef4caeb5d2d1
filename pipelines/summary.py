"""The one-screen summary every backfill ends with, and its JSON twin for machines."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.backfill import BackfillSummary


def as_dict(summary: BackfillSummary) -> dict[str, Any]:
    data = dataclasses.asdict(summary)
    data["rows_quarantined"] = summary.rows_quarantined
    data["rows_per_second"] = round(summary.rows_per_second, 2)
    return data


def as_json(summary: BackfillSummary) -> str:
    return json.dumps(as_dict(summary), sort_keys=True, default=str)


def render(summary: BackfillSummary, console: Console | None = None) -> None:
    console = console or Console()
    s = summary
    table = Table(title=f"sluice backfill · run {s.run_id}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("mode", s.mode)
    table.add_row("source", f"{s.source_uri} @ version {s.source_version}")
    table.add_row("model", f"{s.model_name} · version {s.model_version} · {s.precision} on {s.device}")
    if s.skipped_reason:
        table.add_row("delta", f"nothing to do: {s.skipped_reason}")
    table.add_row("rows in", f"{s.rows_in:,}")
    table.add_row("rows out", f"{s.rows_out:,}" + (f"  (+{s.rows_deleted:,} deleted)" if s.rows_deleted else ""))
    q = ", ".join(f"{k}: {v:,}" for k, v in sorted(s.quarantined.items())) or "none"
    table.add_row("quarantined", f"{s.rows_quarantined:,}  ({q})")
    if s.rows_settled:
        table.add_row("left out", f"{s.rows_settled:,} quarantined before by this model, text unchanged")
    if s.inference_seconds:
        table.add_row(
            "throughput",
            f"{s.rows_per_second:,.1f} rows/s in inference ({s.inference_seconds:.1f} s), run {s.total_seconds:.1f} s",
        )
    if s.padding_efficiency is not None:
        table.add_row("padding efficiency", f"{s.padding_efficiency:.1%} of padded tokens are real")
    if s.oom_retries:
        table.add_row("OOM back-offs", str(s.oom_retries))
    table.add_row(
        "embeddings",
        s.target_uri + (f" (Delta version {s.target_version})" if s.target_version is not None else ""),
    )
    table.add_row("quarantine", s.quarantine_uri)
    if s.online_store:
        deleted = f", {s.online_deleted:,} deleted" if s.online_deleted else ""
        table.add_row("online store", f"Feast {s.online_store}: {s.online_written:,} rows written{deleted}")
    console.print(table)
