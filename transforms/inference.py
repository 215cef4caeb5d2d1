"""Running a text encoder over many texts: tokenise once, bucket, infer, pool, recover.

This is the engine every runner shares (Spark ``mapInArrow``, Beam ``DoFn``, the benchmark): it
owns the parts that decide speed and robustness, so none of the adapters re-implement them.

* Tokenisation happens once per call for all texts (the Rust tokenizer, in parallel; plain ASCII
  texts skip BERT's normaliser, see :mod:`transforms.tokenizing`), then
  :func:`transforms.batching.plan_batches` cuts length-sorted buckets under a token budget.
* Each batch runs under ``inference_mode`` (and autocast on GPU); on CUDA the host tensors are
  pinned and copied without blocking, and the next batch is prepared while the GPU works.
* A CUDA out-of-memory error halves the limits and retries the same rows (invariant 5).
* Any other exception from the model is user code failing (not sluice): the batch is bisected
  until the rows that trigger it are isolated, and only those are reported as failed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch

from transforms.batching import BatchLimits, plan_batches
from transforms.models.text_encoder import TextEncoder


@dataclass
class EncodeStats:
    """What one call cost; summed by the engines into the job summary."""

    rows: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    tokenize_seconds: float = 0.0
    model_seconds: float = 0.0
    oom_retries: int = 0
    failed_rows: int = 0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0

    def add(self, other: EncodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class EncodeResult:
    """Embeddings for every row (zeros where ``failed`` has the row), and why rows failed."""

    embeddings: npt.NDArray[np.float32]
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)
    stats: EncodeStats = field(default_factory=EncodeStats)


@dataclass(frozen=True)
class Tokenized:
    ids: list[list[int]]
    lengths: npt.NDArray[np.int64]


def tokenize(encoder: TextEncoder, texts: Sequence[str] | pa.Array) -> Tokenized:
    ids = encoder.batch_tokenizer.encode(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return Tokenized(ids=ids, lengths=lengths)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class _Runner:
    """One call's state: the encoder, the current limits, and where results go."""

    def __init__(self, encoder: TextEncoder, tokens: Tokenized, limits: BatchLimits) -> None:
        self.encoder = encoder
        self.tokens = tokens
        self.limits = limits
        self.out = np.zeros((len(tokens.ids), encoder.dim), dtype=np.float32)
        self.failed: dict[int, tuple[str, str]] = {}
        self.stats = EncodeStats(rows=len(tokens.ids))
        self.pin = encoder.device.type == "cuda"

    def host_tensors(self, rows: npt.NDArray[np.intp]) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(self.tokens.lengths[rows].max())
        ids = np.full((len(rows), width), self.encoder.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            seq = self.tokens.ids[r]
            ids[j, : len(seq)] = seq
            mask[j, : len(seq)] = 1
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.pin:
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        return ids_t, mask_t

    def launch(self, host: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Queue the forward pass; on CUDA this returns before the GPU is done."""
        enc = self.encoder
        ids = host[0].to(enc.device, non_blocking=True)
        mask = host[1].to(enc.device, non_blocking=True)
        with torch.inference_mode(), enc.forward_context():
            hidden = enc.module(ids, mask)
            if isinstance(hidden, (tuple, list)):
                hidden = hidden[0]
            hidden = hidden.float()  # pool in fp32: a bf16 sum over 256 tokens loses digits
            if enc.pooling == "mean":
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            elif enc.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = hidden
            if enc.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled

    def account(self, rows: npt.NDArray[np.intp]) -> None:
        self.stats.batches += 1
        self.stats.real_tokens += int(self.tokens.lengths[rows].sum())
        self.stats.padded_tokens += len(rows) * int(self.tokens.lengths[rows].max())

    def run_isolating(self, rows: npt.NDArray[np.intp], failed_with: Exception | None = None) -> None:
        """Run ``rows`` synchronously; on failure split until the failing rows are found.

        ``failed_with`` is the error these exact rows already raised on the fast path, so the
        identical (possibly out-of-memory) call is not repeated.
        """
        exc = failed_with
        if exc is None:
            try:
                result = self.launch(self.host_tensors(rows)).cpu().numpy()
            except Exception as caught:
                exc = caught
            else:
                self.account(rows)
                self.out[rows] = result
                return
        if _is_oom(exc):
            self.stats.oom_retries += 1
            torch.cuda.empty_cache()
            if len(rows) == 1:
                self.failed[int(rows[0])] = ("CudaOutOfMemory", "CUDA out of memory even for this row alone")
                return
            self.limits = self.limits.halved()
        elif len(rows) == 1:
            msg = " ".join(str(exc).split())[:500]
            self.failed[int(rows[0])] = (type(exc).__name__, f"model raised {type(exc).__name__}: {msg}")
            return
        half = len(rows) // 2
        self.run_isolating(rows[:half])
        self.run_isolating(rows[half:])

    def run(self) -> None:
        plan = deque(plan_batches(self.tokens.lengths, self.limits))
        planned_with = self.limits
        t0 = time.perf_counter()
        pending: tuple[npt.NDArray[np.intp], torch.Tensor] | None = None
        while plan:
            rows = plan.popleft()
            try:
                launched = self.launch(self.host_tensors(rows))
            except Exception as exc:
                # Slow path for this batch only: synchronous, with OOM back-off and bisection.
                if pending is not None:
                    self._collect(*pending)
                    pending = None
                self.run_isolating(rows, failed_with=exc)
                if self.limits != planned_with and plan:
                    # An OOM halved the limits: cut the rest of the work to the new size now,
                    # rather than letting every later batch fail the same way first.
                    rest = np.concatenate(list(plan))
                    plan = deque(rest[b] for b in plan_batches(self.tokens.lengths[rest], self.limits))
                    planned_with = self.limits
                continue
            if pending is not None:
                self._collect(*pending)
            pending = (rows, launched)
        if pending is not None:
            self._collect(*pending)
        self.stats.model_seconds += time.perf_counter() - t0
        self.stats.failed_rows = len(self.failed)

    def _collect(self, rows: npt.NDArray[np.intp], launched: torch.Tensor) -> None:
        try:
            self.out[rows] = launched.cpu().numpy()
        except Exception:
            # Asynchronous CUDA errors surface at the copy; redo these rows the careful way.
            self.run_isolating(rows)
            return
        self.account(rows)


def encode_tokens(
    encoder: TextEncoder, tokens: Tokenized, *, limits: BatchLimits, tokenize_seconds: float = 0.0
) -> EncodeResult:
    """Embed already tokenised rows in order; for callers that tokenise ahead (:func:`tokenize`)."""
    runner = _Runner(encoder, tokens, limits.for_device(encoder.device.type))
    runner.run()
    runner.stats.tokenize_seconds = tokenize_seconds
    return EncodeResult(embeddings=runner.out, failed=runner.failed, stats=runner.stats)


def encode_texts(encoder: TextEncoder, texts: Sequence[str], *, limits: BatchLimits) -> EncodeResult:
    """Embed ``texts`` in order. Never raises for a bad row: such rows are in ``result.failed``."""
    t0 = time.perf_counter()
    tokens = tokenize(encoder, texts)
    return encode_tokens(encoder, tokens, limits=limits, tokenize_seconds=time.perf_counter() - t0)
