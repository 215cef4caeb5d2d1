"""Token-budget batching (transforms/batching.py): pure logic, checked against the plan's own rules
and against a naive fixed-size plan, not against the implementation's arithmetic."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from transforms.batching import BatchLimits, padding_efficiency, plan_batches


def heavy_tailed_lengths(n: int = 2000, seed: int = 7) -> np.ndarray:
    """Mostly short texts with a long tail up to the 256-token truncation, like real item text."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=2.6, sigma=0.8, size=n).astype(np.int64) + 3, 3, 256)
    lengths[rng.choice(n, size=n // 50, replace=False)] = 256  # the outliers that ruin naive batches
    return lengths


def naive_batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def assert_partition(batches: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(batches) if batches else np.array([], dtype=np.intp)
    assert len(flat) == n, "every row must be in exactly one batch"
    assert sorted(flat.tolist()) == list(range(n))


LIMIT_CASES = [
    BatchLimits(max_rows=128, max_tokens=8192),
    BatchLimits(max_rows=64, max_tokens=2048),
    BatchLimits(max_rows=7, max_tokens=100_000),  # row cap binds
    BatchLimits(max_rows=1000, max_tokens=600),  # token budget binds
    BatchLimits(max_rows=1, max_tokens=1),
]


@pytest.mark.parametrize("limits", LIMIT_CASES, ids=lambda lim: f"r{lim.max_rows}-t{lim.max_tokens}")
def test_plan_partitions_rows_and_respects_limits(limits: BatchLimits) -> None:
    lengths = heavy_tailed_lengths()
    batches = plan_batches(lengths, limits)
    assert_partition(batches, len(lengths))
    for b in batches:
        assert 1 <= len(b) <= limits.max_rows
        padded = len(b) * int(lengths[b].max())
        if padded > limits.max_tokens:
            # Only a single row that is over the budget on its own may exceed it.
            assert len(b) == 1 and lengths[b[0]] > limits.max_tokens


def test_over_budget_row_travels_alone() -> None:
    lengths = np.array([5, 900, 5, 5, 1000, 5])
    batches = plan_batches(lengths, BatchLimits(max_rows=8, max_tokens=512))
    assert_partition(batches, len(lengths))
    assert [b.tolist() for b in batches[:2]] == [[4], [1]]
    assert sorted(batches[2].tolist()) == [0, 2, 3, 5]
    assert len(batches) == 3


def test_longest_first_ordering() -> None:
    lengths = heavy_tailed_lengths(500, seed=3)
    batches = plan_batches(lengths, BatchLimits(max_rows=32, max_tokens=4096))
    flat = np.concatenate(batches)
    seq = lengths[flat]
    assert (np.diff(seq) <= 0).all(), "rows must come longest first, across and within batches"
    assert lengths[batches[0][0]] == lengths.max()
    # each batch's padded width is fixed by its first row
    for b in batches:
        assert lengths[b[0]] == lengths[b].max()


def test_equal_lengths_keep_input_order() -> None:
    lengths = np.array([4, 4, 4, 4, 4])
    batches = plan_batches(lengths, BatchLimits(max_rows=2, max_tokens=1000))
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [4]]


def test_batches_are_as_wide_as_the_budget_allows() -> None:
    lengths = np.array([10] * 100)
    batches = plan_batches(lengths, BatchLimits(max_rows=64, max_tokens=250))
    assert [len(b) for b in batches] == [25, 25, 25, 25]
    batches = plan_batches(lengths, BatchLimits(max_rows=30, max_tokens=10_000))
    assert [len(b) for b in batches] == [30, 30, 30, 10]


def test_zero_length_rows_are_batched() -> None:
    lengths = np.array([0, 0, 3])
    batches = plan_batches(lengths, BatchLimits(max_rows=4, max_tokens=4))
    assert_partition(batches, 3)
    # the 3-token row fills the 4-token budget alone; empty rows count as length 1 for the budget
    assert [b.tolist() for b in batches] == [[2], [0, 1]]
    assert padding_efficiency(lengths, batches) == 1.0


def test_padding_efficiency_beats_naive_fixed_size_batches() -> None:
    lengths = heavy_tailed_lengths()
    rng = np.random.default_rng(11)
    lengths = lengths[rng.permutation(len(lengths))]
    planned = plan_batches(lengths, BatchLimits(max_rows=64, max_tokens=64 * 256))
    naive = naive_batches(len(lengths), 64)
    eff_planned = padding_efficiency(lengths, planned)
    eff_naive = padding_efficiency(lengths, naive)
    assert 0 < eff_naive < eff_planned <= 1.0
    assert eff_planned > 0.8, eff_planned
    assert eff_naive < 0.3, eff_naive  # one 256-token outlier per 64 rows pads the rest to 256


def test_padding_efficiency_known_values() -> None:
    lengths = np.array([10, 2, 2, 6])
    assert padding_efficiency(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(20 / 32)
    assert padding_efficiency(lengths, [np.array([0]), np.array([3]), np.array([1, 2])]) == 1.0
    assert padding_efficiency(np.array([], dtype=np.int64), []) == 1.0


def test_halved_never_below_one() -> None:
    limits = BatchLimits(max_rows=5, max_tokens=9)
    seen = []
    for _ in range(6):
        limits = limits.halved()
        seen.append((limits.max_rows, limits.max_tokens))
    assert seen == [(2, 4), (1, 2), (1, 1), (1, 1), (1, 1), (1, 1)]
    assert BatchLimits(128, 8192).halved() == BatchLimits(64, 4096)


def test_empty_input() -> None:
    assert plan_batches(np.array([], dtype=np.int64), BatchLimits()) == []


@pytest.mark.parametrize(("rows", "tokens"), [(0, 10), (10, 0), (-1, 10), (10, -5)])
def test_invalid_limits_raise(rows: int, tokens: int) -> None:
    with pytest.raises(ValueError, match="batch limits must be positive"):
        BatchLimits(max_rows=rows, max_tokens=tokens)


def plan_cost(lengths: np.ndarray, batches: list[np.ndarray], overhead: int) -> int:
    return sum(len(b) * max(int(lengths[b].max()), 1) + overhead for b in batches)


def brute_force_cost(sorted_desc: list[int], limits: BatchLimits) -> int:
    """Cheapest cut of the longest-first rows into contiguous batches, by trying every cut."""
    n = len(sorted_desc)
    best = None
    for mask in range(1 << max(n - 1, 0)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        total, ok = 0, True
        for a, b in itertools.pairwise(cuts):
            width = max(sorted_desc[a], 1)
            rows = b - a
            if rows > limits.max_rows or (rows > 1 and rows * width > limits.max_tokens):
                ok = False
                break
            total += rows * width + (limits.call_overhead_tokens or 0)
        if ok and (best is None or total < best):
            best = total
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(25))
def test_plan_is_the_cheapest_cut(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 11))
    lengths = rng.integers(1, 60, size=n)
    limits = BatchLimits(
        max_rows=int(rng.integers(1, 6)),
        max_tokens=int(rng.integers(40, 200)),
        call_overhead_tokens=int(rng.integers(0, 80)),
    )
    batches = plan_batches(lengths, limits)
    assert_partition(batches, n)
    expected = brute_force_cost(sorted(lengths.tolist(), reverse=True), limits)
    assert plan_cost(lengths, batches, limits.call_overhead_tokens or 0) == expected


def test_batch_closes_early_where_length_steps_up() -> None:
    # 64 long rows then 64 short ones fit one 128-row batch, which would pad the short ones 10x.
    lengths = np.array([100] * 64 + [10] * 64)
    batches = plan_batches(lengths, BatchLimits(max_rows=128, max_tokens=1 << 20, call_overhead_tokens=256))
    assert sorted(len(b) for b in batches) == [64, 64]
    assert padding_efficiency(lengths, batches) == 1.0


def test_small_length_step_is_cheaper_than_a_call() -> None:
    # padding 8 rows by one token costs 8 tokens, far less than a 256-token call: keep one batch
    lengths = np.array([11] * 8 + [10] * 8)
    batches = plan_batches(lengths, BatchLimits(max_rows=128, max_tokens=8192, call_overhead_tokens=256))
    assert len(batches) == 1


def test_free_calls_mean_no_padding() -> None:
    lengths = heavy_tailed_lengths(1000, seed=5)
    batches = plan_batches(lengths, BatchLimits(call_overhead_tokens=0))
    assert padding_efficiency(lengths, batches) == 1.0


def test_task_sized_inputs_pad_less_than_filling_every_batch() -> None:
    """A Spark task holds ~1k rows; filling batches to the caps wastes far more there."""
    lengths = heavy_tailed_lengths(1000, seed=9)
    limits = BatchLimits().for_device("cpu")
    assert limits.call_overhead_tokens == 256
    greedy_fill = []
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < len(order):
        size = max(1, min(limits.max_rows, limits.max_tokens // int(lengths[order[start]])))
        greedy_fill.append(order[start : start + size])
        start += size
    planned = plan_batches(lengths, limits)
    greedy_cost = plan_cost(lengths, greedy_fill, 256)
    assert plan_cost(lengths, planned, 256) < greedy_cost
    assert padding_efficiency(lengths, planned) > padding_efficiency(lengths, greedy_fill) + 0.03


def test_negative_call_overhead_raises() -> None:
    with pytest.raises(ValueError, match="call_overhead_tokens"):
        BatchLimits(call_overhead_tokens=-1)


def test_call_overhead_defaults_by_device() -> None:
    assert BatchLimits().for_device("cpu").call_overhead_tokens == 256
    assert BatchLimits().for_device("cuda").call_overhead_tokens == 4096
    assert BatchLimits(call_overhead_tokens=7).for_device("cuda").call_overhead_tokens == 7
    assert BatchLimits(call_overhead_tokens=7).halved().call_overhead_tokens == 7


def test_unset_limits_take_the_devices_defaults() -> None:
    """A GPU gets far wider calls than a CPU unless the config says otherwise."""
    assert BatchLimits().for_device("cpu") == BatchLimits(128, 2048, 256)
    assert BatchLimits().for_device("cuda") == BatchLimits(1024, 65536, 4096)
    assert BatchLimits(max_rows=64).for_device("cuda") == BatchLimits(64, 65536, 4096)
    assert BatchLimits(max_tokens=512).for_device("cuda") == BatchLimits(1024, 512, 4096)
    # Unresolved limits plan (and halve) as the CPU defaults, never as "no limit".
    assert (BatchLimits().rows, BatchLimits().tokens) == (128, 2048)
    assert BatchLimits().halved() == BatchLimits(64, 1024)
    lengths = heavy_tailed_lengths()
    assert [b.tolist() for b in plan_batches(lengths, BatchLimits())] == [
        b.tolist() for b in plan_batches(lengths, BatchLimits(128, 2048))
    ]
