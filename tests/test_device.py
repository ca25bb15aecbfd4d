"""The device an engine runs on: chosen once at start (EngineConfig.device), the step's metadata copied to it.

CI has no GPU: the CUDA tests are marked `gpu` and skipped without one (benchmarks/gpu_session.sh runs them
on a lent machine); the rest checks here what does not need one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCHS
from test_exactness import random_prompts
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.attention import AttentionSpec, BatchLayout, TorchAttentionBackend
from tokenmill.engine.config import GPU_STEP_TOKENS, EngineConfig, resolve_device
from tokenmill.engine.model_runner import to_device

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


@pytest.mark.skipif(CUDA, reason="a GPU is here")
def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused_before_loading(tiny_models: dict[str, Path]) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        LLM(str(tiny_models["llama"]), device="cuda")


def test_devices_that_are_not_there_are_refused() -> None:
    for device in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(ValueError, match="device must be"):
            EngineConfig(device=device)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=0)


def test_a_gpu_step_holds_more_tokens_unless_told() -> None:
    cuda = torch.device("cuda")
    assert EngineConfig().step_tokens("generate", cuda) == GPU_STEP_TOKENS
    assert EngineConfig().step_tokens("generate") == 256
    assert EngineConfig(max_num_batched_tokens=512).step_tokens("generate", cuda) == 512


def test_step_metadata_reaches_the_device_whole() -> None:
    # The meta device stands in for a GPU: every tensor of the torch backend's metadata (groups, masks,
    # slots, the shared prefix) must move, and what is not a tensor (how each group is attended) stay.
    spec = AttentionSpec(4, 2, 8, 4, torch.float32, torch.device("cpu"))
    block_table = torch.tensor([[0, 1, 2, 0], [0, 1, 3, 4], [5, 6, 0, 0]])
    layout, _ = BatchLayout.of(torch.tensor([1, 1, 5]), torch.tensor([10, 14, 7]), block_table, 4)
    backend = TorchAttentionBackend(spec)
    meta = backend.build_metadata(layout)
    moved = to_device(meta, torch.device("meta"))
    tensors = [moved.slot_mapping] + [t for g in moved.groups for t in vars(g).values() if isinstance(t, torch.Tensor)]
    assert len(tensors) > 5 and all(t.device.type == "meta" for t in tensors)
    assert moved.attend == meta.attend and len(moved.groups) == len(meta.groups) == 2
    assert [t.shape for t in tensors] == [meta.slot_mapping.shape] + [
        t.shape for g in meta.groups for t in vars(g).values() if isinstance(t, torch.Tensor)]
    # The two decodes share two blocks: attended apart on the CPU only (the merge's op is the CPU's).
    assert [g.shared_prefix_slots is not None for g in meta.groups] == [True, False]
    elsewhere = TorchAttentionBackend(dataclasses.replace(spec, device=torch.device("meta"))).build_metadata(layout)
    assert all(g.shared_prefix_slots is None for g in elsewhere.groups)


@gpu
@pytest.mark.skipif(not CUDA, reason="no GPU")
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_match_transformers_on_the_gpu(arch: str, tiny_models: dict[str, Path]) -> None:
    folder = tiny_models[arch]
    prompts = random_prompts(8)
    llm = LLM(str(folder), dtype="float32", device="cuda", kv_cache_memory=1 << 26)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to("cuda").eval()
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                   pad_token_id=hf.config.eos_token_id)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected


@gpu
@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_sampling_settings_run_on_the_gpu(tiny_models: dict[str, Path]) -> None:
    # Penalties, top-k/p, min-p, logit bias, allowed tokens, seeds and logprobs: every sampler path on CUDA tensors.
    llm = LLM(str(tiny_models["llama"]), device="cuda", kv_cache_memory=1 << 26)
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                             frequency_penalty=0.5, presence_penalty=0.5, seed=7, max_tokens=12, logprobs=3,
                             logit_bias={5: 2.0}),
              SamplingParams(temperature=0, allowed_token_ids=[5, 6, 7], max_tokens=4, prompt_logprobs=2)]
    outputs = llm.generate(random_prompts(2), params, use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 12 and len(outputs[0].outputs[0].logprobs) == 12
    assert set(outputs[1].outputs[0].token_ids) <= {5, 6, 7}
    again = llm.generate(random_prompts(2)[:1], params[:1], use_tqdm=False)
    assert again[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids  # seeded
