"""The engine's settings: one keyword-only `EngineConfig`, checked where it is defined.

Every face (the Python API, `tokenmill run`, `tokenmill serve`, `tokenmill bench`, Ray replicas)
builds its engine from an `EngineConfig` and takes its defaults from here. A bad value raises
`ValueError` naming the field, before anything is loaded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}  # "float", "half": vLLM's names
QUANTIZATIONS = ("auto", "none", "int8")  # what each means: tokenmill/models/loader.py
TASKS = ("auto", "generate", "embed")
SPECULATIVE = ("ngram", "off")
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" too
# Tokens per step by default. Generation: measured (benchmarks/bench_scheduler.py, docs/PERFORMANCE.md),
# 256 runs a mixed job 1-4% and a prompt-only job 5-14% faster than 1024 on this class of CPU.
# Embeddings: whole prompts only, no decode to interleave; GEMMs need rows (benchmarks/bench_embeddings.py).
DEFAULT_STEP_TOKENS = {"generate": 256, "embed": 4096}
# On a GPU a step's cost hardly grows with its tokens until thousands (its weights are read once either
# way), so its steps are as large as vLLM's default.
GPU_STEP_TOKENS = 8192
CPU = torch.device("cpu")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: str | int | float) -> int | float:
    """A memory size as bytes (an int) or as a fraction of the RAM available at start (a float in (0, 1]).

    Accepted: an int of bytes; a float fraction; a string with a unit ("4GiB", "512MB", "65536B"),
    a percentage ("20%") or a decimal fraction ("0.2"). A bare integer string ("1") is refused: from
    the command line it could mean one byte or all the RAM.
    """
    if isinstance(value, bool):
        raise ValueError(f"kv_cache_memory must be a size or a fraction, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if (match := re.fullmatch(r"(\d+(?:\.\d+)?)%", text)) is not None:
            value = float(match.group(1)) / 100
        elif (match := re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]i?b|b)", text)) is not None:
            value = int(float(match.group(1)) * _UNITS[match.group(2)])
        elif re.fullmatch(r"\d*\.\d+", text):
            value = float(text)
        else:
            raise ValueError(f"kv_cache_memory must be bytes with a unit (e.g. '4GiB', '512MB') or a fraction of "
                             f"the available RAM (e.g. '0.2' or '20%'), got {value!r}")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {value}")
        return value
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"kv_cache_memory in bytes must be a positive integer, got {value!r}")
    return value


def resolve_device(device: str) -> torch.device:
    """"auto": the first CUDA device where torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch sees no CUDA device (torch {torch.__version__}, "
                         f"built {'with CUDA ' + str(torch.version.cuda) if torch.version.cuda else 'for CPU only'})")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device = CPU) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # NOTE: bf16 matmuls are only fast where the CPU has native bf16 instructions.
        capability = torch.backends.cpu.get_cpu_capability()
        return torch.bfloat16 if _cpu_has_bf16() or capability == "AVX512_BF16" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(kw_only=True)
class EngineConfig:
    model: str | None = None  # a Hugging Face folder or a .gguf file; None: SmolLM2-135M-Instruct
    dtype: str = "auto"
    # "auto": a GGUF's quantized blocks kept, a folder's weights as they are; "none": all in dtype;
    # "int8": linear weights and the embedding as Q8_0 blocks.
    quantization: str = "auto"
    # "auto": what the model is (a sentence-transformers folder or a BERT config embeds, the rest
    # generates); "embed" makes a Llama-family model an embedder (models/embedder_loader.py).
    task: str = "auto"
    max_num_seqs: int = 128
    # Tokens per step; None: the task's default (`step_tokens`).
    max_num_batched_tokens: int | None = None
    # Bytes (an int, or a string with a unit: "4GiB") or a fraction of the RAM available at start
    # (a float, "0.2" or "20%"); normalised by `parse_memory` to an int or a float. On a GPU, bytes
    # size the pool; a fraction is not used there (gpu_memory_utilization is).
    kv_cache_memory: str | int | float = 0.2
    # "auto": CUDA where torch sees a GPU, else the CPU; "cpu"; "cuda" or "cuda:N".
    device: str = "auto"
    # On a GPU: the share of its memory the engine may fill, weights, a step's activations and the KV
    # pool together (vLLM's name and meaning).
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    block_size: int = 16
    max_model_len: int | None = None
    tokenizer: str | None = None  # a tokenizer folder to use instead of the model's own
    # Sampling defaults (vLLM's): "auto" takes temperature, top_p, top_k, min_p and repetition_penalty
    # from the model folder's generation_config.json (a GGUF has none), "vllm" takes none (SamplingParams'
    # own), anything else is a folder holding a generation_config.json.
    generation_config: str = "auto"
    # "ngram": prompt-lookup speculative decoding where the batch is small enough to gain from it
    # (engine/speculation.py; outputs unchanged); "off": never.
    speculative: str = "ngram"

    def __post_init__(self) -> None:
        for name in ("model", "tokenizer", "generation_config"):
            if getattr(self, name) is not None:
                setattr(self, name, str(getattr(self, name)))
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.generation_config, str):
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder, got {self.generation_config!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)}, got {self.speculative!r}")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} or 'cuda:N', got {self.device!r}")
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, float | int) \
                or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if name == "max_num_batched_tokens" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        self.kv_cache_memory = parse_memory(self.kv_cache_memory)
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            logger.warning("max_num_batched_tokens=%d < max_num_seqs=%d: a step decodes at most %d sequences, "
                           "the others wait", self.max_num_batched_tokens, self.max_num_seqs,
                           self.max_num_batched_tokens)

    def step_tokens(self, task: str, device: torch.device = CPU) -> int:
        """The token budget of a step of the engine serving `task` ("generate" or "embed") on `device`."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max(GPU_STEP_TOKENS, DEFAULT_STEP_TOKENS[task]) if device.type == "cuda" else DEFAULT_STEP_TOKENS[task]
