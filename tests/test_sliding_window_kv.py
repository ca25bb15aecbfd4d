"""KV blocks out of every window's reach are given back: exact outputs, bounded blocks per sequence.

The tiny "mistral-window" model (every layer windowed, 16 tokens) generates far past its window in
small pools, checked against transformers' generate; after every engine step the pool's state is
checked against the sequences' block tables (reference counts, released entries, blocks held).
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_FILES, VOCAB, hf_greedy
from transformers import AutoModelForCausalLM, MistralConfig

from tokenmill import LLM, SamplingParams
from tokenmill.engine.engine import Engine
from tokenmill.engine.scheduler import ScheduledBatch, Scheduler
from tokenmill.engine.sequence import Request, Sequence
from tokenmill.kv.manager import RELEASED, KVCacheManager, attention_reach, cdiv
from tokenmill.outputs import RequestOutput

BLOCK_SIZE = 4
WINDOW = 16  # mistral-window's, in tests/conftest.py
# layers * K|V * kv heads * head_dim * block size * fp32
BLOCK_BYTES = 2 * 2 * 2 * 16 * BLOCK_SIZE * 4


def windowed_llm(tiny_models: dict[str, Path], num_blocks: int, **settings: object) -> LLM:
    return LLM(str(tiny_models["mistral-window"]), dtype="float32", block_size=BLOCK_SIZE,
               kv_cache_memory=num_blocks * BLOCK_BYTES, **settings)


def random_prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(low, high))] for _ in range(count)]


def check_pool(engine: Engine, placed: dict[Sequence, tuple[int, int]]) -> int:
    """Asserts that the pool matches the running sequences' block tables, and that those the step
    placed tokens for (`placed`: their computed tokens when scheduled, and the tokens placed, drafts
    included) gave back every block out of their reach and hold no more than the rest need; returns
    the most blocks one running sequence holds."""
    kv = engine.kv
    held: Counter[int] = Counter()
    most = 0
    for seq in engine.scheduler.running:
        table, released, computed = seq.block_table, seq.num_released_blocks, seq.num_computed_tokens
        assert len(table) >= cdiv(computed, kv.block_size)  # positions kept
        assert table[:released] == [RELEASED] * released
        if kv.reach is not None:  # only blocks before the next query's reach (it is at position `computed`)
            assert released <= max(0, computed - kv.reach + 1) // kv.block_size
        own = table[released:]
        held.update(own)
        most = max(most, len(own))
        if seq in placed:
            before, num_new = placed[seq]
            if kv.reach is not None:  # everything out of reach when scheduled was given back
                assert released == max(0, before - kv.reach + 1) // kv.block_size
            # NOTE: blocks placed for drafted tokens (engine/speculation.py) that were not kept stay in
            # the table for the next step: the tight bound holds where the table has none.
            if len(table) == cdiv(before + num_new, kv.block_size):
                assert len(own) <= kv.max_blocks_held(before + num_new, num_new)
    assert all(kv.pool.ref_counts[b] == n for b, n in held.items())  # samples sharing blocks included
    assert kv.pool.num_free == kv.pool.num_blocks - len(held)
    assert kv.usage == pytest.approx(len(held) / kv.pool.num_blocks)
    return most


def run_checked(llm: LLM, prompts: list[list[int]], params: SamplingParams,
                first: int = 0) -> tuple[list[RequestOutput], int, int]:
    """Runs the prompts on the engine step by step, checking the pool after each step. Returns the
    outputs, the most blocks one sequence held and the most sequences running at once."""
    engine = llm.engine
    scheduler = engine.scheduler
    for i, prompt in enumerate(prompts):
        assert engine.add_request(f"r{first + i}", None, prompt, params) is None
    placed: dict[Sequence, tuple[int, int]] = {}

    def schedule() -> ScheduledBatch:  # the real scheduler's batch, noted on its way to the runner
        batch = Scheduler.schedule(scheduler)
        placed.clear()
        placed.update((seq, (seq.num_computed_tokens, n)) for seq, n in zip(batch.seqs, batch.num_new_tokens))
        return batch

    scheduler.schedule = schedule  # type: ignore[method-assign]
    done: dict[str, RequestOutput] = {}
    most_blocks = most_running = 0
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step())
        most_blocks = max(most_blocks, check_pool(engine, placed))
        most_running = max(most_running, len(scheduler.running))
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks  # every block back at the end
    return [done[f"r{first + i}"] for i in range(len(prompts))], most_blocks, most_running


@pytest.fixture(scope="module")
def windowed_hf(tiny_models: dict[str, Path]) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_models["mistral-window"], dtype=torch.float32).eval()


def test_the_reach_is_the_largest_window_when_every_layer_has_one() -> None:
    assert attention_reach((16, 16)) == 16
    assert attention_reach((8, 32, 16)) == 32  # a block is out of reach only past the largest window
    assert attention_reach((None, 16)) is None
    assert attention_reach((None, None)) is None


def test_a_cached_prefix_out_of_reach_is_found_but_not_taken() -> None:
    kv = KVCacheManager(num_blocks=12, block_size=4, enable_prefix_caching=True, reach=6)
    first = Request("a", None, list(range(30)), SamplingParams(), 100).seqs[0]
    for chunk in (8, 8, 8, 6):  # computed in chunks, as the scheduler cuts a long prompt
        assert kv.allocate_slots(first, chunk)
        first.num_computed_tokens += chunk
    # 24 computed when the last chunk was placed: positions before 24 - 6 + 1 = 19 are out of reach.
    assert first.num_released_blocks == 19 // 4
    assert first.block_table[:4] == [RELEASED] * 4 and len(first.block_table) == 8
    assert kv.pool.num_free == 12 - 4
    second = Request("b", None, list(range(30)) + [7], SamplingParams(), 100).seqs[0]
    computed = kv.get_computed_blocks(second)
    assert len(computed) == 7  # the released blocks kept their hashes
    assert kv.allocate_slots(second, 3, computed)
    # 28 cached tokens: the blocks before 28 - 6 + 1 = 23 are not taken, the others are shared.
    assert second.num_released_blocks == 5 and second.block_table[:5] == [RELEASED] * 5
    assert [kv.pool.ref_counts[b] for b in computed] == [0, 0, 0, 0, 1, 2, 2]  # the fifth: first's only
    kv.free(first)
    kv.free(second)
    assert kv.pool.num_free == 12 and all(count == 0 for count in kv.pool.ref_counts)


def test_without_prefix_caching_released_blocks_are_reused_first() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False, reach=6)
    seq = Request("a", None, list(range(20)), SamplingParams(), 100).seqs[0]
    for chunk in (8, 8, 4):
        assert kv.allocate_slots(seq, chunk)
        seq.num_computed_tokens += chunk
    # At 16 computed, blocks 0 and 1 went back to the front of the free queue (they hold nothing
    # findable), and the last chunk took one of them.
    assert seq.block_table == [RELEASED, RELEASED, 2, 3, 1]
    assert kv.allocate_slots(seq, 1)  # at 20 computed, block 2 goes back and is taken again at once
    assert seq.block_table == [RELEASED, RELEASED, RELEASED, 3, 1, 2]
    assert kv.pool.num_free == 8 - 3


def test_long_outputs_are_exact_in_a_pool_smaller_than_one_sequence(tiny_models: dict[str, Path],
                                                                    windowed_hf: torch.nn.Module) -> None:
    """Four sequences of ~250 tokens each run at once in 40 blocks (160 tokens)."""
    llm = windowed_llm(tiny_models, 40, max_num_batched_tokens=16, max_num_seqs=8)
    assert llm.engine.kv.reach == WINDOW
    prompts = random_prompts(4, 5, 60)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    outputs, most_blocks, most_running = run_checked(llm, prompts, params)
    for prompt, output in zip(prompts, outputs):
        assert output.error is None
        assert output.outputs[0].token_ids == hf_greedy(windowed_hf, prompt, 200)
    assert most_blocks <= llm.engine.kv.max_blocks_held(260, 16) < 40
    assert most_running == 4 and llm.engine.scheduler.num_preemptions == 0


@pytest.fixture(scope="module")
def head_dim_64_window(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """A windowed Mistral of head_dim 64: a shape the CPU kernel backend takes, where it runs."""
    folder = tmp_path_factory.mktemp("mistral-window-64")
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                           sliding_window=WINDOW, initializer_range=0.3, eos_token_id=2, bos_token_id=1,
                           pad_token_id=2)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smol_dir / name).exists():
            shutil.copy(smol_dir / name, folder / name)
    return folder


def test_long_outputs_are_exact_on_a_shape_the_kernels_take(head_dim_64_window: Path) -> None:
    """Backends may read a little before the window (the kernels from a multiple of 16 positions):
    released entries, read there, are masked. A pool of 3 sequences' reach, preempting."""
    block_bytes = 2 * 2 * 1 * 64 * BLOCK_SIZE * 4
    llm = LLM(str(head_dim_64_window), dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory=24 * block_bytes,
              max_num_batched_tokens=8, max_num_seqs=8)
    prompts = random_prompts(5, 5, 40, seed=4)
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    outputs, _, most_running = run_checked(llm, prompts, params)
    assert most_running > 1 and llm.engine.scheduler.num_preemptions > 0
    hf = AutoModelForCausalLM.from_pretrained(head_dim_64_window, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 120)


