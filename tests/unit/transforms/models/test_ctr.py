"""The CTR model's features, encoding, module and scorer (transforms/models/ctr.py).

Requests come from the real synthetic world; the module is freshly initialised (scores need not be
good here, only well-formed, row-independent and isolated from bad rows).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute
import pytest
import torch
from torch import nn

from pipelines.ad_world import AdWorld
from schemas.ad_requests import CATEGORICAL_FEATURES, DENSE_FEATURES, DENSE_RANGES, DEVICES, SLOTS
from transforms.errors import SourceError
from transforms.models import ctr
from transforms.models.ctr import (
    REJECTED,
    UNKNOWN_INDEX,
    CtrArchitecture,
    CtrEncoder,
    CtrFeatureSpec,
    CtrModel,
    CtrScorer,
    _VocabularyIndex,
    build_feature_spec,
    isolate_failures,
)

ARCH = CtrArchitecture(embedding_dim=8, bottom_mlp=(16,), top_mlp=(32,))


@cache
def _world() -> AdWorld:
    return AdWorld.build(5, users=3_000, ads=400, campaigns=40)


@cache
def _train() -> pa.Table:
    return pa.Table.from_batches([_world().requests(1).next_batch(20_000)])


@cache
def _spec() -> CtrFeatureSpec:
    return build_feature_spec(_train(), min_count=3)


def _requests(n: int = 500, seed: int = 2, **kwargs: float) -> pa.RecordBatch:
    return _world().requests(seed, **kwargs).next_batch(n)


def _scorer(module: nn.Module | None = None) -> CtrScorer:
    torch.manual_seed(0)
    spec = _spec()
    model = module or CtrModel(spec.cardinalities, len(spec.dense), ARCH).eval()
    return CtrScorer(model, spec, name="test-ctr", version="0123456789abcdef", base_rate=0.03)


def _replace(batch: pa.RecordBatch, name: str, values: list[object]) -> pa.RecordBatch:
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, batch.schema.field(i), pa.array(values, batch.schema.field(i).type))


# --- feature spec --------------------------------------------------------------------------------


def test_spec_covers_the_input_contract() -> None:
    spec = _spec()
    assert tuple(f.name for f in spec.categorical) == CATEGORICAL_FEATURES
    assert tuple(f.name for f in spec.dense) == DENSE_FEATURES
    assert {f.name: f.accepted_range for f in spec.dense} == DENSE_RANGES


def test_vocabularies_keep_values_seen_at_least_min_count_times() -> None:
    t = _train()
    users, counts = np.unique(t.column("user_id").to_numpy(zero_copy_only=False), return_counts=True)
    vocab = set(next(f for f in _spec().categorical if f.name == "user_id").vocabulary)
    assert vocab == set(users[counts >= 3])
    assert 0 < len(vocab) < len(users)  # the tail (and every new user) goes to the unknown bucket


def test_closed_and_hour_vocabularies_are_fixed() -> None:
    by_name = {f.name: f for f in _spec().categorical}
    assert by_name["slot"].vocabulary == SLOTS
    assert by_name["device"].vocabulary == DEVICES
    assert by_name["hour"].vocabulary == tuple(str(h) for h in range(24))


def test_heavy_tailed_dense_features_are_log_normalised() -> None:
    by_name = {f.name: f for f in _spec().dense}
    assert by_name["bid_floor_usd"].transform == "log1p" and by_name["session_depth"].transform == "log1p"
    assert by_name["user_ctr_7d"].transform == "identity"
    enc = CtrEncoder(_spec())
    dense, rejected = enc.dense(_train())
    assert not rejected
    assert np.allclose(dense.mean(axis=0), 0.0, atol=1e-3) and np.allclose(dense.std(axis=0), 1.0, atol=1e-3)


def test_spec_rejects_extra_keys() -> None:
    data = _spec().model_dump()
    data["categorical"][0]["embeding_dim"] = 4
    with pytest.raises(ValueError, match="embeding_dim"):
        CtrFeatureSpec.model_validate(data)


# --- encoding ------------------------------------------------------------------------------------


def test_known_values_map_to_their_rows() -> None:
    enc = CtrEncoder(_spec())
    batch = _requests(200, new_user_fraction=0.0, new_ad_fraction=0.0)
    cat = enc.categorical(batch)
    assert cat.shape == (200, len(CATEGORICAL_FEATURES)) and cat.dtype == np.int64
    for j, f in enumerate(_spec().categorical):
        values = [str(v) for v in batch.column(f.name).to_pylist()]
        expected = [f.vocabulary.index(v) + 1 if v in f.vocabulary else UNKNOWN_INDEX for v in values]
        assert cat[:, j].tolist() == expected, f.name


def test_unknown_and_null_values_go_to_bucket_zero() -> None:
    enc = CtrEncoder(_spec())
    batch = _requests(4)
    batch = _replace(batch, "user_id", ["never-seen", "", None, "u000000000000000"])
    batch = _replace(batch, "slot", ["feed", "not-a-slot", None, "story"])
    batch = _replace(batch, "hour", [0, 23, 24, -1])
    cat = enc.categorical(batch)
    names = [f.name for f in _spec().categorical]
    assert cat[:, names.index("user_id")].tolist() == [0, 0, 0, 0]
    assert cat[:, names.index("slot")].tolist() == [SLOTS.index("feed") + 1, 0, 0, SLOTS.index("story") + 1]
    assert cat[:, names.index("hour")].tolist() == [1, 24, 0, 0]


def _index_in(values: pa.Array | pa.ChunkedArray, vocabulary: list[str]) -> np.ndarray:
    found = pa.compute.index_in(values, value_set=pa.array(vocabulary, pa.string()))
    return np.asarray(pa.compute.fill_null(found, -1).to_numpy(zero_copy_only=False)) + 1


@pytest.mark.parametrize(
    ("longest", "index_above"),
    [(6, 0), (6, 10**9), (200, 0)],
    ids=["prebuilt-index", "index_in-small-vocabulary", "index_in-long-values"],
)
def test_vocabulary_lookup_agrees_with_arrow_index_in(
    longest: int, index_above: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lookup path must give exactly Arrow's answers: prefixes, NUL bytes, non-ASCII,
    empty strings, nulls, over-long queries, sliced and chunked columns, large_string."""
    monkeypatch.setattr(ctr, "_INDEX_ABOVE_VOCAB_PER_ROW", index_above)
    rng = np.random.default_rng(0)
    alphabet = np.array(["a", "b", "\0", "\x01", "é", "東", "1"])

    def word() -> str:
        return "".join(rng.choice(alphabet, size=int(rng.integers(0, longest))))

    vocabulary = sorted({word() for _ in range(400)} | {"", "a", "a\0", "ab", "b\0", "\x01"})
    index = _VocabularyIndex(vocabulary)
    assert index.indexed == (longest < 64)
    queries = pa.array([word() for _ in range(3_000)] + [None, "", "a\0", "a\0\0", "x" * 300, *vocabulary])
    for column in (
        queries,
        queries.slice(7),
        pa.chunked_array([queries.slice(0, 5), queries.slice(5, 0), queries.slice(5)]),
        queries.cast(pa.large_string()),
    ):
        assert np.array_equal(index.lookup(column), _index_in(column, vocabulary))
    assert index.lookup(pa.array(vocabulary)).tolist() == list(range(1, len(vocabulary) + 1))


