"""Loading a text encoder into a process: the torch module, its tokenizer, and how to pool.

Three artifact kinds end up as the same :class:`TextEncoder`: a Hugging Face encoder directory
(the packaged all-MiniLM-L6-v2 is one), a TorchScript file, or safetensors weights plus a model
class. None of them unpickles code: weights come from safetensors, TorchScript archives are
loaded by torch's restricted loader, and pickled ``.bin`` weights are refused outright.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer

from transforms.errors import ConfigError, ModelLoadError
from transforms.models import bert
from transforms.models.artifact import ModelArtifact
from transforms.models.device import Precision, cpu_flags, int8_engine, resolve_precision
from transforms.tokenizing import BatchTokenizer

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "none"]


class _HFTokenEmbeddings(torch.nn.Module):
    """Adapts a transformers model to the (input_ids, attention_mask) -> [B, T, H] contract."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden: torch.Tensor = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden


@dataclass
class TextEncoder:
    """A loaded encoder, ready for :func:`transforms.inference.encode_texts`.

    ``module`` maps ``(input_ids, attention_mask)`` (int64, ``[B, T]``) to token embeddings
    ``[B, T, H]`` (then ``pooling`` applies) or to sentence embeddings ``[B, H]`` (``pooling="none"``).
    """

    artifact: ModelArtifact
    module: torch.nn.Module
    tokenizer: Tokenizer
    dim: int
    max_seq_length: int
    pad_id: int
    pooling: Pooling
    normalize: bool
    device: torch.device
    precision: Precision
    # True when the weights themselves are bf16/fp16 (sluice's own BERT on a GPU): no autocast then.
    half_weights: bool = False

    @functools.cached_property
    def batch_tokenizer(self) -> BatchTokenizer:
        """``tokenizer`` for whole batches, with the plain-ASCII fast path where it applies."""
        return BatchTokenizer(self.tokenizer)

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return self.artifact.version

    def forward_context(self) -> contextlib.ExitStack:
        """What a forward pass runs under: autocast for bf16/fp16 (unless the weights are already
        half), and on CUDA attention kernels that need no per-shape set-up.

        PyTorch prefers cuDNN's attention on Hopper, and cuDNN builds an execution plan for every
        new (batch, length) shape: 50-80 ms each on an H100, and length-bucketed batches are nearly
        all new shapes, so MiniLM ran 2k rows/s where flash / memory-efficient attention ran 16k.
        """
        stack = contextlib.ExitStack()
        if self.precision in ("bf16", "fp16") and not self.half_weights:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=dtype))
        if self.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(
                sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
            )
        return stack


def _load_tokenizer(path: Path, max_seq_length: int) -> tuple[Tokenizer, int]:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"tokenizer {path} cannot be read: {exc}") from exc
    # Padding is ours (per length bucket); truncation matches the model's training length.
    tok.no_padding()
    tok.enable_truncation(max_length=max_seq_length)
    pad_id = 0
    for candidate in ("[PAD]", "<pad>"):
        tid = tok.token_to_id(candidate)
        if tid is not None:
            pad_id = tid
            break
    return tok, pad_id


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _hf_directory(
    artifact: ModelArtifact, max_seq_length: int | None
) -> tuple[torch.nn.Module, int, int, Pooling, bool]:
    root = artifact.path
    config = _read_json(root / "config.json")
    unsupported = bert.supports(config)
    if unsupported is None and (root / "model.safetensors").is_file():
        # BERT-family (the packaged MiniLM is one): sluice's own encoder, no transformers import.
        model: torch.nn.Module = bert.load_bert(root, config)
    else:
        log.info("loading %s through transformers (%s)", root, unsupported or "no model.safetensors")
        model = _HFTokenEmbeddings(_transformers_model(root))
    pooling: Pooling = "mean"
    pooling_cfg = root / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        pc = _read_json(pooling_cfg)
        if pc.get("pooling_mode_cls_token"):
            pooling = "cls"
    normalize = True
    modules = root / "modules.json"
    if modules.is_file():
        types = [m.get("type", "") for m in json.loads(modules.read_text())]
        normalize = any(t.endswith("Normalize") for t in types)
    seq = max_seq_length
    if seq is None:
        st_cfg = root / "sentence_bert_config.json"
        seq = int(_read_json(st_cfg).get("max_seq_length", 0)) if st_cfg.is_file() else 0
        seq = seq or min(int(config.get("max_position_embeddings", 512)), 512)
    dim = int(config.get("hidden_size", 0))
    return model, dim, seq, pooling, normalize


