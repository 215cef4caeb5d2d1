"""The plain-ASCII path must give exactly the ids the tokenizer itself gives, for every text."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from tokenizers import Tokenizer

from pipelines.demo_data import generate_items
from transforms.models.spec import ModelConfig, load_encoder
from transforms.tokenizing import BatchTokenizer

EDGE_CASES = [
    "Red Running Shoes, size 42",
    "HELLO World   with  extra   spaces ",
    "tabs\tand\nnewlines\r\nand carriage returns",
    "nul\x00 bell\x07 vertical\x0btab form\x0cfeed escape\x1b delete\x7f",
    "literal [CLS] and [SEP] and [MASK] in the text",
    "lower [cls] [sep] [mask] [pad] [unk]",
    "[UNK]",
    "bracketed [notatoken] words",
    "Café crème brûlée",
    "東京 Tokyo 東京タワー",
    "emoji 🙂 and ™ ® © symbols",
    "ﬁ ligature and ẞ sharp s",
    "",
    " ",
    "punctuation!!! ...?? ---///\\\\ 'quotes' \"double\" (parens) {braces} <angle>",
    "numbers 1,234.56 and 3x4 and 1e-9 and 0xFF",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["word"] * 400),  # past the 256-token truncation
    "UPPER lower MiXeD",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_encoder(ModelConfig()).tokenizer


def reference(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=True)]


def variant(tokenizer: Tokenizer, **changes: object) -> Tokenizer:
    spec = json.loads(tokenizer.to_str())
    spec.update(changes)
    return Tokenizer.from_str(json.dumps(spec))


def test_the_packaged_tokenizer_has_the_plain_path(tokenizer: Tokenizer) -> None:
    assert BatchTokenizer(tokenizer).has_plain_path


def test_same_ids_as_the_tokenizer_on_edge_cases(tokenizer: Tokenizer) -> None:
    got = BatchTokenizer(tokenizer).encode(EDGE_CASES)
    want = reference(tokenizer, EDGE_CASES)
    for text, g, w in zip(EDGE_CASES, got, want, strict=True):
        assert g == w, text
    assert len(want[EDGE_CASES.index(" ".join(["word"] * 400))]) == 256


def test_same_ids_as_the_tokenizer_on_the_demo_corpus(tokenizer: Tokenizer) -> None:
    texts = [t for t in generate_items(3000, seed=11).column("text").to_pylist() if t is not None]
    assert any(t.isascii() for t in texts) and not all(t.isascii() for t in texts)  # both paths run
    assert BatchTokenizer(tokenizer).encode(pa.array(texts)) == reference(tokenizer, texts)


def test_takes_lists_arrays_and_chunked_arrays(tokenizer: Tokenizer) -> None:
    bt = BatchTokenizer(tokenizer)
    want = reference(tokenizer, EDGE_CASES)
    assert bt.encode(pa.array(EDGE_CASES)) == want
    assert bt.encode(pa.chunked_array([EDGE_CASES[:5], EDGE_CASES[5:]])) == want
    assert bt.encode(tuple(EDGE_CASES)) == want
    assert bt.encode([]) == []
    only_plain = [t for t in EDGE_CASES if t.isascii() and "[" not in t and "\x00" not in t]
    assert bt.encode(only_plain) == reference(tokenizer, only_plain)


def test_a_cased_bert_normaliser_keeps_case(tokenizer: Tokenizer) -> None:
    spec = json.loads(tokenizer.to_str())
    cased = variant(tokenizer, normalizer={**spec["normalizer"], "lowercase": False})
    bt = BatchTokenizer(cased)
    assert bt.has_plain_path
    assert bt.encode(EDGE_CASES) == reference(cased, EDGE_CASES)


@pytest.mark.parametrize(
    "normalizer",
    [None, {"type": "Lowercase"}, {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}],
    ids=["none", "lowercase", "sequence"],
)
def test_other_normalisers_take_the_tokenizers_own_path(tokenizer: Tokenizer, normalizer: object) -> None:
    other = variant(tokenizer, normalizer=normalizer)
    bt = BatchTokenizer(other)
    assert not bt.has_plain_path
    assert bt.encode(EDGE_CASES) == reference(other, EDGE_CASES)


def test_another_pre_tokenizer_keeps_newlines_on_the_full_path(tokenizer: Tokenizer) -> None:
    # WhitespaceSplit splits on \n as on " ", but a pre-tokenizer that does not (Metaspace) would
    # see the clean-up's spaces where the plain path saw newlines: such texts take the full path.
    spaced = variant(tokenizer, pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"})
    bt = BatchTokenizer(spaced)
    texts = ["one\ntwo", "one two", "tab\there", "plain text"]
    assert bt.encode(texts) == reference(spaced, texts)


def test_an_added_token_of_any_content_keeps_its_text_on_the_full_path(tokenizer: Tokenizer) -> None:
    custom = Tokenizer.from_str(tokenizer.to_str())
    custom.add_tokens(["<Brand Name>", "sku-42"])
    texts = ["buy <brand name> now", "buy <Brand Name> now", "SKU-42 in stock", "plain text", "Café"]
    assert BatchTokenizer(custom).encode(texts) == reference(custom, texts)
