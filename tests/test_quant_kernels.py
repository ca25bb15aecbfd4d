"""The quantized-weight kernels (tokenmill/kernels/quant.cpp) against gguf's own numpy code: dequantize
bit for bit, quantize_q8_0 byte for byte, quant_linear against dequantize-then-matmul on odd shapes (on
bf16 x, the bf16 weights; on fp32 x, gguf's exact fp32 weights in float64), its results independent of
the batch, and clear errors on bad input."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tokenmill import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no AVX-512 (or no compiler): no quantized kernels")

Q = gguf.GGMLQuantizationType
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte offsets of each block's fp16 scales (d, and the min or dmin where the type has one).
FP16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
               Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(qtype: Q, rows: int, in_features: int, seed: int) -> np.ndarray:
    """[rows, row_bytes]: random quants (every bit pattern) with sane fp16 scales, in gguf's layout."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, in_features // block, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scales = rng.uniform(0.002, 0.05, blocks.shape[:2]) * rng.choice([-1.0, 1.0], blocks.shape[:2])
        blocks[..., offset:offset + 2] = scales.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def quantized_blocks(qtype: Q, rows: int, in_features: int, seed: int) -> np.ndarray:
    """Blocks of random normal weights as gguf quantizes them, where it can; random blocks otherwise."""
    weights = np.random.default_rng(seed).standard_normal((rows, in_features), dtype=np.float32)
    try:
        return gguf.quants.quantize(weights, qtype)
    except NotImplementedError:  # gguf's numpy code quantizes no K-quant
        return random_blocks(qtype, rows, in_features, seed)


def reference_dequantize(blocks: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).to(torch.bfloat16)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype: Q) -> None:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    for blocks in (random_blocks(qtype, 37, 3 * block, 0), quantized_blocks(qtype, 5, 2 * block, 1)):
        in_features = blocks.shape[1] // type_size * block
        got = torch.ops.tokenmill.dequantize(torch.from_numpy(blocks), qtype, in_features)
        assert torch.equal(got.view(torch.int16), reference_dequantize(blocks, qtype).view(torch.int16))


