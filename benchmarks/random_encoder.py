"""Write an encoder of BERT-base's shape with random weights, in the packaged MiniLM's layout.

Why: MiniLM-L6 needs ~7 µs of an H100 per demo row, less than the host spends tokenising it, so
it cannot show whether the pipeline keeps a GPU busy once the model is not the cheapest part of a
row. BERT-base's shape (12 layers x 768, ~8x MiniLM's work per token) can, and no model hub is
reachable, so its weights are drawn at random (seed 0). Its vectors mean nothing: use it to
measure speed and GPU utilisation only, e.g.

    python benchmarks/random_encoder.py /tmp/random-bert-base
    python benchmarks/backfill_bench.py --model-source /tmp/random-bert-base --device cuda \
        --skip b,c,a1,hf --e-procs 16 --no-readme
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from transforms.models.artifact import resolve_artifact
from transforms.models.spec import DEFAULT_TEXT_MODEL


def write_random_encoder(
    target: Path, *, source: str = DEFAULT_TEXT_MODEL, layers: int = 12, hidden: int = 768, seed: int = 0
) -> int:
    """Copy ``source``'s HF directory (tokenizer, pooling) to ``target`` with a random BERT of the
    given shape; returns its parameter count."""
    from transformers import BertConfig, BertModel

    src = resolve_artifact(source).path
    src_dir = src if src.is_dir() else src.parent
    shutil.copytree(src_dir, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((target / "config.json").read_text())
    config.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        _name_or_path=f"random-bert-{layers}x{hidden}",
    )
    (target / "config.json").write_text(json.dumps(config, indent=1))
    pooling = target / "1_Pooling" / "config.json"
    if pooling.exists():
        spec = json.loads(pooling.read_text())
        spec["word_embedding_dimension"] = hidden
        pooling.write_text(json.dumps(spec, indent=1))
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(target / "model.safetensors"))
    return sum(v.numel() for v in state.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", type=Path, help="directory to write (created)")
    ap.add_argument("--source", default=DEFAULT_TEXT_MODEL, help="HF directory whose tokenizer and layout to copy")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768, help="a multiple of 64")
    args = ap.parse_args(argv)
    if args.hidden % 64:
        ap.error("--hidden must be a multiple of 64")
    params = write_random_encoder(args.target, source=args.source, layers=args.layers, hidden=args.hidden)
    print(f"wrote {args.target}: random BERT {args.layers} x {args.hidden}, {params / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
