"""Greedy output equals transformers' generate token for token, fp32."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCHS, hf_greedy
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.models import llama

GREEDY = SamplingParams(temperature=0, max_tokens=24)

QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Give me a name for a black cat.",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Classify the sentiment of this review: 'The battery died after two days and support never answered.'",
    "Extract the city from: 'Our office moved from Berlin to Lisbon last spring.'",
    "Why do we have leap years?",
    "Suggest a title for a blog post about home gardening for beginners who live in small apartments.",
    "What does CPU stand for?",
    "Write one sentence that uses the word 'serendipity'.",
    "Tell me a fun fact about octopuses, then a second one about dolphins, and keep both short.",
]


def test_smollm2_chat_matches_transformers(smol_llm: LLM, smol_hf: torch.nn.Module) -> None:
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outputs = smol_llm.chat(conversations, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert len({len(o.prompt_token_ids) for o in outputs}) > 8  # really different lengths
    for output in outputs:
        completion = output.outputs[0]
        expected = hf_greedy(smol_hf, output.prompt_token_ids, 32)
        if completion.finish_reason == "stop":  # EOS: transformers stops there too
            expected = expected[:len(completion.token_ids)]
        assert completion.token_ids == expected, output.prompt
        assert completion.text == smol_llm.get_tokenizer().decode(completion.token_ids, skip_special_tokens=True)


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 70))] for _ in range(count)]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_match_transformers(arch: str, tiny_models: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama, "ROPE_ROWS_AT_START", 16)  # the rope tables grow (twice) while these prompts run
    folder = tiny_models[arch]
    prompts = random_prompts(8)
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=1 << 26)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 20)
        assert output.outputs[0].finish_reason == "length"


def shared_prefix_prompts() -> list[list[int]]:
    """Prompts that share long prefixes, so that the prefix cache has something to find."""
    rng = random.Random(1)
    systems = [[rng.randrange(3, 49152) for _ in range(40)] for _ in range(2)]
    return [systems[i % 2] + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 30))] for i in range(12)]


@pytest.mark.parametrize("arch", ["llama", "qwen2-window", "qwen3-moe", "phi3-longrope", "gemma3"])
@pytest.mark.parametrize("setting", ["no_prefix_cache", "chunks_of_8", "tiny_kv_pool"])
def test_same_outputs_under_cache_chunking_and_preemption(setting: str, arch: str,
                                                          tiny_models: dict[str, Path]) -> None:
    """qwen2-window: a windowed layer (16 tokens) under the same, its window cut across chunks and
    cached blocks; phi3-longrope: keys cached in its partial rotary's order, every layer windowed."""
    folder = str(tiny_models[arch])
    prompts = shared_prefix_prompts()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference_llm = LLM(folder, dtype="float32", kv_cache_memory=1 << 26)
    reference = [o.outputs[0].token_ids for o in reference_llm.generate(prompts, params, use_tqdm=False)]
    assert reference_llm.engine.stats.cached_prompt_tokens > 0  # prefix caching did its part

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert reference[:3] == [hf_greedy(hf, p, 24) for p in prompts[:3]]

    if setting == "no_prefix_cache":
        llm = LLM(folder, dtype="float32", kv_cache_memory=1 << 26, enable_prefix_caching=False)
    elif setting == "chunks_of_8":
        llm = LLM(folder, dtype="float32", kv_cache_memory=1 << 26, max_num_batched_tokens=8)
    else:
        # Room for about two sequences: the others must wait or be preempted and recomputed.
        block_bytes = 2 * 2 * 2 * 16 * 16 * 4  # layers * K/V * kv heads * head dim * block size * fp32
        llm = LLM(folder, dtype="float32", kv_cache_memory=12 * block_bytes)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    if setting == "no_prefix_cache":
        assert llm.engine.stats.cached_prompt_tokens == 0
    if setting == "chunks_of_8":
        assert llm.engine.stats.steps > sum(len(p) for p in prompts) // 8
    if setting == "tiny_kv_pool":
        assert llm.engine.kv.pool.num_blocks == 12
        assert llm.engine.scheduler.num_preemptions > 0


def test_prompt_logprobs_survive_chunking_and_preemption(tiny_models: dict[str, Path]) -> None:
    rng = random.Random(1)
    short, long = [rng.randrange(3, 1000) for _ in range(5)], [rng.randrange(3, 1000) for _ in range(40)]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)]
    folder = str(tiny_models["llama"])
    roomy = LLM(folder, dtype="float32", kv_cache_memory=1 << 22, max_num_batched_tokens=20)
    tight = LLM(folder, dtype="float32", kv_cache_memory=3 * 8192, max_num_batched_tokens=20)  # 3 blocks
    expected, actual = (llm.generate([short, long], params, use_tqdm=False)[1] for llm in (roomy, tight))
    assert tight.engine.scheduler.num_preemptions > 0
    assert len(actual.prompt_logprobs) == len(long)
    for want, got, token in zip(expected.prompt_logprobs[1:], actual.prompt_logprobs[1:], long[1:]):
        assert list(got) == [token] and got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4)
    assert actual.outputs[0].token_ids == expected.outputs[0].token_ids