def test_dequantize_keeps_torch_nan_and_inf() -> None:
    blocks = random_blocks(Q.Q4_1, 3, 64, 0)
    blocks[0, 0:2] = np.array([np.inf], np.float16).view(np.uint8)  # inf * q, inf * 0 = NaN
    blocks[1, 2:4] = np.array([np.nan], np.float16).view(np.uint8)
    with np.errstate(invalid="ignore"):
        expected = reference_dequantize(blocks, Q.Q4_1)
    got = torch.ops.tokenmill.dequantize(torch.from_numpy(blocks), Q.Q4_1, 64)
    assert expected.isnan().any() and expected.isinf().any()
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_dequantize_reads_strided_rows_and_writes_into_a_buffer() -> None:
    blocks = torch.from_numpy(random_blocks(Q.Q4_K, 10, 512, 3))
    every_other = blocks[::2]  # the embedding's rows, indexed
    expected = torch.ops.tokenmill.dequantize(every_other.contiguous(), Q.Q4_K, 512)
    assert torch.equal(torch.ops.tokenmill.dequantize(every_other, Q.Q4_K, 512), expected)
    buffer = torch.empty(5, 512, dtype=torch.bfloat16)
    assert torch.ops.tokenmill.dequantize(every_other, Q.Q4_K, 512, out=buffer) is buffer
    assert torch.equal(buffer, expected)
    # Past 8 MB the output is written around the caches (streaming stores): the same values.
    large = torch.from_numpy(random_blocks(Q.Q8_0, 2048, 2048, 4))
    assert torch.equal(torch.ops.tokenmill.dequantize(large, Q.Q8_0, 2048).view(torch.int16),
                       reference_dequantize(large.numpy(), Q.Q8_0).view(torch.int16))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quant_linear_matches_dequantize_then_matmul(qtype: Q) -> None:
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    torch.manual_seed(0)
    for in_features in sorted({block, 3 * block, 2048 + (block if block == 256 else 96)}):
        for out_features in (1, 3, 37, 100):
            blocks = torch.from_numpy(random_blocks(qtype, out_features, in_features, out_features))
            weight = torch.ops.tokenmill.dequantize(blocks, qtype, in_features).float()
            for rows in (1, 2, 5, 7, 31, 64, 300):
                x = torch.randn(rows, in_features + 32).to(torch.bfloat16)[:, :in_features]  # rows apart
                got = torch.ops.tokenmill.quant_linear(x, blocks, qtype)
                expected = x.float() @ weight.T
                # fp32 sums in another order (|error| well under 1e-5 of the sum of |products|), then
                # one bf16 rounding (half an ulp, 2^-9 relative) on each side.
                bound = 2.0**-8 * expected.abs() + 1e-5 * (x.float().abs() @ weight.abs().T)
                assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
                assert ((got.float() - expected).abs() <= bound).all(), (in_features, out_features, rows)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quant_linear_on_fp32_uses_the_exact_weights(qtype: Q) -> None:
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    torch.manual_seed(3)
    for in_features in sorted({block, 3 * block, 2048 + (block if block == 256 else 96)}):
        for out_features in (1, 3, 37):
            blocks = torch.from_numpy(random_blocks(qtype, out_features, in_features, out_features))
            weight = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype)).double()  # gguf's fp32
            # Rows of the identity give the weights back exactly: no value rounded on the way.
            identity = torch.eye(in_features)[:64]
            assert torch.equal(torch.ops.tokenmill.quant_linear(identity, blocks, qtype).double(), weight[:, :64].T)
            for rows in (1, 5, 64, 300):
                x = torch.randn(rows, in_features + 16)[:, :in_features]  # rows apart
                got = torch.ops.tokenmill.quant_linear(x, blocks, qtype)
                assert got.dtype == torch.float32 and got.shape == (rows, out_features)
                # fp32 FMAs: each product meets K / 16 additions in its lane and 4 in the lanes' sum.
                bound = (in_features / 16 + 4) * 2.0**-24 * (x.double().abs() @ weight.abs().T)
                assert ((got.double() - x.double() @ weight.T).abs() <= bound).all(), (in_features, out_features, rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quant_linear_is_batch_invariant(qtype: Q, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    # The 300 rows take 3 of the kernel's panels of x (132 rows here), a sub-batch of 64 one.
    blocks = torch.from_numpy(random_blocks(qtype, 37, 2304, 2))
    x = torch.randn(300, 2304).to(dtype)
    whole = torch.ops.tokenmill.quant_linear(x, blocks, qtype)
    # Sub-batches of every size up to 13 and a large one: through the register and the scratch paths.
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 64]
    pieces, start = [], 0
    for i in range(len(x)):
        if start >= len(x):
            break
        size = sizes[i % len(sizes)]
        pieces.append(torch.ops.tokenmill.quant_linear(x[start:start + size], blocks, qtype))
        start += size
    assert torch.equal(torch.cat(pieces), whole)
    for m in (0, 5, 150, 299):
        alone = torch.ops.tokenmill.quant_linear(x[m:m + 1], blocks, qtype)
        others = torch.randn(9, 2304).to(dtype)
        among_others = torch.cat([others[:6], x[m:m + 1], others[6:]])
        assert torch.equal(alone[0], whole[m])
        assert torch.equal(torch.ops.tokenmill.quant_linear(among_others, blocks, qtype)[6], whole[m])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_q8_0_is_byte_exact(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    weight = (torch.randn(37, 256) * torch.rand(37, 1) * 10).to(dtype)
    weight[3, 32:64] = 0  # a zero block: d = 0
    weight[4, :32] = torch.arange(32) - 16.5  # halves to round away from zero
    expected = gguf.quants.quantize(weight.float().numpy(), Q.Q8_0)
    assert np.array_equal(torch.ops.tokenmill.quantize_q8_0(weight).numpy(), expected)


def test_bad_input_is_refused_clearly() -> None:
    blocks = torch.from_numpy(random_blocks(Q.Q8_0, 4, 64, 0))
    x = torch.randn(2, 64).to(torch.bfloat16)
    ops = torch.ops.tokenmill
    for wrong in (x.half(), x.to(torch.int32), torch.randn(2, 128)[:, ::2], x.float()[0]):
        with pytest.raises(RuntimeError, match=r"x must be bf16 or fp32 \[M, K\] with contiguous rows, not"):
            ops.quant_linear(wrong, blocks, Q.Q8_0)
    with pytest.raises(RuntimeError, match="blocks must be uint8"):
        ops.quant_linear(x, blocks.view(torch.int8), Q.Q8_0)
    with pytest.raises(RuntimeError, match="not a multiple of the type's block of 32"):
        ops.dequantize(blocks, Q.Q8_0, 48)
    with pytest.raises(RuntimeError, match=r"out must be contiguous bf16 \[4, 64\]"):
        ops.dequantize(blocks, Q.Q8_0, 64, out=torch.empty(4, 64))
    with pytest.raises(RuntimeError, match="blocks have 68 bytes a row, 136 expected"):
        ops.quant_linear(torch.randn(2, 128).to(torch.bfloat16), blocks, Q.Q8_0)
    with pytest.raises(RuntimeError, match="not a multiple of the type's block of 256"):
        ops.quant_linear(x, blocks, Q.Q4_K)
    for unknown in (Q.F16, Q.Q2_K, 99):
        with pytest.raises(RuntimeError, match=f"quantized type {int(unknown)} has no kernel"):
            ops.quant_linear(x, blocks, unknown)
    with pytest.raises(RuntimeError, match="not a multiple of Q8_0's block of 32"):
        ops.quantize_q8_0(torch.randn(2, 48))
    with pytest.raises(RuntimeError, match="weight must be fp32 or bf16"):
        ops.quantize_q8_0(torch.randn(2, 64).half())
    assert kernels.QUANT_TYPES == frozenset(int(t) for t in TYPES)
