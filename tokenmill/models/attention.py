"""Attention over the paged KV cache, for a flat ragged batch.

The KV pool of one layer is `[2, num_slots, num_kv_heads, head_dim]` (K and V; a slot is one token
position of one block). Each step the new K/V are written at `slot_mapping`, then every request's
queries attend to its whole context, gathered from the pool through its block table.

Requests with one new token (decodes) and those with several (prompt chunks, grouped by length)
are attended in separate batched calls, so one long prompt chunk never pads the many one-token
decodes or the short chunks. Everything here is
built once per step in `AttentionMetadata` and reused by all layers: no Python loop over requests.

Decodes that share leading KV blocks (a common system prompt, found by the prefix cache) attend to
that shared prefix in one GEMM for all their queries, reading its K/V once, and to their own
suffixes separately; the two parts are merged exactly by their log-sum-exp (Hydragen,
RelayAttention).

On CPUs with AVX-512 the decode group reads the pool in place through a C++ kernel, and in bf16
the shared prefix and a lone request's prompt chunk go through the prefix kernel
(`tokenmill/kernels/`); the torch code here serves every other case and the CPUs without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.kernels import (
    MAX_QUERY_HEADS,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    DecodeAttentionKernel,
    decode_attention_kernel,
    prefix_attention_kernel,
)


@dataclass
class AttentionGroup:
    """Requests attended together: queries padded to `[B, max_q]`, contexts to `[B, max_ctx]`."""

    query_index: torch.Tensor  # [B, max_q] rows of the flat batch (padding repeats a real row)
    query_valid: torch.Tensor  # [B, max_q] bool, False on padding
    context_slots: torch.Tensor  # [B, max_ctx] pool slots of each request's context
    context_lens: torch.Tensor  # [B] how many of those slots are each request's (the rest is padding)
    mask: torch.Tensor  # [B, 1, max_q * group, max_ctx] bool, True where a query may attend
    # Slots of a prefix all B requests share, [P], or None. When set, context_slots, context_lens
    # and mask cover only what follows the prefix.
    shared_prefix_slots: torch.Tensor | None = None
    # True when the group is rows 0..B-1 of the flat batch, one query each (a batch of decodes only).
    is_leading_decode_rows: bool = False


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes in the pool
    groups: list[AttentionGroup]


def build_group(query_start: torch.Tensor, num_queries: torch.Tensor, context_len: torch.Tensor,
                block_table: torch.Tensor, block_size: int, queries_per_kv_head: int) -> AttentionGroup:
    """query_start, num_queries, context_len: [B]; block_table: [B, max_blocks] (padded)."""
    max_q = int(num_queries.max())
    max_ctx = int(context_len.max())
    q_offset = torch.arange(max_q)
    query_valid = q_offset[None, :] < num_queries[:, None]
    q_offset = torch.minimum(q_offset[None, :], num_queries[:, None] - 1)
    query_index = query_start[:, None] + q_offset
    query_pos = context_len[:, None] - num_queries[:, None] + q_offset  # [B, max_q]
    ctx = torch.arange(max_ctx)
    context_slots = block_table[:, ctx // block_size] * block_size + ctx % block_size
    mask = ctx[None, None, :] <= query_pos[:, :, None]  # causal, and never past the context
    # NOTE: queries are laid out [q, group] per KV head (see paged_attention), so each query's mask
    # row is repeated for the query heads sharing that KV head.
    mask = mask.repeat_interleave(queries_per_kv_head, dim=1).unsqueeze(1)
    group = AttentionGroup(query_index, query_valid, context_slots, context_len, mask)
    group.is_leading_decode_rows = max_q == 1 and bool((query_start == torch.arange(len(query_start))).all())
    if max_q == 1 and len(query_start) > 1:
        # Leading block-table columns equal in every row: blocks shared through the prefix cache
        # (always full). Each request keeps at least its current token outside the prefix.
        same = (block_table == block_table[0]).all(dim=0).int().cumprod(dim=0)
        shared_blocks = min(int(same.sum()), (int(context_len.min()) - 1) // block_size)
        if shared_blocks > 0:
            prefix_len = shared_blocks * block_size
            group.shared_prefix_slots = context_slots[0, :prefix_len]
            group.context_slots = context_slots[:, prefix_len:].contiguous()
            group.context_lens = context_len - prefix_len
            group.mask = group.mask[..., prefix_len:]
    return group


def _attend_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores, in fp32."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(dim=-1, keepdim=True)
    out = torch.matmul((scores - lse).exp().to(values.dtype), values)
    return out.float(), lse


def _prefix_attention(qg: torch.Tensor, kv_pool: torch.Tensor,
                      prefix_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qg: [B, kv_heads, group, D] decode queries against a prefix all B share. Returns fp32 outputs and lse."""
    batch, kv_heads, group, head_dim = qg.shape
    # All B*group queries of a KV head against the one copy of the prefix: GEMMs, not B small products.
    q_all = qg.transpose(0, 1).reshape(1, kv_heads, batch * group, head_dim)
    prefix_k = kv_pool[0][prefix_slots].transpose(0, 1)[None]  # [1, kv_heads, P, D]
    prefix_v = kv_pool[1][prefix_slots].transpose(0, 1)[None]
    # NOTE: the fused CPU kernel behind SDPA, called directly as it also returns the log-sum-exp
    # (the path of fp32 models and of CPUs without the prefix kernel). Against a matmul / fp32
    # softmax / matmul sequence it keeps fp32 scores in bf16 and skips the elementwise passes:
    # ~15 vs ~17 ms per B=64 step with a 512-token prefix.
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_all, prefix_k, prefix_v)
    out = out.view(kv_heads, batch, group, head_dim).transpose(0, 1).float()
    return out, lse.view(kv_heads, batch, group, 1).transpose(0, 1)


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Exact attention over two disjoint parts of a context, from each part's outputs and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp() + out_b * (lse_b - lse).exp()


