"""Linear layers, each multiplying through the method chosen at load for its weight's format.

A `LinearMethod` holds one layer's weight in its format, prepared once at load, and computes
x W^T + b. `Linear.load` takes, for each weight, the first method in `LINEAR_METHODS` that serves it
(by its format, dtype and device, and what this machine's libraries support): a new weight format
(a quantized one with its own kernel) is one method class and one entry there. Code that counts
weights reads `Linear.in_features` and `out_features`, never a method's storage.

`OneDnnPackedLinear`: torch's default fp32 GEMM on CPU, MKL's sgemm, reaches about half of oneDNN's
rate on this class of CPU (AMD EPYC with AVX-512; M=64, 576x3072: ~200 vs ~380 GFLOP/s). bf16
linears go through oneDNN already, but with the weight in its plain layout, which oneDNN reorders
into its blocked layout on every call. Reordering once at load (the weight packing torch.compile's
freezing does) saves that, with bf16 results the same bit for bit: 1.2-1.3x on the decode shapes
(M=64) and 1.8x for a single sequence (M=1), in bf16 and fp32 alike (fp32 also against the earlier
oneDNN path). `TorchLinear` (F.linear on the plain weight) is the reference, and serves the rest.
`QuantizedLinear` (models/quantized.py) serves weights kept in ggml's block formats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.models.linear_method import LinearMethod
from tokenmill.models.quantized import QuantizedLinear, Weight


class TorchLinear(LinearMethod):
    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        return True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class OneDnnPackedLinear(LinearMethod):
    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        # oneDNN refuses bf16 on CPUs without bf16 instructions.
        return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and
                                                 torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = bias

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.weight, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)


# In order of preference; the torch method serves every plain weight.
LINEAR_METHODS: tuple[type[LinearMethod], ...] = (QuantizedLinear, OneDnnPackedLinear, TorchLinear)


def select_linear_method(weight: Weight) -> type[LinearMethod]:
    return next(method for method in LINEAR_METHODS if method.supports(weight))


class Linear(nn.Module):
    """y = x W^T + b, through the method `load` chose for W. No weight until loaded."""

    method: LinearMethod

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias

    def load(self, weight: Weight, bias: torch.Tensor | None) -> None:
        """Takes the layer's weight (and bias) as loaded, in the model's dtype or quantized, and prepares it once."""
        if tuple(weight.shape) != (self.out_features, self.in_features) or \
                (bias is not None and bias.shape != (self.out_features,)):
            raise ValueError(f"weight {tuple(weight.shape)} and bias {None if bias is None else tuple(bias.shape)} "
                             f"for a linear layer of {self.in_features} -> {self.out_features}")
        self.method = select_linear_method(weight)(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(x)

    def extra_repr(self) -> str:
        method = type(self.method).__name__ if hasattr(self, "method") else "not loaded"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, {method}"
