"""logit_bias, allowed_token_ids, bad_words, prompt-only requests (max_tokens 0) and
cumulative_logprob, on the real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill import LLM, SamplingParams

PROMPT = "The capital of France is"


def greedy(llm: LLM, prompts: list[str], **fields: object) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **fields)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_logit_bias_forces_or_bans_a_token_in_its_own_row(smol_llm: LLM) -> None:
    banana = smol_llm.get_tokenizer().encode(" banana")[0]
    [plain] = greedy(smol_llm, [PROMPT])
    assert banana not in plain
    forced = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={banana: 100}, logprobs=1)
    both = smol_llm.generate([PROMPT, PROMPT], [forced, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)],
                             use_tqdm=False)
    assert both[0].outputs[0].token_ids == [banana] * 8
    assert both[1].outputs[0].token_ids == plain  # the unbiased row, beside a biased one, as alone
    # Logprobs are the raw model's, as vLLM's: the forced token is not the model's own choice.
    first = both[0].outputs[0].logprobs[0]
    assert first[banana].rank > 1 and first[plain[0]].rank == 1
    [banned] = greedy(smol_llm, [PROMPT], logit_bias={plain[0]: -100})
    assert plain[0] not in banned and banned != plain


def test_allowed_token_ids_restrict_every_token(smol_llm: LLM) -> None:
    allowed = smol_llm.get_tokenizer().encode(" red green blue sky")
    params = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=5, ignore_eos=True, allowed_token_ids=allowed)
    outputs = smol_llm.generate([PROMPT], params, use_tqdm=False)[0].outputs
    assert all(set(o.token_ids) <= set(allowed) and len(o.token_ids) == 12 for o in outputs)
    assert len({tuple(o.token_ids) for o in outputs}) > 1  # sampled among them, not one forced token


def test_bad_words_never_appear(smol_llm: LLM) -> None:
    tokenizer = smol_llm.get_tokenizer()
    plain = tokenizer.decode(greedy(smol_llm, [PROMPT])[0])
    assert "Paris" in plain and "answer is" in plain  # ' Paris.\n\nThe answer is:'
    # "Paris" is one token mid-text (banned always); "answer is" two (" is" banned after " answer").
    cut = tokenizer.decode(greedy(smol_llm, [PROMPT], bad_words=["Paris", "answer is"])[0])
    assert "Paris" not in cut and "answer is" not in cut
    [one] = greedy(smol_llm, [PROMPT], bad_words=["answer is"])
    assert "Paris" in tokenizer.decode(one) and "answer is" not in tokenizer.decode(one)


def test_prompt_only_request_gives_prompt_logprobs_and_no_token(smol_llm: LLM, smol_hf: torch.nn.Module) -> None:
    engine = smol_llm.engine
    params = SamplingParams(max_tokens=0, prompt_logprobs=1, logprobs=1, n=2)
    output = smol_llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert output.finished and output.error is None
    assert [(c.token_ids, c.text, c.finish_reason, c.cumulative_logprob) for c in output.outputs] == \
        [([], "", "length", 0.0)] * 2
    ids = output.prompt_token_ids
    with torch.no_grad():
        expected = smol_hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(ids)
    for position in range(1, len(ids)):
        assert output.prompt_logprobs[position][ids[position]].logprob == \
            pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-3)
    assert not engine.requests and engine.kv.pool.num_free == engine.kv.pool.num_blocks


def test_prompt_only_request_may_fill_the_context(tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26, max_model_len=32)
    full = list(range(100, 132))
    outputs = llm.generate([full, full], [SamplingParams(max_tokens=0), SamplingParams(max_tokens=1)], use_tqdm=False)
    assert outputs[0].error is None and outputs[0].outputs[0].finish_reason == "length"
    assert outputs[1].error.code == "context_length_exceeded"  # one generated token would not fit


def test_cumulative_logprob_sums_the_chosen_logprobs(smol_llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=10, n=2, seed=11, logprobs=0)
    outputs = smol_llm.generate(PROMPT, params, use_tqdm=False)[0].outputs
    for completion in outputs:
        chosen = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs)]
        assert completion.cumulative_logprob == pytest.approx(sum(chosen), abs=1e-9) and completion.finished()
    assert outputs[0].cumulative_logprob != outputs[1].cumulative_logprob
    unasked = smol_llm.generate(PROMPT, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert unasked.cumulative_logprob is None and unasked.logprobs is None


@pytest.mark.parametrize(("fields", "name"), [
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ({"bad_words": ["ok", " "]}, "bad_words"),
    ({"bad_words": "word"}, "bad_words"),
    ({"max_tokens": 0, "min_tokens": 1}, "min_tokens"),
])
def test_invalid_fields_name_themselves(fields: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} "):
        SamplingParams(**fields)


def test_token_ids_outside_the_vocabulary_fail_the_request_alone(smol_llm: LLM) -> None:
    vocab = smol_llm.engine.vocab_size
    outputs = smol_llm.generate([PROMPT] * 3, [SamplingParams(max_tokens=2, logit_bias={vocab: 1.0}),
                                               SamplingParams(max_tokens=2, allowed_token_ids=[5, vocab + 7]),
                                               SamplingParams(max_tokens=2)], use_tqdm=False)
    assert [(o.error.code, o.error.param) for o in outputs[:2]] == \
        [("invalid_value", "logit_bias"), ("invalid_value", "allowed_token_ids")]
    assert outputs[2].error is None and len(outputs[2].outputs[0].token_ids) == 2
