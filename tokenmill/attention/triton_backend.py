"""The CUDA attention backend: paged attention written in Triton, a whole step in at most two launches.

Chosen on a CUDA device where triton imports (bf16, fp16 or fp32; head_dim up to 256, padded to a
power of two inside the kernel; at most 64 query heads per KV head). One kernel serves decodes and
prompt chunks alike; each program attends one tile of one request's queries for one KV head:
- rows are (query token, query head) pairs: the query heads sharing a KV head are extra rows (GQA), so
  a tile reads each K/V row once for all of them;
- K/V are read in place from the pool through the request's block table, BLOCK_N keys at a time (each
  key's slot looked up: any block size, blocks anywhere in the pool), from the first position the
  tile's earliest query sees (0, or its window's start) to the tile's last query: positions before
  every query's window, and past its own position, are never read;
- scores and sums in fp32 with an online softmax (FlashAttention's), the probabilities rounded to the
  pool's dtype for the weighted sum, as flash attention does.

`build_metadata` lists a step's tiles once (its request and its first query each) in two launches:
the decodes with tiles of 16 rows (a decode's query heads of one KV head; more past 16), the chunks with larger tiles,
so one long chunk never pads the decodes' tiles and the chunks get tensor-core-sized GEMMs. The step's
layout is read on the host; `forward` launches without a host sync. No shared-prefix (cascade) path:
decodes sharing a prefix read it each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, AttentionSpec, BatchLayout

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without triton: the module imports, the backend is never chosen
    triton = None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256
MAX_QUERIES_PER_KV_HEAD = 64
# Stands for "no window": a query then sees every position from 0 (and int32 arithmetic never overflows).
NO_WINDOW = 1 << 30

Kernel = TypeVar("Kernel", bound=Callable)


def triton_jit(fn: Kernel) -> Kernel:
    """triton.jit where triton is installed; elsewhere the plain function, never launched."""
    return fn if triton is None else triton.jit(fn)


@triton_jit
def paged_attention_kernel(
    q_ptr: torch.Tensor, k_pool_ptr: torch.Tensor, v_pool_ptr: torch.Tensor, out_ptr: torch.Tensor,
    block_table_ptr: torch.Tensor, query_start_ptr: torch.Tensor, num_queries_ptr: torch.Tensor,
    context_lens_ptr: torch.Tensor, tile_request_ptr: torch.Tensor, tile_first_query_ptr: torch.Tensor,
    q_stride_token: int, q_stride_head: int, out_stride_token: int, out_stride_head: int,
    kv_stride_slot: int, kv_stride_head: int, block_table_stride: int, window: int, scale_log2: float,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUERIES_PER_KV_HEAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
) -> None:
    """Program (tile, kv_head): with G = QUERIES_PER_KV_HEAD, the tile's rows r < BLOCK_Q * G are query token
    first_query + r // G of its request, query head kv_head * G + r % G."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    request = tl.load(tile_request_ptr + tile)
    first_query = tl.load(tile_first_query_ptr + tile)
    query_start = tl.load(query_start_ptr + request)
    num_queries = tl.load(num_queries_ptr + request)
    context_len = tl.load(context_lens_ptr + request)
    BLOCK_Q: tl.constexpr = BLOCK_M // QUERIES_PER_KV_HEAD

    rows = tl.arange(0, BLOCK_M)
    last_query = tl.minimum(first_query + BLOCK_Q, num_queries) - 1
    row_query = first_query + rows // QUERIES_PER_KV_HEAD
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV_HEAD) & (row_query <= last_query)
    # NOTE: padding rows repeat the tile's last query, so every row sees at least one key (its own
    # position) and its sums stay finite; they are not stored.
    row_query = tl.minimum(row_query, last_query)
    head = kv_head * QUERIES_PER_KV_HEAD + rows % QUERIES_PER_KV_HEAD
    query_pos = context_len - num_queries + row_query
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    token = (query_start + row_query).to(tl.int64)
    q = tl.load(q_ptr + (token * q_stride_token + head * q_stride_head)[:, None] + dims[None, :],
                mask=dim_valid[None, :], other=0.0)

    # Keys from the first position the tile's earliest query sees to its last query's position.
    kv_begin = tl.maximum(context_len - num_queries + first_query - window + 1, 0)
    kv_end = context_len - num_queries + last_query + 1
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    keys = tl.arange(0, BLOCK_N)
    for kv_start in range(kv_begin, kv_end, BLOCK_N):
        key_pos = kv_start + keys
        key_valid = key_pos < kv_end
        block = tl.load(block_table_ptr + request * block_table_stride + key_pos // BLOCK_SIZE, mask=key_valid,
                        other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + key_pos % BLOCK_SIZE
        kv_offset = slot * kv_stride_slot + kv_head * kv_stride_head
        k = tl.load(k_pool_ptr + kv_offset[None, :] + dims[:, None], mask=dim_valid[:, None] & key_valid[None, :],
                    other=0.0)  # [BLOCK_D, BLOCK_N]
        scores = tl.dot(q, k, input_precision=INPUT_PRECISION) * scale_log2  # log2 units: exp2 below
        visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # NOTE: a row that sees none of the keys so far (its window starts further on) keeps m = -inf;
        # subtracting 0 instead keeps its exponentials 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_pool_ptr + kv_offset[:, None] + dims[None, :], mask=key_valid[:, None] & dim_valid[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_offset = token * out_stride_token + head * out_stride_head
    tl.store(out_ptr + out_offset[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])


@dataclass(frozen=True)
class TileShape:
    """A launch's tiling: BLOCK_M query rows (tokens x query heads of one KV head) by BLOCK_N keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tile_shapes(spec: AttentionSpec) -> tuple[TileShape, TileShape]:
    """The decodes' tiling and the chunks'. Rows hold the query heads of a KV head: a tile has at least that many."""
    # NOTE: chosen by compiling for sm_90 with Triton 3.6 (ptxas -v: no register spills, shared memory well
    # within the 228 KiB of an H100/H200); their speed is to be tuned on the GPU.
    group = triton.next_power_of_2(spec.queries_per_kv_head)
    if spec.dtype == torch.float32:
        # fp32 products without TF32 are FMAs, not tensor-core MMAs: small tiles keep their operands in registers.
        decode_m, chunk_m, block_n = max(16, group), max(32, group), 16
    else:
        decode_m, chunk_m = max(16, group), max(64 if spec.head_dim > 128 else 128, group)
        block_n = 32 if spec.head_dim > 128 else 64
    return TileShape(decode_m, block_n, 4 if decode_m < 64 else 8, 2), TileShape(chunk_m, block_n, 8, 2)


@dataclass
class TileLaunch:
    """One launch: its tiles, each a request (an index into the metadata's per-request tensors) and
    the offset of its first query among that request's queries."""

    shape: TileShape
    tile_request: torch.Tensor  # [tiles] int32
    tile_first_query: torch.Tensor  # [tiles] int32


@dataclass
class TritonMetadata(AttentionMetadata):
    query_start: torch.Tensor  # [B] int32, on the device
    num_queries: torch.Tensor  # [B] int32
    context_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    window: int  # NO_WINDOW for full attention
    launches: list[TileLaunch]


def tiles(requests: torch.Tensor, num_queries: torch.Tensor,
          queries_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles covering the given requests' queries, queries_per_tile each: their requests and first queries."""
    counts = (num_queries[requests] + queries_per_tile - 1) // queries_per_tile
    tile_request = requests.repeat_interleave(counts)
    first_tile = (counts.cumsum(0) - counts).repeat_interleave(counts)
    return tile_request, (torch.arange(len(tile_request)) - first_tile) * queries_per_tile


class TritonAttentionBackend(AttentionBackend[TritonMetadata]):
    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return spec.device.type == "cuda" and triton is not None and spec.dtype in DTYPES and \
            spec.head_dim <= MAX_HEAD_DIM and spec.queries_per_kv_head <= MAX_QUERIES_PER_KV_HEAD

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self.decode_shape, self.chunk_shape = tile_shapes(spec)
        # fp32 models get fp32 products (no TF32), as torch's matmuls on CUDA by default.
        self.input_precision = "ieee" if spec.dtype == torch.float32 else "tf32"

    def build_metadata(self, batch: BatchLayout, window: int | None = None) -> TritonMetadata:
        num_queries = batch.num_queries.cpu()
        is_decode = num_queries == 1
        launches = []
        for shape, selected in ((self.decode_shape, is_decode), (self.chunk_shape, ~is_decode)):
            if selected.any():
                queries_per_tile = shape.block_m // self.spec.queries_per_kv_head
                tile_request, tile_first_query = tiles(selected.nonzero()[:, 0], num_queries, queries_per_tile)
                launches.append(TileLaunch(shape, self.on_device(tile_request), self.on_device(tile_first_query)))
        return TritonMetadata(batch.slot_mapping, self.on_device(batch.query_start), self.on_device(num_queries),
                              self.on_device(batch.context_lens), self.on_device(batch.block_table),
                              NO_WINDOW if window is None else window, launches)

    def on_device(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.spec.device, torch.int32, non_blocking=True).contiguous()

    def forward(self, q: torch.Tensor, kv_pool: torch.Tensor, meta: TritonMetadata) -> torch.Tensor:
        q = q if q.stride(-1) == 1 else q.contiguous()
        k_pool, v_pool = kv_pool[0], kv_pool[1]
        out = torch.empty_like(q)
        spec = self.spec
        for launch in meta.launches:
            grid = (len(launch.tile_request), spec.num_kv_heads)
            paged_attention_kernel[grid](
                q, k_pool, v_pool, out, meta.block_table, meta.query_start, meta.num_queries, meta.context_lens,
                launch.tile_request, launch.tile_first_query, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                k_pool.stride(0), k_pool.stride(1), meta.block_table.stride(0), meta.window,
                spec.head_dim ** -0.5 * math.log2(math.e),
                HEAD_DIM=spec.head_dim, BLOCK_D=triton.next_power_of_2(spec.head_dim),
                QUERIES_PER_KV_HEAD=spec.queries_per_kv_head, BLOCK_SIZE=spec.block_size,
                BLOCK_M=launch.shape.block_m, BLOCK_N=launch.shape.block_n, INPUT_PRECISION=self.input_precision,
                num_warps=launch.shape.num_warps, num_stages=launch.shape.num_stages)
        return out
