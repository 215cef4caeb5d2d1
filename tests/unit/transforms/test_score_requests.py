"""The scoring core: every record ends in exactly one output, with its reason and its lineage."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.ad_world import AdWorld
from pipelines.poison import kinds_for
from schemas.ad_request_codec import codec_for
from schemas.scores import DEAD_LETTER_SCHEMA, KAFKA_RECORD_SCHEMA, SCORES_QUARANTINE_SCHEMA, SCORES_SCHEMA
from transforms.errors import ModelLoadError
from transforms.models import ctr_registry
from transforms.score_requests import RequestScorer, ScoringSpec

T0_MS = 1_790_000_000_000


def kafka_records(
    values: list[bytes | None], *, topic: str = "ads", partition: int = 0, first: int = 0
) -> pa.RecordBatch:
    n = len(values)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([f"k{i}".encode() for i in range(n)], pa.binary()),
            pa.array(values, pa.binary()),
            pa.array([topic] * n),
            pa.array([partition] * n, pa.int32()),
            pa.array(range(first, first + n), pa.int64()),
            pa.array([T0_MS] * n, pa.timestamp("ms", tz="UTC")),
        ],
        schema=KAFKA_RECORD_SCHEMA,
    )


def requests(n: int, seed: int = 3) -> pa.RecordBatch:
    return AdWorld.build(7, users=2_000, ads=300, campaigns=40).requests(seed, start_time_ms=T0_MS).next_batch(n)


@pytest.mark.parametrize("codec", ["json", "avro"])
def test_every_poison_kind_lands_in_the_dead_letter_with_its_reason(ctr_artifact: Path, codec: str) -> None:
    good = requests(400)
    rows = good.to_pylist()
    enc = codec_for(codec)
    values: list[bytes | None] = enc.encode_batch(good)
    expected: dict[int, tuple[str, str]] = {}
    rng = np.random.default_rng(0)
    for kind in kinds_for(codec):
        expected[len(values)] = (kind.expected(codec).stage, kind.expected(codec).error_class)
        values.append(kind.make(rows[len(expected) % len(rows)], codec, rng))
    scorer = RequestScorer(ScoringSpec(model_path=str(ctr_artifact), codec=codec))  # type: ignore[arg-type]
    out = scorer.score(kafka_records(values, first=100))

    assert out.scores.schema.equals(SCORES_SCHEMA, check_metadata=False)
    assert out.dead_letters.schema.equals(DEAD_LETTER_SCHEMA, check_metadata=False)
    assert out.quarantined.schema.equals(SCORES_QUARANTINE_SCHEMA, check_metadata=False)
    # invariant 1: every record in exactly one output
    assert out.scores.num_rows + out.dead_letters.num_rows + out.quarantined.num_rows == len(values)
    assert out.stats.records == len(values) and out.stats.dead_lettered == len(expected)
    got = {
        off - 100: (stage, cls)
        for off, stage, cls in zip(
            out.dead_letters.column("offset").to_pylist(),
            out.dead_letters.column("stage").to_pylist(),
            out.dead_letters.column("error_class").to_pylist(),
            strict=True,
        )
    }
    assert got == expected
    # the original bytes are kept for replay tooling, and model rejections name the model
    for value, off, stage, version in zip(
        out.dead_letters.column("value").to_pylist(),
        out.dead_letters.column("offset").to_pylist(),
        out.dead_letters.column("stage").to_pylist(),
        out.dead_letters.column("model_version").to_pylist(),
        strict=True,
    ):
        assert value == values[off - 100]
        assert (version == scorer.models.version) if stage == "model" else version is None
    assert all(m for m in out.dead_letters.column("error_message").to_pylist())


def test_scores_carry_lineage_and_a_probability(ctr_artifact: Path) -> None:
    good = requests(500)
    scorer = RequestScorer(ScoringSpec(model_path=str(ctr_artifact)))
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    out = scorer.score(kafka_records(codec_for("json").encode_batch(good), topic="t", partition=3, first=7), now=now)
    s = out.scores
    assert s.num_rows + out.quarantined.num_rows == 500
    assert s.column("request_id").to_pylist() == good.column("request_id").to_pylist()[: s.num_rows]
    assert set(s.column("topic").to_pylist()) == {"t"} and set(s.column("partition").to_pylist()) == {3}
    assert s.column("offset").to_pylist() == list(range(7, 7 + s.num_rows))
    assert set(s.column("model_version").to_pylist()) == {scorer.models.version}
    scores = s.column("score").to_numpy()
    assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    assert set(s.column("scored_at").to_pylist()) == {now}
    assert s.column("event_date").to_pylist() == [t.date() for t in s.column("event_time").to_pylist()]
    # calibrated near the world's base rate, so the batch-mean check passes on normal traffic
    assert out.quarantined.num_rows == 0 and not out.warnings


def test_a_batch_whose_mean_strays_from_the_base_rate_is_quarantined_loudly(ctr_artifact: Path) -> None:
    good = requests(300)
    # Bounds so tight around the base rate that a real batch mean cannot meet them.
    spec = ScoringSpec(model_path=str(ctr_artifact), mean_ratio_bounds=(0.999, 1.001), min_rows_for_mean=100)
    out = RequestScorer(spec).score(kafka_records(codec_for("json").encode_batch(good)))
    assert out.scores.num_rows == 0 and out.quarantined.num_rows == 300
    assert set(out.quarantined.column("check").to_pylist()) == {"batch_mean"}
    assert "base rate" in out.quarantined.column("reason")[0].as_py()
    assert out.warnings and "quarantined a whole batch of 300" in out.warnings[0]
    # ... but a batch too small for its mean to mean anything is not judged by it
    small = RequestScorer(spec).score(kafka_records(codec_for("json").encode_batch(good.slice(0, 50))))
    assert small.scores.num_rows == 50 and not small.warnings


def test_non_finite_scores_are_quarantined_row_by_row(ctr_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = RequestScorer(ScoringSpec(model_path=str(ctr_artifact)))
    model = scorer.models.current()
    real = model.predict

    def broken(categorical: np.ndarray, dense: np.ndarray) -> np.ndarray:
        out = real(categorical, dense)
        out[::10] = np.nan  # a model that silently emits NaN for some rows
        return out

    monkeypatch.setattr(model, "predict", broken)
    out = scorer.score(kafka_records(codec_for("json").encode_batch(requests(100))))
    assert out.quarantined.num_rows == 10 and out.scores.num_rows == 90
    assert set(out.quarantined.column("check").to_pylist()) == {"score_finite"}
    assert pc.all(pc.is_nan(out.quarantined.column("score"))).as_py()


def test_a_promoted_model_scores_the_next_batch_without_a_restart(
    ctr_artifact: Path, ctr_artifact_b: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(ctr_artifact, tmp_path / "a")
    shutil.copytree(ctr_artifact_b, tmp_path / "b")
    first = ctr_registry.add(registry, tmp_path / "a")
    second = ctr_registry.add(registry, tmp_path / "b")
    assert first != second and ctr_registry.read_pointer(registry) == first  # adding is not promoting
    scorer = RequestScorer(ScoringSpec(model_path=str(registry), model_poll_seconds=0.01))
    batch = kafka_records(codec_for("json").encode_batch(requests(50)))
    assert set(scorer.score(batch).scores.column("model_version").to_pylist()) == {first}
    ctr_registry.promote(registry, second)
    time.sleep(0.02)
    assert set(scorer.score(batch).scores.column("model_version").to_pylist()) == {second}
    assert scorer.models.swaps == 1


def test_a_broken_promotion_keeps_the_old_model_serving(ctr_artifact: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(ctr_artifact, tmp_path / "a")
    first = ctr_registry.add(registry, tmp_path / "a")
    scorer = RequestScorer(ScoringSpec(model_path=str(registry), model_poll_seconds=0.0))
    bad = registry / "deadbeefdeadbeef"
    shutil.copytree(registry / first, bad)
    (bad / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        ctr_registry.promote(registry, bad.name)  # promote() refuses what cannot be served...
    (registry / "CURRENT").write_text(bad.name + "\n")  # ...a hand edit does not
    out = scorer.score(kafka_records(codec_for("json").encode_batch(requests(20))))
    assert set(out.scores.column("model_version").to_pylist()) == {first}
    # A process started on the bad pointer fails at once with the file named.
    with pytest.raises(ModelLoadError, match=r"model\.safetensors does not match its sha256"):
        RequestScorer(ScoringSpec(model_path=str(registry)))
