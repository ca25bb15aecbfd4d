"""Mixture-of-experts decode speed: tokenmill against transformers' generate on a random Qwen3-MoE model.

    .venv/bin/python benchmarks/bench_moe.py [--folder /tmp/tokenmill-qwen3-moe] [--threads 2]
                                             [--dtype bfloat16] [--npl 1,16,64] [--npp 128] [--ntg 32]
                                             [--gguf q8_0,q4_k_m,f32] [--llama-quantize PATH]

Builds once (kept in FOLDER) a Qwen3-MoE model of ~0.5B parameters with random weights: 8 layers, hidden
1024, 16 query and 4 KV heads, 32 experts of 512, top 4 (renormalised), SmolLM2's tokenizer (49,152
tokens, untied head). Then runs `tokenmill bench batched --transformers` on it: the same prompts through
tokenmill and transformers' `generate` (greedy, every sequence decoding NTG tokens, same dtype and
threads) in one run, and prints both tables and tokenmill's ratios (S_TG is decode tokens/s).

`--gguf KINDS` also writes the same model as llama.cpp's converter writes a GGUF of each kind (`write_gguf`,
kept in FOLDER: Q8_0 or F32 by `gguf` itself, Q4_K_M by llama.cpp's `llama-quantize` from an F32 file), runs
tokenmill on each file (its experts in the file's blocks) on the same prompts (the grid's prompts are drawn
from a fixed seed and the vocabulary), and prints each file's decode speed over transformers' and over
tokenmill's on the folder. Decode at B=16 reads every expert's weights each step, so quantized blocks, read 2-4x fewer
bytes, are what moves it.
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import gguf
import hf_to_gguf
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

from tokenmill import cli
from tokenmill.models import gguf_file
from tokenmill.models.loader import default_model_path

CONFIG = dict(vocab_size=49152, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
              num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, norm_topk_prob=True,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)

Q = gguf.GGMLQuantizationType
GGUF_TYPES = {"q8_0": Q.Q8_0, "f32": Q.F32}  # written by gguf; q4_k_m by llama-quantize from an F32 file
FILE_TYPES = {Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.F32: gguf.LlamaFileType.ALL_F32}
# llama.cpp's architecture for each model type (Mixtral is written as llama).
GGUF_ARCHITECTURES = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
# The routing llama.cpp's graphs fix, as the loader sets it: a config whose norm_topk_prob differs is not the model
# llama.cpp runs from the file.
LLAMA_CPP_NORM_TOPK = {t: v["norm_topk_prob"] for t, v in gguf_file._EXPERT_VALUES.items() if "norm_topk_prob" in v}
# Per-expert tensor names -> the stacked experts' (transformers 5's module names), Mixtral's as Qwen's.
STACKED_EXPERTS = {"gate_proj": "gate_proj", "w1": "gate_proj", "up_proj": "up_proj", "w3": "up_proj",
                   "down_proj": "down_proj", "w2": "down_proj"}


def build_model(folder: Path) -> None:
    """The random model and SmolLM2's tokenizer in `folder` (bf16 weights), unless already there."""
    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**CONFIG), dtype=torch.bfloat16)
    print(f"built a Qwen3-MoE model of {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    model.save_pretrained(folder)
    gguf_path = default_model_path()
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)


def stacked_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """The folder's tensors in fp32 under transformers' names, as llama.cpp lays them out: experts stacked [E, rows,
    cols] per layer and projection (named as transformers 5's modules), Mixtral's block as Qwen's "mlp", the shared
    expert's gate a vector."""
    experts: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for name, tensor in load_file(folder / "model.safetensors").items():
        data, name = tensor.float().numpy(), name.replace(".block_sparse_moe.", ".mlp.")
        if expert := re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name):
            experts[f"{expert[1]}.{STACKED_EXPERTS[expert[3]]}"][int(expert[2])] = data
        else:
            yield name, data.reshape(-1) if name.endswith("shared_expert_gate.weight") else data
    for name, by_expert in experts.items():
        yield name, np.stack([by_expert[e] for e in range(len(by_expert))])


