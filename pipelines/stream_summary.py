"""The one-screen summaries the scoring runners end with, and their JSON twins for machines.

Both say the same things in the same words: records in, and where each one went (scored,
dead-lettered, quarantined — they add up to the records read), throughput, the model versions that
scored, and where the outputs are.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.consume import ConsumeSummary
from pipelines.score_stream import StreamSummary
from pipelines.step_times import describe


def _consume_dict(s: ConsumeSummary) -> dict[str, Any]:
    data = dataclasses.asdict(s)
    data["stats"]["dead_lettered"] = s.stats.dead_lettered
    data["records_per_second"] = round(s.records_per_second, 1)
    return data


def consume_as_json(summary: ConsumeSummary) -> str:
    return json.dumps(_consume_dict(summary), sort_keys=True, default=str)


def stream_as_json(summary: StreamSummary) -> str:
    data = dataclasses.asdict(summary)
    data["records_per_second"] = round(summary.records_per_second, 1)
    data["streaming_seconds"] = round(summary.streaming_seconds, 3)
    return json.dumps(data, sort_keys=True, default=str)


def _table(title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    return table


def render_consume(s: ConsumeSummary, console: Console | None = None) -> None:
    st = s.stats
    table = _table(f"sluice consume · group {s.group} · instance {s.instance_id}")
    table.add_row("source", f"topic {s.topic}")
    table.add_row("records in", f"{st.records:,} in {s.batches:,} batches")
    table.add_row("scored", f"{st.scored:,}")
    table.add_row(
        "dead-lettered",
        f"{st.dead_lettered:,} (decode {st.dead_lettered_decode:,}, model {st.dead_lettered_model:,}) -> {s.dlq_topic}",
    )
    table.add_row("quarantined", f"{st.quarantined:,} -> {s.quarantine_uri}")
    table.add_row(
        "throughput",
        f"{s.records_per_second:,.0f} records/s from first record to last commit ({s.streaming_seconds:.1f} s; "
        f"run {s.seconds:.1f} s with start-up)",
    )
    table.add_row("per batch", describe(s.step_seconds, s.batches))
    table.add_row("model versions", ", ".join(s.model_versions) or "-")
    table.add_row("scores", f"{s.target_uri} (+{s.delta_rows_written:,} rows) · topic {s.scores_topic}")
    if s.replayed_rows_skipped:
        table.add_row("replay", f"{s.replayed_rows_skipped:,} rows already in Delta were not written again")
    if s.batches_dropped:
        table.add_row(
            "dropped",
            f"{s.batches_dropped} batches replayed after a failed Kafka transaction or a rebalance"
            f" ({s.producers_recreated} producers recreated)",
        )
    if s.consumers_recreated:
        table.add_row("rejoined", f"{s.consumers_recreated} times with a new consumer after a fatal consumer error")
    table.add_row("online store", f"{s.online_written:,} scores written")
    table.add_row("stopped", s.stopped_because or "-")
    (console or Console()).print(table)


def render_stream(s: StreamSummary, console: Console | None = None) -> None:
    table = _table(f"sluice score-stream · spark · {s.stream_id}")
    table.add_row("source", f"topic {s.topic} · trigger {s.trigger} · master {s.master or '-'}")
    table.add_row("records in", f"{s.records:,} in {s.batches:,} micro-batches")
    table.add_row("scored", f"{s.scored:,}")
    table.add_row("dead-lettered", f"{s.dead_lettered:,}")
    table.add_row("quarantined", f"{s.quarantined:,} -> {s.quarantine_uri}")
    table.add_row(
        "throughput",
        f"{s.records_per_second:,.0f} records/s over the micro-batches ({s.streaming_seconds:.1f} s; "
        f"run {s.seconds:.1f} s with query start-up)",
    )
    table.add_row("per micro-batch", describe(s.step_seconds, s.batches))
    table.add_row("model versions", ", ".join(s.model_versions) or "-")
    table.add_row("scores", s.target_uri)
    replays = [
        f"{n} micro-batches were already {where}"
        for n, where in ((s.delta_batches_skipped, "in Delta"), (s.topic_batches_skipped, "on the topics"))
        if n
    ]
    if replays:
        table.add_row("replay", "; ".join(replays))
    table.add_row("online store", f"{s.online_written:,} scores written")
    table.add_row("checkpoint", s.checkpoint)
    if s.compactions:
        table.add_row("compactions", f"{s.compactions} (target.compact_every_s)")
    table.add_row("stopped", s.stopped_because or "-")
    (console or Console()).print(table)
