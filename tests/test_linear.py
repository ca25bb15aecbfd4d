"""Linear layers: each weight gets the method it should, the methods agree with F.linear (and F.gelu after it),
and the default one for plain weights (the dense kernel, kernels/quant.cpp, with its bias + activation epilogue)
gives each row the same bits whatever the batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from scipy.special import erfc

from tokenmill import kernels
from tokenmill.models.linear import (
    InvariantPlainLinear,
    Linear,
    OneDnnPackedLinear,
    TorchLinear,
    select_linear_method,
)
from tokenmill.models.linear_method import Activation, LinearMethod
from tokenmill.models.quantized import QuantizedLinear, quantize_q8_0

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


def loaded(weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation = None) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None, activation=activation)
    layer.load(weight, bias)
    assert isinstance(layer.method, InvariantPlainLinear)
    return layer


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_each_row_gets_the_same_bits_in_any_batch(dtype: torch.dtype, in_features: int, out_features: int,
                                                  activation: Activation) -> None:
    torch.manual_seed(in_features)
    layer = loaded(torch.randn(out_features, in_features).to(dtype), torch.randn(out_features).to(dtype), activation)
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


def exact_activation(pre: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The activation in float64 (scipy's erfc: no cancellation in the tails), as F.gelu defines it."""
    x = pre.double().numpy()
    with np.errstate(over="ignore"):
        if activation == "gelu":
            y = 0.5 * x * erfc(-x / math.sqrt(2))
        elif activation == "gelu_tanh":  # x/2 (1 + tanh(u)) = x / (1 + exp(-2u))
            y = x / (1 + np.exp(-2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        else:
            y = x
    return torch.from_numpy(y)


def ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of the last place of exact as an fp32 (normal results)."""
    spacing = np.spacing(exact.abs().float().numpy()).astype(np.float64)
    return (got.double() - exact).abs() / torch.from_numpy(spacing)


@needs_kernels
def test_the_activations_are_accurate_to_a_few_ulp() -> None:
    """Through an identity weight (each sum one exact product), so the outputs are the activations of x
    themselves: the erf form within 2e-7 of x Phi(x), relative, for x >= -4 (about 2 ulp) and 3e-11 absolute
    below, where x Phi(x) is under 1.3e-4 (common.h's gelu16); the tanh form within 2 ulp plus what the fp32
    rounding of its inner u costs (~|2u| ulp in the negative tail). torch's own F.gelu is far off in the negative
    tail (its 1 + erf cancels: 1e-6 absolute), so the reference is float64."""
    x = torch.cat([torch.linspace(-16, 16, 400_000), torch.randn(100_000) * 3]).view(-1, 20)
    identity = torch.ops.tokenmill.pack_dense(torch.eye(20))
    for activation in ("gelu", "gelu_tanh"):
        got = torch.ops.tokenmill.dense_linear(x, identity, 20, None, activation)
        exact = exact_activation(x, activation)
        error = (got.double() - exact).abs()
        if activation == "gelu":
            assert (error[x >= -4] <= 2e-7 * exact.abs()[x >= -4]).all()
            assert (error[x < -4] <= 3e-11).all()
            assert (ulps(got, exact)[x > 0] <= 1).all()  # x - t Q(t): one rounding
        else:
            normal = exact.abs() >= 2.0**-126
            two_u = 2 * math.sqrt(2 / math.pi) * (x.double() + 0.044715 * x.double() ** 3)
            allowed = 2 + 3 * two_u.abs()
            assert (ulps(got, exact)[normal] <= allowed[normal]).all()
            assert (error[~normal] <= 2.0**-134).all()  # results too small for a normal float
        # Where 1 + erf/tanh does not cancel (x >= -1), torch's fp32 gelu agrees to a few ulp as well.
        torch_gelu = F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")
        assert (ulps(got, torch_gelu.double())[x >= -1] <= 6).all()


@needs_kernels
def test_the_activations_of_inf_and_nan() -> None:
    specials = torch.tensor([float("inf"), float("nan"), 0.0, 1e30, -1e30, 1e-40, -88.0, -30.0])
    zero_sums = torch.zeros(1, 8)  # x = 0: the outputs are the activations of the bias
    packed = torch.ops.tokenmill.pack_dense(torch.randn(8, 8))
    minus_inf = torch.ops.tokenmill.dense_linear(zero_sums, packed, 8, torch.full((8,), float("-inf")), "gelu")
    assert torch.equal(minus_inf, torch.zeros(1, 8)) and minus_inf.signbit().all()  # the erf form's limit, -0
    for activation in ("gelu", "gelu_tanh"):
        got = torch.ops.tokenmill.dense_linear(zero_sums, packed, 8, specials, activation)[0]
        expected = torch.tensor([float("inf"), float("nan"), 0.0, 1e30, -0.0, 5e-41, -0.0, -0.0])
        torch.testing.assert_close(got, expected, equal_nan=True, rtol=0.02, atol=0)
        assert torch.equal(got.signbit(), expected.signbit())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize(("in_features", "out_features"), [(384, 1536), (97, 37), (7, 70)])
def test_the_epilogue_equals_f_gelu_of_f_linear(dtype: torch.dtype, activation: Activation, in_features: int,
                                                out_features: int) -> None:
    """bias + activation in fp32, rounded once: fp32 within the sums' error (times the activation's slope, at
    most 1.13) and a few ulp of the exact result; bf16 within its rounding of it. Against torch's F.linear then
    F.gelu too, both ways off by their sums' error and torch's gelu's own (1.5e-7 absolute in its erf)."""
    torch.manual_seed(in_features)
    weight = torch.randn(out_features, in_features).to(dtype)
    for rows, bias_dtype in [(1, dtype), (7, torch.float32), (300, dtype)]:
        bias = (torch.randn(out_features) * 4).to(bias_dtype)
        x = (torch.randn(rows, in_features) / math.sqrt(in_features)).to(dtype)
        got = loaded(weight, bias, activation)(x)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        pre = x.double() @ weight.double().T + bias.double()
        exact = exact_activation(pre, activation)
        # One fp32 sum per output (K additions of exact products), then the bias' addition.
        sum_error = (in_features + 1) * 2.0**-24 * (x.double().abs() @ weight.double().abs().T + bias.double().abs())
        slope = 1.13 if activation else 1.0
        reference = F.linear(x.float(), weight.float(), bias.float())
        if activation:
            reference = F.gelu(reference, approximate="tanh" if activation == "gelu_tanh" else "none")
        torch_gelu_error = 1e-6 * pre.abs() if activation else 0.0
        if dtype == torch.float32:
            assert ((got.double() - exact).abs() <= slope * sum_error + 5 * 2.0**-23 * exact.abs()).all()
            assert ((got.double() - reference.double()).abs() <=
                    2 * slope * sum_error + 5 * 2.0**-23 * exact.abs() + torch_gelu_error).all()
        else:
            assert ((got.double() - exact).abs() <= 1.01 * (2.0**-8 * exact.abs() + slope * sum_error)).all()
            assert ((got.double() - reference.double()).abs() <=
                    1.01 * (2.0**-8 * exact.abs() + 2 * slope * sum_error) + torch_gelu_error).all()


@pytest.mark.parametrize("method", [TorchLinear, OneDnnPackedLinear, QuantizedLinear])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_every_other_method_applies_the_activation_after_its_product(method: type[LinearMethod],
                                                                     activation: Activation) -> None:
    if method is QuantizedLinear and not kernels.available():
        pytest.skip("no AVX-512 (or no compiler): no quantized kernels")
    if method is OneDnnPackedLinear and not onednn_packs(torch.float32):
        pytest.skip("oneDNN does not take this dtype here")
    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 64), torch.randn(48), torch.randn(2, 5, 64)
    if method is QuantizedLinear:
        weight = quantize_q8_0(weight)
        assert weight.qtype == GGMLQuantizationType.Q8_0
    product = method(weight, bias).apply(x)
    expected = F.gelu(product, approximate="tanh" if activation == "gelu_tanh" else "none")
    assert torch.equal(method(weight, bias, activation).apply(x), expected)


@needs_kernels
def test_the_epilogue_refuses_bad_input() -> None:
    ops = torch.ops.tokenmill
    packed = ops.pack_dense(torch.randn(37, 64))
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match='activation must be "none", "gelu" or "gelu_tanh", not "relu"'):
        ops.dense_linear(x, packed, 37, None, "relu")
    with pytest.raises(RuntimeError, match=r"bias must be fp32 or bf16 \[37\], not Float \[36\]"):
        ops.dense_linear(x, packed, 37, torch.randn(36))
    with pytest.raises(RuntimeError, match=r"bias must be fp32 or bf16 \[37\], not Half"):
        ops.dense_linear(x, packed, 37, torch.randn(37).half())
    assert ops.dense_linear(torch.randn(0, 64), packed, 37, torch.randn(37), "gelu").shape == (0, 37)
