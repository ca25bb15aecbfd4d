"""Writes a Llama-shaped Hugging Face folder with random bf16 weights, for issue 19's GPU benchmark.

    python benchmarks/make_hf_model.py OUT [--shape 1b|tiny] [--vocab 128256] --tokenizer DIR [--device cuda]

`1b` is Llama-3.2-1B's shape (hidden 2048, 16 layers, FFN 8192, 32/8 heads, tied embeddings), with the
vocabulary the issue names (128,256 tokens); the tokenizer files are copied from DIR (SmolLM2's, which
has fewer tokens: ids past it decode to nothing, and benchmarks draw prompt ids at random anyway). The
weights are drawn on `--device` (a GPU draws 1B parameters in a moment) with std 0.02. Never commit the
folders it writes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPES = {"tiny": (256, 2, 512, 4, 2), "1b": (2048, 16, 8192, 32, 8)}  # hidden, layers, ffn, heads, kv heads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder holding tokenizer.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    hidden, layers, ffn, heads, kv_heads = SHAPES[args.shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=args.vocab,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.output)
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.output / name)
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters)")


if __name__ == "__main__":
    main()
