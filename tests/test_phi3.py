"""Phi-3: longrope's factors chosen once per engine, partial rotary in the fused rope's layout, and a GGUF written
as llama.cpp writes Phi-3 (fused attn_qkv and ffn_up, rope factors as tensors) loading as its HF folder does.
tests/test_exactness.py runs the tiny "phi3" and "phi3-longrope" models against transformers."""

from __future__ import annotations

import logging
import math
import random
import shutil
from pathlib import Path

import gguf
import hf_to_gguf
import numpy as np
import pytest
import torch
from conftest import TOKENIZER_FILES, VOCAB, hf_greedy
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Phi3Config
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

from tokenmill import LLM, SamplingParams, kernels
from tokenmill.models.elementwise import TORCH_OPS, select_elementwise_ops, signed_sin
from tokenmill.models.gguf_file import GGUFFile, hf_name
from tokenmill.models.phi3 import Phi3ForCausalLM, rotary_order

ORIGINAL_CONTEXT = 64


def long_context_config(**overrides: object) -> Phi3Config:
    """Phi-3-mini-128k's shape, tiny: longrope over an original context of 64 of 512, half of each head rotated."""
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=ORIGINAL_CONTEXT,
                  initializer_range=0.3, eos_token_id=2, bos_token_id=1, pad_token_id=2, sliding_window=24,
                  rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 4.0],
                                "long_factor": [2.0, 4.0, 8.0, 16.0]},
                  partial_rotary_factor=0.5)
    return Phi3Config(**values | overrides)


@pytest.fixture(scope="module")
def long_phi3(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("phi3-long")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(long_context_config(), dtype=torch.float32).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smol_dir / name).exists():
            shutil.copy(smol_dir / name, folder / name)
    return folder


def prompts(count: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def generate(llm: LLM, prompt_ids: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params, use_tqdm=False)]


