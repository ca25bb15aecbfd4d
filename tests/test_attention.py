"""Paged attention: the shared-prefix split equals plain attention over the whole context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.models.attention import AttentionMetadata, build_group, paged_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_decode_equals_dense_attention(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    block_size, kv_heads, group, head_dim = 4, 2, 3, 16
    context = torch.tensor([11, 14, 9])  # each decodes its last token
    shared = [5, 6]  # two full blocks every request shares
    tables = [shared + [0, 1], shared + [2, 3], shared + [4]]
    block_table = torch.tensor([t + [0] * (4 - len(t)) for t in tables])
    pool = torch.randn(2, 8 * block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(3, kv_heads * group, head_dim).to(dtype)
    new_k = torch.randn(3, kv_heads, head_dim).to(dtype)
    new_v = torch.randn(3, kv_heads, head_dim).to(dtype)
    pos = context - 1
    slot_mapping = block_table[torch.arange(3), pos // block_size] * block_size + pos % block_size

    g = build_group(torch.arange(3), torch.ones(3, dtype=torch.long), context, block_table, block_size, group)
    assert g.shared_prefix_slots is not None and len(g.shared_prefix_slots) == 2 * block_size
    out = paged_attention(q, new_k, new_v, pool, AttentionMetadata(slot_mapping, [g]))

    for i in range(3):  # dense reference, one request at a time
        slots = torch.cat([torch.arange(b * block_size, (b + 1) * block_size) for b in tables[i]])[:context[i]]
        keys = pool[0][slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        values = pool[1][slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        expected = F.scaled_dot_product_attention(q[i].float()[:, None], keys, values)[:, 0]
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[i].float(), expected, atol=tolerance, rtol=tolerance)
