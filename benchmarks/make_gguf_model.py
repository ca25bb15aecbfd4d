"""Writes a Llama-shaped GGUF file with random weights and SmolLM2's tokenizer, for benchmarks of models
nobody tuned for (issue 12). Never commit the files it writes.

    .venv/bin/python benchmarks/make_gguf_model.py OUT.gguf [--shape 1b|8b|tiny] [--type q8_0|q4_1|q4_k_m|bf16|f32]
        [--llama-quantize PATH]

Shapes: `1b` is Llama-3.2-1B's (hidden 2048, 16 layers, FFN 8192, 32/8 heads), `8b` Llama-3.1-8B's
(hidden 4096, 32 layers, FFN 14336, 32/8 heads); the vocabulary is SmolLM2's 49,152 tokens, its
tokenizer and chat template copied from the default model's GGUF. Linear weights and the embedding take
`--type`: F32, BF16, Q8_0 and Q4_1 are quantized by `gguf` itself; Q4_K_M is llama.cpp's mix (Q4_K, with
Q6_K for some tensors), so the script writes a BF16 file beside OUT first and runs `llama-quantize` from a
llama.cpp build on it (`bash shared/tools/build-llamacpp.sh` builds one). Norms stay F32. Weights are
drawn with a fixed seed, std 0.02, one tensor at a time and streamed to the file, so memory stays at one
tensor's size (the 8B shape's 16 GB BF16 intermediate included).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
from hf_to_gguf import start
from transformers import LlamaConfig

SHAPES = {  # hidden, layers, ffn, heads, kv heads
    "tiny": (256, 2, 512, 4, 2),  # for the tests
    "1b": (2048, 16, 8192, 32, 8),
    "8b": (4096, 32, 14336, 32, 8),
}
Q = gguf.GGMLQuantizationType
TYPES = {"q8_0": Q.Q8_0, "q4_1": Q.Q4_1, "bf16": Q.BF16, "f32": Q.F32}  # written by gguf
FILE_TYPES = {Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.F32: gguf.LlamaFileType.ALL_F32}
LLAMA_QUANTIZE_TYPES = {"q4_k_m": "Q4_K_M"}  # written by llama-quantize from a BF16 file
def tensor_shapes(shape: str, vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor's name and numpy shape ([rows, cols], or [cols] for norms), in file order."""
    hidden, layers, ffn, heads, kv_heads = SHAPES[shape]
    kv = kv_heads * hidden // heads
    yield "token_embd.weight", (vocab, hidden)
    yield "output.weight", (vocab, hidden)
    yield "output_norm.weight", (hidden,)
    for i in range(layers):
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", kv, hidden), ("attn_v", kv, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden),
                                 ("ffn_down", hidden, ffn)):
            yield f"blk.{i}.{name}.weight", (rows, cols)
        for name in ("attn_norm", "ffn_norm"):
            yield f"blk.{i}.{name}.weight", (hidden,)


def write(path: Path, shape: str, kind: gguf.GGMLQuantizationType) -> None:
    """Writes the model with its matrices in `kind`, streaming: every tensor's info goes first, then each
    tensor is drawn, quantized, written and dropped in turn."""
    hidden, layers, ffn, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=8192, rms_norm_eps=1e-5)
    writer = start(path, "llama", config, f"random-llama-{shape}-{kind.name.lower()}")
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_file_type(FILE_TYPES[kind])
    vocab = writer.vocab_size
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    for name, dims in tensor_shapes(shape, vocab):
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), 4 * dims[0])
        else:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * dims[1] // block * block_bytes,
                                   raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, dims in tensor_shapes(shape, vocab):
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, np.float32))
        else:
            data = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
            writer.write_tensor_data(data if kind == Q.F32 else gguf.quants.quantize(data, kind))
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--type", choices=sorted(TYPES.keys() | LLAMA_QUANTIZE_TYPES.keys()), default="q8_0")
    parser.add_argument("--llama-quantize", default=shutil.which("llama-quantize"),
                        help="llama.cpp's llama-quantize, for q4_k_m (default: the one on PATH)")
    args = parser.parse_args()
    if args.type in TYPES:
        write(args.output, args.shape, TYPES[args.type])
    else:
        if args.llama_quantize is None or not Path(args.llama_quantize).is_file():
            raise SystemExit(f"--type {args.type} needs llama.cpp's llama-quantize: pass --llama-quantize PATH "
                             "(bash shared/tools/build-llamacpp.sh builds it beside llama-batched-bench)")
        bf16 = args.output.with_name(args.output.name + ".bf16.tmp")
        try:
            write(bf16, args.shape, Q.BF16)
            result = subprocess.run([args.llama_quantize, str(bf16), str(args.output),
                                     LLAMA_QUANTIZE_TYPES[args.type]], capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"llama-quantize failed:\n{result.stderr[-2000:]}")
        finally:
            bf16.unlink(missing_ok=True)
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
