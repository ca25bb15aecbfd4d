"""The portable attention backend: each group's context gathered from the pool, then torch's attention.

The reference, and the fallback where no other backend fits (any CPU, any dtype and head size).
Requests with one new token (decodes) and those with several (prompt chunks, grouped by length)
are attended in separate batched calls, so one long prompt chunk never pads the many one-token
decodes or the short chunks. The groups, their gather indices and masks are built once per step in
`GroupedMetadata` and reused by all layers: no Python loop over requests.

Decodes that share leading KV blocks (a common system prompt, found by the prefix cache) attend to
that shared prefix in one GEMM for all their queries, reading its K/V once, and to their own
suffixes separately; the two parts are merged exactly by their log-sum-exp (Hydragen,
RelayAttention). Exact, but not batch-invariant: SDPA's blocking, and the prefix split, depend on
the step's shapes (the kernel backend is invariant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, AttentionSpec, BatchLayout


@dataclass
class AttentionGroup:
    """Requests attended together: queries padded to `[B, max_q]`, contexts to `[B, max_ctx]`."""

    rows: torch.Tensor  # [n] the rows of the flat batch this group's outputs go to, in query_index order
    query_index: torch.Tensor  # [B, max_q] rows of the flat batch (padding repeats a real row)
    query_valid: torch.Tensor  # [B, max_q] bool, False on padding
    context_slots: torch.Tensor  # [B, max_ctx] pool slots of each request's context
    context_lens: torch.Tensor  # [B] how many of those slots are each request's (the rest is padding)
    mask: torch.Tensor  # [B, 1, max_q * group, max_ctx] bool, True where a query may attend
    # Slots of a prefix all B requests share, [P], or None. When set, context_slots, context_lens
    # and mask cover only what follows the prefix.
    shared_prefix_slots: torch.Tensor | None = None


def shared_prefix_len(block_table: torch.Tensor, context_len: torch.Tensor, block_size: int) -> int:
    """Tokens at the start of every request's context in the same KV blocks (blocks shared through
    the prefix cache, always full), for decodes (one new token each, kept outside the prefix); 0 for
    a single request."""
    if len(block_table) < 2:
        return 0
    same = (block_table == block_table[0]).all(dim=0).int().cumprod(dim=0)
    return min(int(same.sum()), (int(context_len.min()) - 1) // block_size) * block_size


def context_slots(block_table: torch.Tensor, max_context: int, block_size: int,
                  first: torch.Tensor | None = None) -> torch.Tensor:
    """[B, max_context]: the pool slot of each position of each request's context, from position
    first[b] (0 without `first`); past its end, padding."""
    if first is None:
        ctx = torch.arange(max_context)
        return block_table[:, ctx // block_size] * block_size + ctx % block_size
    ctx = first[:, None] + torch.arange(max_context)
    blocks = (ctx // block_size).clamp(max=block_table.shape[1] - 1)  # padding past a shorter context's end
    return block_table.gather(1, blocks) * block_size + ctx % block_size


def window_start(context_len: torch.Tensor, num_queries: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B] the first context position any of a request's queries sees under the window (0 without one)."""
    if window is None:
        return torch.zeros_like(context_len)
    return (context_len - num_queries - window + 1).clamp(min=0)


def build_group(query_start: torch.Tensor, num_queries: torch.Tensor, context_len: torch.Tensor,
                block_table: torch.Tensor, block_size: int, queries_per_kv_head: int,
                window: int | None, split_prefix: bool = True) -> AttentionGroup:
    """query_start, num_queries, context_len: [B]; block_table: [B, max_blocks] (padded). With a
    window, each request's context is read from the first position its earliest query sees. With
    split_prefix, decodes attend to the prefix they share apart (shared_prefix_attention)."""
    max_q = int(num_queries.max())
    first = window_start(context_len, num_queries, window)
    span = context_len - first
    max_ctx = int(span.max())
    q_offset = torch.arange(max_q)
    query_valid = q_offset[None, :] < num_queries[:, None]
    q_offset = torch.minimum(q_offset[None, :], num_queries[:, None] - 1)
    query_index = query_start[:, None] + q_offset
    query_pos = context_len[:, None] - num_queries[:, None] + q_offset  # [B, max_q]
    slots = context_slots(block_table, max_ctx, block_size, first)
    key_pos = first[:, None, None] + torch.arange(max_ctx)[None, None, :]
    mask = key_pos <= query_pos[:, :, None]  # causal, and never past the context
    if window is not None:
        mask &= key_pos > query_pos[:, :, None] - window
    # NOTE: queries are laid out [q, group] per KV head (see grouped_queries), so each query's mask
    # row is repeated for the query heads sharing that KV head.
    mask = mask.repeat_interleave(queries_per_kv_head, dim=1).unsqueeze(1)
    group = AttentionGroup(query_index[query_valid], query_index, query_valid, slots, span, mask)
    if max_q == 1 and window is None and split_prefix:
        prefix_len = shared_prefix_len(block_table, context_len, block_size)
        if prefix_len > 0:
            group.shared_prefix_slots = slots[0, :prefix_len]
            group.context_slots = slots[:, prefix_len:].contiguous()
            group.context_lens = context_len - prefix_len
            group.mask = group.mask[..., prefix_len:]
    return group


