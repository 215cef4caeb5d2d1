"""Smoothing must not change the fp32 function, and must make int8 keep its cosine to fp32."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from pipelines.demo_data import generate_items
from transforms.batching import BatchLimits
from transforms.inference import encode_texts
from transforms.models.smoothing import SmoothedLinear, smooth_linear_inputs
from transforms.models.spec import ModelConfig, load_encoder


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [t for t in generate_items(300, seed=5).column("text").to_pylist() if t and t.strip()]


def test_smoothing_alone_keeps_the_fp32_outputs(texts: list[str]) -> None:
    enc = load_encoder(ModelConfig())
    smoothed = smooth_linear_inputs(copy.deepcopy(enc.module), enc.tokenizer, texts=texts[:64])
    assert any(isinstance(m, SmoothedLinear) for m in smoothed.modules())
    ref = encode_texts(enc, texts[:80], limits=BatchLimits()).embeddings
    got = encode_texts(dataclasses.replace(enc, module=smoothed), texts[:80], limits=BatchLimits()).embeddings
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_int8_with_in_domain_calibration_stays_close_to_fp32(texts: list[str]) -> None:
    enc = load_encoder(ModelConfig())
    # 256 calibration texts, as the backfill samples; evaluated on other texts of the same domain.
    calibration = tuple(t for t in generate_items(260, seed=11).column("text").to_pylist() if t and t.strip())
    enc8 = load_encoder(ModelConfig(precision="int8", calibration_texts=calibration))
    assert enc8.precision == "int8"
    held_out = texts
    ref = encode_texts(enc, held_out, limits=BatchLimits()).embeddings
    got = encode_texts(enc8, held_out, limits=BatchLimits()).embeddings
    cosine = (ref * got).sum(axis=1)
    assert cosine.mean() >= 0.99, cosine.mean()
    assert cosine.min() >= 0.985, cosine.min()
