"""Linear layers: each weight gets the method it should, the methods agree with F.linear, and the default
one for plain weights (the dense kernel, kernels/dense.cpp) gives each row the same bits whatever the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill import kernels
from tokenmill.models.linear import (
    InvariantPlainLinear,
    Linear,
    OneDnnPackedLinear,
    TorchLinear,
    select_linear_method,
)

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no AVX-512 (or no compiler): no dense kernel")
# SmolLM2's MLP shapes, and odd ones: K odd (bf16's last pair half empty), N not a multiple of 16, K under 16.
SHAPES = [(576, 1536), (1536, 576), (97, 37), (2065, 9), (7, 70), (1, 3)]  # K -> N
ROWS = [1, 3, 7, 16, 64, 200]


def onednn_packs(dtype: torch.dtype) -> bool:
    """What this machine's oneDNN takes: fp32 always, bf16 where the CPU has bf16 instructions."""
    return torch.backends.mkldnn.is_available() and \
        (dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))


@pytest.mark.parametrize(("dtype", "device", "plain_cpu"), [
    (torch.float32, "cpu", True),
    (torch.bfloat16, "cpu", True),
    (torch.float16, "cpu", False),  # a dtype neither the kernel nor oneDNN packing takes
    (torch.float32, "meta", False),  # not a CPU tensor
])
def test_each_weight_gets_the_method_it_should(dtype: torch.dtype, device: str, plain_cpu: bool) -> None:
    weight = torch.empty(8, 4, dtype=dtype, device=device)
    if plain_cpu and kernels.available():
        expected = InvariantPlainLinear
    elif plain_cpu and onednn_packs(dtype):
        expected = OneDnnPackedLinear
    else:
        expected = TorchLinear
    assert select_linear_method(weight) is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_the_packed_method_equals_f_linear(dtype: torch.dtype, rows: int) -> None:
    """bit for bit in bf16 (oneDNN does the product either way); to rounding in fp32 (MKL vs oneDNN)."""
    if not onednn_packs(dtype):
        pytest.skip("oneDNN does not take this dtype here")
    torch.manual_seed(rows)
    weight, bias = torch.randn(1536, 576).to(dtype), torch.randn(1536).to(dtype)
    x = torch.randn(2, rows, 576).to(dtype)
    out = OneDnnPackedLinear(weight, bias).apply(x)
    assert out.shape == (2, rows, 1536)
    if dtype == torch.bfloat16:
        assert torch.equal(out, F.linear(x, weight, bias))
    else:
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def loaded(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.load(weight, bias)
    assert isinstance(layer.method, InvariantPlainLinear)
    return layer


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
def test_each_row_gets_the_same_bits_in_any_batch(dtype: torch.dtype, in_features: int, out_features: int) -> None:
    torch.manual_seed(in_features)
    layer = loaded(torch.randn(out_features, in_features).to(dtype), torch.randn(out_features).to(dtype))
    x = torch.randn(max(ROWS), in_features).to(dtype)
    whole = layer(x)
    alone = torch.cat([layer(x[m:m + 1]) for m in range(len(x))])
    assert torch.equal(alone, whole)
    for rows in ROWS:
        # The first rows as a batch of their own, and a row among others it was never batched with.
        assert torch.equal(layer(x[:rows]), whole[:rows])
        others = torch.randn(rows, in_features).to(dtype)
        assert torch.equal(layer(torch.cat([others, x[-1:]]))[-1], whole[-1])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_thread_count_changes_no_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    layer = loaded(torch.randn(1536, 576).to(dtype), None)
    x = torch.randn(64, 576).to(dtype)
    threads = torch.get_num_threads()
    expected = layer(x)
    try:
        torch.set_num_threads(1)
        assert torch.equal(layer(x), expected)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
def test_the_dense_kernel_is_as_close_as_its_sums_allow(dtype: torch.dtype, in_features: int,
                                                        out_features: int) -> None:
    torch.manual_seed(out_features)
    weight = torch.randn(out_features, in_features).to(dtype)
    x = torch.randn(3, 64, in_features).to(dtype)
    got = loaded(weight, None)(x)
    assert got.dtype == dtype and got.shape == (3, 64, out_features)
    exact = x.double() @ weight.double().T
    # One fp32 sum per output, each product meeting at most K additions (exact products: bf16 pairs, or FMAs);
    # F.linear's sums are within the same bound of the exact ones.
    sum_error = in_features * 2.0**-24 * (x.double().abs() @ weight.double().abs().T)
    reference = F.linear(x, weight).double()
    if dtype == torch.bfloat16:  # then one rounding to bf16 (8 significant bits): 2^-8 relative, on each side
        assert ((got.double() - exact).abs() <= 1.01 * (2.0**-8 * exact.abs() + sum_error)).all()
        assert ((got.double() - reference).abs() <= 1.01 * (2.0**-7 * exact.abs() + 2 * sum_error)).all()
    else:
        assert ((got.double() - exact).abs() <= sum_error).all()
        assert ((got.double() - reference).abs() <= 2 * sum_error).all()


@needs_kernels
def test_the_dense_ops_read_strided_rows_and_refuse_bad_input() -> None:
    ops = torch.ops.tokenmill
    weight = torch.randn(37, 64)
    packed = ops.pack_dense(weight)
    assert packed.shape == (3, 64, 16, 1) and torch.equal(packed[0, :, 3, 0], weight[3])
    assert torch.equal(packed[2, :, 5:, 0], torch.zeros(64, 11))  # features past N are zeros
    wide = torch.randn(5, 80)
    assert torch.equal(ops.dense_linear(wide[:, :64], packed, 37), ops.dense_linear(wide[:, :64].contiguous(),
                                                                                   packed, 37))
    bf16_packed = ops.pack_dense(torch.randn(16, 7).to(torch.bfloat16))
    assert bf16_packed.shape == (1, 4, 16, 2) and (bf16_packed[0, 3, :, 1] == 0).all()  # K odd: a zero after
    with pytest.raises(RuntimeError, match=r"packed must be pack_dense's Float \[4, 64, 16, 1\] for 50 x 64"):
        ops.dense_linear(torch.randn(2, 64), packed, 50)
    with pytest.raises(RuntimeError, match="packed must be pack_dense's BFloat16"):
        ops.dense_linear(torch.randn(2, 64).to(torch.bfloat16), packed, 37)
    with pytest.raises(RuntimeError, match="x must be bf16 or fp32 \\[M, K\\] with contiguous rows"):
        ops.dense_linear(torch.randn(64, 2).T, packed, 37)
    with pytest.raises(RuntimeError, match="weight must be bf16 or fp32 \\[N, K\\], not Half"):
        ops.pack_dense(weight.half())
    assert ops.dense_linear(torch.randn(0, 64), packed, 37).shape == (0, 37)


def test_a_weight_of_the_wrong_shape_is_refused() -> None:
    layer = Linear(576, 1536, bias=False)
    with pytest.raises(ValueError, match="weight \\(576, 1536\\)"):
        layer.load(torch.randn(576, 1536), None)
    with pytest.raises(ValueError, match="bias \\(7,\\)"):
        layer.load(torch.randn(1536, 576), torch.randn(7))
