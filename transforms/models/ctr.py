"""The CTR model of the ad-scoring job: what it reads, how Arrow becomes tensors, how it scores.

The model is DLRM-shaped (Naumov et al., 2019) because that is what production CTR models look
like and because its parts map onto the input contract one to one: every categorical feature of
:data:`schemas.ad_requests.CATEGORICAL_FEATURES` gets an embedding table, the dense features go
through a bottom MLP into the same space, the pairwise dot products of all those vectors are the
feature interactions, and a top MLP turns them into one logit.

Three rules shape the code around it:

* **Unknown ids are traffic, not errors.** Row 0 of every embedding table is the reserved
  unknown bucket: an id outside the vocabulary (a new user, a new ad, an id below the training
  min-count) is encoded as 0, so a lookup can never go out of range. The bucket is trained: rare
  training ids are folded into it, so it learns what "an id we know little about" is worth.
* **The scoring path is vectorised.** Vocabulary lookups are numpy operations on the Arrow
  buffers against an index built once per model (:class:`_VocabularyIndex`), dense
  normalisation and range checks are numpy expressions, and the forward pass sees whole batches;
  no Python runs per row except to word the message of a rejected one.
* **A bad row costs that row only.** Dense values outside the ranges the model accepts are
  rejected (``ModelInputRejected``) before the forward pass; if the module itself raises, the
  batch is bisected down to the rows that trigger it and only those are rejected, as the text
  encoder's engine does (``transforms.inference``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from schemas.ad_requests import CATEGORICAL_FEATURES, DENSE_FEATURES, DENSE_RANGES, DEVICES, SLOTS
from transforms.errors import ConfigError, SourceError

__all__ = [
    "REJECTED",
    "UNKNOWN_INDEX",
    "CategoricalFeature",
    "CtrArchitecture",
    "CtrEncoder",
    "CtrFeatureSpec",
    "CtrModel",
    "CtrScorer",
    "DenseFeature",
    "EncodedBatch",
    "ScoreResult",
    "build_feature_spec",
    "isolate_failures",
]

#: Index of the unknown/out-of-vocabulary bucket in every embedding table.
UNKNOWN_INDEX = 0
#: Error class of rows the model refuses before running (dense values outside its ranges).
REJECTED = "ModelInputRejected"

#: Closed or naturally bounded vocabularies: fixed, not learned from data, so a quiet hour or a
#: rare device in the training log does not fall into the unknown bucket.
FIXED_VOCABULARIES: Mapping[str, tuple[str, ...]] = {
    "slot": SLOTS,
    "device": DEVICES,
    "hour": tuple(str(h) for h in range(24)),
}

Table: TypeAlias = pa.RecordBatch | pa.Table
Column: TypeAlias = pa.Array | pa.ChunkedArray

# --------------------------------------------------------------------------------------------------
# Feature spec (travels in the artifact's manifest)
# --------------------------------------------------------------------------------------------------


class CategoricalFeature(BaseModel):
    """One embedding table: value ``vocabulary[i]`` is row ``i + 1``; row 0 is the unknown bucket."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    vocabulary: tuple[str, ...]
    min_count: int = Field(1, ge=1, description="training occurrences a value needed to get its own row")

    @property
    def cardinality(self) -> int:
        return len(self.vocabulary) + 1

    @model_validator(mode="after")
    def _unique(self) -> CategoricalFeature:
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"vocabulary of {self.name} has duplicate values")
        return self


class DenseFeature(BaseModel):
    """One dense input: accepted range, then ``(transform(x) - mean) / std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    accepted_range: tuple[float, float]
    transform: Literal["identity", "log1p"] = "identity"
    mean: float = 0.0
    std: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> DenseFeature:
        lo, hi = self.accepted_range
        if not lo <= hi:
            raise ValueError(f"accepted_range of {self.name} is empty: {lo} > {hi}")
        if self.transform == "log1p" and lo <= -1.0:
            raise ValueError(f"{self.name} uses log1p but accepts values <= -1")
        return self


class CtrFeatureSpec(BaseModel):
    """Which columns the model reads and how each becomes a number."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    categorical: tuple[CategoricalFeature, ...]
    dense: tuple[DenseFeature, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.categorical) + tuple(f.name for f in self.dense)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return tuple(f.cardinality for f in self.categorical)


