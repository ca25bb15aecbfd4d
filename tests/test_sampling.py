"""Sampling settings, stop conditions, n > 1 and logprobs, on the real model."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.engine.sampler import first_argmax

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def texts(llm: LLM, params: SamplingParams, conversation: list[dict] = CHAT) -> list[str]:
    return [c.text for c in llm.chat(conversation, params, use_tqdm=False)[0].outputs]


def test_seeded_sampling_is_reproducible(smol_llm: LLM) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234)
    first, second = texts(smol_llm, params), texts(smol_llm, params)
    assert first == second
    other = texts(smol_llm, SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=99))
    assert other != first


def test_n_samples_share_one_prompt_computation(smol_llm: LLM) -> None:
    engine = smol_llm.engine
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    before, drafts_before = engine.stats.computed_tokens, engine.stats.draft_tokens
    output = smol_llm.chat(CHAT, params, use_tqdm=False)[0]
    computed = engine.stats.computed_tokens - before - (engine.stats.draft_tokens - drafts_before)
    prompt_len = len(output.prompt_token_ids)
    uncached = prompt_len - output.num_cached_tokens
    # The prompt once; each later sample finds it in the prefix cache but for the block holding its
    # last token; then each of the 4 samples feeds back all but its last token (besides drafts).
    tail = prompt_len - (prompt_len - 1) // 16 * 16
    assert computed == uncached + 3 * tail + 4 * (12 - 1)
    samples = [c.text for c in output.outputs]
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    assert len(set(samples)) == 4
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in output.outputs)
    assert texts(smol_llm, params) == samples


def test_filters_that_leave_one_token_equal_greedy(smol_llm: LLM) -> None:
    greedy = texts(smol_llm, SamplingParams(temperature=0, max_tokens=20))
    for params in (SamplingParams(temperature=1.0, top_k=1, max_tokens=20, seed=3),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=20, seed=3),
                   SamplingParams(temperature=1.0, min_p=1.0, max_tokens=20, seed=3)):
        assert texts(smol_llm, params) == greedy, params


def test_penalties_change_output_and_stop_repetition(smol_llm: LLM) -> None:
    prompt = "one one one one one one one one"
    plain = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
    assert len(set(plain.token_ids)) < 8  # the model loops
    for params in (SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=2.0),
                   SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=2.0),
                   SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=3.0)):
        penalised = smol_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert penalised.token_ids != plain.token_ids, params
        assert len(set(penalised.token_ids)) > len(set(plain.token_ids)), params


def test_stop_strings_cut_the_text(smol_llm: LLM) -> None:
    full = smol_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    words = full.text.split()
    stop = words[len(words) // 2]
    cut = smol_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "zzzz"]),
                        use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]
    assert stop not in cut.text
    kept = smol_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=40, stop=stop,
                                              include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == cut.text + stop


def test_stop_token_ids_min_tokens_and_eos(smol_llm: LLM) -> None:
    short = [{"role": "user", "content": "What is 1 plus 1?"}]
    natural = smol_llm.chat(short, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in smol_llm.engine.eos_token_ids
    assert len(natural.token_ids) < 64
    longer = smol_llm.chat(short, SamplingParams(temperature=0, max_tokens=64, min_tokens=len(natural.token_ids) + 5),
                           use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= len(natural.token_ids) + 5
    stop_id = natural.token_ids[1]
    cut = smol_llm.chat(short, SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[stop_id]),
                        use_tqdm=False)[0].outputs[0]
    assert cut.token_ids == natural.token_ids[:2] and cut.stop_reason == stop_id


def test_logprobs_match_transformers(smol_llm: LLM, smol_hf: torch.nn.Module) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    output = smol_llm.generate("The capital of France is", params, use_tqdm=False)[0]
    completion = output.outputs[0]
    ids = output.prompt_token_ids + completion.token_ids
    with torch.no_grad():
        expected = smol_hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    n_prompt = len(output.prompt_token_ids)
    assert len(completion.logprobs) == len(completion.token_ids)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(float(expected[n_prompt - 1 + step, token_id]), abs=1e-3)
        assert entry[token].decoded_token == smol_llm.get_tokenizer().decode([token])
    assert output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == n_prompt
    for position in range(1, n_prompt):
        entry = output.prompt_logprobs[position]
        actual = output.prompt_token_ids[position]
        assert entry[actual].logprob == pytest.approx(float(expected[position - 1, actual]), abs=1e-3)
        assert entry[actual].rank == int((expected[position - 1] > expected[position - 1, actual]).sum()) + 1


def test_stop_token_text_is_left_out_unless_asked(smol_llm: LLM) -> None:
    short = [{"role": "user", "content": "What is 1 plus 1?"}]
    natural = smol_llm.chat(short, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    tokenizer = smol_llm.get_tokenizer()
    stop_id = natural.token_ids[2]
    for include in (False, True):
        cut = smol_llm.chat(short, SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[stop_id],
                                                  include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
        kept = natural.token_ids[:3] if include else natural.token_ids[:2]
        assert cut.text == tokenizer.decode(kept, skip_special_tokens=True)


def test_too_many_logprobs_fail_the_request_alone(smol_llm: LLM) -> None:
    outputs = smol_llm.generate(["a", "b"], [SamplingParams(max_tokens=2, logprobs=50), SamplingParams(max_tokens=2)],
                                use_tqdm=False)
    assert (outputs[0].error.param, outputs[0].error.message) == ("logprobs", "logprobs must be <= 20")
    assert outputs[1].error is None and len(outputs[1].outputs[0].token_ids) == 2


@pytest.mark.parametrize("vocab", [100, 49152, 50001])
def test_first_argmax_matches_torch_argmax(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randint(0, 4, (6, vocab), generator=generator).float()  # many ties
    logits[1, -1] = 9.0  # the maximum in a short last chunk
    logits[2, 3] = logits[2, vocab // 2] = float("nan")
    logits[3] = float("-inf")
    logits[4, vocab // 3] = float("inf")
    assert torch.equal(first_argmax(logits), logits.argmax(dim=-1))
    random_logits = torch.randn(64, vocab, generator=generator)
    assert torch.equal(first_argmax(random_logits), random_logits.argmax(dim=-1))