def test_a_long_shared_prefix_is_still_found_in_the_cache(tiny_models: dict[str, Path],
                                                          windowed_hf: torch.nn.Module) -> None:
    llm = windowed_llm(tiny_models, 64, max_num_batched_tokens=32, max_num_seqs=8)
    prefix = random_prompts(1, 48, 48, seed=1)[0]  # 12 blocks, three windows long
    prompts = [prefix + suffix for suffix in random_prompts(5, 3, 10, seed=2)]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    alone, most_blocks, _ = run_checked(llm, prompts[:1], params)
    assert most_blocks < len(prefix) // BLOCK_SIZE  # the prefix's first blocks were given back as it ran
    together, _, _ = run_checked(llm, prompts[1:], params, first=1)
    assert all(o.num_cached_tokens >= len(prefix) for o in together)
    for prompt, output in zip(prompts, alone + together):
        assert output.outputs[0].token_ids == hf_greedy(windowed_hf, prompt, 60)
    # n samples share the prompt's blocks in reach (reference counts checked at every step).
    samples, _, _ = run_checked(llm, [prompts[2]], SamplingParams(n=3, temperature=0, max_tokens=60, ignore_eos=True),
                                first=10)
    assert [c.token_ids for c in samples[0].outputs] == [together[1].outputs[0].token_ids] * 3