def group_requests(batch: BatchLayout, spec: AttentionSpec, window: int | None) -> list[AttentionGroup]:
    """The decodes in one group, the prompt chunks grouped by length."""
    # NOTE: chunk lengths by powers of two, so that padding each group to its longest chunk wastes
    # at most half of its work.
    num_queries = batch.num_queries
    length_class = torch.where(num_queries == 1, 0, torch.ceil(torch.log2(num_queries.float())).long() + 1)
    groups = []
    for cls in length_class.unique().tolist():
        selected = length_class == cls
        # NOTE: the shared prefix's merge takes its log-sum-exp from torch's CPU flash-attention op: other
        # devices attend to the whole context (this backend is their fallback only).
        groups.append(build_group(batch.query_start[selected], num_queries[selected], batch.context_lens[selected],
                                  batch.block_table[selected], spec.block_size, spec.queries_per_kv_head, window,
                                  split_prefix=spec.device.type == "cpu"))
    return groups


# (q [T, heads, D], kv_pool, group) -> the group's outputs, [len(group.rows), heads, D]
GroupAttention = Callable[[torch.Tensor, torch.Tensor, AttentionGroup], torch.Tensor]


@dataclass
class GroupedMetadata(AttentionMetadata):
    groups: list[AttentionGroup]
    attend: list[GroupAttention]  # how each group is attended, chosen from its shape when built


def grouped_queries(q: torch.Tensor, kv_heads: int, g: AttentionGroup) -> torch.Tensor:
    """The group's queries as [B, kv_heads, max_q * group, D]: GQA without repeating K/V, the query
    heads of one KV head become extra query rows."""
    batch, max_q = g.query_index.shape
    head_dim = q.shape[2]
    qg = q[g.query_index].view(batch, max_q, kv_heads, -1, head_dim)
    return qg.permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, head_dim)


def output_rows(o: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
    """o: [B, kv_heads, max_q * group, D] back to the group's rows, [len(g.rows), heads, D]."""
    batch, kv_heads, _, head_dim = o.shape
    o = o.view(batch, kv_heads, g.query_index.shape[1], -1, head_dim).permute(0, 2, 1, 3, 4)
    return o[g.query_valid].reshape(len(g.rows), -1, head_dim)


def attend_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores, in fp32."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(dim=-1, keepdim=True)
    out = torch.matmul((scores - lse).exp().to(values.dtype), values)
    return out.float(), lse


def prefix_attention(qg: torch.Tensor, kv_pool: torch.Tensor,
                     prefix_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qg: [B, kv_heads, group, D] decode queries against a prefix all B share. Returns fp32 outputs and lse."""
    batch, kv_heads, group, head_dim = qg.shape
    # All B*group queries of a KV head against the one copy of the prefix: GEMMs, not B small products.
    q_all = qg.transpose(0, 1).reshape(1, kv_heads, batch * group, head_dim)
    prefix_k = kv_pool[0][prefix_slots].transpose(0, 1)[None]  # [1, kv_heads, P, D]
    prefix_v = kv_pool[1][prefix_slots].transpose(0, 1)[None]
    # NOTE: the fused CPU kernel behind SDPA, called directly as it also returns the log-sum-exp
    # (where the kernel backend does not run). Against a matmul / fp32
    # softmax / matmul sequence it keeps fp32 scores in bf16 and skips the elementwise passes:
    # ~15 vs ~17 ms per B=64 step with a 512-token prefix. It is CPU-only: on CUDA tensors this is
    # the one op of the backend to swap (for the CUDA flash-attention op, which returns the lse too).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_all, prefix_k, prefix_v)
    out = out.view(kv_heads, batch, group, head_dim).transpose(0, 1).float()
    return out, lse.view(kv_heads, batch, group, 1).transpose(0, 1)


def merge_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Exact attention over two disjoint parts of a context, from each part's outputs and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * (lse_a - lse).exp() + out_b * (lse_b - lse).exp()


def masked_attention(q: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
    """The group's contexts gathered from the pool, then SDPA under the group's mask."""
    qg = grouped_queries(q, kv_pool.shape[2], g)
    keys = kv_pool[0][g.context_slots].transpose(1, 2)  # [B, kv_heads, max_ctx, D]
    values = kv_pool[1][g.context_slots].transpose(1, 2)
    return output_rows(F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask), g)


def shared_prefix_attention(q: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
    """Decodes sharing `g.shared_prefix_slots`: exact attention over the prefix + each one's own suffix."""
    qg = grouped_queries(q, kv_pool.shape[2], g)
    out_p, lse_p = prefix_attention(qg, kv_pool, g.shared_prefix_slots)
    keys = kv_pool[0][g.context_slots].transpose(1, 2)
    values = kv_pool[1][g.context_slots].transpose(1, 2)
    out_s, lse_s = attend_with_lse(qg, keys, values, g.mask)
    return output_rows(merge_by_lse(out_p, lse_p, out_s, lse_s).to(q.dtype), g)


class TorchAttentionBackend(AttentionBackend[GroupedMetadata]):
    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return True

    def build_metadata(self, batch: BatchLayout, window: int | None = None) -> GroupedMetadata:
        groups = group_requests(batch, self.spec, window)
        return GroupedMetadata(batch.slot_mapping, groups, [self.choose(g) for g in groups])

    def choose(self, g: AttentionGroup) -> GroupAttention:
        return masked_attention if g.shared_prefix_slots is None else shared_prefix_attention

    def forward(self, q: torch.Tensor, kv_pool: torch.Tensor, meta: GroupedMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for attend, g in zip(meta.attend, meta.groups):
            out[g.rows] = attend(q, kv_pool, g)
        return out
