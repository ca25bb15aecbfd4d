"""Which task a model serves (generate or embed), and the loading of embedding models.

A model embeds when its folder is a sentence-transformers folder (`modules.json`) or its config
names a BERT-family encoder or a bare decoder body (Qwen3Model...); `task="embed"` makes any
Llama-family model an embedder (its last hidden states pooled, last token by default, as
Qwen3-Embedding and gte-Qwen). A model may be cut
to fewer `dimensions` per request only when its config says it was trained for it
(`matryoshka_dimensions` or `is_matryoshka`, as vLLM reads them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from tokenmill.models.bert import SUPPORTED_ENCODERS, BertModel, load_bert_weights
from tokenmill.models.causal_lm import CausalLM
from tokenmill.models.loader import (
    SUPPORTED_ARCHITECTURES,
    ModelLoadError,
    build_decoder,
    decoder_context,
    model_name,
    prepare_weights,
    read_folder,
    read_gguf,
    release_freed_memory,
    resolve_model_path,
)
from tokenmill.models.pooling import PoolingConfig, read_pooling_config

# Checkpoints of the bare decoder, without a head: embedders only (e5-mistral's MistralModel...).
DECODER_BODIES = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model")


def model_task(model: str | os.PathLike | None, task: str = "auto") -> str:
    """"generate" or "embed": `task` itself unless "auto", then what the model is."""
    if task != "auto":
        return task
    path = resolve_model_path(model)
    if path.is_file():
        return "generate"
    if (path / "modules.json").is_file():
        return "embed"
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    return "embed" if any(a in SUPPORTED_ENCODERS + DECODER_BODIES for a in architectures) else "generate"


@dataclass
class LoadedEmbedder:
    model: BertModel | CausalLM
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    pooling: PoolingConfig
    max_model_len: int
    path: Path
    name: str  # what responses report as the model
    quantization: str  # what the weights run as (LoadedModel's)
    matryoshka: bool  # whether requests may ask for fewer dimensions


def load_embedder(model: str | os.PathLike | None, dtype: torch.dtype, max_model_len: int | None = None,
                  quantization: str = "auto") -> LoadedEmbedder:
    path = resolve_model_path(model)
    if path.is_file():
        config, tokenizer, tensors = read_gguf(path)
    else:
        config, tokenizer, tensors = read_folder(path, SUPPORTED_ARCHITECTURES + DECODER_BODIES + SUPPORTED_ENCODERS)
    encoder = any(a in SUPPORTED_ENCODERS for a in getattr(config, "architectures", None) or [])
    try:
        pooling = read_pooling_config(path, encoder) if path.is_dir() else PoolingConfig("last", normalize=True)
    except (ValueError, OSError, KeyError, StopIteration) as e:
        raise ModelLoadError(f"cannot read the pooling of {str(path)!r}: {e}") from e
    limit = min(config.max_position_embeddings, pooling.max_seq_length or config.max_position_embeddings)
    embedder: BertModel | CausalLM
    if encoder:
        if quantization == "int8":
            raise ModelLoadError("quantization='int8' is not supported for encoder models")
        max_model_len = min(max_model_len or limit, limit)
        embedder = BertModel(config, dtype).to(dtype)
        try:
            load_bert_weights(embedder, tensors)  # type: ignore[arg-type]  # a folder's weights are plain
        except ValueError as e:
            raise ModelLoadError(f"cannot load the weights of {str(path)!r}: {e}") from e
        embedder.eval()
        release_freed_memory()
        running = "none"
    else:
        max_model_len = min(decoder_context(config, max_model_len), limit)
        if not any(name.startswith("model.") for name in tensors):  # a bare Qwen3Model's checkpoint
            tensors = {f"model.{name}": weight for name, weight in tensors.items()}
        running = prepare_weights(tensors, quantization, dtype)
        embedder = build_decoder(config, tensors, dtype, max_model_len, path, lm_head=False)
    matryoshka = bool(getattr(config, "matryoshka_dimensions", None) or getattr(config, "is_matryoshka", False))
    return LoadedEmbedder(embedder, config, tokenizer, pooling, max_model_len, path, model_name(model), running,
                          matryoshka)
