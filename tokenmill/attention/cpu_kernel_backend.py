"""The CPU kernel backend: batch-invariant attention through tokenmill's AVX-512 kernels (`kernels/attention.cpp`).

Chosen where the kernels run (an AVX-512 CPU where they build; bf16 or fp32; head_dim 64, 128 or 256;
at most 64 query heads per KV head; full attention or sliding windows). The kernels attend every query in
one fixed order of sums, which depends only on its own context (attention.cpp states it), so a request's
outputs never depend on what else the step holds: how many requests, where the token budget cut its
prompt, which of its blocks others share, or whether they came from the prefix cache. Each step's
tokens take one of two calls per layer:
- decodes (one new token per request): `decode_attention`, each request's rows read in place from
  the pool. When all of them share leading blocks (the prefix cache's: a common system prompt), that
  prefix is read once for all (Hydragen): sharing saves reading it, not the order of its sums.
- prompt chunks (several new tokens): `chunk_attention`, all of the step's chunks in one call, each
  query token attending causally to its request's context.

Under a window W (a layer's; the metadata is built once per window), a query at position p attends to
positions p - W + 1 .. p. Each request's context is gathered from the multiple of 16 at or below its
earliest query's first visible position (the kernels' tiles start there, whatever the chunk, so a
query's bits are the same in a decode, in a chunk of any length, or beside any other request), so the
blocks before it are never read. Windowed decodes share a prefix only while every one's whole context
fits its window (the window then changes nothing, and the shared prefix never changes bits); past
that, each reads its own window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill import kernels
from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, AttentionSpec, BatchLayout
from tokenmill.attention.torch_backend import context_slots, shared_prefix_len, window_start

# The kernels' sums run in tiles of this many tokens: a shared prefix, or the start of a windowed context,
# is cut only at multiples of it.
TILE = 16
NO_PREFIX = torch.zeros(0, dtype=torch.long)


@dataclass
class Decodes:
    rows: torch.Tensor | None  # the step's rows that are decodes, or None when all are
    context_slots: torch.Tensor  # [B, L] what follows the shared prefix
    context_lens: torch.Tensor  # [B]
    prefix_slots: torch.Tensor  # [P] shared by all B, possibly empty
    window: int | None  # None where it changes nothing (every context fits it)


@dataclass
class Chunks:
    query_start: torch.Tensor  # [R] rows of the step
    num_queries: torch.Tensor  # [R]
    context_slots: torch.Tensor  # [R, L]
    context_lens: torch.Tensor  # [R]
    window: int | None


@dataclass
class KernelMetadata(AttentionMetadata):
    decodes: Decodes | None
    chunks: Chunks | None


def windowed_context(block_table: torch.Tensor, context_len: torch.Tensor, num_queries: torch.Tensor, window: int,
                     block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's context from the multiple of TILE at or below its earliest query's first visible
    position: its slots [B, L] and lengths [B]."""
    first = window_start(context_len, num_queries, window) // TILE * TILE
    lens = context_len - first
    return context_slots(block_table, int(lens.max()), block_size, first), lens


class CpuKernelAttentionBackend(AttentionBackend[KernelMetadata]):
    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return spec.device.type == "cpu" and spec.dtype in kernels.ATTENTION_DTYPES and \
            spec.head_dim in kernels.ATTENTION_HEAD_DIMS and \
            spec.queries_per_kv_head <= kernels.MAX_QUERIES_PER_KV_HEAD and kernels.available()

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self.decode_kernel: kernels.DecodeAttentionKernel = torch.ops.tokenmill.decode_attention
        self.chunk_kernel: kernels.ChunkAttentionKernel = torch.ops.tokenmill.chunk_attention

    def build_metadata(self, batch: BatchLayout, window: int | None = None) -> KernelMetadata:
        is_decode = batch.num_queries == 1
        all_decodes = bool(is_decode.all())
        decodes = chunks = None
        if is_decode.any():
            rows = None if all_decodes else batch.query_start[is_decode]
            block_table, lens = batch.block_table[is_decode], batch.context_lens[is_decode]
            if window is None or bool((lens <= window).all()):
                prefix_len = shared_prefix_len(block_table, lens, self.spec.block_size) // TILE * TILE
                slots = context_slots(block_table, int(lens.max()), self.spec.block_size)
                decodes = Decodes(rows, slots[:, prefix_len:].contiguous(), lens - prefix_len,
                                  slots[0, :prefix_len].contiguous(), None)
            else:
                slots, lens = windowed_context(block_table, lens, batch.num_queries[is_decode], window,
                                               self.spec.block_size)
                decodes = Decodes(rows, slots, lens, NO_PREFIX, window)
        if not all_decodes:
            block_table, lens = batch.block_table[~is_decode], batch.context_lens[~is_decode]
            num_queries = batch.num_queries[~is_decode]
            if window is None:
                slots = context_slots(block_table, int(lens.max()), self.spec.block_size)
            else:
                slots, lens = windowed_context(block_table, lens, num_queries, window, self.spec.block_size)
            chunks = Chunks(batch.query_start[~is_decode], num_queries, slots, lens, window)
        return KernelMetadata(batch.slot_mapping, decodes, chunks)

    def forward(self, q: torch.Tensor, kv_pool: torch.Tensor, meta: KernelMetadata) -> torch.Tensor:
        q = q.contiguous()
        d, c = meta.decodes, meta.chunks
        if c is None:
            return self.decode_kernel(q, kv_pool[0], kv_pool[1], d.context_slots, d.context_lens, d.prefix_slots,
                                      d.window)
        out = self.chunk_kernel(q, kv_pool[0], kv_pool[1], c.query_start, c.num_queries, c.context_slots,
                                c.context_lens, c.window)
        if d is not None:
            out[d.rows] = self.decode_kernel(q[d.rows], kv_pool[0], kv_pool[1], d.context_slots, d.context_lens,
                                             d.prefix_slots, d.window)
        return out
