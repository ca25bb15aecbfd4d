"""Speculative decoding: prompt-lookup drafts, the draft-length policy, and outputs unchanged by it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.engine.speculation import (
    MATCH_CLASS_STARTS,
    MAX_DRAFT,
    PROBE_INTERVAL,
    STEPS_REMEMBERED,
    STEPS_TO_TRUST,
    Draft,
    DraftPolicy,
    propose,
)

# The match classes drafts of the shortest and of the longest matches are in.
SHORT, LONG = 1, len(MATCH_CLASS_STARTS)


def test_propose_continues_the_latest_earlier_occurrence() -> None:
    assert propose([5, 6, 7, 8, 1, 5, 6, 7, 9, 5, 6, 7], 3) == ([9, 5, 6], 3)  # the latest of two matches
    assert propose([1, 2, 3, 4, 2, 3], 5) == ([4, 2, 3], 2)  # up to the end of the sequence
    assert propose([1, 2, 3, 9, 3], 2) == ([9, 3], 1)  # a shorter n-gram when the longer has no match
    # The longest n-gram first (5 tokens: the class of 4-7).
    assert propose([1, 2, 3, 4, 5, 9, 2, 3, 4, 5, 8, 1, 2, 3, 4, 5], 2) == ([9, 2], 4)
    assert propose([1, 2, 3, 4], 4) == ([], 0)  # nothing repeats
    assert propose([7, 7, 7, 7], 2) == ([7], 3)  # overlapping occurrences
    assert propose([1, 2, 1, 2], 0) == ([], 0)
    # Token ids whose bytes match across token boundaries are not matches.
    assert propose([0x10000, 0, 5, 1], 2) == ([], 0)  # 1's bytes straddle 0x10000 and 0


def test_propose_takes_the_occurrence_matching_furthest_back() -> None:
    """Of the 5-gram's occurrences, the one whose match with the sequence's end goes on longest (the line being
    copied, not a phrase that recurs), its class that length's: 8 tokens the class of 8-15; 32 or more the last."""
    phrase = [10, 11, 12, 13, 14]
    line = [20, 21, 22, *phrase]
    assert propose([*line, 1, 30, *phrase, 2, *line], 2) == ([1, 30], 5)
    assert propose([*line, 1, 30, *phrase, 2, 40, *phrase], 2) == ([2, 40], 4)  # equally long: the latest
    assert propose([*range(40), 99, *range(40)], 1) == ([99], LONG)


# Fastest decode steps of SmolLM2 by token count (ms): the first extra tokens cost ~2.5 ms each, the
# next ones ~0.8 ms, then ~0.9 ms once compute-bound.
STEP_MS = {1: 10.0, 2: 12.5, 4: 17.6, 8: 20.8, 16: 27.0, 36: 42.0, 64: 60.0, 128: 120.0}


def measured_policy() -> DraftPolicy:
    policy = DraftPolicy()
    for _ in range(3):
        for tokens, ms in STEP_MS.items():
            policy.observe_step(tokens, ms / 1e3 * random.uniform(1, 1.5))  # noise only slows steps
            policy.observe_step(tokens, ms / 1e3)
    return policy


def test_step_cost_is_the_fastest_of_each_counts_recent_steps() -> None:
    # A quiet machine's hundreds of plain decode steps must not outweigh a busy machine's few verifications.
    policy = DraftPolicy()
    for _ in range(200):
        policy.observe_step(4, 0.010)
    for tokens in (4, 12):
        for _ in range(STEPS_REMEMBERED):
            policy.observe_step(tokens, 0.020 if tokens == 4 else 0.030)
    assert policy.step_cost(4) == pytest.approx(0.020) and policy.step_cost(12) == pytest.approx(0.030)


