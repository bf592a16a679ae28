#!/usr/bin/env python
"""Random-init Llama model directories for the memory measurements (``benchmarks/memory.py``).

    python benchmarks/make_scale_model.py --size 95m --out runs/models/llama_95m

Sizes share stories260K's tokenizer (vocab 512, copied from ``../shared/data/models/stories260K``) so
the same SFT/DPO data runs on every size; only the transformer grows. The weights are random (seed 0):
these models measure memory, not quality, and are never committed (``runs/`` is git-ignored).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "data" / "models" / "stories260K"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

# name -> LlamaConfig fields; vocab 512 is the tokenizer's
SIZES = {
    "25m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1536),
    "95m": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                intermediate_size=2816),
}


def build(size: str, out: Path, tokenizer_dir: Path = STORIES) -> int:
    """Write the model and tokenizer to ``out``; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise SystemExit(f"--size {size!r}: expected one of {sorted(SIZES)}")
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise SystemExit(f"tokenizer not found in {tokenizer_dir} (the stories260K model of ../shared/data)")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, **SIZES[size])
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    count = build(args.size, Path(args.out))
    print(f"{args.out}: random-init Llama, {count:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
