"""The fused bf16 elementwise kernels give bit for bit what the torch ops they replace give, the encoder's
add + LayerNorm is within rounding of torch's, and each model gets them where they serve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_exactness import QUESTIONS

from tokenmill import LLM, SamplingParams, kernels
from tokenmill.models import llama
from tokenmill.models.elementwise import (
    TORCH_OPS,
    add_layer_norm,
    apply_rope,
    rope_store,
    select_add_layer_norm,
    select_elementwise_ops,
    signed_sin,
)
from tokenmill.models.llama import RMSNorm

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no AVX-512 (or no compiler): torch ops are used")
ops = torch.ops.tokenmill if kernels.available() else None


def torch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x if residual is None else residual + x
    normed = summed.float()
    normed = normed * normed.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return normed.to(torch.bfloat16).mul_(weight), summed


# Widths below one 8-lane vector, with leftover vectors and elements, and past the sum's first cascade level.
@needs_kernels
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


@needs_kernels
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


@needs_kernels
def test_rms_norm_module_gives_the_same_bits_on_both_paths() -> None:
    """The module as the layers call it, with the fused ops and with the torch ops."""
    torch.manual_seed(0)
    weight = torch.randn(64).to(torch.bfloat16)
    fused, reference = (RMSNorm(64, 1e-6, o).to(torch.bfloat16) for o in (select_elementwise_ops(
        torch.device("cpu"), torch.bfloat16, 64), TORCH_OPS))
    fused.weight.data, reference.weight.data = weight, weight
    x, residual = torch.randn(2, 12, 64).to(torch.bfloat16)
    for (normed, summed), (expected_normed, expected_summed) in zip([fused(x, residual), fused(x)],
                                                                    [reference(x, residual), reference(x)]):
        assert torch.equal(normed, expected_normed) and torch.equal(summed, expected_summed)
    assert fused(x)[1] is x


@needs_kernels
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


@needs_kernels
def test_silu_mul_is_bit_exact() -> None:
    torch.manual_seed(0)
    gate_up = (torch.randn(17, 2 * 1000) * 8).to(torch.bfloat16)
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -1e-30, 88.0, -88.0])
    gate, up = gate_up.split(1000, dim=-1)
    assert torch.equal(ops.silu_mul(gate_up), torch.nn.functional.silu(gate).mul_(up))


@needs_kernels
def test_bf16_model_gives_the_same_tokens_with_and_without_the_kernels(smol_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:8]]
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(llama, "select_elementwise_ops", lambda device, dtype, head_dim: TORCH_OPS)
        llm = LLM(str(smol_dir), dtype="bfloat16", kv_cache_memory=1 << 27)
        outputs.append([o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(("device", "dtype", "head_dim", "fused", "fused_rope"), [
    ("cpu", torch.bfloat16, 64, True, True),
    ("cpu", torch.bfloat16, 80, True, False),  # rope_store takes heads of a multiple of 32
    ("cpu", torch.float32, 64, False, False),  # the kernels are bf16 only
    ("cpu", torch.float16, 128, False, False),
    ("meta", torch.bfloat16, 64, False, False),  # not a CPU tensor
])
def test_each_fused_op_is_chosen_where_it_serves(device: str, dtype: torch.dtype, head_dim: int, fused: bool,
                                                 fused_rope: bool) -> None:
    chosen = select_elementwise_ops(torch.device(device), dtype, head_dim)
    fused, fused_rope = fused and kernels.available(), fused_rope and kernels.available()
    assert (chosen.rms_norm, chosen.add_rms_norm, chosen.silu_mul) == \
        ((ops.rms_norm, ops.add_rms_norm, ops.silu_mul) if fused else
         (TORCH_OPS.rms_norm, TORCH_OPS.add_rms_norm, TORCH_OPS.silu_mul))
    assert chosen.rope_store == (ops.rope_store if fused_rope else rope_store)


def test_a_cpu_without_avx512_gets_the_torch_ops() -> None:
    """ATEN_CPU_CAPABILITY=avx2 makes torch (and so tokenmill) see a CPU without AVX-512."""
    code = ("import torch\n"
            "from tokenmill.models.elementwise import TORCH_OPS, add_layer_norm, select_add_layer_norm, "
            "select_elementwise_ops\n"
            "print(select_elementwise_ops(torch.device('cpu'), torch.bfloat16, 64) is TORCH_OPS)\n"
            "print(select_add_layer_norm(torch.device('cpu'), torch.float32) is add_layer_norm)\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True"]


def layer_norm_bound(summed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of the fp32 sums in float64, and the scale errors are measured against: |w| (1 + |xhat|) + |b|."""
    s = summed.double()
    normed = (s - s.mean(-1, keepdim=True)) / (s.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return normed * weight.double() + bias.double(), weight.double().abs() * (1 + normed.abs()) + bias.double().abs()


# Widths below one vector, with a tail, MiniLM's, and long rows.
@needs_kernels
@pytest.mark.parametrize("width", [1, 5, 100, 384, 1000, 20000])
def test_add_layer_norm_in_fp32_is_within_1e_6_of_layer_norm(width: int) -> None:
    """Within 1e-6 (relative to |w| (1 + |xhat|) + |b|) of the exact LayerNorm of the fp32 sum x + residual,
    even for rows whose mean is far above their spread (where torch's, which rounds its mean, is off by 1e-5);
    and of torch's F.layer_norm(x + residual) on rows of zero mean."""
    torch.manual_seed(width)
    x, residual = torch.randn(2, 33, width)
    x[1:4] *= 1000
    x[4:8] += 1000  # a large mean
    weight, bias = torch.randn(width), torch.randn(width)
    got = ops.add_layer_norm(x, residual, weight, bias, 1e-12)
    exact, scale = layer_norm_bound(x + residual, weight, bias, 1e-12)
    assert ((got.double() - exact).abs() <= 1e-6 * scale).all()
    centred = slice(8, None)
    assert ((got[centred] - F.layer_norm(x + residual, (width,), weight, bias, 1e-12)[centred]).abs().double() <=
            1e-6 * scale[centred]).all()


@needs_kernels
@pytest.mark.parametrize("width", [5, 384, 1000])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_add_layer_norm_in_bf16_rounds_the_fp32_result(width: int, weight_dtype: torch.dtype) -> None:
    """bf16 rows: the sum and the norm in fp32 (the sum not rounded to bf16 as torch's x + residual is),
    then one rounding: within bf16's half ulp of the exact result (plus the fp32 steps' 1e-6)."""
    torch.manual_seed(width)
    x, residual = (torch.randn(2, 33, width) * 4).to(torch.bfloat16)
    weight, bias = torch.randn(width).to(weight_dtype), torch.randn(width).to(weight_dtype)
    got = ops.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert got.dtype == torch.bfloat16
    exact, scale = layer_norm_bound(x.float() + residual.float(), weight, bias, 1e-5)
    assert ((got.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6 * scale).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_layer_norm_gives_a_row_the_same_bits_in_any_batch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, residual = torch.randn(2, 300, 384).to(dtype)
    weight, bias = torch.randn(384).to(dtype), torch.randn(384).to(dtype)
    whole = ops.add_layer_norm(x, residual, weight, bias, 1e-12)
    alone = torch.cat([ops.add_layer_norm(x[i:i + 1], residual[i:i + 1], weight, bias, 1e-12) for i in range(300)])
    assert torch.equal(alone, whole)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.add_layer_norm(x, residual, weight, bias, 1e-12), whole)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_add_layer_norm_reads_strided_rows_and_refuses_bad_input() -> None:
    x, residual = torch.randn(2, 4, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    wide = torch.randn(4, 80)
    assert torch.equal(ops.add_layer_norm(wide[:, :64], residual, weight, bias, 1e-5),
                       ops.add_layer_norm(wide[:, :64].contiguous(), residual, weight, bias, 1e-5))
    with pytest.raises(RuntimeError, match="x must be bf16 or fp32, not Half"):
        ops.add_layer_norm(x.half(), residual.half(), weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="x must be \\[rows, n\\] with contiguous rows"):
        ops.add_layer_norm(x.T, residual.T, weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="residual must be x's Float \\[4, 64\\]"):
        ops.add_layer_norm(x, residual[:3], weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must be \\[64\\] of one dtype, fp32 or x's"):
        ops.add_layer_norm(x, residual, weight.to(torch.bfloat16), bias, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must be \\[64\\]"):
        ops.add_layer_norm(x, residual, weight[:63], bias[:63], 1e-5)
    assert ops.add_layer_norm(x[:0], residual[:0], weight, bias, 1e-5).shape == (0, 64)


@pytest.mark.parametrize(("device", "dtype", "fused"), [
    ("cpu", torch.bfloat16, True),
    ("cpu", torch.float32, True),
    ("cpu", torch.float16, False),  # the kernel takes bf16 and fp32
    ("meta", torch.float32, False),  # not a CPU tensor
])
def test_add_layer_norm_is_chosen_where_it_serves(device: str, dtype: torch.dtype, fused: bool) -> None:
    chosen = select_add_layer_norm(torch.device(device), dtype)
    assert chosen == (ops.add_layer_norm if fused and kernels.available() else add_layer_norm)
