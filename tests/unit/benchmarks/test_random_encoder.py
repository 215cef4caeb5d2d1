"""The random encoder the GPU utilisation runs use must load like any HF encoder directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.random_encoder import main, write_random_encoder
from transforms.batching import BatchLimits
from transforms.inference import encode_texts
from transforms.models.spec import ModelConfig, load_encoder


def test_writes_an_encoder_sluice_loads_with_the_requested_shape(tmp_path: Path) -> None:
    params = write_random_encoder(tmp_path / "enc", layers=1, hidden=64)
    assert params > 0
    encoder = load_encoder(ModelConfig(source=str(tmp_path / "enc"), device="cpu"))
    assert encoder.dim == 64
    result = encode_texts(encoder, ["red running shoes", "a kettle"], limits=BatchLimits())
    assert result.embeddings.shape == (2, 64) and not result.failed
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)


def test_the_same_seed_writes_the_same_weights(tmp_path: Path) -> None:
    write_random_encoder(tmp_path / "a", layers=1, hidden=64)
    write_random_encoder(tmp_path / "b", layers=1, hidden=64)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_rejects_a_width_attention_heads_cannot_split(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--hidden", "100"])