def write_gguf(folder: Path, path: Path, kind: gguf.GGMLQuantizationType) -> None:
    """The folder's MoE model (Qwen3-MoE, Qwen2-MoE, Mixtral) as llama.cpp's convert_hf_to_gguf.py writes it,
    its matrices in `kind` where their rows are whole blocks (benchmarks/hf_to_gguf.py)."""
    config = AutoConfig.from_pretrained(folder)
    if config.model_type in LLAMA_CPP_NORM_TOPK and config.norm_topk_prob != LLAMA_CPP_NORM_TOPK[config.model_type]:
        raise ValueError(f"llama.cpp runs {config.model_type} with norm_topk_prob={not config.norm_topk_prob}")
    if config.model_type == "mixtral" and config.sliding_window is not None:
        raise ValueError("llama.cpp runs Mixtral with full attention: a sliding window has no place in its file")
    architecture = GGUF_ARCHITECTURES[config.model_type]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = hf_to_gguf.start(path, architecture, config, folder.name)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if architecture == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_expert_count(getattr(config, "num_experts", None) or config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if moe_intermediate_size := getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(moe_intermediate_size)
    if shared := getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(shared)
    writer.add_file_type(FILE_TYPES[kind])
    hf_to_gguf.add_weights(writer, architecture, config, stacked_tensors(folder), kind)
    hf_to_gguf.finish(writer)


def build_gguf(folder: Path, kind: str, llama_quantize: str | None) -> Path:
    """FOLDER/model-KIND.gguf, written unless already there."""
    path = folder / f"model-{kind}.gguf"
    if path.is_file():
        return path
    if kind in GGUF_TYPES:
        write_gguf(folder, path, GGUF_TYPES[kind])
        return path
    if llama_quantize is None or not Path(llama_quantize).is_file():
        raise SystemExit(f"--gguf {kind} needs llama.cpp's llama-quantize: pass --llama-quantize PATH")
    f32 = path.with_name(path.name + ".f32.tmp")
    try:
        write_gguf(folder, f32, Q.F32)
        result = subprocess.run([llama_quantize, str(f32), str(path), kind.upper()], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"llama-quantize failed:\n{result.stderr[-2000:]}")
    finally:
        f32.unlink(missing_ok=True)
    return path


def bench(model: Path, args: argparse.Namespace, jsonl: Path, transformers: bool) -> None:
    max_batch = max(int(b) for b in args.npl.split(","))
    code = cli.main(["bench", "batched", "--model", str(model), "--threads", str(args.threads), "--dtype", args.dtype,
                     "--npl", args.npl, "--npp", args.npp, "--ntg", args.ntg, "--max-num-seqs", str(max_batch),
                     "--kv-cache-memory", "2GiB", "--jsonl", str(jsonl)] + (["--transformers"] if transformers else []))
    if code:
        raise SystemExit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/tokenmill-qwen3-moe"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--npl", default="1,16,64")
    parser.add_argument("--npp", default="128")
    parser.add_argument("--ntg", default="32")
    parser.add_argument("--gguf", default="", help=f"also run tokenmill on the model written as a GGUF of each of "
                        f"these types (comma-separated: {', '.join([*GGUF_TYPES, 'q4_k_m'])})")
    parser.add_argument("--llama-quantize", default=shutil.which("llama-quantize"),
                        help="llama.cpp's llama-quantize, for q4_k_m (default: the one on PATH)")
    args = parser.parse_args()
    build_model(args.folder)
    kinds = [k for k in args.gguf.split(",") if k]
    if unknown := set(kinds) - {*GGUF_TYPES, "q4_k_m"}:
        raise SystemExit(f"--gguf: unknown types {sorted(unknown)}")
    files = [build_gguf(args.folder, kind, args.llama_quantize) for kind in kinds]
    with tempfile.TemporaryDirectory() as scratch:
        s_tg: dict[tuple[int, int, int], dict[str, float]] = defaultdict(dict)
        for model in [args.folder, *files]:
            if model != args.folder:
                print(f"\n{model.name} ({model.stat().st_size / 2**30:.2f} GiB):")
            rows = Path(scratch) / "rows.jsonl"
            bench(model, args, rows, transformers=model == args.folder)
            for line in rows.read_text().splitlines():
                row = json.loads(line)
                label = row["engine"] if model == args.folder else model.name
                s_tg[(row["PP"], row["TG"], row["B"])][label] = row["S_TG"]
    for path in files:
        print(f"\nS_TG of tokenmill on {path.name} over transformers ({args.dtype}, the folder) and over tokenmill "
              f"({args.dtype}, the folder):\n\n| PP | TG | B | S_TG | / transformers | / tokenmill |\n"
              "|---|---|---|---|---|---|")
        for (pp, tg, b), speeds in sorted(s_tg.items()):
            print(f"| {pp} | {tg} | {b} | {speeds[path.name]:.1f} | {speeds[path.name] / speeds['transformers']:.2f}x "
                  f"| {speeds[path.name] / speeds['tokenmill']:.2f}x |")


if __name__ == "__main__":
    main()