def test_empty_vocabulary_maps_everything_to_unknown() -> None:
    assert _VocabularyIndex([]).lookup(pa.array(["a", None])).tolist() == [0, 0]
    assert _VocabularyIndex(["a"]).lookup(pa.array([], pa.string())).shape == (0,)


def test_new_ids_never_index_out_of_range() -> None:
    scorer = _scorer()
    batch = _requests(300, new_user_fraction=1.0, new_ad_fraction=1.0)
    enc = scorer.encode(batch)
    assert (enc.categorical[:, 0] == UNKNOWN_INDEX).all() and (enc.categorical[:, 1] == UNKNOWN_INDEX).all()
    assert (enc.categorical < np.array(_spec().cardinalities)).all()
    result = scorer.score(batch)
    assert not result.rejected and np.isfinite(result.scores).all()


def test_missing_column_is_a_one_line_source_error() -> None:
    batch = _requests(3)
    with pytest.raises(SourceError, match="no column 'ad_id'") as excinfo:
        _scorer().score(batch.drop_columns(["ad_id"]))
    assert "\n" not in str(excinfo.value)


# --- module --------------------------------------------------------------------------------------


def test_forward_gives_one_logit_per_row() -> None:
    spec = _spec()
    model = CtrModel(spec.cardinalities, len(spec.dense), ARCH)
    n_vectors = len(spec.cardinalities) + 1
    assert model.top[0].in_features == ARCH.embedding_dim + n_vectors * (n_vectors - 1) // 2
    enc = CtrEncoder(spec).encode(_requests(64))
    logits = model(torch.from_numpy(enc.categorical), torch.from_numpy(enc.dense))
    assert logits.shape == (64,) and logits.dtype == torch.float32
    assert model(torch.zeros((0, len(spec.cardinalities)), dtype=torch.long), torch.zeros((0, 4))).shape == (0,)
    # The pair indices are derived, not weights: they are not in the state dict.
    assert not any("pair" in k for k in model.state_dict())