def test_longrope_factors_are_chosen_from_the_engines_context(long_phi3: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A context within the original one runs the short factors, exactly transformers' for every sequence; a longer
    one the long factors, exactly transformers' for a sequence past the original context from its prompt on."""
    hf = AutoModelForCausalLM.from_pretrained(long_phi3, dtype=torch.float32).eval()
    with caplog.at_level(logging.INFO, logger="tokenmill.models.phi3"):
        short = LLM(str(long_phi3), dtype="float32", kv_cache_memory=1 << 26, max_model_len=ORIGINAL_CONTEXT)
        long = LLM(str(long_phi3), dtype="float32", kv_cache_memory=1 << 26, max_num_batched_tokens=32)
    assert "the short factors for a context of 64 tokens" in caplog.text
    assert "the long factors for a context of 512 tokens" in caplog.text

    within = prompts(6, (1, 40))
    assert generate(short, within, 20) == [hf_greedy(hf, p, 20) for p in within]
    beyond = prompts(6, (ORIGINAL_CONTEXT + 1, 120), seed=1)  # chunks of 32: keys cached over several steps
    assert generate(long, beyond, 20) == [hf_greedy(hf, p, 20) for p in beyond]
    assert long.engine.stats.steps > 6 * (ORIGINAL_CONTEXT + 1) // 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_rotary_in_its_layout_is_transformers_rope_bit_for_bit(dtype: torch.dtype) -> None:
    """Phi-4-mini's share (0.75 of head_dim 64): the fused kernel (bf16, where it runs) and the torch ops rotate
    each head in `rotary_order` to transformers' apply_rotary_pos_emb's values, permuted alike."""
    factors = {"short_factor": [1.0 + i / 8 for i in range(24)], "long_factor": [2.0 + i for i in range(24)]}
    config = long_context_config(hidden_size=256, num_attention_heads=4, partial_rotary_factor=0.75,
                                 rope_scaling={"rope_type": "longrope", **factors})
    with torch.device("meta"):
        model = Phi3ForCausalLM(config, 512, dtype, torch.device("cpu"))
    cos, sin = model.compute_rope_tables(512)
    positions = torch.arange(0, 512, 7)
    tokens, heads, kv_heads, head_dim = positions.numel(), 4, 2, 64
    qk = torch.randn(tokens, heads + kv_heads, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    # The long factors, as the engine's context (512) is past the original: positions up to 511 give them here too.
    ref_cos, ref_sin = Phi3RotaryEmbedding(config)(qk, positions[None])
    expected_q, expected_k = apply_rotary_pos_emb(qk[None, :, :heads].transpose(1, 2),
                                                  qk[None, :, heads:].transpose(1, 2), ref_cos, ref_sin)
    order = rotary_order(head_dim, 48)
    ops = [TORCH_OPS] + ([select_elementwise_ops(torch.device("cpu"), dtype, head_dim)]
                         if dtype == torch.bfloat16 and kernels.available() else [])
    for op in ops:
        keys, values = torch.zeros(tokens, kv_heads, head_dim, dtype=dtype), torch.zeros(tokens, kv_heads, head_dim,
                                                                                          dtype=dtype)
        q = op.rope_store(qk[:, :, order].contiguous(), qk[:, heads:].contiguous(), cos[positions].to(dtype),
                          signed_sin(sin[positions].to(dtype)), keys, values, torch.arange(tokens))
        assert torch.equal(q, expected_q[0].transpose(0, 1)[:, :, order])
        assert torch.equal(keys, expected_k[0].transpose(0, 1)[:, :, order])


def write_phi3_gguf(folder: Path, path: Path, kind: gguf.GGMLQuantizationType) -> None:
    """The folder's model as llama.cpp's convert_hf_to_gguf.py writes a Phi-3 (Phi3MiniModel), its matrices in
    `kind` (benchmarks/hf_to_gguf.py)."""
    config = Phi3Config.from_pretrained(folder)
    rope = config.rope_parameters
    original = rope["original_max_position_embeddings"]
    writer = hf_to_gguf.start(path, "phi3", config, "tiny-phi3")
    writer.add_rope_scaling_orig_ctx_len(original)
    rotary_dims = int(rope["partial_rotary_factor"] * config.hidden_size) // config.num_attention_heads
    writer.add_rope_dimension_count(rotary_dims)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_sliding_window(config.sliding_window or 0)
    scale = config.max_position_embeddings / original
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    assert len(rope["long_factor"]) == rotary_dims // 2
    writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
    writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    weights = ((name, tensor.numpy()) for name, tensor in load_file(folder / "model.safetensors").items())
    hf_to_gguf.add_weights(writer, "phi3", config, weights, kind)
    hf_to_gguf.finish(writer)


def test_llama_cpps_phi3_names() -> None:
    assert hf_name("blk.3.attn_qkv.weight", "phi3") == "model.layers.3.self_attn.qkv_proj.weight"
    assert hf_name("blk.3.ffn_up.weight", "phi3") == "model.layers.3.mlp.gate_up_proj.weight"
    assert hf_name("blk.3.ffn_up.weight") == "model.layers.3.mlp.up_proj.weight"
    assert hf_name("rope_factors_long.weight", "phi3") is None


def test_a_phi3_gguf_loads_as_its_hf_folder(long_phi3: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny-phi3-f32.gguf"
    write_phi3_gguf(long_phi3, path, gguf.GGMLQuantizationType.F32)
    config, expected = GGUFFile(path).config, Phi3Config.from_pretrained(long_phi3)
    assert config.architectures == ["Phi3ForCausalLM"]
    assert config.tie_word_embeddings == expected.tie_word_embeddings
    assert (config.sliding_window, config.max_position_embeddings) == (24, 512)
    for key in ("rope_type", "rope_theta", "partial_rotary_factor", "short_factor", "long_factor",
                "original_max_position_embeddings"):
        assert config.rope_parameters[key] == expected.rope_parameters[key], key
    with torch.device("meta"):
        models = [Phi3ForCausalLM(c, 512, torch.float32, torch.device("cpu")) for c in (config, expected)]
    for mine, theirs in zip(*(m.compute_rope_tables(512) for m in models)):
        assert torch.equal(mine, theirs)  # the attention factor too: the file's float32 of transformers' own

    prompt_ids = prompts(4, (ORIGINAL_CONTEXT + 1, 100), seed=2)
    from_gguf = generate(LLM(str(path), dtype="float32", kv_cache_memory=1 << 26), prompt_ids, 16)
    assert from_gguf == generate(LLM(str(long_phi3), dtype="float32", kv_cache_memory=1 << 26), prompt_ids, 16)
    hf = AutoModelForCausalLM.from_pretrained(long_phi3, dtype=torch.float32).eval()
    assert from_gguf == [hf_greedy(hf, p, 16) for p in prompt_ids]


@pytest.mark.skipif(not kernels.available(), reason="quantized blocks run on tokenmill's CPU kernels (AVX-512)")
def test_a_quantized_phi3_gguf_keeps_its_blocks_in_the_rotary_order(long_phi3: Path, tmp_path: Path) -> None:
    """Q8_0 attn_qkv rows permuted as blocks give what the same weights dequantized at load give."""
    path = tmp_path / "tiny-phi3-q8_0.gguf"
    write_phi3_gguf(long_phi3, path, gguf.GGMLQuantizationType.Q8_0)
    prompt_ids = prompts(4, (5, 60), seed=3)
    blocks = LLM(str(path), dtype="float32", kv_cache_memory=1 << 26)
    assert blocks.engine.quantization == "Q8_0"
    dequantized = LLM(str(path), dtype="float32", kv_cache_memory=1 << 26, quantization="none")
    assert generate(blocks, prompt_ids, 16) == generate(dequantized, prompt_ids, 16)
