"""Tokenising a batch of texts to ids, with a cheaper path for plain ASCII text.

On a GPU box tokenising is the host's largest cost per row, and it decides how busy the GPU can be
kept: on the 16-core H100 box, the packaged MiniLM's tokenizer took ~180 µs of one core per demo
row while the model needed ~7 µs of the GPU. About a third of that tokenizer time is BERT's
normaliser (clean-up, lowercasing and accent stripping through NFD, CJK spacing), which tracks the
alignment of every character it touches.

For a text that is ASCII, holds no control characters and no added token (``[CLS]`` and friends),
that normaliser only lowercases: accents and CJK characters cannot occur, and the clean-up has
nothing to remove. Such texts are lowercased by Arrow and tokenised by a copy of the tokenizer
without a normaliser, which gives the same ids (tested over the demo corpus and the edge cases
above) for ~30% less time. Every other text, and every tokenizer whose normaliser is not BERT's,
takes the tokenizer's own path unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

# What BERT's clean-up removes or rewrites, besides \t \n \r (which it turns into spaces, and which
# the pre-tokenizer splits on either way).
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"


@dataclass(frozen=True)
class _PlainPath:
    tokenizer: Tokenizer
    excluded: str  # regex: a text matching it must take the full path
    lowercase: bool


def _plain_path(tokenizer: Tokenizer) -> _PlainPath | None:
    """The normaliser-free copy of ``tokenizer`` and when it may be used, or None where the
    tokenizer's normaliser is not (exactly) BERT's, whose effect on ASCII text is known."""
    spec = json.loads(tokenizer.to_str())
    normalizer = spec.get("normalizer")
    if not isinstance(normalizer, dict) or normalizer.get("type") != "BertNormalizer":
        return None
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.normalizer = None
    # The clean-up turns \t \n \r into spaces: the same split for BERT's pre-tokenizer, not for others.
    bert_split = (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
    control = _CONTROL if bert_split else r"[\x00-\x1f\x7f]"
    added = [re.escape(token.content) for token in tokenizer.get_added_tokens_decoder().values() if token.content]
    return _PlainPath(
        tokenizer=plain,
        excluded="|".join([control, *added]),
        lowercase=bool(normalizer.get("lowercase", True)),
    )


class BatchTokenizer:
    """``tokenizer``'s ids for many texts at once, special tokens added, as the tokenizer is set
    (truncation included). Built once per loaded encoder."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._plain = _plain_path(tokenizer)

    @property
    def has_plain_path(self) -> bool:
        return self._plain is not None

    def encode(self, texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> list[list[int]]:
        arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(list(texts), pa.string())
        if self._plain is None or len(arr) == 0:
            return _ids(self.tokenizer, arr.to_pylist())
        # Case-insensitive, so an added token is found in any case the lowercasing could map onto it.
        plain = pc.and_(
            pc.string_is_ascii(arr),
            pc.invert(pc.match_substring_regex(arr, self._plain.excluded, ignore_case=True)),
        )
        mask = pc.fill_null(plain, False).to_numpy(zero_copy_only=False)
        plain_texts = arr.filter(pa.array(mask))
        if self._plain.lowercase:
            plain_texts = pc.ascii_lower(plain_texts)
        plain_ids = _ids(self._plain.tokenizer, plain_texts.to_pylist())
        if mask.all():
            return plain_ids
        rest_rows = np.flatnonzero(~mask)
        rest_ids = _ids(self.tokenizer, arr.take(pa.array(rest_rows, pa.int64())).to_pylist())
        ids: list[list[int]] = [[] for _ in range(len(arr))]
        for row, seq in zip(np.flatnonzero(mask).tolist(), plain_ids, strict=True):
            ids[row] = seq
        for row, seq in zip(rest_rows.tolist(), rest_ids, strict=True):
            ids[row] = seq
        return ids


def _ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    # The _fast variant skips character offsets, which nothing here reads; the ids are the same.
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=True)]