def test_start_at_rate_sets_the_initial_prediction() -> None:
    spec = _spec()
    model = CtrModel(spec.cardinalities, len(spec.dense), ARCH)
    model.start_at_rate(0.03)
    assert model.top[-1].bias.item() == pytest.approx(np.log(0.03 / 0.97))


# --- scoring -------------------------------------------------------------------------------------


def test_scores_are_probabilities_and_independent_of_batch_company() -> None:
    scorer = _scorer()
    batch = _requests(400)
    result = scorer.score(batch)
    assert result.scores.dtype == np.float32 and result.scores.shape == (400,)
    assert ((result.scores > 0) & (result.scores < 1)).all() and not result.rejected
    alone = np.concatenate([scorer.score(batch.slice(i, 1)).scores for i in range(0, 400, 37)])
    assert np.allclose(alone, result.scores[::37], atol=1e-6)
    empty = scorer.score(batch.slice(0, 0))
    assert empty.scores.shape == (0,) and not empty.rejected


def test_out_of_range_dense_values_are_rejected_by_name_and_value() -> None:
    scorer = _scorer()
    batch = _requests(6)
    batch = _replace(batch, "bid_floor_usd", [1.0, 1_000.5, 2.0, -0.1, 3.0, 4.0])
    batch = _replace(batch, "user_ctr_7d", [0.1, 0.1, float("nan"), 0.1, 1.5, 0.2])
    clean = scorer.score(_replace(_replace(batch, "bid_floor_usd", [1.0] * 6), "user_ctr_7d", [0.1] * 6))
    result = scorer.score(batch)
    assert sorted(result.rejected) == [1, 2, 3, 4]
    assert all(cls == REJECTED for cls, _ in result.rejected.values())
    assert "bid_floor_usd=1000.5" in result.rejected[1][1] and "[0, 1000]" in result.rejected[1][1]
    assert "user_ctr_7d=null or NaN" in result.rejected[2][1]
    assert "bid_floor_usd=-0.1" in result.rejected[3][1]
    assert "user_ctr_7d=1.5" in result.rejected[4][1]
    assert all("\n" not in msg for _, msg in result.rejected.values())
    assert np.isnan(result.scores[[1, 2, 3, 4]]).all()
    assert np.isfinite(result.scores[[0, 5]]).all()
    assert result.scores[0] == pytest.approx(clean.scores[0], abs=1e-6)