def test_preemption_in_a_tiny_pool_stays_exact(tiny_models: dict[str, Path], windowed_hf: torch.nn.Module) -> None:
    llm = windowed_llm(tiny_models, 14, max_num_batched_tokens=8, max_num_seqs=8)
    prompts = random_prompts(6, 20, 50, seed=3)
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    outputs, most_blocks, _ = run_checked(llm, prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert most_blocks <= llm.engine.kv.max_blocks_held(130, 8)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(windowed_hf, prompt, 80)


@pytest.mark.parametrize("arch", ["mistral", "qwen2-window"])  # no window; a full layer beside a windowed one
def test_a_model_with_a_full_attention_layer_keeps_every_block(arch: str, tiny_models: dict[str, Path]) -> None:
    llm = LLM(str(tiny_models[arch]), dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory=80 * BLOCK_BYTES,
              max_num_batched_tokens=16, max_num_seqs=8)
    assert llm.engine.kv.reach is None
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    outputs, most_blocks, _ = run_checked(llm, random_prompts(2, 30, 40), params)
    assert most_blocks == max(cdiv(len(o.prompt_token_ids) + 99, BLOCK_SIZE) for o in outputs)
    too_long = llm.engine.add_request("long", None, [5] * 100, SamplingParams(max_tokens=300))
    assert too_long is not None and too_long.error.code == "kv_cache_too_small"
