"""The fused bf16 elementwise kernels (Llama's and Gemma's) give bit for bit what the torch ops they replace
give, the encoder's add + LayerNorm is within rounding of torch's, and each model gets them where they serve."""

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
    GEMMA_TORCH_OPS,
    TORCH_OPS,
    add_layer_norm,
    apply_rope,
    gemma_norm_add_norm,
    gemma_rms_norm,
    rope_store,
    select_add_layer_norm,
    select_elementwise_ops,
    select_gemma_ops,
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
    for bad in (-1, 500):  # a slot outside the pool is refused, not written
        outside = slots.clone()
        outside[tokens // 2] = bad
        with pytest.raises(RuntimeError, match="slot_mapping outside the pool's 500 slots"):
            ops.rope_store(qk, v, cos, sin, pool[0], pool[1], outside)


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
            "from tokenmill.models.elementwise import GEMMA_TORCH_OPS, TORCH_OPS, add_layer_norm, "
            "select_add_layer_norm, select_elementwise_ops, select_gemma_ops\n"
            "print(select_elementwise_ops(torch.device('cpu'), torch.bfloat16, 64) is TORCH_OPS)\n"
            "print(select_gemma_ops(torch.device('cpu'), torch.bfloat16) is GEMMA_TORCH_OPS)\n"
            "print(select_add_layer_norm(torch.device('cpu'), torch.float32) is add_layer_norm)\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "True"]


def gemma_scale(*shape: int) -> torch.Tensor:
    """A Gemma norm's fp32 factor, 1 + a bf16 weight (models/gemma3.py's norm_scale)."""
    return 1.0 + torch.randn(*shape).to(torch.bfloat16).float()


# Gemma 3's hidden sizes (270M: 640, 1B: 1152, 4B: 2560) and head_dim (256), odd widths and long rows.
@needs_kernels
@pytest.mark.parametrize("width", [5, 100, 256, 640, 1152, 2560, 70000])
def test_gemma_norms_are_bit_exact(width: int) -> None:
    torch.manual_seed(width)
    x = (torch.randn(33, width) * torch.rand(33, 1) * 20).to(torch.bfloat16)
    residual = (torch.randn(33, width) * 4).to(torch.bfloat16)
    scale, next_scale = gemma_scale(width), gemma_scale(width)
    assert torch.equal(ops.gemma_rms_norm(x, scale, 1e-6), gemma_rms_norm(x, scale, 1e-6))
    normed, summed = ops.gemma_norm_add_norm(x, residual, scale, next_scale, 1e-6)
    expected_normed, expected_summed = gemma_norm_add_norm(x, residual, scale, next_scale, 1e-6)
    assert torch.equal(summed, expected_summed) and torch.equal(normed, expected_normed)


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 1, 256), (8, 4, 256), (3, 2, 40)])
def test_gemma_qk_norm_per_head_on_the_qkv_rows_is_bit_exact(heads: int, kv_heads: int, head_dim: int) -> None:
    """The q and k heads normed where the qkv projection left them (rows strided past v), a scale per head."""
    torch.manual_seed(head_dim)
    qkv = (torch.randn(37, (heads + 2 * kv_heads) * head_dim) * 3).to(torch.bfloat16)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(37, heads + kv_heads, head_dim)
    for scale in (gemma_scale(heads + kv_heads, head_dim), gemma_scale(head_dim)):
        normed = ops.gemma_rms_norm(qk, scale, 1e-6)
        assert normed.is_contiguous() and torch.equal(normed, gemma_rms_norm(qk, scale, 1e-6))


def torch_gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.gelu(gate, approximate="tanh") * up as torch's vector loop computes it. NOTE: torch takes the elements
    past a row's last full vectors through its scalar tanh, a few ulp off in the far negative tail (-0 at
    x = -5.06 becomes -1.5e-7); the kernel is the vector loop everywhere, so the reference runs on one flat row
    padded to whole vectors."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    flat = F.pad(gate.flatten(), (0, -gate.numel() % 64))
    return F.gelu(flat, approximate="tanh")[:gate.numel()].view(gate.shape).mul_(up)


@needs_kernels
def test_gelu_tanh_mul_is_bit_exact_on_every_bf16_gate() -> None:
    """Every bf16 value (NaNs, infinities, denormals, the tail where 1 + tanh cancels) as a gate."""
    gate = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(64, 1024)
    up = torch.randn(64, 1024).to(torch.bfloat16)
    gate_up = torch.cat((gate, up), dim=1)
    assert same_bits(ops.gelu_tanh_mul(gate_up), torch_gelu_tanh_mul(gate_up))
    assert same_bits(ops.gelu_tanh_mul(gate_up), GEMMA_TORCH_OPS.gelu_tanh_mul(gate_up))  # 1024: no scalar tail


@needs_kernels
@pytest.mark.parametrize("width", [1, 37, 2048, 6912])
def test_gelu_tanh_mul_is_bit_exact_at_any_width(width: int) -> None:
    torch.manual_seed(width)
    gate_up = (torch.randn(9, 2 * width + 6) * 4).to(torch.bfloat16)
    for x in (gate_up[:, :2 * width].contiguous(), gate_up[:, :2 * width]):  # and rows that are views
        assert torch.equal(ops.gelu_tanh_mul(x), torch_gelu_tanh_mul(x))


@needs_kernels
def test_gemma_kernels_refuse_bad_input() -> None:
    x, residual = torch.randn(2, 4, 64).to(torch.bfloat16)
    scale = gemma_scale(64)
    with pytest.raises(RuntimeError, match="x must be bf16, not Float"):
        ops.gemma_rms_norm(x.float(), scale, 1e-6)
    with pytest.raises(RuntimeError, match="the last dim contiguous"):
        ops.gemma_rms_norm(x.T, scale, 1e-6)
    with pytest.raises(RuntimeError, match="scale must be fp32 \\[64\\]"):
        ops.gemma_rms_norm(x, scale.to(torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="scale must be \\[n\\] or, for x \\[T, heads, n\\], \\[heads, n\\]"):
        ops.gemma_rms_norm(x.view(4, 2, 32), gemma_scale(3, 32), 1e-6)
    with pytest.raises(RuntimeError, match="residual and x shapes differ"):
        ops.gemma_norm_add_norm(x, residual[:3], scale, scale, 1e-6)
    with pytest.raises(RuntimeError, match="next_scale must be fp32 \\[64\\]"):
        ops.gemma_norm_add_norm(x, residual, scale, scale[:63], 1e-6)
    with pytest.raises(RuntimeError, match="gate_up must have an even width"):
        ops.gelu_tanh_mul(x[:, :63])
    assert ops.gemma_rms_norm(x[:0], scale, 1e-6).shape == (0, 64)


@pytest.mark.parametrize(("device", "dtype", "fused"), [
    ("cpu", torch.bfloat16, True),
    ("cpu", torch.float32, False),  # the fp32 path stays transformers' ops (token-exact tests)
    ("meta", torch.bfloat16, False),
])
def test_gemma_ops_are_chosen_where_they_serve(device: str, dtype: torch.dtype, fused: bool) -> None:
    chosen = select_gemma_ops(torch.device(device), dtype)
    if fused and kernels.available():
        assert (chosen.rms_norm, chosen.norm_add_norm, chosen.gelu_tanh_mul) == \
            (ops.gemma_rms_norm, ops.gemma_norm_add_norm, ops.gelu_tanh_mul)
    else:
        assert chosen is GEMMA_TORCH_OPS


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
