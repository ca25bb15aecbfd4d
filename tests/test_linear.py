"""Linear layers: each weight gets the method it should, and the methods agree with F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.models.linear import Linear, OneDnnPackedLinear, TorchLinear, select_linear_method


def onednn_packs(dtype: torch.dtype) -> bool:
    """What this machine's oneDNN takes: fp32 always, bf16 where the CPU has bf16 instructions."""
    return torch.backends.mkldnn.is_available() and \
        (dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))


@pytest.mark.parametrize(("dtype", "device", "packed"), [
    (torch.float32, "cpu", True),
    (torch.bfloat16, "cpu", True),
    (torch.float16, "cpu", False),  # not a dtype we pack
    (torch.float32, "meta", False),  # not a CPU tensor
])
def test_each_weight_gets_the_method_it_should(dtype: torch.dtype, device: str, packed: bool) -> None:
    weight = torch.empty(8, 4, dtype=dtype, device=device)
    expected = OneDnnPackedLinear if packed and onednn_packs(dtype) else TorchLinear
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
    layer = Linear(576, 1536, bias=True)
    layer.load(weight, bias)
    assert isinstance(layer.method, OneDnnPackedLinear)
    out = layer(x)
    assert out.shape == (2, rows, 1536)
    if dtype == torch.bfloat16:
        assert torch.equal(out, F.linear(x, weight, bias))
    else:
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_a_weight_of_the_wrong_shape_is_refused() -> None:
    layer = Linear(576, 1536, bias=False)
    with pytest.raises(ValueError, match="weight \\(576, 1536\\)"):
        layer.load(torch.randn(576, 1536), None)
    with pytest.raises(ValueError, match="bias \\(7,\\)"):
        layer.load(torch.randn(1536, 576), torch.randn(7))
