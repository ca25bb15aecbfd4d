"""Speculative decoding: prompt-lookup drafts, the draft-length policy, and outputs unchanged by it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.engine.speculation import MAX_DRAFT, DraftPolicy, propose


def test_propose_continues_the_latest_earlier_occurrence() -> None:
    assert propose([5, 6, 7, 8, 1, 5, 6, 7, 9, 5, 6, 7], 3) == [9, 5, 6]  # the latest of two matches
    assert propose([1, 2, 3, 4, 2, 3], 5) == [4, 2, 3]  # up to the end of the sequence
    assert propose([1, 2, 3, 9, 3], 2) == [9, 3]  # a shorter n-gram when the longer has no match
    assert propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert propose([7, 7, 7, 7], 2) == [7]  # overlapping occurrences
    assert propose([1, 2, 1, 2], 0) == []
    # Token ids whose bytes match across token boundaries are not matches.
    assert propose([0x10000, 0, 5, 1], 2) == []  # 1's bytes straddle 0x10000 and 0


def test_draft_length_follows_cost_and_acceptance() -> None:
    policy = DraftPolicy()
    for _ in range(20):  # a step costs 10 ms + 1 ms per token: ten tokens per read of the weights
        for tokens in (1, 4, 16, 64):
            policy.observe_step(tokens, 0.010 + 0.001 * tokens)
    assert abs(policy.tokens_per_weight_read() - 10) < 1e-6
    for _ in range(200):
        policy.observe_drafts(8, 7)
    assert policy.draft_length(1) >= 4  # memory-bound and mostly accepted: draft many
    for i in range(200):  # half the first drafts kept, and then whole spans (a copy goes on)
        policy.observe_drafts(8, 8 * (i % 2))
    assert policy.acceptance(0) == pytest.approx(0.5, abs=0.05) and policy.acceptance(5) > 0.95
    assert policy.draft_length(1) >= 4
    assert policy.draft_length(64) == 0  # compute-bound: drafts cost more than they save
    for _ in range(300):
        policy.observe_drafts(8, 0)
    assert policy.draft_length(1) == 0  # never accepted: stop drafting
    assert DraftPolicy().draft_length(1) in range(1, MAX_DRAFT + 1)  # priors before any step


def generate(folder: str | None, prompts: list, params: SamplingParams, **engine: object) -> tuple[list, LLM]:
    llm = LLM(folder, **engine)
    outputs = llm.chat(prompts, params, use_tqdm=False) if isinstance(prompts[0], list) and \
        isinstance(prompts[0][0], dict) else llm.generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outputs], llm


COPY_TEXT = ("Invoice 4471 from Larkspur Supplies, dated 12 March 2024, lists twelve oak chairs at 85 euros each, "
             "two walnut tables at 640 euros each and delivery to 9 Quay Street, Galway, for 40 euros.")


def test_greedy_smollm2_outputs_are_unchanged_and_drafts_are_kept() -> None:
    prompts = [[{"role": "user", "content": f"Copy this text exactly: {COPY_TEXT}"}],
               [{"role": "user", "content": f"Extract the address from: {COPY_TEXT}"}],
               [{"role": "user", "content": f"Rewrite in plain words: {COPY_TEXT}"}]]
    params = SamplingParams(temperature=0, max_tokens=48)
    plain, _ = generate(None, prompts, params, speculative="off", max_num_seqs=4)
    drafted, llm = generate(None, prompts, params, max_num_seqs=4)
    assert drafted == plain
    stats = llm.engine.stats
    assert stats.accepted_draft_tokens > 10 and stats.draft_tokens > stats.accepted_draft_tokens
    assert stats.generated_tokens == sum(len(t[0]) for t in drafted)


def random_prompts(count: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(4, 40))] for _ in range(count)]


@pytest.mark.parametrize("setting", ["plain", "chunks_of_8", "tiny_kv_pool", "n_and_seed", "off_per_request"])
def test_tiny_models_give_the_same_tokens_with_and_without_drafts(setting: str,
                                                                   tiny_models: dict[str, Path]) -> None:
    """Prompt chunks cut drafts by the budget; preemption drops them; n > 1 samples and seeded
    sampling (each token's noise from its own position) give the very same tokens."""
    folder = str(tiny_models["qwen2-window" if setting == "chunks_of_8" else "llama"])
    prompts = random_prompts(6)
    # Eight allowed tokens: a random model's outputs repeat, so prompt lookup finds drafts.
    few = {"max_tokens": 40, "ignore_eos": True, "allowed_token_ids": list(range(20, 28))}
    params = SamplingParams(temperature=0, **few)
    engine: dict[str, object] = {"dtype": "float32", "kv_cache_memory": 1 << 26, "max_num_seqs": 2}
    if setting == "chunks_of_8":
        engine["max_num_batched_tokens"] = 8
    if setting == "tiny_kv_pool":
        engine["kv_cache_memory"] = 7 * 2 * 2 * 2 * 16 * 16 * 4  # seven blocks: sequences are preempted
    if setting == "n_and_seed":
        params = SamplingParams(temperature=0.8, n=3, seed=7, **few)
    if setting == "off_per_request":
        params = SamplingParams(temperature=0, speculative=False, **few)
    plain, _ = generate(folder, prompts, params, speculative="off", **engine)
    drafted, llm = generate(folder, prompts, params, **engine)
    assert drafted == plain
    stats = llm.engine.stats
    if setting == "off_per_request":
        assert stats.draft_tokens == 0
    else:
        assert stats.accepted_draft_tokens > 0
    if setting == "tiny_kv_pool":
        assert llm.engine.scheduler.num_preemptions > 0


def test_sampled_tokens_keep_the_models_distribution(tiny_models: dict[str, Path]) -> None:
    """Unseeded sampling at temperature 1 over three allowed tokens, one sequence at a time: the
    joint distribution of the three generated tokens (the third verified against a draft whenever
    the second had one) matches the model's own, computed by transformers, within sampling error."""
    folder = tiny_models["llama"]
    allowed = [11, 12, 13]
    prompt = [5, 11, 12, 13, 11, 13, 12, 12, 11, 11, 13, 13, 12, 11]  # every pair of allowed tokens occurs
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def probs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([tokens])).logits[0, -1, allowed].softmax(-1)

    joint = torch.zeros(27)
    for i, a in enumerate(allowed):
        for j, b in enumerate(allowed):
            joint[9 * i + 3 * j:9 * i + 3 * j + 3] = probs(prompt)[i] * probs(prompt + [a])[j] * probs(prompt + [a, b])
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=1 << 26, max_num_seqs=1)
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, allowed_token_ids=allowed)
    samples = 600
    counts = torch.zeros(27)
    for output in llm.generate([prompt] * samples, params, use_tqdm=False):
        a, b, c = (allowed.index(t) for t in output.outputs[0].token_ids)
        counts[9 * a + 3 * b + c] += 1
    stats = llm.engine.stats
    assert stats.draft_tokens > samples / 2 and 0 < stats.accepted_draft_tokens < stats.draft_tokens
    expected = joint * samples
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 54.1  # chi-square, 26 degrees of freedom, p = 0.0005
