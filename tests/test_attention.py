"""Paged attention: the kernels, both backends' paths (decodes, shared prefixes, prompt chunks; full attention
and sliding windows) and dense attention all agree, and each machine and model gets the backend it should."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, hf_greedy
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams, kernels
from tokenmill.attention import (
    AttentionBackend,
    AttentionSpec,
    BatchLayout,
    CpuKernelAttentionBackend,
    TorchAttentionBackend,
    select_attention_backend,
)


def dense_reference(q: torch.Tensor, pool: torch.Tensor,
                    slots: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request, fp32 softmax attention of its query heads [heads, D] over the given slots: out, lse."""
    outs, lses = [], []
    group = q.shape[1] // pool.shape[2]
    for i, s in enumerate(slots):
        keys = pool[0][s].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, n, D]
        values = pool[1][s].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (keys @ q[i].float()[:, :, None])[..., 0] * q.shape[-1] ** -0.5  # [heads, n]
        outs.append((scores.softmax(-1)[:, None, :] @ values)[:, 0])
        lses.append(scores.logsumexp(-1))
    return torch.stack(outs), torch.stack(lses)


def random_paged_requests(lengths: list[int], block_size: int, kv_heads: int, head_dim: int,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool holding each request's context in randomly placed blocks: pool, context_slots [B, L], lengths."""
    blocks_per_request = [(n + block_size - 1) // block_size for n in lengths]
    placement = torch.randperm(sum(blocks_per_request) + 3).tolist()
    max_len = max(lengths)
    context_slots = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        blocks = torch.tensor([placement.pop() for _ in range(blocks_per_request[i])])
        pos = torch.arange(n)
        context_slots[i, :n] = blocks[pos // block_size] * block_size + pos % block_size
    pool = torch.randn(2, (sum(blocks_per_request) + 3) * block_size, kv_heads, head_dim).to(dtype)
    return pool, context_slots, torch.tensor(lengths)


needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no AVX-512 (or no compiler): the torch path is used")
decode_kernel = torch.ops.tokenmill.decode_attention if kernels.available() else None
chunk_kernel = torch.ops.tokenmill.chunk_attention if kernels.available() else None
NO_PREFIX = torch.zeros(0, dtype=torch.long)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"),
                         [(3, 3, 64), (2, 4, 128), (4, 1, 64), (1, 7, 64), (1, 4, 256), (2, 3, 256)])
def test_decode_kernel_equals_dense_attention(dtype: torch.dtype, kv_heads: int, group: int, head_dim: int) -> None:
    torch.manual_seed(0)
    lengths = [1, 15, 16, 17, 40, 300, 33]  # ragged: partial 16-token tiles, a single token, several blocks
    pool, context_slots, context_lens = random_paged_requests(lengths, 16, kv_heads, head_dim, dtype)
    q = torch.randn(len(lengths), kv_heads * group, head_dim).to(dtype)
    out = decode_kernel(q, pool[0], pool[1], context_slots, context_lens, NO_PREFIX)
    expected, _ = dense_reference(q, pool, [context_slots[i, :n] for i, n in enumerate(lengths)])
    assert out.dtype == dtype
    # bf16: the probabilities are rounded to bf16 for the weighted sum, as torch's fused CPU attention does.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@needs_kernel
def test_decode_kernel_scores_extreme_values_stably() -> None:
    """Large scores (a max-subtracted softmax) and a context of one repeated slot."""
    torch.manual_seed(0)
    pool, context_slots, context_lens = random_paged_requests([50, 7], 16, 3, 64, torch.float32)
    pool *= 30
    q = torch.randn(2, 9, 64) * 30
    context_slots[1, :7] = context_slots[1, 0]
    out = decode_kernel(q, pool[0], pool[1], context_slots, context_lens, NO_PREFIX)
    expected, _ = dense_reference(q, pool, [context_slots[0, :50], context_slots[1, :7]])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "kv_heads", "group", "head_dim", "prefix_len"),
                         [(64, 3, 3, 64, 512), (5, 2, 4, 128, 48), (3, 3, 3, 64, 16), (7, 4, 1, 64, 96),
                          (9, 1, 4, 256, 64)])