def test_step_cost_interpolates_the_fastest_steps_and_is_monotone() -> None:
    policy = DraftPolicy()
    assert policy.step_cost(8) / policy.step_cost(0) == 2  # the prior before any step: 8 tokens per weight read
    for tokens, ms in ((1, 10.0), (4, 17.6), (8, 20.8), (8, 30.0), (6, 25.0)) * STEPS_TO_TRUST:
        policy.observe_step(tokens, ms / 1e3)
    for _ in range(STEPS_TO_TRUST - 1):
        policy.observe_step(2, 0.5)  # a new size's first steps are slow: not trusted yet
    assert policy.step_cost(1) == pytest.approx(0.0100) and policy.step_cost(8) == pytest.approx(0.0208)
    assert policy.step_cost(2) == pytest.approx(0.0100 + 0.0076 / 3)  # between measured counts: interpolated
    assert policy.step_cost(6) == pytest.approx(0.0208) == policy.step_cost(7)  # never above a larger step's
    assert policy.step_cost(16) == pytest.approx(0.0208 * 24 / 16)  # beyond: the prior's slope from the last


def drafts(*lengths: int, match_class: int = LONG) -> list[Draft]:
    return [Draft([0] * length, match_class) for length in lengths]


def test_draft_lengths_follow_cost_and_acceptance() -> None:
    assert DraftPolicy().draft_lengths(1, drafts(8)) == [8]  # optimistic later positions: long drafts tried first
    assert DraftPolicy().draft_lengths(2, drafts(3, 0)) == [3, 0]  # no more than a sequence has
    policy = measured_policy()
    for i in range(200):  # 70% of the first drafts kept, and then whole spans (a copy goes on)
        policy.observe_drafts(LONG, 8, 8 * (i % 10 < 7))
    assert policy.draft_lengths(4, drafts(8, 8, 8, 8)) == [8] * 4  # memory-bound, accepted: draft many
    assert not policy.may_draft(64) and policy.draft_lengths(64, drafts(*[8] * 64)) == [0] * 64  # compute-bound
    for i in range(200):  # half the first drafts kept
        policy.observe_drafts(LONG, 8, 8 * (i % 2))
    assert policy.acceptance(LONG, 0) == pytest.approx(0.5, abs=0.05) and policy.acceptance(LONG, 5) > 0.95
    assert policy.draft_lengths(1, drafts(8)) == [8]
    assert verifications_until_no_drafts(policy, [LONG]) <= 80  # after 400 at 0.5, none kept any more
    assert policy.draft_lengths(4, drafts(8, 8, 8, 8)) == [0] * 4
    # Nothing to copy from the start: every match class's drafts stop soon.
    policy = measured_policy()
    classes = list(range(SHORT, LONG + 1))
    assert verifications_until_no_drafts(policy, classes) <= 8 * len(classes)
    assert not policy.may_draft(1)


def test_acceptance_is_measured_per_match_class() -> None:
    """Short matches are wrong far more often than long ones: each class's drafts are priced by its own record."""
    policy = measured_policy()
    for i in range(100):
        policy.observe_drafts(LONG, 8, 8 * (i % 10 < 7))
        policy.observe_drafts(SHORT, 8, 0)
    assert policy.acceptance(SHORT, 0) < 0.05 < 0.65 < policy.acceptance(LONG, 0)
    mixed = [Draft([0] * 8, LONG), Draft([0] * 8, SHORT), Draft([0] * 8, LONG)]
    assert policy.draft_lengths(3, mixed) == [8, 0, 8]
    assert policy.may_draft(3)


def test_drafts_judged_useless_are_tried_again_later() -> None:
    """A job whose first lines had nothing to copy drafts again for its later lines: after PROBE_INTERVAL steps
    without drafts, the likeliest are verified anyway (a probe), and drafting goes on once they are kept."""
    policy = measured_policy()
    verifications_until_no_drafts(policy, list(range(SHORT, LONG + 1)))
    probes = []
    for step in range(4 * PROBE_INTERVAL):  # nothing to copy still: a probe every PROBE_INTERVAL steps
        policy.observe_step(1, STEP_MS[1] / 1e3)
        if policy.may_draft(1) and (probe := policy.draft_lengths(1, drafts(8))[0]):
            probes.append(step)
            policy.observe_drafts(LONG, probe, 0)
    assert probes == [PROBE_INTERVAL * i - 1 for i in range(1, 5)]
    drafted = []
    for _ in range(4 * PROBE_INTERVAL):  # the lines copy now: each probe's drafts are kept, until drafting pays
        policy.observe_step(1, STEP_MS[1] / 1e3)
        drafted.append(policy.draft_lengths(1, drafts(8))[0] if policy.may_draft(1) else 0)
        if drafted[-1]:
            policy.observe_drafts(LONG, drafted[-1], drafted[-1])
    assert drafted[-PROBE_INTERVAL:] == [8] * PROBE_INTERVAL