class CtrArchitecture(BaseModel):
    """Hyperparameters that fix the module's shape (with the spec's cardinalities)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_dim: int = Field(16, ge=1, le=1024)
    bottom_mlp: tuple[int, ...] = Field((64,), description="hidden widths; a last layer to embedding_dim is added")
    top_mlp: tuple[int, ...] = Field((128, 64), description="hidden widths; a last layer to 1 logit is added")


def _as_strings(column: Column) -> Column:
    """``pa.string()`` values (ints such as ``hour`` become their decimal text)."""
    return column if pa.types.is_string(column.type) else pc.cast(column, pa.string())


def build_feature_spec(
    table: Table,
    *,
    categorical: Sequence[str] = CATEGORICAL_FEATURES,
    dense: Sequence[str] = DENSE_FEATURES,
    ranges: Mapping[str, tuple[float, float]] = DENSE_RANGES,
    min_count: int = 2,
    fixed: Mapping[str, tuple[str, ...]] = FIXED_VOCABULARIES,
) -> CtrFeatureSpec:
    """Vocabularies and normalisation learned from training rows.

    Values seen fewer than ``min_count`` times get no row of their own: they train the unknown
    bucket, which is exactly what new ids will be scored through. Dense features whose accepted
    range reaches past 1 are heavy-tailed (prices, counts) and are log1p-transformed first.
    """
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, not {min_count}")
    cats: list[CategoricalFeature] = []
    for name in categorical:
        if name in fixed:
            cats.append(CategoricalFeature(name=name, vocabulary=tuple(fixed[name]), min_count=1))
            continue
        counts = pc.value_counts(_as_strings(_column(table, name)).drop_null())
        values = counts.field("values")
        keep = pc.greater_equal(counts.field("counts"), min_count)
        kept = pc.filter(values, keep)
        vocab = pc.take(kept, pc.sort_indices(kept)).to_pylist()
        cats.append(CategoricalFeature(name=name, vocabulary=tuple(vocab), min_count=min_count))
    dens: list[DenseFeature] = []
    for name in dense:
        if name not in ranges:
            raise ConfigError(f"dense feature {name} has no accepted range: add it to the ranges")
        lo, hi = ranges[name]
        transform: Literal["identity", "log1p"] = "log1p" if hi > 1.0 and lo > -1.0 else "identity"
        raw = _dense_values(table, name)
        ok = (raw >= lo) & (raw <= hi)
        x = _transform(raw[ok], transform)
        mean = float(x.mean()) if x.size else 0.0
        std = float(x.std()) if x.size else 1.0
        dens.append(
            DenseFeature(
                name=name,
                accepted_range=(float(lo), float(hi)),
                transform=transform,
                mean=mean,
                std=std if std > 1e-6 else 1.0,
            )
        )
    return CtrFeatureSpec(categorical=tuple(cats), dense=tuple(dens))


# --------------------------------------------------------------------------------------------------
# Arrow -> tensors
# --------------------------------------------------------------------------------------------------


def _column(table: Table, name: str) -> Column:
    index = table.schema.get_field_index(name)
    if index < 0:
        raise SourceError(f"ad request batch has no column {name!r}: the CTR model needs {name}")
    return table.column(index)


def _dense_values(table: Table, name: str) -> npt.NDArray[np.float64]:
    col = _column(table, name)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise SourceError(f"ad request column {name!r} is {col.type}, expected a number")
    if col.null_count:
        col = pc.fill_null(pc.cast(col, pa.float64()), math.nan)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def _transform(x: npt.NDArray[np.float64], transform: str) -> npt.NDArray[np.float64]:
    return np.log1p(x) if transform == "log1p" else x


@dataclass
class EncodedBatch:
    """Model inputs for every row (zeros where rejected) and the rows refused before the model."""

    categorical: npt.NDArray[np.int64]
    dense: npt.NDArray[np.float32]
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def accepted_rows(self) -> npt.NDArray[np.intp]:
        mask = np.ones(len(self.categorical), dtype=bool)
        if self.rejected:
            mask[np.fromiter(self.rejected, dtype=np.intp, count=len(self.rejected))] = False
        return np.flatnonzero(mask)


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
#: Vocabularies with a longer value are looked up by Arrow's index_in instead (see below).
_MAX_INDEXED_BYTES = 64
#: index_in costs ~40 ns per vocabulary value (its hash table, rebuilt per call) + ~15 ns per row;
#: the prebuilt index ~200 ns per row. So the index pays only where the vocabulary outnumbers
#: the rows about 5 to 1: user and ad ids in 1k-5k-row batches, never slot or hour.
_INDEX_ABOVE_VOCAB_PER_ROW = 5


def _mix(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _padded_bytes(strings: pa.Array, width: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Each string's first ``width`` bytes, zero-padded, as a ``[n, width]`` matrix, and its length.

    Read straight from the Arrow offsets and data buffers (``strings`` must be ``pa.string()``).
    """
    n = len(strings)
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=strings.offset + n + 1)[strings.offset :]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None and data_buf.size else np.zeros(1, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    lengths = offsets[1:].astype(np.int64) - starts
    at = starts[:, None] + np.arange(width, dtype=np.int64)
    np.minimum(at, len(data) - 1, out=at)
    matrix = data[at]
    matrix[np.arange(width)[None, :] >= lengths[:, None]] = 0
    return matrix, lengths


class _VocabularyIndex:
    """Exact string -> embedding row lookups against one vocabulary, built once per model.

    ``pyarrow.compute.index_in`` rebuilds a hash table of the whole value set on every call:
    ~2 ms for a 50k-id vocabulary, most of the scoring time of a 1k-row batch. Here the
    vocabulary is hashed once (64-bit hashes of the zero-padded bytes and the length, sorted),
    a batch is hashed with numpy and binary-searched, and every hit is confirmed by comparing
    the bytes and the length, so a hash collision can never map an id to another id's row.
    Small vocabularies (relative to the batch), long values or colliding hashes use
    ``index_in``: the answers are the same either way.
    """

    def __init__(self, vocabulary: Sequence[str]) -> None:
        self.values = pa.array(vocabulary, pa.string())
        longest = max((len(v.encode()) for v in vocabulary), default=0)
        self.width = max(8, -(-longest // 8) * 8)
        self.indexed = len(vocabulary) > 0 and longest <= _MAX_INDEXED_BYTES
        if not self.indexed:
            return
        matrix, lengths = _padded_bytes(self.values, self.width)
        hashes = self._hash(matrix, lengths)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        if (self.hashes[1:] == self.hashes[:-1]).any():
            self.indexed = False
            return
        self.words = np.ascontiguousarray(matrix[order]).view(np.uint64)
        self.lengths = lengths[order]
        self.rows = order.astype(np.int64) + 1

    @staticmethod
    def _hash(matrix: npt.NDArray[np.uint8], lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        words = matrix.view(np.uint64)
        # The length seeds the state through the mixer (not XORed into the first word, where
        # "a" and "b\0" would cancel out); then one mixing round per 8 bytes.
        h = _mix(lengths.astype(np.uint64) * _M2 + _M1)
        for k in range(words.shape[1]):
            h = _mix(h ^ words[:, k])
        return h

    def lookup(self, column: Column) -> npt.NDArray[np.int64]:
        """Embedding row of every value: ``i + 1`` for ``vocabulary[i]``, 0 for anything else."""
        strings = _as_strings(column)
        chunks = strings.chunks if isinstance(strings, pa.ChunkedArray) else [strings]
        parts = [self._lookup_chunk(c) for c in chunks if len(c)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _lookup_chunk(self, strings: pa.Array) -> npt.NDArray[np.int64]:
        if not self.indexed or len(self.values) < _INDEX_ABOVE_VOCAB_PER_ROW * len(strings):
            found = pc.index_in(strings, value_set=self.values)
            return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64) + 1
        matrix, lengths = _padded_bytes(strings, self.width)
        hashes = self._hash(matrix, lengths)
        at = np.searchsorted(self.hashes, hashes)
        np.minimum(at, len(self.hashes) - 1, out=at)
        hit = (self.hashes[at] == hashes) & (self.lengths[at] == lengths)
        hit &= (self.words[at] == matrix.view(np.uint64)).all(axis=1)
        if strings.null_count:
            hit &= np.asarray(strings.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        return np.where(hit, self.rows[at], UNKNOWN_INDEX)


class CtrEncoder:
    """Turns request batches into model inputs for one spec (lookup arrays built once)."""

    def __init__(self, spec: CtrFeatureSpec) -> None:
        self.spec = spec
        self._vocabularies = [_VocabularyIndex(f.vocabulary) for f in spec.categorical]
        self._lo = np.array([f.accepted_range[0] for f in spec.dense], dtype=np.float64)
        self._hi = np.array([f.accepted_range[1] for f in spec.dense], dtype=np.float64)
        self._mean = np.array([f.mean for f in spec.dense], dtype=np.float64)
        self._std = np.array([f.std for f in spec.dense], dtype=np.float64)
        self._log = np.array([f.transform == "log1p" for f in spec.dense], dtype=bool)

    def categorical(self, table: Table) -> npt.NDArray[np.int64]:
        """``[rows, features]`` embedding rows; anything outside a vocabulary (or null) is 0."""
        out = np.empty((table.num_rows, len(self._vocabularies)), dtype=np.int64)
        for j, (feature, vocabulary) in enumerate(zip(self.spec.categorical, self._vocabularies, strict=True)):
            out[:, j] = vocabulary.lookup(_column(table, feature.name))
        return out

    def dense(self, table: Table) -> tuple[npt.NDArray[np.float32], dict[int, tuple[str, str]]]:
        """Normalised ``[rows, features]`` dense inputs, and the rows outside the accepted ranges."""
        n, d = table.num_rows, len(self.spec.dense)
        raw = np.empty((n, d), dtype=np.float64)
        for j, feature in enumerate(self.spec.dense):
            raw[:, j] = _dense_values(table, feature.name)
        ok = (raw >= self._lo) & (raw <= self._hi)  # NaN compares False: rejected too
        rejected: dict[int, tuple[str, str]] = {}
        bad_rows = np.flatnonzero(~ok.all(axis=1))
        if bad_rows.size:
            first_bad = np.argmin(ok[bad_rows], axis=1)  # the first feature out of range
            values = raw[bad_rows, first_bad]
            for row, j, value in zip(bad_rows.tolist(), first_bad.tolist(), values.tolist(), strict=True):
                rejected[row] = (REJECTED, self._rejection(j, value))
            # Placeholders keep the arithmetic finite; these rows never reach the model.
            raw[bad_rows] = np.where(ok[bad_rows], raw[bad_rows], self._lo)
        x = np.where(self._log, np.log1p(np.where(self._log, raw, 0.0)), raw)
        return ((x - self._mean) / self._std).astype(np.float32), rejected

    def _rejection(self, j: int, value: float) -> str:
        f = self.spec.dense[j]
        lo, hi = f.accepted_range
        shown = "null or NaN" if math.isnan(value) else f"{value:g}"
        return f"{f.name}={shown} is outside the range the model accepts [{lo:g}, {hi:g}]"

    def encode(self, table: Table) -> EncodedBatch:
        dense, rejected = self.dense(table)
        return EncodedBatch(categorical=self.categorical(table), dense=dense, rejected=rejected)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


def _mlp(widths: Sequence[int], *, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CtrModel(nn.Module):
    """DLRM: embeddings + bottom MLP -> pairwise dot interactions -> top MLP -> one logit per row.

    ``forward(categorical [B, F] int64, dense [B, D] float32) -> logits [B]``.
    """

    _pair_rows: torch.Tensor
    _pair_cols: torch.Tensor

    def __init__(self, cardinalities: Sequence[int], n_dense: int, arch: CtrArchitecture | None = None) -> None:
        super().__init__()
        arch = arch or CtrArchitecture()
        dim = arch.embedding_dim
        tables = [nn.Embedding(c, dim) for c in cardinalities]
        for table in tables:
            nn.init.normal_(table.weight, std=0.05)
        self.embeddings = nn.ModuleList(tables)
        self.bottom = _mlp((n_dense, *arch.bottom_mlp, dim), last_activation=True)
        vectors = len(cardinalities) + 1
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        # Derived from the shape, not learned: not saved with the weights.
        self.register_buffer("_pair_rows", rows, persistent=False)
        self.register_buffer("_pair_cols", cols, persistent=False)
        self.top = _mlp((dim + len(rows), *arch.top_mlp, 1), last_activation=False)

    def start_at_rate(self, rate: float) -> None:
        """Set the output bias to ``logit(rate)`` so training starts at the base rate, not at 0.5:
        at a 3% click rate the first hundreds of steps otherwise only learn the intercept."""
        last = self.top[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            last.bias.fill_(math.log(rate / (1.0 - rate)))

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        vectors = torch.stack([x, *(emb(categorical[:, i]) for i, emb in enumerate(self.embeddings))], dim=1)
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        pairs = gram[:, self._pair_rows, self._pair_cols]
        logits: torch.Tensor = self.top(torch.cat([x, pairs], dim=1)).squeeze(1)
        return logits


# --------------------------------------------------------------------------------------------------
# Scoring with row-level failure isolation
# --------------------------------------------------------------------------------------------------


def isolate_failures(
    rows: npt.NDArray[np.intp],
    attempt: Callable[[npt.NDArray[np.intp]], None],
    *,
    first_error: Exception | None = None,
) -> dict[int, Exception]:
    """Run ``attempt`` over ``rows``; where it raises, bisect until the failing rows are alone.

    Returns each failing row with the exception it raised by itself; every other row has been
    run successfully by ``attempt`` (which stores its own results). ``first_error`` is what
    ``rows`` already raised on the fast path, so that identical call is not repeated. Halving
    also makes this the right response to a CUDA out-of-memory error: smaller calls are retried
    until they fit, and only a row that cannot run even alone is reported.
    """
    failed: dict[int, Exception] = {}
    stack: list[tuple[npt.NDArray[np.intp], Exception | None]] = [(rows, first_error)]
    while stack:
        part, exc = stack.pop()
        if exc is None:
            try:
                attempt(part)
                continue
            except Exception as caught:
                exc = caught
        if len(part) == 1:
            failed[int(part[0])] = exc
            continue
        half = len(part) // 2
        stack.append((part[half:], None))
        stack.append((part[:half], None))
    return failed


@dataclass
class ScoreResult:
    """p(click) per row (NaN where rejected) and why rows were rejected (row -> (class, message))."""

    scores: npt.NDArray[np.float32]
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)


class CtrScorer:
    """A loaded CTR model bound to its feature spec: ``score(batch)`` is all a runner calls."""

    #: Rows per forward pass: bounds memory for huge batches, irrelevant for typical ones.
    max_rows_per_call = 65_536

    def __init__(
        self,
        module: nn.Module,
        spec: CtrFeatureSpec,
        *,
        name: str,
        version: str,
        base_rate: float,
        device: torch.device | None = None,
    ) -> None:
        self.module = module
        self.spec = spec
        self.name = name
        self.version = version
        self.base_rate = base_rate
        self.device = device or torch.device("cpu")
        self.encoder = CtrEncoder(spec)

    def encode(self, batch: Table) -> EncodedBatch:
        return self.encoder.encode(batch)

    def predict(self, categorical: npt.NDArray[np.int64], dense: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """p(click) for already-encoded rows; raises whatever the module raises."""
        n = len(categorical)
        out = np.empty(n, dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, self.max_rows_per_call):
                stop = min(n, start + self.max_rows_per_call)
                cat = torch.from_numpy(categorical[start:stop]).to(self.device, non_blocking=True)
                den = torch.from_numpy(dense[start:stop]).to(self.device, non_blocking=True)
                logits = self.module(cat, den)
                if logits.shape != (stop - start,):
                    raise RuntimeError(f"CTR module returned shape {tuple(logits.shape)} for {stop - start} rows")
                out[start:stop] = torch.sigmoid(logits.float()).cpu().numpy()
        return out

    def score(self, batch: Table) -> ScoreResult:
        """Score every row; never raises for a bad row (see :class:`ScoreResult`)."""
        enc = self.encode(batch)
        scores = np.full(batch.num_rows, np.nan, dtype=np.float32)
        rejected = dict(enc.rejected)
        rows = enc.accepted_rows
        if rows.size == 0:
            return ScoreResult(scores=scores, rejected=rejected)
        whole = rows.size == batch.num_rows
        try:
            if whole:
                scores[:] = self.predict(enc.categorical, enc.dense)
            else:
                scores[rows] = self.predict(enc.categorical[rows], enc.dense[rows])
        except Exception as exc:
            # Slow path: user code failed on some rows; find them, keep everyone else's score.
            def attempt(part: npt.NDArray[np.intp]) -> None:
                scores[part] = self.predict(enc.categorical[part], enc.dense[part])

            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for row, err in isolate_failures(rows, attempt, first_error=exc).items():
                msg = " ".join(str(err).split())[:500]
                rejected[row] = (type(err).__name__, f"model raised {type(err).__name__}: {msg}")
                scores[row] = np.nan
        return ScoreResult(scores=scores, rejected=rejected)
