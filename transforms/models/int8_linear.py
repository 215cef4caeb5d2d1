"""An int8 Linear whose activations are quantised with one scale per token, on torch's CPU kernels.

torch's dynamic int8 Linear (fbgemm/oneDNN) quantises its whole input with a single scale per call.
After a GELU, a handful of tokens ([CLS], [SEP], punctuation) carry activations tens of times
larger than the rest, so that one scale leaves ordinary tokens with a few usable levels: in
all-MiniLM-L6-v2 the FFN output projection is where most of int8's error comes from (min cosine to
fp32 0.991 with it quantised that way, 0.996 with it kept in fp32).

Per-token scaling fixes that without a new kernel: divide each row by its own absolute maximum (now
every row spans [-1, 1], so the per-call scale suits all of them), run the stock int8 GEMM, and
multiply each output row back by the same factor before adding the bias. It costs one reduction
and one division over the input and one fused multiply-add over the output, a fraction of the
GEMM, and on MiniLM lifts the worst sentence cosine to fp32 from 0.991 to 0.995.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenScaledInt8Linear(nn.Module):
    """``x W^T + b`` with int8 weights (per output channel) and per-token int8 activations."""

    bias: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        self.in_features = linear.in_features
        self.out_features = linear.out_features
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias", bias)
        weight_only = nn.Linear(linear.in_features, linear.out_features, bias=False)
        with torch.no_grad():
            weight_only.weight.copy_(linear.weight)
        # quantize_dynamic swaps the child of a container, so wrap the bias-free Linear in one.
        self.gemm = quantize_dynamic(
            nn.Sequential(weight_only), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        # amax of |x| and a multiply by the reciprocal: on CPU, vector_norm(ord=inf) and a division
        # took ~6 and ~3 ms per [8k, 1536] call, a quarter of MiniLM's int8 forward.
        peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
        out = torch.addcmul(self.bias, self.gemm(rows * peak.reciprocal()), peak)
        return out.view(*shape[:-1], self.out_features)
