"""A compact BERT encoder for inference, loaded straight from a Hugging Face directory's safetensors.

Why sluice carries its own instead of ``transformers.AutoModel`` for BERT-family encoders (the
packaged all-MiniLM-L6-v2 is one):

* **Import cost.** ``transformers`` takes ~3 s to import; every Spark/Beam Python worker pays it
  once, and on a 2-core executor that is seconds of model time lost per worker. This module needs
  only torch and safetensors.
* **Fewer passes over activations.** Q, K and V are one Linear (one GEMM over a 3x wider weight,
  and under int8 one activation quantisation instead of three), attention runs through
  ``scaled_dot_product_attention`` on views of that output (no transpose copies), and the masks
  are built once per batch rather than per layer.
* **Room for int8.** With the projections fused, SmoothQuant's per-channel input scaling costs one
  elementwise pass per fused projection instead of one per Linear, and the attention-out scale
  folds into V's weights for free (see :func:`smooth`).

Only what BERT inference needs is here: absolute position embeddings, post-LayerNorm blocks, GELU
(exact or tanh) or ReLU feed-forward, no cross-attention, no cache. :func:`supports` says whether a
checkpoint fits; anything else loads through ``transformers`` as before. Outputs match
``BertModel``'s ``last_hidden_state`` on non-padded positions to float rounding (unit-tested
against it, and against sentence-transformers' ``encode`` end to end).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transforms.errors import ModelLoadError

_ACTIVATIONS = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "relu": "relu"}


@dataclass(frozen=True)
class BertShape:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    type_vocab_size: int
    activation: str  # erf | tanh | relu
    eps: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BertShape:
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            intermediate=int(config["intermediate_size"]),
            max_positions=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            activation=_ACTIVATIONS[str(config.get("hidden_act", "gelu"))],
            eps=float(config.get("layer_norm_eps", 1e-12)),
        )


def supports(config: Mapping[str, Any]) -> str | None:
    """``None`` when this module can run the checkpoint described by ``config``, else why not."""
    if config.get("model_type") != "bert":
        return f"model_type {config.get('model_type')!r} is not bert"
    if config.get("position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.get('position_embedding_type')!r}"
    if config.get("is_decoder") or config.get("add_cross_attention"):
        return "decoder / cross-attention checkpoints"
    if str(config.get("hidden_act", "gelu")) not in _ACTIVATIONS:
        return f"hidden_act {config.get('hidden_act')!r}"
    try:
        BertShape.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        return f"incomplete config ({exc})"
    if int(config["hidden_size"]) % int(config["num_attention_heads"]):
        return "hidden_size is not a multiple of num_attention_heads"
    return None


class _Layer(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        h = shape.hidden
        self.heads = shape.heads
        self.head_dim = h // shape.heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=shape.eps)
        self.ffn_in = nn.Linear(h, shape.intermediate)
        self.ffn_out = nn.Linear(shape.intermediate, h)
        self.ffn_norm = nn.LayerNorm(h, eps=shape.eps)
        self.activation = shape.activation
        # Per-input-channel divisors set by :func:`smooth` (int8 only); None costs nothing.
        self.qkv_in: torch.Tensor | None = None
        self.ffn_in_in: torch.Tensor | None = None
        self.ffn_out_in: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, h = x.shape
        # [B, T, 3, heads, d] -> three [B, heads, T, d] views of the one GEMM output.
        qkv = self.qkv(x if self.qkv_in is None else x * self.qkv_in)
        q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        ctx = ctx.transpose(1, 2).reshape(b, t, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        inner = self.ffn_in(x if self.ffn_in_in is None else x * self.ffn_in_in)
        if self.activation == "relu":
            inner = F.relu(inner)
        else:
            inner = F.gelu(inner, approximate="tanh" if self.activation == "tanh" else "none")
        if self.ffn_out_in is not None:
            inner = inner * self.ffn_out_in
        out: torch.Tensor = self.ffn_norm(x + self.ffn_out(inner))
        return out


class BertEncoder(nn.Module):
    """``(input_ids, attention_mask) -> last hidden state [B, T, H]``, like ``BertModel``."""

    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.shape = shape
        self.word = nn.Embedding(shape.vocab_size, shape.hidden)
        self.position = nn.Embedding(shape.max_positions, shape.hidden)
        self.token_type = nn.Embedding(shape.type_vocab_size, shape.hidden)
        self.embed_norm = nn.LayerNorm(shape.hidden, eps=shape.eps)
        self.layers = nn.ModuleList(_Layer(shape) for _ in range(shape.layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[:t] + self.token_type.weight[0]
        x = self.embed_norm(x)
        # Boolean key mask [B, 1, 1, T]; None when nothing is padded (the kernel's fastest case). The
        # check reads the mask on the host, so on CUDA the mask is always passed (no sync per batch).
        unpadded = attention_mask.device.type == "cpu" and bool(attention_mask.all())
        mask = None if unpadded else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


def _hf_state(state: Mapping[str, torch.Tensor], shape: BertShape) -> dict[str, torch.Tensor]:
    """Our parameter names from a ``BertModel`` / ``BertForX`` state dict (``bert.`` prefix or none)."""
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in state:
            raise KeyError(key)
        return state[key]

    out = {
        "word.weight": get("embeddings.word_embeddings.weight"),
        "position.weight": get("embeddings.position_embeddings.weight"),
        "token_type.weight": get("embeddings.token_type_embeddings.weight"),
        "embed_norm.weight": get("embeddings.LayerNorm.weight"),
        "embed_norm.bias": get("embeddings.LayerNorm.bias"),
    }
    for i in range(shape.layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        att = src + "attention."
        for kind in ("weight", "bias"):
            out[dst + f"qkv.{kind}"] = torch.cat(
                [get(att + f"self.{p}.{kind}") for p in ("query", "key", "value")], dim=0
            )
            out[dst + f"attn_out.{kind}"] = get(att + f"output.dense.{kind}")
            out[dst + f"attn_norm.{kind}"] = get(att + f"output.LayerNorm.{kind}")
            out[dst + f"ffn_in.{kind}"] = get(src + f"intermediate.dense.{kind}")
            out[dst + f"ffn_out.{kind}"] = get(src + f"output.dense.{kind}")
            out[dst + f"ffn_norm.{kind}"] = get(src + f"output.LayerNorm.{kind}")
    return out


def load_bert(directory: Path, config: Mapping[str, Any]) -> BertEncoder:
    """Build the encoder from ``config.json``'s contents and the directory's ``model.safetensors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    shape = BertShape.from_config(config)
    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"safetensors file {weights} is corrupt or unreadable: {exc}") from exc
    try:
        mapped = _hf_state(state, shape)
    except KeyError as exc:
        raise ModelLoadError(f"{weights} is not a BERT checkpoint: tensor {exc} is missing") from exc
    module = BertEncoder(shape)
    try:
        module.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {weights} do not fit the BERT shape in config.json: {exc}") from exc
    return module.eval()


