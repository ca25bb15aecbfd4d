"""A GGUF file read in place: its config, its tokenizer and its tensors, with no conversion pass.

The header (metadata and tensor table) is parsed by transformers' GGUF reader, which walks the
vocabulary without building a numpy view per string (`gguf.GGUFReader` takes ~7 s on SmolLM2's
header alone); the config is rebuilt with transformers' key table and the tokenizer with its GGUF
converter. Each tensor is read (one `readinto`, no memory map) into memory of its own: a plain one
(the norms, or a whole F32/F16/BF16 file) becomes a torch tensor, a quantized one a
`QuantizedWeight` holding the file's blocks unchanged, both keyed by transformers' names. With no
file pages mapped, the process holds the weights once, during the load as after it (reading
through a memory map counted the file's pages in RSS too: a peak of twice the file).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch
from gguf import GGML_QUANT_SIZES, ExpertGatingFuncType, GGMLQuantizationType
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
from transformers.integrations.gguf import reader as hf_reader
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
from transformers.integrations.gguf.reader import GgufHeader, TensorInfo

from tokenmill.models import gemma3, phi3
from tokenmill.models.quantized import QuantizedWeight

# GGUF architectures tokenmill runs, and the transformers model type each is.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma3": "gemma3_text",
                 "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Mixture-of-experts model types: llama.cpp's expert keys for each, beyond transformers' key table (which has
# only the counts, under Qwen's names), and the values llama.cpp's graphs fix per architecture, which no key
# states: Qwen3-MoE's top-k renormalised, Qwen2-MoE's not (whatever the model's norm_topk_prob was), Mixtral's
# attention full (the file carries no window). llama.cpp writes Mixtral as "llama" with an expert count.
_EXPERT_KEYS = {
    "mixtral": {"expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok"},
    "qwen2_moe": {"expert_count": "num_experts", "expert_used_count": "num_experts_per_tok",
                  "expert_feed_forward_length": "moe_intermediate_size",
                  "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3_moe": {"expert_count": "num_experts", "expert_used_count": "num_experts_per_tok",
                  "expert_feed_forward_length": "moe_intermediate_size"},
}
_EXPERT_VALUES = {"mixtral": {"sliding_window": None}, "qwen2_moe": {"norm_topk_prob": False},
                  "qwen3_moe": {"norm_topk_prob": True}}
_WITH_EXPERTS = {"llama": "mixtral"}  # architectures whose files with an expert count are another model type
PLAIN_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
               GGMLQuantizationType.BF16: torch.bfloat16}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    # mixture of experts (models/moe.py): the router, the experts stacked, the shared expert and its gate
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Per architecture, llama.cpp's layer names whose layer differs from the Llama family's.
_ARCHITECTURE_LAYER_NAMES = {"phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                             "gemma3": {"post_attention_norm": "post_attention_layernorm",
                                        "ffn_norm": "pre_feedforward_layernorm",
                                        "post_ffw_norm": "post_feedforward_layernorm"}}
# NOTE: llama.cpp's converter stores Gemma's norm weights plus 1 (its RMSNorm scales by the weight, Gemma's
# by 1 + weight); read back minus 1 in fp32, as transformers' GGUF loader does.
_NORMS_PLUS_ONE = {"gemma3"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp's rope frequency factors (Llama 3.1+; Phi-3's longrope): read into the config.
_IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
# Per architecture, the config values its keys and tensors give beyond transformers' key table.
_CONFIG_VALUES = {"phi3": phi3.gguf_config_values, "gemma3": gemma3.gguf_config_values}


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """transformers' name for a tensor of the file; None for one the model does not use."""
    if gguf_name in _IGNORED:
        return None
    layer_names = _LAYER_NAMES | _ARCHITECTURE_LAYER_NAMES.get(architecture, {})
    if (match := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)) and match[2] in layer_names:
        # NOTE: stacked experts are named as transformers 5's modules name theirs, parameters without ".weight".
        suffix = "" if match[2].endswith("_exps") else f".{match[3]}"
        return f"model.layers.{match[1]}.{layer_names[match[2]]}{suffix}"
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    raise ValueError(f"tensor {gguf_name!r} has no place in a {architecture} model")


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes the row order llama.cpp's converter gives Llama's q and k projections (each head's two
    rope halves interleaved), as transformers does. Rows are whole output features, so this works
    on a quantized weight's block rows as on plain ones."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def read_header(path: Path) -> tuple[dict[str, Any], GgufHeader]:
    """The file's metadata and tensor table, parsed by transformers' reader, each tensor's size from gguf's
    block table. NOTE: transformers' `GgufHeader.from_file` refuses the block types its own dequantizer lacks
    (Q5_0, Q5_1; Gemma 3 270M's Q4_K_M file holds Q5_0), which gguf's dequantizer and tokenmill's kernels take."""
    blob = hf_reader._mapped(str(path))
    metadata, count, position = hf_reader._read_metadata(blob, str(path))
    entries, position = hf_reader._read_tensor_table(blob, count, position)
    infos = []
    for name, shape, ggml_type, offset in entries:
        qtype = GGMLQuantizationType(ggml_type)  # ValueError for a type gguf does not know
        block, block_bytes = (1, PLAIN_TYPES[qtype].itemsize) if qtype in PLAIN_TYPES else GGML_QUANT_SIZES[qtype]
        infos.append(TensorInfo(name, shape, ggml_type, offset, math.prod(shape) // block * block_bytes))
    alignment = metadata.get("general.alignment", 32)  # llama.cpp's default
    data_start = (position + alignment - 1) // alignment * alignment
    return metadata, GgufHeader(str(path), metadata["general.architecture"], tuple(infos), data_start)


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata, self.header = read_header(path)
        self.architecture = self.metadata["general.architecture"]
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"GGUF architecture {self.architecture!r} is not supported; tokenmill runs "
                             f"{', '.join(ARCHITECTURES)}")
        self.model_type = ARCHITECTURES[self.architecture]
        if f"{self.architecture}.expert_count" in self.metadata:
            self.model_type = _WITH_EXPERTS.get(self.model_type, self.model_type)
            self._check_routing()
        self.tensor_names = {info.name for info in self.header.tensors}
        self.config = self._config()

    def _check_routing(self) -> None:
        """A clear error for experts these families do not route as llama.cpp would."""
        key = f"{self.architecture}.expert"
        if self.model_type not in _EXPERT_KEYS:
            raise ValueError(f"GGUF architecture {self.architecture!r} with experts is not supported; tokenmill runs "
                             f"the mixture-of-experts files of {', '.join(sorted(_EXPERT_KEYS))}")
        if self.metadata.get(f"{key}_gating_func", ExpertGatingFuncType.SOFTMAX) != ExpertGatingFuncType.SOFTMAX or \
                self.metadata.get(f"{key}_weights_scale", 1.0) not in (0.0, 1.0) or \
                self.metadata.get(f"{key}_group_count", 0) > 1:
            raise ValueError(f"the file's expert routing (gating function, weight scale or expert groups) is not "
                             f"{self.model_type}'s softmax top-k, which tokenmill runs")

    def _config(self) -> PretrainedConfig:
        """transformers' config for the file, from its metadata through transformers' key table."""
        model_type = self.model_type
        name = str(self.metadata.get("general.name", ""))
        values = {}
        if model_type == "llama" and "mistral" in name.lower():
            model_type = "mistral"  # llama.cpp writes Mistral models as llama
            # NOTE: and runs them with full attention, the file carrying no window (MistralConfig's
            # default, 4096, is v0.1's; later Mistrals have none).
            values["sliding_window"] = None
        key_table = GGUF_CONFIG_MAPPING.get(self.architecture) or GGUF_CONFIG_MAPPING[model_type]  # qwen2_moe's
        for section, keys in (("general", GGUF_CONFIG_MAPPING["general"]),
                              (self.architecture, key_table | _EXPERT_KEYS.get(model_type, {}))):
            for key, hf_key in keys.items():
                if hf_key is not None and f"{section}.{key}" in self.metadata:
                    values[hf_key] = self.metadata[f"{section}.{key}"]
        values.pop("model_type", None)
        values.pop("_model_name_or_path", None)
        values.setdefault("vocab_size", self.metadata.get("tokenizer.ggml.tokens"))  # the reader's count
        for gguf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                              ("padding_token_id", "pad_token_id"), ("unknown_token_id", "unk_token_id")):
            if f"tokenizer.ggml.{gguf_key}" in self.metadata:
                values[key] = self.metadata[f"tokenizer.ggml.{gguf_key}"]
        values["tie_word_embeddings"] = "output.weight" not in self.tensor_names
        if "rope_freqs.weight" in self.tensor_names:
            # NOTE: llama.cpp writes Llama 3.1+'s rope scaling as one divisor per frequency, not as
            # config keys; models/llama.py divides the default frequencies by them, as llama.cpp does.
            values["rope_freq_factors"] = self._plain_tensor("rope_freqs.weight").tolist()
        if config_values := _CONFIG_VALUES.get(self.architecture):
            values |= config_values(self.metadata, self._plain_tensor, self.tensor_names)
        values |= _EXPERT_VALUES.get(model_type, {})
        values["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                    "phi3": "Phi3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                                    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                    "qwen3_moe": "Qwen3MoeForCausalLM"}[model_type]]
        return AutoConfig.for_model(model_type, **values)

    def _read(self, file: BinaryIO, info: TensorInfo) -> torch.Tensor:
        """The tensor's bytes, read into memory of their own."""
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        file.seek(self.header.data_start + info.offset)
        if file.readinto(raw.numpy()) != info.nbytes:
            raise ValueError(f"the file ends inside tensor {info.name!r}")
        return raw

    def _plain_tensor(self, name: str) -> torch.Tensor:
        info = next(info for info in self.header.tensors if info.name == name)
        with self.path.open("rb", buffering=0) as file:
            raw = self._read(file, info)
        return raw.view(PLAIN_TYPES[GGMLQuantizationType(info.ggml_type)]).reshape(info.shape)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(self.path))
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)

    def tensors(self) -> dict[str, torch.Tensor | QuantizedWeight]:
        """Every tensor the model uses, by transformers' name, each read from the file into its own memory."""
        heads = {"q_proj": self.config.num_attention_heads, "k_proj": self.config.num_key_value_heads}
        tensors: dict[str, torch.Tensor | QuantizedWeight] = {}
        with self.path.open("rb", buffering=0) as file:
            for info in self.header.tensors:
                name = hf_name(info.name, self.architecture)
                if name is None:
                    continue
                raw = self._read(file, info)
                qtype = GGMLQuantizationType(info.ggml_type)
                if qtype in PLAIN_TYPES:
                    tensor = raw.view(PLAIN_TYPES[qtype]).reshape(info.shape)
                else:
                    block, block_bytes = GGML_QUANT_SIZES[qtype]
                    rows, width = math.prod(info.shape[:-1]), info.shape[-1]
                    tensor = raw.view(rows, width // block * block_bytes)
                projection = name.split(".")[-2]
                if self.architecture == "llama" and projection in heads:
                    tensor = unpermute_rows(tensor, heads[projection])
                if self.architecture in _NORMS_PLUS_ONE and name.endswith("norm.weight"):
                    tensor = tensor.float() - 1
                if name.endswith("shared_expert_gate.weight"):  # llama.cpp stores this [1, hidden] weight as a row
                    tensor = tensor.reshape(1, -1)
                if qtype not in PLAIN_TYPES:
                    tensor = QuantizedWeight(tensor, qtype, width)
                tensors[name] = tensor
        return tensors