def _transformers_model(root: Path) -> torch.nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model: torch.nn.Module = AutoModel.from_pretrained(str(root), local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise ModelLoadError(f"model directory {root} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    return model


def _torchscript(artifact: ModelArtifact) -> torch.nn.Module:
    try:
        module: torch.nn.Module = torch.jit.load(str(artifact.path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"TorchScript file {artifact.path} cannot be loaded (corrupt or not TorchScript): {exc}"
        ) from exc
    return module


def _safetensors_with_class(
    artifact: ModelArtifact, model_class: str | None, model_kwargs: dict[str, Any]
) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not model_class or ":" not in model_class:
        raise ConfigError("model.model_class must be 'package.module:ClassName' for a .safetensors artifact")
    mod_name, _, cls_name = model_class.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.model_class {model_class} cannot be imported: {exc}") from exc
    try:
        state = load_file(str(artifact.path))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"safetensors file {artifact.path} is corrupt or truncated: {exc}") from exc
    try:
        module: torch.nn.Module = cls(**model_kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.model_kwargs do not fit {model_class}: {exc}") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {artifact.path} do not fit {model_class}: {exc}") from exc
    return module


def _probe_output(module: torch.nn.Module, device: torch.device) -> tuple[int, Pooling]:
    """Run a two-token input once to learn the output rank and width."""
    ids = torch.ones((1, 2), dtype=torch.long, device=device)
    with torch.inference_mode():
        out = module(ids, torch.ones_like(ids))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if out.dim() == 3:
        return int(out.shape[-1]), "mean"
    if out.dim() == 2:
        return int(out.shape[-1]), "none"
    raise ModelLoadError(f"model output has shape {tuple(out.shape)}: expected [B, T, H] or [B, H]")


def load_text_encoder(
    artifact: ModelArtifact,
    *,
    tokenizer: str | None = None,
    model_class: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    max_seq_length: int | None = None,
    precision: str = "auto",
    device: str | torch.device = "cpu",
    compile_model: bool = False,
    calibration_texts: Sequence[str] = (),
) -> TextEncoder:
    """Load ``artifact`` onto ``device`` at ``precision``. Errors are one-line :class:`ModelLoadError`s."""
    dev = torch.device(device)
    prec = resolve_precision(precision, dev)
    pooling: Pooling
    if artifact.kind == "hf_directory":
        module, dim, seq, pooling, normalize = _hf_directory(artifact, max_seq_length)
        tok_path = Path(tokenizer) if tokenizer else artifact.path / "tokenizer.json"
    else:
        module = (
            _torchscript(artifact)
            if artifact.kind == "torchscript"
            else _safetensors_with_class(artifact, model_class, model_kwargs or {})
        )
        seq = max_seq_length or 256
        normalize = True
        tok_path = Path(tokenizer or "")
        if tok_path.is_dir():
            tok_path = tok_path / "tokenizer.json"
        dim, pooling = 0, "mean"
    tok, pad_id = _load_tokenizer(tok_path, seq)

    module.eval()
    if prec == "int8" and isinstance(module, torch.jit.ScriptModule):
        raise ConfigError(
            f"model.precision int8 cannot quantise the TorchScript file {artifact.path}: "
            "export it already quantised, or use fp32"
        )
    if prec == "int8":
        # Dynamic quantisation: int8 weights for Linear layers, activations quantised per batch,
        # after smoothing the activation outliers into the weights (see transforms.models.smoothing)
        # and with per-channel weight scales: without either, MiniLM loses ~0.05 of cosine to fp32.
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        from transforms.models.smoothing import calibration_batches, smooth_linear_inputs

        # Process-wide, and before quantising: the weights are packed for the engine in force.
        qe = torch.backends.quantized
        qe.engine = int8_engine(cpu_flags(), qe.supported_engines, qe.engine)

        if isinstance(module, bert.BertEncoder):
            module = bert.quantize_int8(module, calibration_batches(tok, calibration_texts))
        else:
            module = smooth_linear_inputs(module, tok, texts=calibration_texts)
            module = quantize_dynamic(module, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    module.to(dev)
    # sluice's BERT on a GPU runs with bf16/fp16 weights rather than under autocast: no weight casts
    # per call (H100, MiniLM: 107k rows/s vs 85k; cosine to autocast >= 0.9999). Its attention
    # softmax and pooling stay in fp32. Other modules keep autocast, which knows their fp32-only ops.
    half_weights = dev.type == "cuda" and prec in ("bf16", "fp16") and isinstance(module, bert.BertEncoder)
    if half_weights:
        module.to(torch.bfloat16 if prec == "bf16" else torch.float16)
    if artifact.kind != "hf_directory":
        dim, pooling = _probe_output(module, dev)
    if compile_model and dev.type == "cuda":
        module = torch.compile(module, dynamic=True)  # type: ignore[assignment]
    if dim <= 0:
        raise ModelLoadError(f"cannot tell the embedding width of {artifact.spec}")
    log.info(
        "model loaded",
        extra={
            "model": artifact.name,
            "model_version": artifact.version,
            "device": str(dev),
            "precision": prec,
            **({"int8_engine": torch.backends.quantized.engine} if prec == "int8" else {}),
        },
    )
    return TextEncoder(
        artifact=artifact,
        module=module,
        tokenizer=tok,
        dim=dim,
        max_seq_length=seq,
        pad_id=pad_id,
        pooling=pooling,
        normalize=normalize,
        device=dev,
        precision=prec,
        half_weights=half_weights,
    )
