"""Making a transformer encoder survive int8 dynamic quantisation (SmoothQuant-style smoothing).

Plain ``quantize_dynamic`` quantises each Linear layer's input with one scale per batch. BERT-like
encoders have a few hidden channels whose activations are tens of times larger than the rest, so
that one scale crushes every other channel: MiniLM's sentence embeddings fall to a cosine of
~0.95 against fp32. Smoothing moves the outliers into the weights before quantising: for each
Linear, input channel ``j`` is divided by ``s_j`` and weight column ``j`` multiplied by it, with
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` measured on a fixed calibration text. The product
is unchanged in exact arithmetic; after quantisation both factors are well conditioned.

The calibration texts are fixed for a run (a deterministic sample of the job's own source, else
the small corpus below), so every worker smooths identically and rows get the same vectors on
every executor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

#: Mixed lengths and registers: product listings, questions, prose, lists, numbers, a long text.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "Wireless noise-cancelling headphones with 30-hour battery life and fast USB-C charging.",
    "Men's waterproof hiking boots, leather upper, Vibram sole, sizes 7-13, free returns within 30 days.",
    "Is this blender dishwasher safe?",
    "Organic cotton crew-neck t-shirt in navy, relaxed fit. Machine wash cold, tumble dry low.",
    "Stainless steel 12-cup coffee maker with programmable timer, auto shut-off and reusable filter.",
    "Great value! Arrived two days early and works exactly as described. Would buy again.",
    "4K Ultra HD smart TV, 55 inch, HDR10+, Dolby Vision, three HDMI 2.1 ports, voice remote included.",
    "Kids' LEGO-compatible building set, 500 pieces, ages 6 and up.",
    "The city council voted on Tuesday to extend the bike lane network by twelve kilometres.",
    "How do I reset the router to factory settings without losing my saved networks?",
    "Ergonomic office chair: adjustable lumbar support, 4D armrests, breathable mesh back, 150 kg capacity.",
    "Limited offer: 20% off all running shoes this weekend only. Use code RUN20 at checkout.",
    "Vintage-style ceramic vase, hand-glazed, 25 cm tall, each piece unique.",
    "Dimensions: 120 x 60 x 75 cm. Weight: 18.5 kg. Material: solid oak. Assembly required (tools included).",
    "She packed the tent, two sleeping bags and a stove, then drove north until the road ran out.",
    "Replacement HEPA filter for models X200, X300 and X350; replace every 6 months for best results.",
    "Q: Does it come with a charger? A: Yes, a 65 W GaN charger and a braided 2 m cable are in the box.",
    "Gluten-free granola with almonds, honey and dried cranberries, 500 g resealable bag.",
    "ok",
    "Smartphone case",
    (
        "Premium memory-foam mattress topper designed for side and back sleepers. The three-inch "
        "gel-infused layer draws heat away from the body while contouring to shoulders and hips, "
        "relieving pressure points that keep you awake. A removable bamboo-viscose cover zips off "
        "for machine washing, and an elastic skirt holds the topper in place on mattresses up to "
        "sixteen inches deep. Certified free of formaldehyde and heavy metals; ships vacuum-packed "
        "and expands fully within forty-eight hours. Backed by a ten-year limited warranty, with a "
        "one-hundred-night home trial: if it is not right for you, we will collect it for free. "
        "Available in twin, full, queen, king and California king. Customer reviews praise the "
        "cooling effect and the lack of odour on arrival, and several mention better sleep within "
        "the first week. Care: spot clean the foam, air out regularly, avoid direct sunlight."
    ),
)


def calibration_batches(tokenizer: Tokenizer, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``texts`` (or the built-in corpus when empty) as length-sorted batches of 16, so padded
    positions (which have activations of their own) barely count in the measured maxima."""
    encodings = tokenizer.encode_batch(list(texts) or list(CALIBRATION_TEXTS), add_special_tokens=True)
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    batches = []
    for start in range(0, len(order), 16):
        rows = [encodings[i].ids for i in order[start : start + 16]]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        batches.append((ids, mask))
    return batches


class SmoothedLinear(torch.nn.Module):
    """``linear(x / s)`` where ``linear``'s weight columns were multiplied by ``s``."""

    inverse_scale: torch.Tensor

    def __init__(self, inverse_scale: torch.Tensor, linear: torch.nn.Module) -> None:
        super().__init__()
        self.register_buffer("inverse_scale", inverse_scale)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x * self.inverse_scale)
        return out


def smooth_linear_inputs(
    module: torch.nn.Module, tokenizer: Tokenizer, *, texts: Sequence[str] = (), alpha: float = 0.85
) -> torch.nn.Module:
    """Wrap every Linear of ``module`` (in place) with per-input-channel smoothing.

    ``texts`` should come from the data the model will see (the backfill passes a fixed sample of
    its source): measured on 200 in-domain texts MiniLM keeps a mean cosine of 0.996 to fp32, on
    the 21 built-in ones only 0.97. Every worker must get the same texts to embed identically.
    """
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):

            def record(layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _: object, name: str = name) -> None:
                x = inputs[0].detach()
                peak = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
                maxima[name] = torch.maximum(maxima[name], peak) if name in maxima else peak

            hooks.append(layer.register_forward_hook(record))
    try:
        with torch.inference_mode():
            for ids, mask in calibration_batches(tokenizer, texts):
                module(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, torch.nn.Linear) or full not in maxima:
                continue
            x_max = maxima[full].clamp(min=1e-5)
            w_max = child.weight.detach().abs().amax(dim=0).clamp(min=1e-5)
            scale = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
            with torch.no_grad():
                child.weight.mul_(scale)
            setattr(parent, child_name, SmoothedLinear(1.0 / scale, child))
    return module
