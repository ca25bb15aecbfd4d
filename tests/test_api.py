"""The Python API: input forms, lazy consumption, per-prompt parameters, output order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenmill import LLM, RequestOutput, SamplingParams


def test_lazy_iterable_in_order_with_bounded_flight(tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models["qwen2"]), dtype="float32", kv_cache_memory=1 << 26, max_num_seqs=4)
    peak = 0

    def prompts() -> Iterator[list[int]]:
        nonlocal peak
        for i in range(100):
            peak = max(peak, len(llm.engine.requests))
            yield [100 + i, 200 + i % 7, 300]

    outputs = llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert [o.prompt_token_ids[0] for o in outputs] == [100 + i for i in range(100)]
    assert peak <= 2 * 4  # the window, not the input's length
    assert not llm.engine.requests and not llm.engine.scheduler.has_work()
    # Same prompt, same output, whatever else was in the batch.
    again = llm.generate([[100, 200, 300]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                         use_tqdm=False)
    assert again[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids


def test_one_sampling_params_per_prompt(tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in (1, 5, 9)]
    outputs = llm.generate(["a", "b", {"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 5, 9]
    assert outputs[0].prompt == "a" and outputs[2].prompt_token_ids == [5, 6, 7]


def test_default_model_chat(smol_llm: LLM) -> None:
    default = LLM(kv_cache_memory=1 << 28, dtype="float32")
    assert default.engine.model_path == smol_llm.engine.model_path
    conversation = [{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "What colour is the sky on a clear day?"}]
    single = default.chat(conversation, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    batch = default.chat([conversation, conversation], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert isinstance(single[0], RequestOutput) and len(batch) == 2
    assert single[0].prompt.startswith("<|im_start|>system\nAnswer in one word.")
    assert batch[0].outputs[0].text == batch[1].outputs[0].text == single[0].outputs[0].text
    assert batch[1].num_cached_tokens > 0  # the second conversation reuses the first's blocks


def test_lazy_prompts_and_a_params_list_of_another_length(tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26)
    two = [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2)]
    with pytest.raises(ValueError, match="more prompts"):
        llm.generate(iter([[5], [6], [7]]), two, use_tqdm=False)
    with pytest.raises(ValueError, match="more sampling_params"):
        llm.generate(iter([[5]]), two, use_tqdm=False)
    assert not llm.engine.requests and llm.engine.kv.pool.num_free == llm.engine.kv.pool.num_blocks


def test_a_failed_step_leaves_no_uncomputed_block_in_the_prefix_cache(tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26)
    prompt = list(range(100, 140))
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    fresh = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26)
    forward = fresh.engine.runner.model.forward

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    fresh.engine.runner.model.forward = interrupted  # e.g. Ctrl-C during a long prefill
    with pytest.raises(KeyboardInterrupt):
        fresh.generate([prompt], params, use_tqdm=False)
    fresh.engine.runner.model.forward = forward
    assert fresh.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_generate_inside_a_prompt_iterator_is_a_clear_error(tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26)

    def prompts() -> Iterator[list[int]]:
        yield [5, 6]
        llm.generate([[7, 8]], use_tqdm=False)
        yield [9]

    with pytest.raises(RuntimeError, match="cannot run inside another call"):
        llm.generate(prompts(), use_tqdm=False)
    assert len(llm.generate([[7, 8]], SamplingParams(max_tokens=2), use_tqdm=False)) == 1
