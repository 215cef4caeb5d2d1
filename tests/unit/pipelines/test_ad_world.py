"""The synthetic ad marketplace (pipelines/ad_world.py): the promises the CTR job's tests, the Kafka
producer and the trainer rely on — determinism (also across batch cuts), the input contract,
per-user sequence numbers, new ids, value ranges, a realistic click rate and a ground truth that
the dense features actually reflect."""

from __future__ import annotations

from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.ad_world import COUNTRIES, AdWorld
from schemas.ad_requests import AD_REQUEST_SCHEMA, DENSE_RANGES, DEVICES, SLOTS
from transforms.errors import ConfigError


@cache
def _world() -> AdWorld:
    return AdWorld.build(7)


@cache
def _small() -> AdWorld:
    return AdWorld.build(3, users=2_000, ads=300, campaigns=30)


@cache
def _traffic() -> pa.Table:
    """60k requests of the default world, in three batches."""
    stream = _world().requests(11)
    return pa.Table.from_batches([stream.next_batch(20_000) for _ in range(3)])


def _index(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.cast(pc.utf8_slice_codeunits(ids, 1), pa.int64()).to_numpy()


def test_same_seeds_give_identical_streams() -> None:
    a = AdWorld.build(5, users=1_000, ads=100, campaigns=10).requests(2).next_batch(3_000)
    b = AdWorld.build(5, users=1_000, ads=100, campaigns=10).requests(2).next_batch(3_000)
    assert a.equals(b, check_metadata=True)


def test_other_seeds_give_other_streams() -> None:
    base = _small().requests(1).next_batch(2_000)
    other_stream = _small().requests(2).next_batch(2_000)
    other_world = AdWorld.build(4, users=2_000, ads=300, campaigns=30).requests(1).next_batch(2_000)
    for other in (other_stream, other_world):
        same = np.mean(np.asarray(base.column("ad_id").to_pylist()) == np.asarray(other.column("ad_id").to_pylist()))
        assert same < 0.2
    assert set(base.column("request_id").to_pylist()).isdisjoint(other_stream.column("request_id").to_pylist())


def test_batch_boundaries_do_not_change_the_stream() -> None:
    """A producer batching by 7 and a trainer batching by 5,000 see the same requests."""
    whole = _small().requests(9).next_batch(5_000)
    stream = _small().requests(9)
    pieces = [stream.next_batch(n) for n in (7, 1, 0, 992, 4_000)]
    assert pa.Table.from_batches(pieces).combine_chunks().equals(pa.Table.from_batches([whole]).combine_chunks())
    assert stream.position == 5_000


def test_batches_are_exactly_the_input_contract() -> None:
    batch = _small().requests(1).next_batch(1_000)
    assert batch.schema.equals(AD_REQUEST_SCHEMA, check_metadata=True)
    assert batch.num_rows == 1_000
    empty = _small().requests(1).next_batch(0)
    assert empty.schema.equals(AD_REQUEST_SCHEMA, check_metadata=True) and empty.num_rows == 0
    with pytest.raises(ValueError):
        _small().requests(1).next_batch(-1)


def test_request_ids_are_unique_across_batches() -> None:
    ids = _traffic().column("request_id")
    assert pc.count_distinct(ids).as_py() == len(ids)


def test_seq_numbers_each_users_requests_without_gaps_across_batches() -> None:
    t = _traffic()
    users = np.asarray(t.column("user_id").to_pylist())
    seq = t.column("seq").to_numpy()
    order = np.lexsort((np.arange(len(users)), users))  # by user, then arrival
    u, s = users[order], seq[order]
    first = np.r_[True, u[1:] != u[:-1]]
    expected = np.arange(len(u)) - np.maximum.accumulate(np.where(first, np.arange(len(u)), 0))
    assert np.array_equal(s, expected)
    assert seq.max() > 100  # heavy users really come back, across the batch cuts


def test_new_users_and_ads_come_at_the_asked_fractions_and_never_repeat() -> None:
    t = _traffic()
    w = _world()
    user, ad = _index(t.column("user_id")), _index(t.column("ad_id"))
    new_user, new_ad = user >= w.n_users, ad >= w.n_ads
    assert 0.015 < new_user.mean() < 0.025
    assert 0.006 < new_ad.mean() < 0.014
    assert len(np.unique(user[new_user])) == new_user.sum()
    assert (t.column("seq").to_numpy()[new_user] == 0).all()
    # A new ad is a new creative of an existing campaign; a new user has no history yet.
    campaigns = _index(t.column("campaign_id"))
    assert (campaigns[new_ad] < w.n_campaigns).all()
    assert (t.column("user_ctr_7d").to_numpy()[new_user] == 0).all()
    assert (t.column("ad_ctr_7d").to_numpy()[new_ad] == 0).all()
    # Another stream's new ids are never this one's (nor the world's).
    other = _index(_world().requests(12).next_batch(5_000).column("user_id"))
    assert set(other[other >= w.n_users]).isdisjoint(user[new_user])


def test_new_fractions_can_be_zero_or_all() -> None:
    none = _small().requests(1, new_user_fraction=0.0, new_ad_fraction=0.0).next_batch(2_000)
    assert (_index(none.column("user_id")) < 2_000).all() and (_index(none.column("ad_id")) < 300).all()
    every = _small().requests(1, new_user_fraction=1.0).next_batch(500)
    assert (_index(every.column("user_id")) >= 2_000).all()


def test_values_are_in_their_vocabularies_and_ranges() -> None:
    t = _traffic()
    assert set(t.column("slot").to_pylist()) == set(SLOTS)
    assert set(t.column("device").to_pylist()) == set(DEVICES)
    assert set(t.column("country").to_pylist()) <= set(COUNTRIES)
    assert len(set(t.column("country").to_pylist())) >= 25
    hours = t.column("hour").to_numpy()
    assert hours.min() >= 0 and hours.max() <= 23
    for name, (lo, hi) in DENSE_RANGES.items():
        values = t.column(name).to_numpy()
        assert np.isfinite(values).all(), name
        assert values.min() >= lo and values.max() <= hi, name
    assert pc.min(t.column("bid_floor_usd")).as_py() > 0


def test_event_time_advances_from_the_start() -> None:
    stream = _small().requests(1, start_time_ms=1_700_000_000_000, rate_per_s=100.0)
    a, b = stream.next_batch(1_000), stream.next_batch(1_000)
    times = np.r_[
        a.column("event_time").cast(pa.int64()).to_numpy(), b.column("event_time").cast(pa.int64()).to_numpy()
    ]
    assert times[0] >= 1_700_000_000_000
    assert (np.diff(times) >= 0).all()
    span_s = (times[-1] - times[0]) / 1000
    assert 15 < span_s < 25  # 2,000 requests at ~100/s


def test_traffic_is_heavy_tailed() -> None:
    t = _traffic()
    _, per_user = np.unique(t.column("user_id").to_numpy(zero_copy_only=False), return_counts=True)
    top = np.sort(per_user)[::-1]
    assert top[: len(top) // 100].sum() > 0.1 * top.sum()  # the top 1% of users send >10%
    countries = pc.value_counts(t.column("country")).to_pylist()
    shares = sorted((c["counts"] for c in countries), reverse=True)
    assert shares[0] > 5 * shares[-1]


def test_base_rate_is_realistic_and_the_truth_is_informative() -> None:
    t = _traffic()
    p = _world().click_probability(t)
    assert p.shape == (t.num_rows,) and p.dtype == np.float64
    assert np.isfinite(p).all() and (p > 0).all() and (p < 1).all()
    assert 0.02 <= p.mean() <= 0.05
    assert p.std() > 0.02  # not a constant: there is something to learn


def test_ctr_features_track_the_true_propensity() -> None:
    """``user_ctr_7d``/``ad_ctr_7d`` are noisy daily estimates of the truth, not noise."""
    t = _traffic()
    p = _world().click_probability(t)
    for name in ("user_ctr_7d", "ad_ctr_7d"):
        feature = t.column(name).to_numpy()
        known = feature > 0
        assert np.corrcoef(feature[known], p[known])[0, 1] > 0.2, name


def test_ground_truth_scores_new_ids_and_is_deterministic() -> None:
    batch = _small().requests(1, new_user_fraction=1.0, new_ad_fraction=1.0).next_batch(500)
    p1 = _small().click_probability(batch)
    p2 = AdWorld.build(3, users=2_000, ads=300, campaigns=30).click_probability(batch)
    assert np.isfinite(p1).all() and np.array_equal(p1, p2)


def test_ground_truth_refuses_foreign_ids() -> None:
    batch = _small().requests(1).next_batch(3)
    foreign = batch.set_column(1, "user_id", pa.array(["u1", "someone", "u3"]))
    with pytest.raises(ValueError, match="user ids were not produced by an AdWorld"):
        _small().click_probability(foreign)


@pytest.mark.parametrize(
    "kwargs", [{"users": 0}, {"ads": -1}, {"campaigns": 10**9}, {"seed": -1}], ids=lambda k: next(iter(k))
)
def test_bad_build_arguments_are_config_errors(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        AdWorld.build(**kwargs)


def test_bad_stream_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        _small().requests(1, new_user_fraction=1.5)
    with pytest.raises(ConfigError):
        _small().requests(1, rate_per_s=0)


def test_a_kafka_sized_stream_generates_without_per_row_python() -> None:
    """Not timed (shared CI cores); 50k requests must simply be a sub-second affair to run."""
    batch = _world().requests(1).next_batch(50_000)
    assert batch.num_rows == 50_000
