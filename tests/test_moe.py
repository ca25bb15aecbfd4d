"""Mixture-of-experts layers (models/moe.py) against transformers' own blocks, and their checkpoints' layouts.

Greedy generation of the tiny Qwen3-MoE, Qwen2-MoE and Mixtral models against transformers is in
test_exactness.py (every TINY_ARCHS entry; qwen3-moe also under chunking, caching and preemption).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeConfig

from tokenmill import LLM, SamplingParams, kernels
from tokenmill.models.llama import MLP
from tokenmill.models.loader import ModelLoadError, load_model
from tokenmill.models.moe import SparseMoeBlock
from tokenmill.models.moe_llama import MoeForCausalLM

MOE_ARCHS = ("qwen3-moe", "qwen2-moe", "mixtral")


def sparse_layer(model: torch.nn.Module) -> int:
    return next(i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, SparseMoeBlock))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_block_matches_transformers_with_idle_experts(arch: str, tiny_models: dict[str, Path]) -> None:
    """The block on batches of 1, 3 and 40 tokens (most experts get no token from one or three) equals
    transformers' sparse block on the same weights, fp32 (within the rounding of sums taken in another order)."""
    folder = tiny_models[arch]
    ours = load_model(folder, torch.float32).model
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layer = sparse_layer(ours)
    block, hf_block = ours.layers[layer].mlp, hf.model.layers[layer].mlp
    torch.manual_seed(0)
    for tokens in (1, 3, 40):
        x = torch.randn(tokens, hf.config.hidden_size)
        used = block.route(x)[1].unique().numel()
        assert used < 8 if tokens <= 3 else used == 8
        with torch.no_grad():
            torch.testing.assert_close(block(x), hf_block(x[None])[0], rtol=1e-4, atol=1e-4)  # outputs ~10


@pytest.mark.skipif(not kernels.available(), reason="batch-invariant linears need tokenmill's kernels (AVX-512)")
def test_a_token_alone_equals_the_token_in_a_batch(tiny_models: dict[str, Path]) -> None:
    """bf16: each token's output is the same bits alone as among 40 tokens spread over all the experts."""
    model = load_model(tiny_models["mixtral"], torch.bfloat16).model
    block = model.layers[0].mlp
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        batch = block(x)
        for i in range(len(x)):
            assert torch.equal(block(x[i:i + 1])[0], batch[i])


def stacked_checkpoint(source: Path, folder: Path) -> None:
    """The source model's experts stacked as transformers 5's modules hold them: one gate_up_proj [E, 2F, H]
    and one down_proj [E, H, F] per layer, under `mlp` (Mixtral's `block_sparse_moe` renamed)."""
    shutil.copytree(source, folder)
    tensors = load_file(source / "model.safetensors")
    config = AutoConfig.from_pretrained(source)
    names = ("w1", "w3", "w2") if config.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        moe = next((m for m in ("mlp", "block_sparse_moe") if f"{p}{m}.gate.weight" in tensors), None)
        if moe is None:
            continue
        tensors[f"{p}mlp.gate.weight"] = tensors.pop(f"{p}{moe}.gate.weight")
        experts = range(8)
        gate, up, down = ([tensors.pop(f"{p}{moe}.experts.{e}.{n}.weight") for e in experts] for n in names)
        tensors[f"{p}mlp.experts.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up)])
        tensors[f"{p}mlp.experts.down_proj"] = torch.stack(down)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("arch", ["qwen3-moe", "mixtral"])
def test_stacked_experts_load(arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / arch
    stacked_checkpoint(tiny_models[arch], folder)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 40))] for _ in range(4)]
    outputs = LLM(str(folder), dtype="float32", kv_cache_memory=1 << 24).generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p, 12) for p in prompts]


def test_a_missing_or_extra_expert_is_named(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    missing, extra = tmp_path / "missing", tmp_path / "extra"
    stacked_checkpoint(tiny_models["qwen3-moe"], extra)
    shutil.copytree(tiny_models["qwen3-moe"], missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight' is missing"):
        load_model(missing, torch.float32)
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.1.mlp.experts.down_proj"] = torch.cat([tensors["model.layers.1.mlp.experts.down_proj"]] * 2)
    save_file(tensors, extra / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.experts\.down_proj of shape \(16, 64, 32\) "
                                             r"does not stack the config's 8 experts"):
        load_model(extra, torch.float32)


def test_dense_layers_where_transformers_has_them() -> None:
    """decoder_sparse_step and mlp_only_layers choose the same dense layers as transformers' Qwen3-MoE."""
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3])
    with torch.device("meta"):
        ours = MoeForCausalLM(config, 64, torch.float32, torch.device("cpu"))
        hf = AutoModelForCausalLM.from_config(config)
    kinds = [type(layer.mlp).__name__.removeprefix("Qwen3Moe") for layer in hf.model.layers]
    assert kinds == ["MLP", "SparseMoeBlock", "MLP", "MLP", "MLP", "SparseMoeBlock"]
    assert [isinstance(layer.mlp, SparseMoeBlock if kind == "SparseMoeBlock" else MLP)
            for layer, kind in zip(ours.layers, kinds)] == [True] * 6