def test_shared_prefix_decodes_are_bitwise_the_same_as_unshared(dtype: torch.dtype, batch: int, kv_heads: int,
                                                                group: int, head_dim: int, prefix_len: int) -> None:
    """Requests sharing a prefix, its K/V read once for all: each one's output is, bit for bit, its output
    with its whole context read as its own, alone; and equals dense attention."""
    torch.manual_seed(0)
    pool = torch.randn(2, 4000, kv_heads, head_dim).to(dtype)
    slots = torch.randperm(4000)
    prefix_slots = slots[:prefix_len]
    suffix_lens = torch.randint(1, 40, (batch,))
    suffixes = list(slots[prefix_len:prefix_len + int(suffix_lens.sum())].split(suffix_lens.tolist()))
    padded = torch.nn.utils.rnn.pad_sequence(suffixes, batch_first=True)
    q = torch.randn(batch, kv_heads * group, head_dim).to(dtype)
    out = decode_kernel(q, pool[0], pool[1], padded, suffix_lens, prefix_slots)
    for i, suffix in enumerate(suffixes):
        whole = torch.cat((prefix_slots, suffix))[None]
        alone = decode_kernel(q[i:i + 1], pool[0], pool[1], whole, torch.tensor([len(whole[0])]), NO_PREFIX)
        assert torch.equal(out[i], alone[0])
    expected, _ = dense_reference(q, pool, [torch.cat((prefix_slots, s)) for s in suffixes])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@needs_kernel
def test_decode_kernel_refuses_a_prefix_off_its_tiles() -> None:
    pool, slots, lens = random_paged_requests([40, 40], 16, 3, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        decode_kernel(torch.randn(2, 9, 64).to(torch.bfloat16), pool[0], pool[1], slots, lens, slots[0, :10])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (2, 4, 128), (1, 4, 256)])
def test_prompt_chunks_are_bitwise_their_tokens_decoded_alone(dtype: torch.dtype, kv_heads: int, group: int,
                                                              head_dim: int) -> None:
    """A prompt's last 70 tokens as one chunk, as chunks of 23 and 47 tokens in one call, or beside another
    request's chunk: every query token's output is, bit for bit, that token decoded alone over its context;
    and equals dense causal attention."""
    torch.manual_seed(0)
    pool, slots, lens = random_paged_requests([300, 90], 16, kv_heads, head_dim, dtype)
    q = torch.randn(70 + 20, kv_heads * group, head_dim).to(dtype)
    prompt = slots[:1, :300].contiguous()
    one = chunk_kernel(q[:70].contiguous(), pool[0], pool[1], torch.tensor([0]), torch.tensor([70]), prompt,
                       torch.tensor([300]))
    split = chunk_kernel(q[:70].contiguous(), pool[0], pool[1], torch.tensor([0, 23]), torch.tensor([23, 47]),
                         slots[[0, 0], :300].contiguous(), torch.tensor([253, 300]))
    beside = chunk_kernel(q, pool[0], pool[1], torch.tensor([0, 70]), torch.tensor([70, 20]), slots,
                          torch.tensor([300, 90]))
    decoded = decode_kernel(q[:70].contiguous(), pool[0], pool[1], prompt.expand(70, -1).contiguous(),
                            torch.arange(231, 301), NO_PREFIX)
    assert torch.equal(one, split) and torch.equal(one, beside[:70]) and torch.equal(one, decoded)
    expected, _ = dense_reference(q[:70], pool, [slots[0, :n] for n in range(231, 301)])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(one.float(), expected, atol=tolerance, rtol=tolerance)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (2, 4, 128), (1, 4, 256)])
