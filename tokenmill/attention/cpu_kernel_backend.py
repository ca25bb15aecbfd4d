"""The CPU kernel backend: attention through tokenmill's AVX-512 kernels (`tokenmill/kernels/attention.cpp`).

Chosen where the decode kernel runs (an AVX-512 CPU where the kernels build; bf16 or fp32; head_dim
64 or 128; at most 256 query heads). It groups requests as the torch backend does, then picks each
group's path from its shape when the metadata is built:
- decodes: the decode kernel reads each request's K/V in place from the pool (no gather). When
  they share a prefix, it covers each one's suffix and returns the log-sum-exp; the prefix is the
  prefix kernel's (bf16) or torch's fused attention's (fp32), merged by log-sum-exp.
- one request's prompt chunk, in bf16 (the usual prompt group under a small token budget): the
  context before the chunk through the prefix kernel, each query token a "request" of its own,
  the chunk itself through torch's causal fused attention, merged by the kernel. No mask is read.
- several prompt chunks (and fp32 chunks): the torch backend's gather + masked SDPA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill import kernels
from tokenmill.attention.backend import AttentionSpec, BatchLayout
from tokenmill.attention.torch_backend import (
    AttentionGroup,
    GroupAttention,
    GroupedMetadata,
    TorchAttentionBackend,
    group_requests,
    masked_attention,
    merge_by_lse,
    prefix_attention,
)

# (the group's queries [n, heads, D], kv_pool, group) -> its outputs [n, heads, D]
RowsAttention = Callable[[torch.Tensor, torch.Tensor, AttentionGroup], torch.Tensor]


@dataclass
class KernelMetadata(GroupedMetadata):
    # When every token of the step is a decode (one group, rows 0..T-1 in order): that group's
    # attention, called on the layer's q itself (no gathering of query rows, no scattering of outputs).
    all_decodes: RowsAttention | None


class CpuKernelAttentionBackend(TorchAttentionBackend):
    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return spec.device.type == "cpu" and spec.dtype in kernels.ATTENTION_DTYPES and \
            spec.head_dim in kernels.ATTENTION_HEAD_DIMS and spec.num_heads <= kernels.MAX_QUERY_HEADS and \
            kernels.available()

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self.decode_kernel: kernels.DecodeAttentionKernel = torch.ops.tokenmill.decode_attention
        self.prefix_kernel: kernels.PrefixAttentionKernel = torch.ops.tokenmill.prefix_attention
        bf16 = spec.dtype == torch.bfloat16  # the prefix kernel's only dtype
        self.decode_with_prefix: RowsAttention = \
            self.decode_then_prefix_kernel if bf16 else self.decode_then_torch_prefix
        self.one_request_chunk: GroupAttention = self.on_rows(self.prompt_chunk) if bf16 else masked_attention

    def build_metadata(self, batch: BatchLayout) -> KernelMetadata:
        groups = group_requests(batch, self.spec)
        all_decodes = len(groups) == 1 and groups[0].query_index.shape[1] == 1
        return KernelMetadata(batch.slot_mapping, groups, [self.choose(g) for g in groups],
                              self.decode_path(groups[0]) if all_decodes else None)

    def decode_path(self, g: AttentionGroup) -> RowsAttention:
        return self.decode if g.shared_prefix_slots is None else self.decode_with_prefix

    def choose(self, g: AttentionGroup) -> GroupAttention:
        batch, max_q = g.query_index.shape
        if max_q == 1:
            return self.on_rows(self.decode_path(g))
        return self.one_request_chunk if batch == 1 else masked_attention

    def forward(self, q: torch.Tensor, kv_pool: torch.Tensor, meta: KernelMetadata) -> torch.Tensor:
        if meta.all_decodes is not None:
            return meta.all_decodes(q.contiguous(), kv_pool, meta.groups[0])
        return super().forward(q, kv_pool, meta)

    @staticmethod
    def on_rows(attend: RowsAttention) -> GroupAttention:
        """A path over the group's own queries, as one over the step's."""
        return lambda q, kv_pool, g: attend(q[g.rows], kv_pool, g)

    def decode(self, q: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """q: [B, heads, D], one query per request, read in place from the pool by the kernel."""
        out, _ = self.decode_kernel(q, kv_pool[0], kv_pool[1], g.context_slots, g.context_lens)
        return out.to(q.dtype)

    def decode_then_prefix_kernel(self, q: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        out, lse = self.decode_kernel(q, kv_pool[0], kv_pool[1], g.context_slots, g.context_lens)
        return self.prefix_kernel(q, kv_pool[0], kv_pool[1], g.shared_prefix_slots, out, lse)

    def decode_then_torch_prefix(self, q: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        out, lse = self.decode_kernel(q, kv_pool[0], kv_pool[1], g.context_slots, g.context_lens)
        batch, kv_heads, head_dim = q.shape[0], kv_pool.shape[2], q.shape[2]
        qg = q.view(batch, kv_heads, -1, head_dim)
        out_p, lse_p = prefix_attention(qg, kv_pool, g.shared_prefix_slots)
        out = merge_by_lse(out_p, lse_p, out.view_as(qg), lse.view(*qg.shape[:3], 1))
        return out.to(q.dtype).reshape(q.shape)

    def prompt_chunk(self, q: torch.Tensor, kv_pool: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """q: [n, heads, D] bf16, one request's prompt chunk (its n newest tokens), attending causally to its
        whole context. Every query sees all of the context before the chunk: that part is the prefix
        kernel's GEMMs (a query token per "request"), the chunk itself torch's causal fused attention,
        and the kernel merges the two by their log-sum-exp."""
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
        return self.prefix_kernel(q.contiguous(), kv_pool[0], kv_pool[1], slots[:context - n].contiguous(),
                                  out.float().contiguous(), lse[0].transpose(0, 1).contiguous())
