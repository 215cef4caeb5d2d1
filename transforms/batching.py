"""Cutting a set of tokenised texts into model batches that waste little on padding.

Texts are sorted by length and cut into runs whose *padded* size (rows x longest row) stays under a
token budget as well as a row cap. Short texts then travel in wide batches and long ones in narrow
batches, so a heavy-tailed length distribution costs what it must and no more: with naive
fixed-size batches one 256-token outlier pads 63 ten-token neighbours to 256. The budget also
bounds activation memory per batch (invariant 5), which the row cap alone cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class BatchLimits:
    """Upper bounds on one model call: rows, and rows x padded length."""

    max_rows: int = 128
    max_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_tokens < 1:
            raise ValueError(
                f"batch limits must be positive, got max_rows={self.max_rows} max_tokens={self.max_tokens}"
            )

    def halved(self) -> BatchLimits:
        """Limits after an out-of-memory error (never below one row)."""
        return BatchLimits(max(1, self.max_rows // 2), max(1, self.max_tokens // 2))


def plan_batches(lengths: npt.NDArray[np.integer], limits: BatchLimits) -> list[npt.NDArray[np.intp]]:
    """Row indices of each batch, longest texts first.

    Greedy from the longest row down: the first row of a batch fixes its padded length ``L``, so
    the batch may hold ``min(max_rows, max_tokens // L)`` rows, all no longer than ``L``. A row
    longer than the budget on its own still gets a batch of one.
    """
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(-np.asarray(lengths), kind="stable")
    sorted_len = np.asarray(lengths)[order]
    batches: list[npt.NDArray[np.intp]] = []
    start = 0
    while start < n:
        longest = max(int(sorted_len[start]), 1)
        size = max(1, min(limits.max_rows, limits.max_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


def padding_efficiency(lengths: npt.NDArray[np.integer], batches: list[npt.NDArray[np.intp]]) -> float:
    """Real tokens / padded tokens over a plan (1.0 means no padding at all)."""
    lengths = np.asarray(lengths)
    real = int(lengths.sum())
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real / padded if padded else 1.0