@pytest.mark.parametrize("window", [None, 20, 100])
def test_short_chunks_read_in_place_have_the_bits_of_a_long_one(dtype: torch.dtype, kv_heads: int, group: int,
                                                                head_dim: int, window: int | None) -> None:
    """Chunks of 1 to 9 tokens (drafts being verified), which the kernel attends in place up to 24 rows a KV head and
    packs above, several in one call and beside a long chunk: every query's output is, bit for bit, what one chunk
    of all 70 tokens gives."""
    torch.manual_seed(0)
    pool, slots, _ = random_paged_requests([300, 90], 16, kv_heads, head_dim, dtype)
    q = torch.randn(70 + 20, kv_heads * group, head_dim).to(dtype)
    one = chunk_kernel(q[:70].contiguous(), pool[0], pool[1], torch.tensor([0]), torch.tensor([70]),
                       slots[:1, :300].contiguous(), torch.tensor([300]), window)
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 6, 5, 4, 3]
    assert sum(sizes) == 70
    starts = torch.tensor([0, *sizes]).cumsum(0)
    pieces = chunk_kernel(q[:70].contiguous(), pool[0], pool[1], starts[:-1], torch.tensor(sizes),
                          slots[[0] * len(sizes), :300].contiguous(), 230 + starts[1:], window)
    assert torch.equal(one, pieces)
    beside = chunk_kernel(q, pool[0], pool[1], torch.tensor([0, 3, 70]), torch.tensor([3, 67, 20]),
                          slots[[0, 0, 1]].contiguous(), torch.tensor([233, 300, 90]), window)
    assert torch.equal(one, beside[:70])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (1, 4, 256)])