def test_boundary_values_are_accepted() -> None:
    batch = _replace(_requests(2), "session_depth", [0.0, 10_000.0])
    assert not _scorer().score(batch).rejected


class _RaisesOnUser(nn.Module):
    """Wraps a CTR module; raises when a batch holds a chosen user row (user code failing)."""

    def __init__(self, inner: nn.Module, poison_rows: set[int]) -> None:
        super().__init__()
        self.inner = inner
        self.poison = torch.tensor(sorted(poison_rows))
        self.calls = 0

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if torch.isin(categorical[:, 0], self.poison).any():
            raise ValueError("embedding shard for this user is corrupt\nsecond line")
        out: torch.Tensor = self.inner(categorical, dense)
        return out


def test_module_errors_are_bisected_down_to_the_rows_that_trigger_them() -> None:
    plain = _scorer()
    batch = _requests(512, new_user_fraction=0.0)
    enc = plain.encode(batch)
    users = enc.categorical[:, 0]
    target = int(users[100])  # every request of that user fails, nobody else's
    wrapped = _RaisesOnUser(plain.module, {target})
    result = _scorer(wrapped).score(batch)
    bad = set(np.flatnonzero(users == target).tolist())
    assert set(result.rejected) == bad
    for cls, msg in result.rejected.values():
        assert cls == "ValueError"
        assert msg.startswith("model raised ValueError: embedding shard") and "\n" not in msg
    good = np.array(sorted(set(range(512)) - bad))
    assert np.isnan(result.scores[sorted(bad)]).all()
    # Same rows, other batch sizes: equal up to float summation order.
    assert np.allclose(result.scores[good], plain.score(batch).scores[good], atol=1e-6)
    assert wrapped.calls < 2 * len(bad) * np.log2(512) + 4  # bisection, not row by row


def test_rejected_and_raising_rows_are_both_reported() -> None:
    plain = _scorer()
    batch = _replace(_requests(8, new_user_fraction=0.0), "ad_ctr_7d", [0.1, 7.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    users = plain.encode(batch).categorical[:, 0]
    result = _scorer(_RaisesOnUser(plain.module, {int(users[5])})).score(batch)
    raising = set(np.flatnonzero(users == users[5]).tolist()) - {1}
    assert result.rejected[1][0] == REJECTED
    assert {row for row, (cls, _) in result.rejected.items() if cls == "ValueError"} == raising
    fine = sorted(set(range(8)) - raising - {1})
    assert np.isfinite(result.scores[fine]).all()


def test_a_module_returning_the_wrong_shape_fails_every_row_not_the_job() -> None:
    class Wrong(nn.Module):
        def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
            return torch.zeros((len(categorical), 2))

    result = _scorer(Wrong()).score(_requests(5))
    assert sorted(result.rejected) == [0, 1, 2, 3, 4]
    assert "shape" in result.rejected[0][1]


def test_isolate_failures_finds_exactly_the_failing_rows() -> None:
    done: list[int] = []

    def attempt(rows: npt.NDArray[np.intp]) -> None:
        if {13, 14, 90} & set(rows.tolist()):
            raise RuntimeError(f"bad rows among {len(rows)}")
        done.extend(rows.tolist())

    failed = isolate_failures(np.arange(100), attempt)
    assert sorted(failed) == [13, 14, 90]
    assert all(isinstance(e, RuntimeError) and str(e) == "bad rows among 1" for e in failed.values())
    assert sorted(done) == sorted(set(range(100)) - {13, 14, 90})

    calls: list[int] = []
    failed = isolate_failures(np.arange(1), lambda rows: calls.append(1), first_error=RuntimeError("first"))
    assert list(failed) == [0] and str(failed[0]) == "first" and not calls  # not re-run
