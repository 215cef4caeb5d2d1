"""Cutting a set of tokenised texts into model batches that waste little on padding.

Texts are sorted by length and cut into runs whose *padded* size (rows x longest row) stays under a
token budget as well as a row cap. Short texts then travel in wide batches and long ones in narrow
batches, so a heavy-tailed length distribution costs what it must and no more: with naive
fixed-size batches one 256-token outlier pads 63 ten-token neighbours to 256. The budget also
bounds activation memory per batch (invariant 5), which the row cap alone cannot.

Where the cuts go matters most when a Spark task holds only ~1k rows: filling every batch up to the
caps puts neighbours of quite different lengths together (0.86 of padded tokens real on the demo
table, against 0.98 over 10k rows). The planner therefore picks the cuts that minimise the padded
tokens plus a fixed per-call cost, so it closes a batch early where the length steps up and the
padding would cost more than one more model call (0.94 on the same 1k-row tasks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class BatchLimits:
    """Upper bounds on one model call (rows, and rows x padded length) and what a call costs.

    ``None`` in any field means the default for the device the model runs on (:meth:`for_device`):
    a GPU wants ~8x wider calls than a CPU (on an H100, MiniLM did 107k rows/s at 1024 rows x 64k
    tokens and 23k at 128 x 8k, both on shapes never seen before), and the driver that builds
    the limits does not know which device its workers have.

    ``call_overhead_tokens`` is the fixed cost of one model call expressed in padded tokens: the
    planner accepts that much padding before it prefers an extra call. ``None`` means the default
    for the device (:meth:`for_device`): on CPU a MiniLM forward costs about as much as ~150-250
    tokens of work on top of its tokens; on a GPU, where small batches leave it idle, far more.
    """

    max_rows: int | None = None
    max_tokens: int | None = None
    call_overhead_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.rows < 1 or self.tokens < 1:
            raise ValueError(
                f"batch limits must be positive, got max_rows={self.max_rows} max_tokens={self.max_tokens}"
            )
        if self.call_overhead_tokens is not None and self.call_overhead_tokens < 0:
            raise ValueError(f"call_overhead_tokens must be >= 0, got {self.call_overhead_tokens}")

    @property
    def rows(self) -> int:
        """``max_rows``, or the CPU default where it was left to the device and never resolved."""
        return self.max_rows if self.max_rows is not None else DEFAULT_MAX_ROWS["cpu"]

    @property
    def tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS["cpu"]

    def halved(self) -> BatchLimits:
        """Limits after an out-of-memory error (never below one row)."""
        return BatchLimits(max(1, self.rows // 2), max(1, self.tokens // 2), self.call_overhead_tokens)

    def for_device(self, device_type: str) -> BatchLimits:
        """These limits with every unset field filled in for ``device_type`` ("cpu", "cuda")."""
        kind = "cuda" if device_type == "cuda" else "cpu"
        return BatchLimits(
            self.max_rows if self.max_rows is not None else DEFAULT_MAX_ROWS[kind],
            self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS[kind],
            self.call_overhead_tokens if self.call_overhead_tokens is not None else DEFAULT_CALL_OVERHEAD_TOKENS[kind],
        )


# CPU: the token cap bounds the widest activation (tokens x FFN width x 4 B), and that must stay well
# under glibc's 32 MiB mmap ceiling: at 8k tokens MiniLM's [8192, 1536] activations (48 MiB) were each
# a fresh mmap, page-faulted in and unmapped again on every call (a fifth of the process's time in
# the kernel), and int8, whose GEMMs are cheap, lost most of its gain to it. 2x Xeon (AMX) cores,
# 3k demo rows, fp32 / int8 rows/s: 8k tokens 229-245 / 297-354, 4k 252-258 / 425-435, 2k
# 255-268 / 527-549, 1k 267-271 / 537-543 (about 2k's, in twice the calls). By the same arithmetic
# a model with a wider FFN (BERT-base: 3072) wants ~1k (not measured). CUDA (H100, MiniLM, bf16):
# 128 x 8k tokens left the GPU waiting on the host at ~2 ms per call; 1024 x 64k tokens ran 4.6x
# the rows/s (107k vs 23k). A CUDA OOM halves them per call (invariant 5).
DEFAULT_MAX_ROWS = {"cpu": 128, "cuda": 1024}
DEFAULT_MAX_TOKENS = {"cpu": 2048, "cuda": 65536}
# CPU: timed with MiniLM on one core, a call costs ~20-25 ms beyond its tokens, i.e. ~120-150 tokens
# at ~0.17 ms each (noisy; 256 errs towards fewer calls). CUDA: set high because a call below a few
# thousand tokens leaves the device idle; config overrides both.
DEFAULT_CALL_OVERHEAD_TOKENS = {"cpu": 256, "cuda": 4096}


def plan_batches(lengths: npt.NDArray[np.integer], limits: BatchLimits) -> list[npt.NDArray[np.intp]]:
    """Row indices of each batch, longest texts first.

    Rows are sorted longest first, so a batch's first row fixes its padded length ``L`` and it may
    hold at most ``min(max_rows, max_tokens // L)`` rows. Among all such cuts of the sorted rows
    the one with the least ``sum(rows * L) + calls * call_overhead_tokens`` is chosen by dynamic
    programming from the shortest end (O(rows x max_rows), a few ms for a 1k-row task). A row
    longer than the budget on its own still gets a batch of one.
    """
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(-np.asarray(lengths), kind="stable")
    sorted_len = np.maximum(np.asarray(lengths, dtype=np.int64)[order], 1)
    # cost[i]: cheapest plan for sorted rows i..n-1; cut[i]: where the first batch of that plan ends.
    cost = np.zeros(n + 1, dtype=np.float64)
    cut = np.zeros(n, dtype=np.intp)
    overhead = float(limits.for_device("cpu").call_overhead_tokens or 0)
    for i in range(n - 1, -1, -1):
        longest = int(sorted_len[i])
        size = max(1, min(limits.rows, limits.tokens // longest, n - i))
        candidates = cost[i + 1 : i + size + 1] + np.arange(1, size + 1, dtype=np.float64) * longest
        # ties go to the larger batch: fewer calls for the same padded tokens.
        k = size - 1 - int(np.argmin(candidates[::-1]))
        cost[i] = candidates[k] + overhead
        cut[i] = i + k + 1
    batches: list[npt.NDArray[np.intp]] = []
    start = 0
    while start < n:
        batches.append(order[start : cut[start]])
        start = int(cut[start])
    return batches


def padding_efficiency(lengths: npt.NDArray[np.integer], batches: list[npt.NDArray[np.intp]]) -> float:
    """Real tokens / padded tokens over a plan (1.0 means no padding at all)."""
    lengths = np.asarray(lengths)
    real = int(lengths.sum())
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return real / padded if padded else 1.0
