"""A layer's elementwise steps, chosen once per model: tokenmill's fused kernels or torch ops.

`select_elementwise_ops` (a decoder layer's), `select_gemma_ops` (Gemma's norms and activation) and
`select_add_layer_norm` (an encoder's post-norm) are the one place that says where each fused op serves;
the model calls what they return without checks. The decoder's fused ops (`tokenmill/kernels/elementwise.cpp`,
one pass each) round to bf16 where and as the torch ops below do, so they give the same results bit for bit
(tests/test_elementwise.py): the choice changes speed, never tokens. The encoder's add + LayerNorm does not
round the sum before the norm and orders its sums its own way: within rounding of the torch ops, not their
bits (embeddings are compared by cosine, and are the same bits for a text in any batch either way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill import kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # NOTE: computed in fp32 and cast back before the weight, exactly as transformers does,
    # so greedy outputs match it token for token.
    # In-place steps where the operand is a fresh temporary: same values, fewer allocations.
    normed = x.float()
    normed = normed * normed.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return normed.to(x.dtype).mul_(weight)  # the weight has the model's dtype


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of residual + x, residual + x)."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim (the sum rounded to x's dtype first)."""
    return F.layer_norm(x + residual, weight.shape, weight, bias, eps)


AddLayerNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def select_add_layer_norm(device: torch.device, dtype: torch.dtype) -> AddLayerNorm:
    """The fused kernel where the kernels run (AVX-512 CPUs; x [rows, n] with contiguous rows, bf16 or fp32),
    `add_layer_norm` elsewhere."""
    if device.type != "cpu" or dtype not in kernels.LAYER_NORM_DTYPES or not kernels.available():
        return add_layer_norm
    return torch.ops.tokenmill.add_layer_norm


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for `apply_rope`: (-x) * s and x * (-s) are the same number."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin_signed (from `signed_sin`): [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    out = x * cos[:, None, :]
    return out.add_(rotated.mul_(sin_signed[:, None, :]))


def rope_store(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
               key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """qk: [T, heads + kv_heads, D], v: [T, kv_heads, D]. Rotates the query and key heads, writes the keys
    and values to the pool at `slot_mapping`; returns the queries, [T, heads, D]."""
    qk = apply_rope(qk, cos, sin_signed)  # one call for the query and key heads: half the small ops of two
    num_heads = qk.shape[1] - v.shape[1]
    key_cache.index_copy_(0, slot_mapping, qk[:, num_heads:])
    value_cache.index_copy_(0, slot_mapping, v)
    return qk[:, :num_heads]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, gate_up being [..., gate | up]."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate).mul_(up)


@dataclass(frozen=True)
class ElementwiseOps:
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # x [rows, n] (contiguous rows)
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    rope_store: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor], torch.Tensor]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]


TORCH_OPS = ElementwiseOps(rms_norm, add_rms_norm, rope_store, silu_mul)


def select_elementwise_ops(device: torch.device, dtype: torch.dtype, head_dim: int) -> ElementwiseOps:
    """The fused ops where the kernels run (AVX-512 CPUs) and take the dtype (bf16), the torch ops elsewhere."""
    if device.type != "cpu" or dtype not in kernels.ELEMENTWISE_DTYPES or not kernels.available():
        return TORCH_OPS
    fused = torch.ops.tokenmill
    return ElementwiseOps(fused.rms_norm, fused.add_rms_norm,
                          fused.rope_store if head_dim % kernels.ROPE_HEAD_DIM_MULTIPLE == 0 else rope_store,
                          fused.silu_mul)


def gemma_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, times `scale` (fp32, broadcast), then cast: transformers' Gemma3RMSNorm."""
    normed = x.float()
    normed = normed * normed.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return normed.mul_(scale).to(x.dtype)


def gemma_norm_add_norm(x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, next_scale: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gemma block's output x normed and added to the residual stream, and the sum normed for the next block:
    (norm(summed) * next_scale, summed = residual + norm(x) * scale)."""
    summed = residual + gemma_rms_norm(x, scale, eps)
    return gemma_rms_norm(summed, next_scale, eps), summed


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GELU-tanh(gate) * up, gate_up being [..., gate | up]."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.gelu(gate, approximate="tanh").mul_(up)


@dataclass(frozen=True)
class GemmaOps:
    """Gemma's norms take its fp32 scale (1 + weight) and round once after it; x [rows, n] (contiguous rows),
    or [T, heads, n] with a scale per head ([heads, n]) for the q and k norms."""
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    norm_add_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                            tuple[torch.Tensor, torch.Tensor]]
    gelu_tanh_mul: Callable[[torch.Tensor], torch.Tensor]


GEMMA_TORCH_OPS = GemmaOps(gemma_rms_norm, gemma_norm_add_norm, gelu_tanh_mul)


def select_gemma_ops(device: torch.device, dtype: torch.dtype) -> GemmaOps:
    """The fused ops where the kernels run (AVX-512 CPUs) and take the dtype (bf16), the torch ops elsewhere."""
    if device.type != "cpu" or dtype not in kernels.ELEMENTWISE_DTYPES or not kernels.available():
        return GEMMA_TORCH_OPS
    fused = torch.ops.tokenmill
    return GemmaOps(fused.gemma_rms_norm, fused.gemma_norm_add_norm, fused.gelu_tanh_mul)
