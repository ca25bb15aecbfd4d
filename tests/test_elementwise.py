"""The fused bf16 elementwise kernels give bit for bit what the torch ops they replace give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_exactness import QUESTIONS

from tokenmill import LLM, SamplingParams
from tokenmill.kernels import fused_elementwise
from tokenmill.models import llama
from tokenmill.models.llama import RMSNorm, apply_rope, signed_sin

pytestmark = pytest.mark.skipif(not fused_elementwise(torch.bfloat16),
                                reason="no AVX-512 (or no compiler): the torch ops are used")
ops = torch.ops.tokenmill


def torch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x if residual is None else residual + x
    normed = summed.float()
    normed = normed * normed.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return normed.to(torch.bfloat16).mul_(weight), summed


# Widths below one 8-lane vector, with leftover vectors and elements, and past the sum's first cascade level.
@pytest.mark.parametrize("width", [5, 64, 100, 576, 960, 2048, 5120, 70000])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_is_bit_exact(width: int, with_residual: bool) -> None:
    torch.manual_seed(width)
    x = (torch.randn(33, width) * torch.rand(33, 1) * 20).to(torch.bfloat16)
    residual = torch.randn(33, width).to(torch.bfloat16) if with_residual else None
    weight = torch.randn(width).to(torch.bfloat16)
    expected_normed, expected_summed = torch_rms_norm(x, residual, weight, 1e-5)
    if residual is None:
        normed = ops.rms_norm(x, weight, 1e-5)
    else:
        normed, summed = ops.add_rms_norm(x, residual, weight, 1e-5)
        assert torch.equal(summed, expected_summed)
    assert torch.equal(normed, expected_normed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as bf16 bit patterns: NaN included, and denormals not confused with zero."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_denormals_and_nans_come_out_as_torch_rounds_them() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64).to(torch.bfloat16)
    x[0, 3] = float("nan")
    tiny = torch.full((64,), 1e-38).to(torch.bfloat16)  # normed values * 1e-38: denormal products
    assert same_bits(ops.rms_norm(x[1:], tiny, 1e-5), torch_rms_norm(x[1:], None, tiny, 1e-5)[0])
    assert same_bits(ops.rms_norm(x, tiny, 1e-5), torch_rms_norm(x, None, tiny, 1e-5)[0])  # a NaN row
    gate_up = torch.cat((torch.randn(4, 32), torch.full((4, 32), 1e-39)), dim=1).to(torch.bfloat16)
    gate_up[1, 5] = float("nan")
    gate, up = gate_up.split(32, dim=-1)
    assert same_bits(ops.silu_mul(gate_up), torch.nn.functional.silu(gate).mul_(up))


def test_rms_norm_module_gives_the_same_bits_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module as the layers call it: rows through the kernel, qk-norm's [T, heads, D] through torch ops."""
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    norm.weight.data = torch.randn(64).to(torch.bfloat16)
    x, residual = torch.randn(2, 12, 64).to(torch.bfloat16)
    results = [norm(x, residual), norm(x), norm(x.view(4, 3, 64))]
    monkeypatch.setattr(llama, "fused_elementwise", lambda dtype: False)
    for fused, (normed, summed) in zip(results, [norm(x, residual), norm(x), norm(x.view(4, 3, 64))]):
        assert torch.equal(fused[0], normed) and torch.equal(fused[1], summed)
    assert results[1][1] is x


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
def test_rope_store_is_bit_exact_and_writes_the_pool(heads: int, kv_heads: int, head_dim: int) -> None:
    torch.manual_seed(0)
    tokens = 37
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(torch.bfloat16)
    qk, v = qkv.split([(heads + kv_heads) * head_dim, kv_heads * head_dim], dim=-1)
    qk, v = qk.view(tokens, heads + kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    angles = torch.rand(tokens, head_dim) * 100
    cos, sin = angles.cos().to(torch.bfloat16), signed_sin(angles.sin().to(torch.bfloat16))
    pool = torch.zeros(2, 500, kv_heads, head_dim, dtype=torch.bfloat16)
    slots = torch.randperm(500)[:tokens]
    q = ops.rope_store(qk, v, cos, sin, pool[0], pool[1], slots)
    expected = apply_rope(qk, cos, sin)
    assert torch.equal(q, expected[:, :heads])
    assert torch.equal(pool[0][slots], expected[:, heads:]) and torch.equal(pool[1][slots], v)
    untouched = torch.ones(500, dtype=torch.bool)
    untouched[slots] = False
    assert not pool[:, untouched].any()


def test_silu_mul_is_bit_exact() -> None:
    torch.manual_seed(0)
    gate_up = (torch.randn(17, 2 * 1000) * 8).to(torch.bfloat16)
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -1e-30, 88.0, -88.0])
    gate, up = gate_up.split(1000, dim=-1)
    assert torch.equal(ops.silu_mul(gate_up), torch.nn.functional.silu(gate).mul_(up))


def test_bf16_model_gives_the_same_tokens_with_and_without_the_kernels(smol_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:8]]
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(llama, "fused_elementwise", lambda dtype: False)
        llm = LLM(str(smol_dir), dtype="bfloat16", kv_cache_memory=1 << 27)
        outputs.append([o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]
