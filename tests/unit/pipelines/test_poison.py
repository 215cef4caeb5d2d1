"""The poison catalogue is shared by every runner's tests and by the demo producer, so its promises
are pinned here: each kind is deterministic, applies to the codecs it says, reaches the outcome it
says on requests from the real generator, and plans put an exact, balanced, seeded set of kinds at
seeded positions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines.ad_world import AdWorld
from pipelines.poison import MODEL_INPUT_REJECTED, POISON_CATALOGUE, kinds_for, plan_poison, poison_kind
from schemas.ad_request_codec import CODEC_NAMES, DecodeErrorClass, codec_for
from schemas.ad_requests import DENSE_RANGES
from transforms.errors import ConfigError


def _records(n: int = 40) -> list[dict[str, object]]:
    return AdWorld.build(7, users=500, ads=100, campaigns=20).requests(3).next_batch(n).to_pylist()


def test_names_are_unique_and_every_kind_applies_somewhere() -> None:
    names = [k.name for k in POISON_CATALOGUE]
    assert len(names) == len(set(names))
    assert all(k.outcomes for k in POISON_CATALOGUE)
    assert all(set(k.outcomes) <= set(CODEC_NAMES) for k in POISON_CATALOGUE)


def test_outcomes_use_the_known_stages_and_classes() -> None:
    classes = {str(c) for c in DecodeErrorClass}
    for kind in POISON_CATALOGUE:
        for outcome in kind.outcomes.values():
            assert outcome.disposition == "dead_letter"
            if outcome.stage == "decode":
                assert outcome.error_class in classes
            else:
                assert (outcome.stage, outcome.error_class) == ("model", MODEL_INPUT_REJECTED)


def test_catalogue_has_the_kinds_design_md_lists() -> None:
    """Bad JSON, empty, wrong types, missing fields, NaN/Infinity, out-of-vocabulary, versions, model."""
    json_classes = Counter(k.expected("json").error_class for k in kinds_for("json"))
    for required in [*(str(c) for c in DecodeErrorClass if c != DecodeErrorClass.MALFORMED_AVRO), MODEL_INPUT_REJECTED]:
        assert json_classes[required] >= 1, required
    assert json_classes["MalformedJSON"] >= 3  # truncated, not an object, binary garbage
    assert json_classes["UnknownCategory"] >= 2  # slot and device
    avro_classes = {k.expected("avro").error_class for k in kinds_for("avro")}
    assert {"MalformedAvro", "EmptyMessage", "UnsupportedSchemaVersion", "NonFiniteValue", MODEL_INPUT_REJECTED} <= (
        avro_classes
    )


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_every_kind_reaches_its_outcome_on_generated_requests(codec: str) -> None:
    records = _records()
    rng = np.random.default_rng(0)
    kinds = kinds_for(codec)
    values = [k.make(records[i], codec, rng) for i, k in enumerate(kinds)]
    decoded = codec_for(codec).decode_batch(values)
    failures = {f.index: str(f.error_class) for f in decoded.failures}
    for i, kind in enumerate(kinds):
        expected = kind.expected(codec)
        if expected.stage == "decode":
            assert failures.get(i) == expected.error_class, kind.name
        else:
            assert i not in failures, kind.name
    model = decoded.records.to_pylist()
    assert len(model) == sum(k.expected(codec).stage == "model" for k in kinds)
    for row in model:
        assert any(not lo <= row[name] <= hi for name, (lo, hi) in DENSE_RANGES.items())


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_make_is_deterministic_for_a_seed(codec: str) -> None:
    record = _records(1)[0]
    for kind in kinds_for(codec):
        a = kind.make(record, codec, np.random.default_rng(11))
        b = kind.make(record, codec, np.random.default_rng(11))
        assert a == b, kind.name


def test_kind_for_the_wrong_codec_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not exist for codec 'avro'"):
        poison_kind("hour_as_string").make(_records(1)[0], "avro", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="unknown poison kind"):
        poison_kind("nope")
    with pytest.raises(ConfigError, match="unknown codec"):
        kinds_for("xml")


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_plan_is_exact_balanced_and_seeded(codec: str) -> None:
    positions, kinds = plan_poison(10_000, 0.0123, codec=codec, seed=5)
    assert len(positions) == len(kinds) == 123
    assert positions.tolist() == sorted(set(positions.tolist()))
    assert positions.min() >= 0 and positions.max() < 10_000
    counts = Counter(k.name for k in kinds)
    assert set(counts) == {k.name for k in kinds_for(codec)}
    assert max(counts.values()) - min(counts.values()) <= 1
    again = plan_poison(10_000, 0.0123, codec=codec, seed=5)
    assert again[0].tolist() == positions.tolist() and again[1] == kinds
    other = plan_poison(10_000, 0.0123, codec=codec, seed=6)
    assert other[0].tolist() != positions.tolist()


def test_plan_edges() -> None:
    assert len(plan_poison(1_000, 0.0, codec="json", seed=1)[0]) == 0
    assert plan_poison(5, 1.0, codec="json", seed=1)[0].tolist() == [0, 1, 2, 3, 4]
    assert len(plan_poison(0, 0.5, codec="avro", seed=1)[0]) == 0
    with pytest.raises(ConfigError, match="between 0 and 1"):
        plan_poison(10, 1.5, codec="json", seed=1)
    with pytest.raises(ConfigError, match="events must be >= 0"):
        plan_poison(-1, 0.1, codec="json", seed=1)
