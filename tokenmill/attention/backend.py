"""The attention backend interface: chosen once when the model runner starts, then used by every layer.

A backend is constructed with the model's attention shape and the KV pool's layout
(`AttentionSpec`). Each step it turns the flat batch's description (`BatchLayout`) into its own
metadata, once per sliding window the model's layers use (`build_metadata(batch, window)`, None for
full attention); every layer then calls `forward(q, kv_pool, metadata)` with its window's. What
depends on the model and the machine (dtype, head_dim, head counts, CPU features) is decided by
`supports` and the constructor; what depends on the batch (which requests are attended together,
which kernel serves them), by `build_metadata`. A layer's call re-checks neither.

The KV pool of one layer is `[2, num_slots, num_kv_heads, head_dim]` (K and V; a slot is one token
position of one block: block * block_size + offset). When `forward` runs, the step's new K/V are
already in the pool at `metadata.slot_mapping` (the layers' rope step writes them), and every
request's queries attend causally to its whole context, read through its block table; under a
window W, a query at position p attends to positions p - W + 1 .. p only, and positions before
every query's window are not read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch


@dataclass(frozen=True)
class AttentionSpec:
    """What a backend is built for: the model's attention shape, its dtype and device, the KV block size."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per KV block
    dtype: torch.dtype
    device: torch.device

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class BatchLayout:
    """The flat ragged batch as attention sees it: B requests, T tokens. Request i's queries are rows
    query_start[i] .. query_start[i] + num_queries[i] - 1 of the batch, its newest tokens."""

    query_start: torch.Tensor  # [B]
    num_queries: torch.Tensor  # [B]
    context_lens: torch.Tensor  # [B] each request's context, its new tokens included
    block_table: torch.Tensor  # [B, max_blocks] each request's blocks, rows padded with 0
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes in the pool

    @classmethod
    def of(cls, num_queries: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
           block_size: int) -> tuple[BatchLayout, torch.Tensor]:
        """The layout of requests whose newest num_queries[i] of context_lens[i] tokens are this step's,
        their tokens laid out request after request; and those tokens' positions, [T]."""
        query_start = num_queries.cumsum(0) - num_queries
        request = torch.repeat_interleave(torch.arange(len(num_queries)), num_queries)
        positions = (context_lens - num_queries - query_start)[request] + torch.arange(len(request))
        slot_mapping = block_table[request, positions // block_size] * block_size + positions % block_size
        return cls(query_start, num_queries, context_lens, block_table, slot_mapping), positions


@dataclass
class AttentionMetadata:
    """What every backend's metadata holds; each backend adds its own fields."""

    slot_mapping: torch.Tensor  # [T], read by the layers' K/V writes


Metadata = TypeVar("Metadata", bound=AttentionMetadata)


class AttentionBackend(ABC, Generic[Metadata]):
    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    @classmethod
    @abstractmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        """Whether this backend runs the spec here (its kernels build, its dtypes and shapes fit)."""

    @abstractmethod
    def build_metadata(self, batch: BatchLayout, window: int | None = None) -> Metadata:
        """Once per step and window: everything the layers' calls need, computed from the batch's layout."""

    @abstractmethod
    def forward(self, q: torch.Tensor, kv_pool: torch.Tensor, meta: Metadata) -> torch.Tensor:
        """q: [T, heads, D]; kv_pool: [2, slots, kv_heads, D], the step's new K/V already stored.
        Returns [T, heads, D]."""