@pytest.mark.parametrize("window", [1, 20, 64, 100, 5000])
def test_windowed_kernels_equal_dense_attention(dtype: torch.dtype, kv_heads: int, group: int, head_dim: int,
                                                window: int) -> None:
    """Under a window W (off the 16-token tiles or on them, larger than every context), each query sees its
    W newest tokens: decodes over contexts from 1 to 40x W tokens, and a prompt chunk, given their whole
    contexts, against dense attention over those tokens alone."""
    torch.manual_seed(0)
    lengths = [1, 15, 17, 40, 300, 33, 800]
    pool, slots, lens = random_paged_requests(lengths, 16, kv_heads, dtype=dtype, head_dim=head_dim)
    q = torch.randn(len(lengths) + 70, kv_heads * group, head_dim).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    out = decode_kernel(q[:len(lengths)].contiguous(), pool[0], pool[1], slots, lens, NO_PREFIX, window)
    expected, _ = dense_reference(q, pool, [slots[i, max(0, n - window):n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    chunk = q[len(lengths):].contiguous()  # request 6's last 70 tokens
    out = chunk_kernel(chunk, pool[0], pool[1], torch.tensor([0]), torch.tensor([70]), slots[6:], lens[6:], window)
    expected, _ = dense_reference(chunk, pool, [slots[6, max(0, n - window):n] for n in range(731, 801)])
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("window", [1, 20, 48, 100, 1000])
def test_a_windowed_query_has_the_same_bits_however_it_is_computed(dtype: torch.dtype, head_dim: int,
                                                                   window: int) -> None:
    """A prompt's last 70 tokens under a window: as one chunk, as chunks of 23 and 47, beside another request,
    decoded one by one, and each with its context starting at any multiple of 16 at or below its window
    (the backend starts it at the one below its earliest query's): the same bits every time."""
    torch.manual_seed(0)
    kv_heads, group = 2, 3
    pool, slots, _ = random_paged_requests([300, 90], 16, kv_heads, head_dim, dtype)
    q = torch.randn(70 + 20, kv_heads * group, head_dim).to(dtype)
    prompt = slots[:1, :300].contiguous()

    def chunk(starts: list[int], counts: list[int], rows: list[int], lens: list[int], begin: int = 0) -> torch.Tensor:
        return chunk_kernel(q[:sum(counts)].contiguous(), pool[0], pool[1], torch.tensor(starts), torch.tensor(counts),
                            slots[rows, begin:300].contiguous(), torch.tensor(lens) - begin, window)

    one = chunk([0], [70], [0], [300])
    assert torch.equal(one, chunk([0, 23], [23, 47], [0, 0], [253, 300]))
    beside = chunk_kernel(q, pool[0], pool[1], torch.tensor([0, 70]), torch.tensor([70, 20]), slots,
                          torch.tensor([300, 90]), window)
    assert torch.equal(one, beside[:70])
    earliest = max(0, 231 - window) // 16 * 16
    assert torch.equal(one, chunk([0], [70], [0], [300], begin=earliest))
    for begin in range(0, earliest + 1, 16):  # every cut of the context the invariance allows
        assert torch.equal(one, chunk([0], [70], [0], [300], begin=begin))
    context_lens = torch.arange(231, 301)
    decoded = decode_kernel(q[:70].contiguous(), pool[0], pool[1], prompt.expand(70, -1).contiguous(), context_lens,
                            NO_PREFIX, window)
    assert torch.equal(one, decoded)
    # Each decode's context from its own window's tile, as the backend gathers it (the rest: other slots).
    begins = (context_lens - window).clamp(min=0) // 16 * 16
    own = torch.stack([prompt[0].roll(-b) for b in begins.tolist()])
    assert torch.equal(one, decode_kernel(q[:70].contiguous(), pool[0], pool[1], own, context_lens - begins,
                                          NO_PREFIX, window))


@needs_kernel
def test_decode_kernel_refuses_a_prefix_under_a_window_and_an_empty_window() -> None:
    pool, slots, lens = random_paged_requests([40, 40], 16, 3, 64, torch.bfloat16)
    q = torch.randn(2, 9, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="no prefix_slots under a window"):
        decode_kernel(q, pool[0], pool[1], slots, lens, slots[0, :16].contiguous(), 8)
    with pytest.raises(RuntimeError, match="window: at least 1 token"):
        decode_kernel(q, pool[0], pool[1], slots, lens, NO_PREFIX, 0)


@needs_kernel
def test_decode_kernel_refuses_slots_outside_the_pool_and_contexts_past_their_tables() -> None:
    pool, slots, lens = random_paged_requests([40, 40], 16, 3, 64, torch.bfloat16)
    q = torch.randn(2, 9, 64).to(torch.bfloat16)
    num_slots = pool.shape[1]
    for bad in (-1, num_slots):
        outside = slots.clone()
        outside[1, 5] = bad
        with pytest.raises(RuntimeError, match="context_slots outside the pool"):
            decode_kernel(q, pool[0], pool[1], outside, lens, NO_PREFIX, None)
    for bad_len in (0, slots.shape[1] + 1):
        with pytest.raises(RuntimeError, match="every context needs 1..L tokens"):
            decode_kernel(q, pool[0], pool[1], slots, torch.tensor([40, bad_len]), NO_PREFIX, None)


def backends(spec: AttentionSpec) -> list[AttentionBackend]:
    """The torch backend, and the kernel backend where it runs."""
    return [TorchAttentionBackend(spec)] + ([CpuKernelAttentionBackend(spec)] if kernels.available() else [])


def step(backend: AttentionBackend, q: torch.Tensor, pool: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
         batch: BatchLayout, window: int | None = None) -> torch.Tensor:
    """One layer's attention for the step: its new K/V stored in (a copy of) the pool first."""
    pool = pool.clone()
    pool[0][batch.slot_mapping], pool[1][batch.slot_mapping] = new_k, new_v
    return backend.forward(q, pool, backend.build_metadata(batch, window))


def paged_batch(context: list[int], new: list[int], block_size: int, shared_blocks: int) -> tuple[BatchLayout, list]:
    """Requests with the given context lengths, the last `new` tokens of each being this step's; the first
    `shared_blocks` blocks of every request are the same ones (a prefix-cache hit). Returns the layout and
    each request's block list."""
    tables, next_block = [], 20
    shared = list(range(10, 10 + shared_blocks))
    for n in context:
        own = (n + block_size - 1) // block_size - shared_blocks
        tables.append(shared + torch.randperm(own).add(next_block).tolist())
        next_block += own
    max_blocks = max(map(len, tables))
    block_table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    return BatchLayout.of(torch.tensor(new), torch.tensor(context), block_table, block_size)[0], tables


def dense_causal(q: torch.Tensor, pool: torch.Tensor, batch: BatchLayout, tables: list,
                 block_size: int, window: int | None = None) -> torch.Tensor:
    """fp32 softmax attention of each query token of the batch over its request's context up to itself (its
    `window` newest tokens with a window)."""
    group = q.shape[1] // pool.shape[2]
    outs = []
    for i, table in enumerate(tables):
        n, start, context = int(batch.num_queries[i]), int(batch.query_start[i]), int(batch.context_lens[i])
        slots = torch.tensor([b * block_size + j for b in table for j in range(block_size)])[:context]
        keys = pool[0][slots].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, context, D]
        values = pool[1][slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = q[start:start + n].float().transpose(0, 1) @ keys.transpose(1, 2) * q.shape[-1] ** -0.5
        key_pos, query_pos = torch.arange(context)[None, :], torch.arange(context - n, context)[:, None]
        causal = key_pos <= query_pos  # [n, context]
        if window is not None:
            causal &= key_pos > query_pos - window
        outs.append((scores.masked_fill(~causal, float("-inf")).softmax(-1) @ values).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_blocks", [0, 2])
def test_decode_group_kernel_and_torch_paths_agree(dtype: torch.dtype, shared_blocks: int) -> None:
    """A step of decodes, with or without a shared prefix, through the kernel backend where the CPU has it
    and through the torch backend (gather + SDPA): both equal dense attention."""
    torch.manual_seed(0)
    block_size, kv_heads, group, head_dim = 16, 3, 3, 64
    batch, tables = paged_batch([70, 33, 49, 64], [1, 1, 1, 1], block_size, shared_blocks)
    spec = AttentionSpec(kv_heads * group, kv_heads, head_dim, block_size, dtype, torch.device("cpu"))
    pool = torch.randn(2, 40 * block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(4, kv_heads * group, head_dim).to(dtype)
    new_k, new_v = torch.randn(2, 4, kv_heads, head_dim).to(dtype)
    torch_backend, *kernel_backend = backends(spec)
    meta = torch_backend.build_metadata(batch)
    prefix = meta.groups[0].shared_prefix_slots
    assert (0 if prefix is None else len(prefix)) == shared_blocks * block_size
    outputs = [step(b, q, pool, new_k, new_v, batch) for b in (torch_backend, *kernel_backend)]
    pool[0][batch.slot_mapping], pool[1][batch.slot_mapping] = new_k, new_v
    expected = dense_causal(q, pool, batch, tables, block_size)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for out in outputs:
        torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("chunk", "context"), [(5, 5), (7, 40), (16, 17), (33, 100), (256, 1000)])
def test_prompt_chunk_of_one_request_equals_dense_causal_attention(chunk: int, context: int) -> None:
    """One request's prompt chunk (its newest tokens) over its paged context: through the chunk kernel in the
    kernel backend, the masked SDPA in the torch backend; both equal dense causal attention."""
    torch.manual_seed(0)
    block_size, kv_heads, group, head_dim = 16, 3, 3, 64
    batch, tables = paged_batch([context], [chunk], block_size, 0)
    spec = AttentionSpec(kv_heads * group, kv_heads, head_dim, block_size, torch.bfloat16, torch.device("cpu"))
    pool = torch.randn(2, (len(tables[0]) + 30) * block_size, kv_heads, head_dim).to(torch.bfloat16)
    q = torch.randn(chunk, kv_heads * group, head_dim).to(torch.bfloat16)
    expected = dense_causal(q, pool, batch, tables, block_size)
    for backend in backends(spec):
        out = backend.forward(q, pool, backend.build_metadata(batch))
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (2, 4, 128)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window", [None, 37])
def test_backends_agree_on_random_mixed_steps(dtype: torch.dtype, kv_heads: int, group: int, head_dim: int,
                                              seed: int, window: int | None) -> None:
    """Random steps mixing decodes (sharing a prefix or not), one request's prompt chunk and groups of
    several chunks, under full attention or a window: every path of both backends, against dense causal
    attention."""
    torch.manual_seed(seed)
    block_size = 16
    decodes = int(torch.randint(2, 9, ()))
    shared_blocks = seed % 2 * int(torch.randint(1, 4, ()))
    # Two chunks of one length class (a group of several), maybe short ones, and a long one alone in its group.
    chunks = torch.randint(17, 33, (2,)).tolist() + torch.randint(2, 17, (int(torch.randint(0, 3, ())),)).tolist()
    chunks.append(int(torch.randint(100, 200, ())))
    new = [1] * decodes + chunks
    context = [shared_blocks * block_size + int(torch.randint(1, 90, ())) for _ in range(decodes)]
    # The chunks' requests share the prefix too; their new tokens come after it.
    context += [shared_blocks * block_size + n + int(torch.randint(0, 150, ())) for n in chunks]
    batch, tables = paged_batch(context, new, block_size, shared_blocks)
    blocks = max(b for t in tables for b in t) + 1
    spec = AttentionSpec(kv_heads * group, kv_heads, head_dim, block_size, dtype, torch.device("cpu"))
    pool = torch.randn(2, blocks * block_size, kv_heads, head_dim).to(dtype)
    tokens = sum(new)
    q = torch.randn(tokens, kv_heads * group, head_dim).to(dtype)
    new_k, new_v = torch.randn(2, tokens, kv_heads, head_dim).to(dtype)
    outputs = [step(b, q, pool, new_k, new_v, batch, window) for b in backends(spec)]
    pool[0][batch.slot_mapping], pool[1][batch.slot_mapping] = new_k, new_v
    expected = dense_causal(q, pool, batch, tables, block_size, window)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for out in outputs:
        torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windowed_decodes_that_fit_their_window_share_their_prefix(dtype: torch.dtype) -> None:
    """Decodes whose contexts (33 to 70 tokens) all fit a 100-token window read their 32 shared tokens once
    in the kernel backend: each one's bits are its own alone under the window, and dense attention's. Under
    a 64-token window, which the 70-token context exceeds, none shares."""
    torch.manual_seed(0)
    block_size, kv_heads, group, head_dim = 16, 3, 3, 64
    batch, tables = paged_batch([70, 33, 49, 64], [1, 1, 1, 1], block_size, 2)
    spec = AttentionSpec(kv_heads * group, kv_heads, head_dim, block_size, dtype, torch.device("cpu"))
    backend = CpuKernelAttentionBackend(spec)
    pool = torch.randn(2, 40 * block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(4, kv_heads * group, head_dim).to(dtype)
    meta = backend.build_metadata(batch, 100)
    assert len(meta.decodes.prefix_slots) == 32
    together = backend.forward(q, pool, meta)
    for i in range(4):
        alone = BatchLayout(torch.tensor([0]), batch.num_queries[i:i + 1], batch.context_lens[i:i + 1],
                            batch.block_table[i:i + 1], batch.slot_mapping[i:i + 1])
        assert torch.equal(together[i], backend.forward(q[i:i + 1], pool, backend.build_metadata(alone, 100))[0])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(together.float(), dense_causal(q, pool, batch, tables, block_size, 100),
                               atol=tolerance, rtol=tolerance)
    assert len(backend.build_metadata(batch, 64).decodes.prefix_slots) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [20, 64])
def test_keys_before_the_window_are_not_read(dtype: torch.dtype, window: int) -> None:
    """Decodes and prompt chunks over contexts much longer than the window (up to 1,500 tokens): their
    positions below the 16-token tile of each request's earliest first visible position are NaN in the
    pool, and both backends' outputs are those of the pool without the NaNs (dense attention's)."""
    torch.manual_seed(0)
    block_size, kv_heads, group, head_dim = 16, 2, 4, 64
    new = [1, 1, 1, 5, 40]
    batch, tables = paged_batch([1500, 700, 30, 1000, 400], new, block_size, 0)
    spec = AttentionSpec(kv_heads * group, kv_heads, head_dim, block_size, dtype, torch.device("cpu"))
    pool = torch.randn(2, (max(b for t in tables for b in t) + 1) * block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(sum(new), kv_heads * group, head_dim).to(dtype)
    expected = dense_causal(q, pool, batch, tables, block_size, window)
    poisoned = pool.clone()
    for table, n, context in zip(tables, new, batch.context_lens.tolist()):
        unread = max(0, context - n - window + 1) // 16 * 16
        slots = torch.tensor([b * block_size + j for b in table for j in range(block_size)])[:unread]
        poisoned[:, slots] = float("nan")
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for backend in backends(spec):
        out = backend.forward(q, poisoned, backend.build_metadata(batch, window))
        torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window", [None, 20])
def test_each_request_of_a_mixed_step_gets_the_bits_it_gets_alone(dtype: torch.dtype, seed: int,
                                                                  window: int | None) -> None:
    """Batch invariance of the kernel backend: decodes (sharing a prefix or not) and prompt chunks of all
    lengths in one step, under full attention or a window; each request's rows equal, bit for bit, a step
    holding that request alone, and (under the window) those of its last token decoded alone."""
    torch.manual_seed(seed)
    block_size, kv_heads, group, head_dim = 16, 3, 3, 64
    shared_blocks = seed % 2 * 2
    new = [1] * 5 + [3, 40, 130]
    context = [shared_blocks * block_size + int(torch.randint(1, 90, ())) for _ in range(5)]
    context += [shared_blocks * block_size + n + int(torch.randint(0, 150, ())) for n in new[5:]]
    batch, tables = paged_batch(context, new, block_size, shared_blocks)
    spec = AttentionSpec(kv_heads * group, kv_heads, head_dim, block_size, dtype, torch.device("cpu"))
    backend = CpuKernelAttentionBackend(spec)
    pool = torch.randn(2, (max(b for t in tables for b in t) + 1) * block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(sum(new), kv_heads * group, head_dim).to(dtype)
    pool[0][batch.slot_mapping], pool[1][batch.slot_mapping] = torch.randn(2, sum(new), kv_heads, head_dim).to(dtype)
    together = backend.forward(q, pool, backend.build_metadata(batch, window))
    for i in range(len(new)):
        rows = slice(int(batch.query_start[i]), int(batch.query_start[i]) + new[i])
        alone = BatchLayout(torch.tensor([0]), batch.num_queries[i:i + 1], batch.context_lens[i:i + 1],
                            batch.block_table[i:i + 1], batch.slot_mapping[rows])
        assert torch.equal(together[rows], backend.forward(q[rows], pool, backend.build_metadata(alone, window)))
        last = BatchLayout(torch.tensor([0]), torch.tensor([1]), batch.context_lens[i:i + 1],
                           batch.block_table[i:i + 1], batch.slot_mapping[rows.stop - 1:rows.stop])
        last_alone = backend.forward(q[rows.stop - 1:rows.stop], pool, backend.build_metadata(last, window))
        assert torch.equal(together[rows.stop - 1], last_alone[0])


@pytest.mark.parametrize(("dtype", "heads", "kv_heads", "head_dim", "device", "kernel_fits"), [
    (torch.bfloat16, 9, 3, 64, "cpu", True),
    (torch.float32, 32, 8, 128, "cpu", True),
    (torch.float16, 9, 3, 64, "cpu", False),  # a dtype the kernels do not take
    (torch.bfloat16, 16, 4, 80, "cpu", False),  # a head size they do not take
    (torch.bfloat16, 520, 8, 64, "cpu", False),  # more query heads per KV head than the kernels' scratch
    (torch.bfloat16, 9, 3, 64, "meta", False),  # not a CPU tensor
    (torch.bfloat16, 4, 1, 256, "cpu", True),  # Gemma 3's heads
    (torch.float32, 8, 2, 256, "cpu", True),
])
def test_the_kernel_backend_is_chosen_where_its_kernels_fit(dtype: torch.dtype, heads: int, kv_heads: int,
                                                            head_dim: int, device: str, kernel_fits: bool) -> None:
    spec = AttentionSpec(heads, kv_heads, head_dim, 16, dtype, torch.device(device))
    backend = select_attention_backend(spec)
    expected = CpuKernelAttentionBackend if kernel_fits and kernels.available() else TorchAttentionBackend
    assert type(backend) is expected


def test_a_cpu_without_avx512_gets_the_torch_backend() -> None:
    """ATEN_CPU_CAPABILITY=avx2 makes torch (and so tokenmill) see a CPU without AVX-512."""
    code = ("import torch\n"
            "from tokenmill.attention import AttentionSpec, select_attention_backend\n"
            "for dtype in (torch.bfloat16, torch.float32):\n"
            "    spec = AttentionSpec(9, 3, 64, 16, dtype, torch.device('cpu'))\n"
            "    print(type(select_attention_backend(spec)).__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["TorchAttentionBackend"] * 2


@pytest.fixture(scope="module")
def windowed_model(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """conftest's tiny Mistral whose every layer has a 20-token window, with 64-dim heads (the kernels')."""
    return build_tiny_model("mistral-window-hd64", tmp_path_factory.mktemp("windowed"), smol_dir)


def windowed_prompts() -> list[list[int]]:
    """Prompts of 1 to 90 tokens, some sharing a 40-token start (for the prefix cache), most longer than the window."""
    rng = random.Random(2)
    shared = [rng.randrange(3, 49152) for _ in range(40)]
    return [(shared if i % 3 == 0 else []) + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 50))]
            for i in range(10)]


def test_a_windowed_model_runs_on_the_kernel_backend_token_exact(windowed_model: Path) -> None:
    """Greedy output equals transformers' under the window, in chunks of 8 tokens and with prefix-cache hits."""
    prompts = windowed_prompts()
    llm = LLM(str(windowed_model), dtype="float32", kv_cache_memory=1 << 26, max_num_batched_tokens=8)
    expected_backend = CpuKernelAttentionBackend if kernels.available() else TorchAttentionBackend
    assert type(llm.engine.runner.attention) is expected_backend
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert llm.engine.stats.cached_prompt_tokens > 0
    hf = AutoModelForCausalLM.from_pretrained(windowed_model, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 20)


@needs_kernel
def test_a_windowed_model_gives_each_request_the_bits_it_gets_alone(windowed_model: Path) -> None:
    """bf16, on the kernel backend: each request alone, then all together with 16-token steps (prompts cut
    across the window, decodes beside chunks): the same tokens and logprobs, bit for bit."""
    prompts = windowed_prompts()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    alone_llm = LLM(str(windowed_model), dtype="bfloat16", kv_cache_memory=1 << 26, enable_prefix_caching=False)
    alone = [alone_llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    together_llm = LLM(str(windowed_model), dtype="bfloat16", kv_cache_memory=1 << 26, max_num_batched_tokens=16)
    together = [o.outputs[0] for o in together_llm.generate(prompts, params, use_tqdm=False)]
    for a, t in zip(alone, together):
        assert t.token_ids == a.token_ids and t.logprobs == a.logprobs
