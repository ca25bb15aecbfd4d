"""Paged attention: the decode kernel, the shared-prefix split and the torch path all equal dense attention."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels import decode_attention_kernel, prefix_attention_kernel
from tokenmill.models import attention
from tokenmill.models.attention import AttentionMetadata, build_group, paged_attention, store_kv


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


kernel = decode_attention_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no AVX-512 (or no compiler): the torch path is used")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (2, 4, 128), (4, 1, 64)])
def test_decode_kernel_equals_dense_attention(dtype: torch.dtype, kv_heads: int, group: int, head_dim: int) -> None:
    torch.manual_seed(0)
    lengths = [1, 15, 16, 17, 40, 300, 33]  # ragged: partial 16-token tiles, a single token, several blocks
    pool, context_slots, context_lens = random_paged_requests(lengths, 16, kv_heads, head_dim, dtype)
    q = torch.randn(len(lengths), kv_heads * group, head_dim).to(dtype)
    out, lse = kernel(q, pool[0], pool[1], context_slots, context_lens)
    expected_out, expected_lse = dense_reference(q, pool, [context_slots[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_decode_kernel_scores_extreme_values_stably() -> None:
    """Large scores (a max-subtracted softmax) and a context of one repeated slot."""
    torch.manual_seed(0)
    pool, context_slots, context_lens = random_paged_requests([50, 7], 16, 3, 64, torch.float32)
    pool *= 30
    q = torch.randn(2, 9, 64) * 30
    context_slots[1, :7] = context_slots[1, 0]
    out, lse = kernel(q, pool[0], pool[1], context_slots, context_lens)
    expected_out, expected_lse = dense_reference(q, pool, [context_slots[0, :50], context_slots[1, :7]])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, expected_out, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-3, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize(("batch", "kv_heads", "group", "head_dim", "prefix_len"),
                         [(64, 3, 3, 64, 512), (5, 2, 4, 128, 37), (3, 3, 3, 64, 1), (7, 4, 1, 64, 100)])
def test_prefix_kernel_equals_dense_attention(batch: int, kv_heads: int, group: int, head_dim: int,
                                              prefix_len: int) -> None:
    """Every request's queries against one shared prefix, merged with the attention to its own suffix:
    query counts and prefix lengths off the tile sizes."""
    torch.manual_seed(0)
    pool = torch.randn(2, 4000, kv_heads, head_dim).to(torch.bfloat16)
    slots = torch.randperm(4000)
    prefix_slots = slots[:prefix_len]
    suffix_lens = torch.randint(1, 40, (batch,)).tolist()
    suffixes = list(slots[prefix_len:prefix_len + sum(suffix_lens)].split(suffix_lens))
    q = torch.randn(batch, kv_heads * group, head_dim).to(torch.bfloat16)
    suffix_out, suffix_lse = dense_reference(q, pool, suffixes)
    out = prefix_attention_kernel()(q, pool[0], pool[1], prefix_slots, suffix_out, suffix_lse)
    expected, _ = dense_reference(q, pool, [torch.cat((prefix_slots, s)) for s in suffixes])
    assert out.dtype == torch.bfloat16
    # bf16 outputs; the prefix's probabilities are rounded to bf16 too, as torch's fused CPU attention does.
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_blocks", [0, 2])
def test_decode_group_kernel_and_torch_paths_agree(dtype: torch.dtype, shared_blocks: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """paged_attention's decode group, with or without a shared prefix, through the kernel where the CPU
    has one and through gather + SDPA (the path of CPUs without AVX-512): both equal dense attention."""
    torch.manual_seed(0)
    block_size, kv_heads, group, head_dim = 16, 3, 3, 64
    context = torch.tensor([70, 33, 49, 64])
    shared = list(range(10, 10 + shared_blocks))
    tables, next_block = [], 20
    for n in context.tolist():
        own = (n + block_size - 1) // block_size - shared_blocks
        tables.append(shared + list(range(next_block, next_block + own)))
        next_block += own
    max_blocks = max(map(len, tables))
    block_table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    pool = torch.randn(2, next_block * block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(4, kv_heads * group, head_dim).to(dtype)
    new_k = torch.randn(4, kv_heads, head_dim).to(dtype)
    new_v = torch.randn(4, kv_heads, head_dim).to(dtype)
    pos = context - 1
    slot_mapping = block_table[torch.arange(4), pos // block_size] * block_size + pos % block_size
    g = build_group(torch.arange(4), torch.ones(4, dtype=torch.long), context, block_table, block_size, group)
    prefix_len = 0 if g.shared_prefix_slots is None else len(g.shared_prefix_slots)
    assert prefix_len == shared_blocks * block_size

    outputs = []
    for path in ("kernel", "torch"):
        if path == "torch":
            monkeypatch.setattr(attention, "decode_attention_kernel", lambda: None)
        step_pool = pool.clone()
        store_kv(new_k, new_v, step_pool, slot_mapping)
        outputs.append(paged_attention(q, step_pool, AttentionMetadata(slot_mapping, [g])))
    pool[0][slot_mapping], pool[1][slot_mapping] = new_k, new_v
    slots = [torch.tensor([b * block_size + j for b in t for j in range(block_size)])[:n] for t, n in
             zip(tables, context.tolist())]
    expected, _ = dense_reference(q, pool, slots)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for out in outputs:
        torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("chunk", "context"), [(5, 5), (7, 40), (16, 17), (33, 100), (256, 1000)])
def test_prompt_chunk_of_one_request_equals_dense_causal_attention(chunk: int, context: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One request's prompt chunk (its newest tokens) over its paged context: in bf16 through the prefix
    kernel + torch's causal fused op where the CPU has the kernels, else the masked SDPA path; both
    equal dense causal attention."""
    torch.manual_seed(0)
    block_size, kv_heads, group, head_dim = 16, 3, 3, 64
    blocks = (context + block_size - 1) // block_size
    table = torch.randperm(blocks + 10)[:blocks][None]
    pool = torch.randn(2, (blocks + 10) * block_size, kv_heads, head_dim).to(torch.bfloat16)
    q = torch.randn(chunk, kv_heads * group, head_dim).to(torch.bfloat16)
    g = build_group(torch.tensor([0]), torch.tensor([chunk]), torch.tensor([context]), table, block_size, group)
    positions = torch.arange(context)
    slots = table[0, positions // block_size] * block_size + positions % block_size
    expected = torch.stack([dense_reference(q[i:i + 1], pool, [slots[:context - chunk + i + 1]])[0][0]
                            for i in range(chunk)])
    outputs = [paged_attention(q, pool, AttentionMetadata(slots[-chunk:], [g]))]
    monkeypatch.setattr(attention, "decode_attention_kernel", lambda: None)
    outputs.append(paged_attention(q, pool, AttentionMetadata(slots[-chunk:], [g])))
    for out in outputs:
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
