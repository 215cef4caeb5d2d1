"""The Spark backfill's per-partition function, run in-process (no TaskContext: no GPU, default
threads): what it does once per Python worker."""

from __future__ import annotations

import pyarrow as pa
import pytest

from transforms.batching import BatchLimits
from transforms.embed_items import EmbedSpec
from transforms.models.spec import ModelConfig
from transforms.spark import embed

BATCH = pa.record_batch({"item_id": ["a", "b"], "text": ["organic green tea", "stainless steel water bottle"]})


def test_a_worker_freezes_its_heap_once_after_its_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bool, int]] = []
    produced = [0]
    monkeypatch.setattr(embed.heap, "freeze", lambda *, collect: calls.append((collect, produced[0])))
    monkeypatch.setattr(embed, "_heap_frozen", False)
    spec = EmbedSpec(model=ModelConfig(device="cpu"), source_version=1, run_id="r", limits=BatchLimits(max_rows=8))
    fn = embed.make_embed_fn(spec, 384)
    for _ in fn(iter([BATCH, BATCH, BATCH])):  # the worker's first task
        produced[0] += 1
    assert calls == [(True, 1)], "frozen once, after the first batch was handed to Spark"
    for _ in fn(iter([BATCH])):  # a later task in the same (reused) worker
        produced[0] += 1
    assert len(calls) == 1 and produced[0] == 4