def smooth(
    module: BertEncoder,
    calibration: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float,
    ffn_out: bool = True,
) -> None:
    """SmoothQuant's migration of activation outliers into weights, before int8 quantisation.

    For a Linear ``y = x W^T`` whose input channel ``j`` peaks at ``max|x_j|``, dividing ``x_j`` by
    ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)`` and multiplying ``W_:,j`` by ``s_j`` leaves ``y``
    unchanged in exact arithmetic but makes both factors easy to quantise. Where the division goes:

    * ``attn_out`` reads the attention context, a convex mix of V's rows per head, and nothing else
      reads it: V's output rows (weight and bias) are divided by ``s``, so it costs nothing.
    * ``qkv`` and ``ffn_in`` read a LayerNorm output that is *also* the residual stream (BERT is
      post-LN), so the division cannot be folded into the LayerNorm as in pre-LN models: it is one
      multiply by ``1/s`` on the way in, one per fused projection.
    * ``ffn_out`` reads GELU output (no linear map precedes it): a multiply as well, unless
      ``ffn_out=False``.
    """
    peaks: dict[str, torch.Tensor] = {}
    hooks = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):

            def record(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: object, name: str = name) -> None:
                x = inputs[0].detach()
                peak = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
                peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak

            hooks.append(sub.register_forward_hook(record))
    try:
        with torch.inference_mode():
            for ids, mask in calibration:
                module(ids, mask)
    finally:
        for hook in hooks:
            hook.remove()

    def scale_for(name: str, linear: nn.Linear) -> torch.Tensor:
        x_max = peaks[name].clamp(min=1e-5)
        w_max = linear.weight.detach().abs().amax(dim=0).clamp(min=1e-5)
        return x_max.pow(alpha) / w_max.pow(1.0 - alpha)

    h = module.shape.hidden
    with torch.no_grad():
        for i, layer in enumerate(module.layers):
            assert isinstance(layer, _Layer)
            s = scale_for(f"layers.{i}.qkv", layer.qkv)
            layer.qkv.weight.mul_(s)
            layer.qkv_in = (1.0 / s).contiguous()
            s = scale_for(f"layers.{i}.attn_out", layer.attn_out)
            layer.attn_out.weight.mul_(s)
            layer.qkv.weight[2 * h :].div_(s[:, None])
            layer.qkv.bias[2 * h :].div_(s)
            s = scale_for(f"layers.{i}.ffn_in", layer.ffn_in)
            layer.ffn_in.weight.mul_(s)
            layer.ffn_in_in = (1.0 / s).contiguous()
            if ffn_out:
                s = scale_for(f"layers.{i}.ffn_out", layer.ffn_out)
                layer.ffn_out.weight.mul_(s)
                layer.ffn_out_in = (1.0 / s).contiguous()


#: SmoothQuant migration strength for QKV, attention-out and FFN-in (0.5-0.9 tried on the demo
#: table's texts: 0.85 keeps the best worst-case cosine to fp32).
INT8_ALPHA = 0.85


def quantize_int8(module: BertEncoder, calibration: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """The CPU int8 recipe for this encoder: smoothing, then int8 weights and activations.

    QKV, attention-out and FFN-in are smoothed (:func:`smooth`) and become torch's dynamic int8
    Linear (per-channel weights, one activation scale per call). FFN-out is not smoothed but gets a
    :class:`~transforms.models.int8_linear.TokenScaledInt8Linear`: its GELU input has outlier
    *tokens*, which per-channel smoothing cannot fix and per-token scales do. Measured on 1,500 demo
    texts against fp32: cosine min 0.9950, p1 0.9964, mean 0.9978 (0.9906 / 0.9920 / 0.9956 with
    every Linear smoothed and per-call scaled).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from transforms.models.int8_linear import TokenScaledInt8Linear

    smooth(module, calibration, alpha=INT8_ALPHA, ffn_out=False)
    for layer in module.layers:
        assert isinstance(layer, _Layer)
        layer.ffn_out = TokenScaledInt8Linear(layer.ffn_out)  # type: ignore[assignment]
    quantized: nn.Module = quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    return quantized