def verifications_until_no_drafts(policy: DraftPolicy, classes: list[int]) -> int:
    """Verifications of drafts (of these match classes in turn) of which none is kept until the policy drafts none
    of them at B = 1."""
    verifications = 0
    while any(policy.draft_lengths(1, drafts(8, match_class=c)) != [0] for c in classes):
        match_class = classes[verifications % len(classes)]
        policy.observe_drafts(match_class, policy.draft_lengths(1, drafts(8, match_class=match_class))[0], 0)
        verifications += 1
    return verifications


def test_draft_lengths_take_the_likeliest_drafts_up_to_the_best_total() -> None:
    """Against every total checked by brute force: the drafts taken are the likeliest to be kept, and
    their total maximises expected tokens per second (candidates pruned as _best_total's NOTE says)."""
    rng = random.Random(5)
    for _ in range(300):
        policy = DraftPolicy()
        for tokens in rng.sample(range(1, 80), rng.randint(0, 8)):
            for _ in range(STEPS_TO_TRUST):
                policy.observe_step(tokens, (10 + 2 * tokens ** rng.uniform(0.5, 1.1)) / 1e3)
        for _ in range(rng.randint(0, 30)):
            policy.observe_drafts(rng.randint(SHORT, LONG), 8, rng.choice([0, 1, 2, 8]))
        proposed = [Draft([0] * rng.randint(0, MAX_DRAFT), rng.randint(SHORT, LONG))
                    for _ in range(rng.randint(1, 6))]
        lengths = policy.draft_lengths(len(proposed), proposed)
        assert all(0 <= n <= len(d.tokens) for n, d in zip(lengths, proposed))
        chances = [([1.0, *policy.chances(d.match_class)], n, len(d.tokens)) for d, n in zip(proposed, lengths)]
        taken = [c[i] for c, n, _ in chances for i in range(1, n + 1)]
        left = [c[i] for c, n, a in chances for i in range(n + 1, a + 1)]
        assert not taken or not left or min(taken) >= max(left)  # the likeliest drafts first
        gains = sorted(taken + left, reverse=True)
        rates = [(len(proposed) + sum(gains[:total])) / policy.step_cost(len(proposed) + total)
                 for total in range(len(gains) + 1)]
        assert rates[sum(lengths)] == pytest.approx(max(rates))


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
    plain, plain_llm = generate(None, prompts, params, speculative="off", max_num_seqs=4)
    drafted, llm = generate(None, prompts, params, max_num_seqs=4)
    assert drafted == plain
    stats = llm.engine.stats
    assert stats.accepted_draft_tokens > 10 and stats.draft_tokens > stats.accepted_draft_tokens
    assert stats.generated_tokens == sum(len(t[0]) for t in drafted)
    # Every token but each prompt's first and those decoded in the step that took the last prompt (chunked
    # prefill: the prompts need two steps here) comes from a step that only decoded.
    plain_stats = plain_llm.engine.stats
    assert plain_stats.generated_tokens - 3 - 2 == plain_stats.decode_tokens and plain_stats.decode_seconds > 0
    assert stats.generated_tokens - 3 - 2 >= stats.decode_tokens > stats.generated_tokens / 2


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
    # NOTE: every step priced alike, so that drafts always pay: the draft-length policy reads step
    # times, and on a loaded machine it may find drafting too dear; it is not what this test checks.
    llm.engine.drafts.step_cost = lambda tokens: 1.0
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
