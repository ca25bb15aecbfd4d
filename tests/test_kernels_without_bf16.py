"""The kernels' code for AVX-512 CPUs without AVX512-BF16 (bf16 pairs widened to fp32 for FMAs)
gives the same results as the AVX512-BF16 build this machine runs: it is built here a second time
with -mno-avx512bf16, under its own op namespace, since no CPU in CI would otherwise compile it."""

from __future__ import annotations

import pytest
import torch
from test_attention import random_paged_requests

from tokenmill.kernels import CFLAGS, SOURCES, available, cpu_specific_name

pytestmark = pytest.mark.skipif(not available(),
                                reason="no AVX-512 (or no compiler): the torch path is used")


@pytest.fixture(scope="module")
def without_bf16() -> object:
    from torch.utils.cpp_extension import load

    load(cpu_specific_name("tokenmill_kernels_without_bf16"), sources=SOURCES,
         extra_cflags=[*CFLAGS, "-mno-avx512bf16", "-DTOKENMILL_OPS=tokenmill_without_bf16"],
         extra_ldflags=["-fopenmp"], is_python_module=False)
    return torch.ops.tokenmill_without_bf16


def test_attention_kernels_equal_the_bf16_build(without_bf16: object) -> None:
    torch.manual_seed(0)
    pool, slots, lens = random_paged_requests([1, 17, 40, 300, 33], 16, 3, 64, torch.bfloat16)
    q = torch.randn(5, 9, 64).to(torch.bfloat16)
    # Bit for bit: the two FMAs add the pair products in the order vdpbf16ps does.
    for prefix in (torch.zeros(0, dtype=torch.long), slots[3, :96].contiguous()):
        assert torch.equal(without_bf16.decode_attention(q, pool[0], pool[1], slots, lens, prefix),
                           torch.ops.tokenmill.decode_attention(q, pool[0], pool[1], slots, lens, prefix))
    chunk = (torch.tensor([0, 2]), torch.tensor([2, 3]), slots[[3, 4]].contiguous(), torch.tensor([300, 33]))
    assert torch.equal(without_bf16.chunk_attention(q, pool[0], pool[1], *chunk),
                       torch.ops.tokenmill.chunk_attention(q, pool[0], pool[1], *chunk))


def test_elementwise_kernels_equal_the_bf16_build(without_bf16: object) -> None:
    torch.manual_seed(0)
    x, residual = torch.randn(2, 33, 576).to(torch.bfloat16)
    weight = torch.randn(576).to(torch.bfloat16)
    for a, b in zip(torch.ops.tokenmill.add_rms_norm(x, residual, weight, 1e-5),
                    without_bf16.add_rms_norm(x, residual, weight, 1e-5)):
        assert torch.equal(a, b)
    gate_up = (torch.randn(33, 2 * 1536) * 4).to(torch.bfloat16)
    assert torch.equal(torch.ops.tokenmill.silu_mul(gate_up), without_bf16.silu_mul(gate_up))


def test_quant_kernels_equal_the_bf16_build(without_bf16: object) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    torch.manual_seed(0)
    x = torch.randn(7, 512).to(torch.bfloat16)
    weight = torch.randn(37, 512) * 0.02
    for qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1):
        blocks = torch.from_numpy(quantize(weight.numpy(), qtype))
        assert torch.equal(without_bf16.dequantize(blocks, int(qtype), 512),
                           torch.ops.tokenmill.dequantize(blocks, int(qtype), 512))
        assert torch.equal(without_bf16.quant_linear(x, blocks, int(qtype)),
                           torch.ops.tokenmill.quant_linear(x, blocks, int(qtype)))
    assert torch.equal(without_bf16.quantize_q8_0(weight), torch.ops.tokenmill.quantize_q8_0(weight))


def test_dense_kernel_equals_the_bf16_build(without_bf16: object) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(9, 97).to(torch.bfloat16), torch.randn(37, 97).to(torch.bfloat16)
    packed = torch.ops.tokenmill.pack_dense(weight)
    assert torch.equal(without_bf16.dense_linear(x, packed, 37), torch.ops.tokenmill.dense_linear(x, packed, 37))


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_encoder_kernels_equal_the_bf16_build(without_bf16: object, head_dim: int) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(150, 3, 4, head_dim).to(torch.bfloat16)
    seq_starts = torch.tensor([0, 1, 40, 150])
    assert torch.equal(without_bf16.encoder_attention(*qkv.unbind(1), seq_starts, head_dim ** -0.5),
                       torch.ops.tokenmill.encoder_attention(*qkv.unbind(1), seq_starts, head_dim ** -0.5))
    x, residual = torch.randn(2, 33, 384).to(torch.bfloat16)
    weight, bias = torch.randn(2, 384).to(torch.bfloat16)
    assert torch.equal(without_bf16.add_layer_norm(x, residual, weight, bias, 1e-12),
                       torch.ops.tokenmill.add_layer_norm(x, residual, weight, bias, 1e-12))
    w = torch.randn(100, 384).to(torch.bfloat16)
    packed, b = torch.ops.tokenmill.pack_dense(w), torch.randn(100).to(torch.bfloat16)
    assert torch.equal(without_bf16.dense_linear(x, packed, 100, b, "gelu"),
                       torch.ops.tokenmill.dense_linear(x, packed, 100, b, "gelu"))
