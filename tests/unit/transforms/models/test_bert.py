"""sluice's own BERT must compute what transformers' BertModel computes, and load what it loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transforms.errors import ModelLoadError
from transforms.models import bert
from transforms.models.artifact import resolve_artifact
from transforms.models.int8_linear import TokenScaledInt8Linear

REPO = Path(__file__).resolve().parents[4]
MINILM = resolve_artifact("builtin:all-MiniLM-L6-v2").path


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), vocab, (4, 23), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((23, 17, 5, 1)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    return ids, mask


def _assert_same_hidden(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> None:
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=2e-4, rtol=1e-4)


def test_minilm_matches_transformers_bertmodel_on_real_positions() -> None:
    from transformers import AutoModel

    config = json.loads((MINILM / "config.json").read_text())
    assert bert.supports(config) is None
    ours = bert.load_bert(MINILM, config)
    theirs = AutoModel.from_pretrained(str(MINILM), local_files_only=True).eval()
    ids, mask = _batch(int(config["vocab_size"]))
    with torch.inference_mode():
        _assert_same_hidden(ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        full = torch.ones_like(mask)  # the unpadded fast path (no mask passed to attention)
        _assert_same_hidden(ours(ids, full), theirs(input_ids=ids, attention_mask=full).last_hidden_state, full)


@pytest.mark.parametrize(
    ("head", "act"), [("BertModel", "gelu"), ("BertForMaskedLM", "gelu_new"), ("BertModel", "relu")]
)
def test_random_bert_checkpoints_load_with_or_without_the_bert_prefix(tmp_path: Path, head: str, act: str) -> None:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=500,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        hidden_act=act,
    )
    torch.manual_seed(3)
    model = getattr(transformers, head)(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    ours = bert.load_bert(tmp_path, config)
    base = model if head == "BertModel" else model.bert
    ids, mask = _batch(500, seed=1)
    with torch.inference_mode():
        _assert_same_hidden(ours(ids, mask), base(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model_type": "roberta"}, "is not bert"),
        ({"position_embedding_type": "relative_key"}, "relative_key"),
        ({"is_decoder": True}, "decoder"),
        ({"hidden_act": "swish"}, "swish"),
        ({"num_attention_heads": 5}, "multiple"),
    ],
)
def test_unsupported_configs_say_why(change: dict[str, object], reason: str) -> None:
    config = {**json.loads((MINILM / "config.json").read_text()), **change}
    why = bert.supports(config)
    assert why is not None and reason in why


def test_a_checkpoint_missing_a_tensor_is_a_clear_model_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(MINILM / "model.safetensors"))
    state.pop(next(k for k in state if k.endswith("attention.self.key.weight")))
    save_file(state, str(tmp_path / "model.safetensors"))
    config = json.loads((MINILM / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"not a BERT checkpoint: tensor .*key\.weight.* is missing"):
        bert.load_bert(tmp_path, config)


def test_smoothing_alone_keeps_the_fp32_function() -> None:
    from transforms.models.smoothing import CALIBRATION_TEXTS, calibration_batches
    from transforms.models.text_encoder import _load_tokenizer

    config = json.loads((MINILM / "config.json").read_text())
    plain, smoothed = bert.load_bert(MINILM, config), bert.load_bert(MINILM, config)
    tok, _ = _load_tokenizer(MINILM / "tokenizer.json", 256)
    bert.smooth(smoothed, calibration_batches(tok, CALIBRATION_TEXTS), alpha=bert.INT8_ALPHA, ffn_out=True)
    layer = smoothed.layers[0]
    assert layer.qkv_in is not None and layer.ffn_in_in is not None and layer.ffn_out_in is not None
    ids, mask = _batch(int(config["vocab_size"]))
    with torch.inference_mode():
        _assert_same_hidden(smoothed(ids, mask), plain(ids, mask), mask)


def test_token_scaled_int8_linear_tracks_fp32_where_one_scale_per_call_does_not() -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64)
    x = torch.randn(200, 256) * 0.1
    x[::50] *= 400  # a few outlier tokens, as GELU outputs have at [CLS]/[SEP]
    with torch.inference_mode():
        exact = linear(x)
        per_token = TokenScaledInt8Linear(linear)(x)
        per_call = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig})(x)
    normal = torch.ones(200, dtype=torch.bool)
    normal[::50] = False

    def err(y: torch.Tensor) -> float:
        return float(((y - exact)[normal].norm() / exact[normal].norm()).item())

    assert err(per_token) < 0.02
    assert err(per_token) * 5 < err(per_call)
    assert per_token.shape == exact.shape


def test_loading_the_packaged_encoder_does_not_import_transformers() -> None:
    code = (
        "import sys; from transforms.models.spec import ModelConfig, load_encoder; "
        "enc = load_encoder(ModelConfig()); "
        "assert type(enc.module).__name__ == 'BertEncoder', type(enc.module); "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
