"""Mixture-of-experts decode speed: tokenmill against transformers' generate on a random Qwen3-MoE model.

    .venv/bin/python benchmarks/bench_moe.py [--folder /tmp/tokenmill-qwen3-moe] [--threads 2]
                                             [--dtype bfloat16] [--npl 1,16,64] [--npp 128] [--ntg 32]

Builds once (kept in FOLDER) a Qwen3-MoE model of ~0.5B parameters with random weights: 8 layers, hidden
1024, 16 query and 4 KV heads, 32 experts of 512, top 4 (renormalised), SmolLM2's tokenizer (49,152
tokens, untied head). Then runs `tokenmill bench batched --transformers` on it: the same prompts through
tokenmill and transformers' `generate` (greedy, every sequence decoding NTG tokens, same dtype and
threads) in one run, and prints both tables and tokenmill's ratios (S_TG is decode tokens/s).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

from tokenmill import cli
from tokenmill.models.loader import default_model_path

CONFIG = dict(vocab_size=49152, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
              num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, norm_topk_prob=True,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build_model(folder: Path) -> None:
    """The random model and SmolLM2's tokenizer in `folder` (bf16 weights), unless already there."""
    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**CONFIG), dtype=torch.bfloat16)
    print(f"built a Qwen3-MoE model of {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    model.save_pretrained(folder)
    gguf = default_model_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/tokenmill-qwen3-moe"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--npl", default="1,16,64")
    parser.add_argument("--npp", default="128")
    parser.add_argument("--ntg", default="32")
    args = parser.parse_args()
    build_model(args.folder)
    max_batch = max(int(b) for b in args.npl.split(","))
    raise SystemExit(cli.main(["bench", "batched", "--model", str(args.folder), "--transformers",
                               "--threads", str(args.threads), "--dtype", args.dtype, "--npl", args.npl,
                               "--npp", args.npp, "--ntg", args.ntg, "--max-num-seqs", str(max_batch),
                               "--kv-cache-memory", "2GiB"]))


if __name__ == "__main__":
    main()
