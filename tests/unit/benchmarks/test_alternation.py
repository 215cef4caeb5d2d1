"""The bench's alternated (a)/(b) rounds: each (b) judged against the (a)s measured either side of it."""

from __future__ import annotations

import pytest

from benchmarks import backfill_bench


def _b(inference: float, whole: float) -> dict[str, float]:
    return {"inference_rows_per_s": inference, "whole_rows_per_s": whole}


def test_each_b_is_judged_against_the_mean_of_its_two_neighbours() -> None:
    # The box sped up between rounds: the first (b) is judged against 110, the second against 115.
    got = backfill_bench.alternation([100.0, 120.0, 110.0], [_b(99.0, 88.0), _b(115.0, 92.0)])
    first, second = got["rounds"]
    assert (first["a_before"], first["a_after"]) == (100.0, 120.0)
    assert first["inference_over_a"] == pytest.approx(0.9)
    assert first["whole_over_a"] == pytest.approx(0.8)
    assert second["inference_over_a"] == pytest.approx(1.0)
    assert second["whole_over_a"] == pytest.approx(0.8)
    assert got["inference_over_a"] == pytest.approx({"median": 0.95, "min": 0.9, "max": 1.0})
    assert got["a_range"] == [100.0, 120.0]


def test_the_median_ignores_one_disturbed_round() -> None:
    a = [200.0, 200.0, 200.0, 200.0]
    got = backfill_bench.alternation(a, [_b(180.0, 170.0), _b(120.0, 110.0), _b(184.0, 176.0)])
    assert got["inference_over_a"]["median"] == pytest.approx(0.9)
    assert got["whole_over_a"]["min"] == pytest.approx(0.55)


def test_a_sequence_that_does_not_bracket_every_b_is_refused() -> None:
    with pytest.raises(ValueError, match="one \\(a\\) more than \\(b\\)s"):
        backfill_bench.alternation([100.0, 101.0], [_b(90.0, 80.0), _b(91.0, 81.0)])
