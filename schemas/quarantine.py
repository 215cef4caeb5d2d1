"""Where rows that cannot be published go, with why and from where (invariant 1 of DESIGN.md).

One table per job target. ``stage`` says which step rejected the row: ``input`` (missing id or
text, duplicate id), ``model`` (the model raised on it) or ``validation`` (an output expectation
failed). ``check`` names the failed expectation or error class; ``reason`` is the human sentence.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa

QUARANTINE_SCHEMA_VERSION = 1

Stage = Literal["input", "model", "validation"]
STAGES: tuple[Stage, ...] = ("input", "model", "validation")

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("check", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
        pa.field("source_version", pa.int64(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"sluice.schema": "quarantine", "sluice.schema_version": str(QUARANTINE_SCHEMA_VERSION)},
)