def _shared_prefix_attention(qg: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
    """qg: [B, kv_heads, group, D] decode queries. Exact attention over prefix + own suffix."""
    out_p, lse_p = _prefix_attention(qg, kv_pool, g.shared_prefix_slots)
    keys = kv_pool[0][g.context_slots].transpose(1, 2)
    values = kv_pool[1][g.context_slots].transpose(1, 2)
    out_s, lse_s = _attend_with_lse(qg, keys, values, g.mask)
    return _merge(out_p, lse_p, out_s, lse_s).to(qg.dtype)


def _kernel_decode_attention(q: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup,
                             kernel: DecodeAttentionKernel) -> torch.Tensor:
    """q: [B, heads, D], one query per request, read in place from the pool by the C++ kernel."""
    out, lse = kernel(q, kv_pool[0], kv_pool[1], g.context_slots, g.context_lens)
    prefix_kernel = prefix_attention_kernel() if q.dtype == torch.bfloat16 else None
    if g.shared_prefix_slots is not None and prefix_kernel is not None:
        return prefix_kernel(q, kv_pool[0], kv_pool[1], g.shared_prefix_slots, out, lse)
    if g.shared_prefix_slots is not None:
        batch, kv_heads, head_dim = q.shape[0], kv_pool.shape[2], q.shape[2]
        qg = q.view(batch, kv_heads, -1, head_dim)
        out_p, lse_p = _prefix_attention(qg, kv_pool, g.shared_prefix_slots)
        out = _merge(out_p, lse_p, out.view_as(qg), lse.view(*qg.shape[:3], 1))
    return out.to(q.dtype).reshape(q.shape)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_pool: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, D], the step's new keys and values, written to the pool at their slots."""
    kv_pool[0].index_copy_(0, slot_mapping, k)
    kv_pool[1].index_copy_(0, slot_mapping, v)


def _prompt_chunk_attention(q: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
    """q: [n, heads, D] bf16, one request's prompt chunk (its n newest tokens), attending causally to its
    whole context. Every query sees all of the context before the chunk: that part is the prefix
    kernel's GEMMs (a query token per "request"), the chunk itself torch's causal fused attention,
    and the kernel merges the two by their log-sum-exp. No mask is built or read."""
    n, heads, head_dim = q.shape
    context = int(g.context_lens[0])
    slots = g.context_slots[0, :context]
    group = heads // kv_pool.shape[2]
    # The chunk's own K/V, each KV head repeated for its query heads: torch's causal mask is per head.
    own_k = kv_pool[0][slots[context - n:]].transpose(0, 1).repeat_interleave(group, dim=0)[None]
    own_v = kv_pool[1][slots[context - n:]].transpose(0, 1).repeat_interleave(group, dim=0)[None]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.transpose(0, 1)[None], own_k, own_v,
                                                                          is_causal=True)
    out = out[0].transpose(0, 1)  # [n, heads, D]
    if context == n:
        return out
    return prefix_attention_kernel()(q.contiguous(), kv_pool[0], kv_pool[1], slots[:context - n].contiguous(),
                                     out.float().contiguous(), lse[0].transpose(0, 1).contiguous())


def paged_attention(q: torch.Tensor, kv_pool: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, heads, D]; kv_pool: [2, slots, kv_heads, D], the step's new K/V already stored. Returns [T, heads, D]."""
    tokens, heads, head_dim = q.shape
    kv_heads = kv_pool.shape[2]
    group = heads // kv_heads
    kernel = decode_attention_kernel() if q.device.type == "cpu" and head_dim in SUPPORTED_HEAD_DIMS and \
        q.dtype in SUPPORTED_DTYPES and heads <= MAX_QUERY_HEADS else None
    if kernel is not None and len(meta.groups) == 1 and meta.groups[0].is_leading_decode_rows and \
            len(meta.groups[0].query_index) == tokens:
        # All tokens are decodes, in order: no gathering of query rows and scattering of outputs.
        return _kernel_decode_attention(q.contiguous(), kv_pool, meta.groups[0], kernel)
    out = torch.empty_like(q)
    for g in meta.groups:
        batch, max_q = g.query_index.shape
        if max_q == 1 and kernel is not None:
            rows = g.query_index[:, 0]
            out[rows] = _kernel_decode_attention(q[rows], kv_pool, g, kernel)
            continue
        if batch == 1 and kernel is not None and q.dtype == torch.bfloat16:
            # NOTE: one request's chunk (the usual prompt group with a small token budget), where a
            # long context made the masked SDPA below the slowest op of prompt processing.
            rows = g.query_index[0]
            out[rows] = _prompt_chunk_attention(q[rows], kv_pool, g)
            continue
        # GQA without repeating K/V: the `group` query heads of one KV head become extra query rows.
        qg = q[g.query_index].view(batch, max_q, kv_heads, group, head_dim)
        qg = qg.permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, max_q * group, head_dim)
        if g.shared_prefix_slots is not None:
            o = _shared_prefix_attention(qg, kv_pool, g)
        else:
            keys = kv_pool[0][g.context_slots].transpose(1, 2)  # [B, kv_heads, max_ctx, D]
            values = kv_pool[1][g.context_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask)
        o = o.view(batch, kv_heads, max_q, group, head_dim).permute(0, 2, 1, 3, 4)
        out[g.query_index[g.query_valid]] = o[g.query_valid].reshape(-1, heads, head_dim)
    return out
