"""The per-batch path of the embedding backfill (transforms/embed_items.py), engine-free, with the
real packaged model and the real validator. Every input row must leave in exactly one output."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from schemas.embeddings import embeddings_schema
from schemas.quarantine import QUARANTINE_SCHEMA
from transforms import embed_items as embed_items_mod
from transforms.batching import BatchLimits
from transforms.embed_items import EmbedSpec, embed_items
from transforms.inference import encode_texts
from transforms.models.spec import ModelConfig, load_encoder
from transforms.models.text_encoder import TextEncoder

MODEL = ModelConfig(device="cpu")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return load_encoder(MODEL)


@pytest.fixture
def spec() -> EmbedSpec:
    return EmbedSpec(model=MODEL, source_version=7, run_id="run-42", limits=BatchLimits(max_rows=8, max_tokens=512))


def check_invariant(batch: pa.RecordBatch, outcome: embed_items_mod.EmbedOutcome) -> None:
    assert outcome.output.num_rows + outcome.quarantine.num_rows == batch.num_rows
    assert outcome.quarantine.schema.equals(QUARANTINE_SCHEMA, check_metadata=True)


MIXED = pa.record_batch(
    {
        "item_id": ["a", None, "c", "d", "e", "f", "g", "h"],
        "text": [
            "stainless steel water bottle",
            "a row without an id",
            None,
            "",
            " \t\n ",
            "wireless headphones with noise cancelling",
            "organic green tea",
            "x",
        ],
    }
)


def test_bad_inputs_are_quarantined_before_the_model(spec: EmbedSpec, encoder: TextEncoder) -> None:
    before = datetime.now(UTC)
    outcome = embed_items(spec, MIXED)
    check_invariant(MIXED, outcome)
    q = outcome.quarantine.to_pylist()
    assert [(r["item_id"], r["text"], r["check"]) for r in q] == [
        (None, "a row without an id", "id_not_null"),
        ("c", None, "text_not_null"),
        ("d", "", "text_not_empty"),
        ("e", " \t\n ", "text_not_empty"),
    ]
    for r in q:
        assert r["stage"] == "input"
        assert r["reason"]
        assert r["model_version"] == encoder.version
        assert r["source_version"] == 7
        assert r["run_id"] == "run-42"
        assert before - timedelta(seconds=1) <= r["quarantined_at"] <= datetime.now(UTC)
    assert outcome.output.column("item_id").to_pylist() == ["a", "f", "g", "h"]
    assert outcome.stats.rows == 4 and outcome.stats.failed_rows == 0


def test_output_schema_and_lineage(spec: EmbedSpec, encoder: TextEncoder) -> None:
    outcome = embed_items(spec, MIXED)
    out = outcome.output
    assert out.schema.equals(embeddings_schema(384), check_metadata=True)
    rows = out.to_pylist()
    assert {r["model_name"] for r in rows} == {"all-MiniLM-L6-v2"}
    assert {r["model_version"] for r in rows} == {encoder.version}
    assert {r["source_version"] for r in rows} == {7}
    assert len({r["processed_at"] for r in rows}) == 1
    assert rows[0]["processed_at"].tzinfo is not None
    # the vectors are the model's, in row order
    want = encode_texts(encoder, [MIXED.column("text")[i].as_py() for i in (0, 5, 6, 7)], limits=BatchLimits())
    got = np.asarray(out.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, want.embeddings, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_model_name_from_config(spec: EmbedSpec, encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    named = dataclasses.replace(spec, model=MODEL.model_copy(update={"name": "minilm-prod"}))
    monkeypatch.setattr(embed_items_mod, "load_encoder", lambda cfg, **_: encoder)
    outcome = embed_items(named, MIXED)
    assert set(outcome.output.column("model_name").to_pylist()) == {"minilm-prod"}


class RaiseOnToken(nn.Module):
    def __init__(self, inner: nn.Module, token_id: int) -> None:
        super().__init__()
        self.inner = inner
        self.token_id = token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if bool((input_ids == self.token_id).any()):
            raise ValueError("unsupported token")
        return self.inner(input_ids, attention_mask)


def test_model_failures_are_quarantined_with_stage_model(
    spec: EmbedSpec, encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    zebra = encoder.tokenizer.token_to_id("zebra")
    failing = dataclasses.replace(encoder, module=RaiseOnToken(encoder.module, zebra))
    monkeypatch.setattr(embed_items_mod, "load_encoder", lambda cfg, **_: failing)
    batch = pa.record_batch(
        {
            "item_id": ["k1", "k2", "k3", "k4", None, "k6"],
            "text": ["plain text", "a zebra crossing", "more text", "", "zebra without id", "zebra again"],
        }
    )
    outcome = embed_items(spec, batch)
    check_invariant(batch, outcome)
    q = {r["item_id"]: r for r in outcome.quarantine.to_pylist()}
    assert set(q) == {"k2", "k4", None, "k6"}
    assert (q["k2"]["stage"], q["k2"]["check"]) == ("model", "ValueError")
    assert (q["k6"]["stage"], q["k6"]["check"]) == ("model", "ValueError")
    assert "unsupported token" in q["k2"]["reason"]
    assert q["k2"]["text"] == "a zebra crossing"
    assert (q["k4"]["stage"], q["k4"]["check"]) == ("input", "text_not_empty")
    assert (q[None]["stage"], q[None]["check"]) == ("input", "id_not_null")  # never reached the model
    assert outcome.output.column("item_id").to_pylist() == ["k1", "k3"]
    assert outcome.stats.failed_rows == 2


def test_duplicate_ids_are_quarantined_by_validation(spec: EmbedSpec) -> None:
    batch = pa.record_batch({"item_id": [1, 1, 2], "text": ["first", "second", "third"]})  # int ids are cast
    outcome = embed_items(spec, batch)
    check_invariant(batch, outcome)
    assert outcome.output.column("item_id").to_pylist() == ["2"]
    assert Counter((r["stage"], r["check"], r["item_id"]) for r in outcome.quarantine.to_pylist()) == {
        ("validation", "id_unique", "1"): 2
    }


def test_custom_columns_and_extra_columns(spec: EmbedSpec) -> None:
    batch = pa.record_batch({"sku": ["s1", "s2"], "title": ["red shoes", None], "price": [9.5, 3.0]})
    custom = dataclasses.replace(spec, id_column="sku", text_column="title")
    outcome = embed_items(custom, batch)
    check_invariant(batch, outcome)
    assert outcome.output.column("item_id").to_pylist() == ["s1"]
    assert outcome.quarantine.column("item_id").to_pylist() == ["s2"]


def test_all_bad_and_empty_batches(spec: EmbedSpec) -> None:
    bad = pa.record_batch({"item_id": [None, "b"], "text": ["t", None]})
    outcome = embed_items(spec, bad)
    check_invariant(bad, outcome)
    assert outcome.output.num_rows == 0
    assert outcome.output.schema.equals(embeddings_schema(384), check_metadata=True)
    empty = pa.record_batch({"item_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    outcome = embed_items(spec, empty)
    check_invariant(empty, outcome)
    assert outcome.output.num_rows == 0 and outcome.quarantine.num_rows == 0
    assert outcome.output.schema.equals(embeddings_schema(384), check_metadata=True)


@pytest.mark.parametrize("overlap_finish", [None, True], ids=["cpu-default-inline", "finish-on-helper-thread"])
def test_a_stream_of_batches_gives_what_each_batch_gives_alone(spec: EmbedSpec, overlap_finish: bool | None) -> None:
    second = pa.record_batch({"item_id": ["p", "q"], "text": ["leather wallet", "stainless steel water bottle"]})
    empty = MIXED.slice(0, 0)
    pulled: list[int] = []

    def source() -> Iterator[pa.RecordBatch]:
        for i, b in enumerate([MIXED, empty, second]):
            pulled.append(i)
            yield b

    stream = embed_items_mod.embed_batches(spec, source(), overlap_finish=overlap_finish)
    first = next(stream)
    # Looked ahead: the batch after the first was pulled (and is being tokenised) before the first
    # outcome came back, skipping the empty one.
    assert pulled == [0, 1, 2]
    outcomes = [first, *stream]
    assert len(outcomes) == 2  # the empty batch has no outcome
    for batch, got in zip([MIXED, second], outcomes, strict=True):
        alone = embed_items(spec, batch)
        check_invariant(batch, got)
        assert got.output.column("item_id").to_pylist() == alone.output.column("item_id").to_pylist()
        assert got.quarantine.column("item_id").to_pylist() == alone.quarantine.column("item_id").to_pylist()
        assert got.quarantine.column("check").to_pylist() == alone.quarantine.column("check").to_pylist()
        vec = lambda o: np.asarray(o.output.column("embedding").to_pylist(), dtype=np.float32)  # noqa: E731
        np.testing.assert_allclose(vec(got), vec(alone), atol=1e-5)
        assert got.stats.rows == alone.stats.rows and got.stats.tokenize_seconds > 0


@pytest.mark.parametrize("overlap_finish", [False, True], ids=["inline", "finish-on-helper-thread"])
def test_a_stream_raises_what_the_helper_thread_raised(spec: EmbedSpec, overlap_finish: bool) -> None:
    no_text = pa.record_batch({"item_id": ["a"], "body": ["text under another name"]})
    with pytest.raises(KeyError):
        embed_items(spec, no_text)
    with pytest.raises(KeyError):
        list(embed_items_mod.embed_batches(spec, iter([MIXED, no_text]), overlap_finish=overlap_finish))


def test_a_stream_raises_what_the_finishing_thread_raised(spec: EmbedSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error while validating batch k on the helper thread reaches the consumer, in order: the
    outcomes before it arrive, none after it."""
    real = embed_items_mod._finish
    calls: list[int] = []

    def failing_second(*args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("validation broke")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(embed_items_mod, "_finish", failing_second)
    second = pa.record_batch({"item_id": ["p"], "text": ["leather wallet"]})
    stream = embed_items_mod.embed_batches(spec, iter([MIXED, second, MIXED]), overlap_finish=True)
    check_invariant(MIXED, next(stream))
    with pytest.raises(RuntimeError, match="validation broke"):
        next(stream)


def test_the_validator_is_built_once_per_process(spec: EmbedSpec) -> None:
    embed_items_mod._validator.cache_clear()
    for _ in range(3):
        embed_items(spec, MIXED)
    info = embed_items_mod._validator.cache_info()
    assert (info.misses, info.hits) == (1, 2)
