"""Linear layers, each multiplying through the method chosen at load for its weight's format.

A `LinearMethod` holds one layer's weight in its format, prepared once at load, and computes
act(x W^T + b), the activation (none, or a GELU) given when the model is built (`Linear(..., activation=)`).
`Linear.load` takes, for each weight, the first method in `LINEAR_METHODS` that serves it
(by its format, dtype and device, and what this machine's libraries support): a new weight format
(a quantized one with its own kernel) is one method class and one entry there. Code that counts
weights reads `Linear.in_features` and `out_features`, never a method's storage.

Where tokenmill's kernels run (AVX-512), quantized, bf16 and fp32 weights get batch-invariant methods: a
row's result depends on that row and the weight alone, bit for bit, never on the other rows of the batch
(a request's output must not depend on what it was batched with). `Int8DotLinear` (models/int8_dot.py) serves
bf16 models' weights in the block formats it has a kernel for (int8 activations), `QuantizedLinear`
(models/quantized.py) the other weights kept in ggml's block formats; `InvariantPlainLinear` plain bf16/fp32
CPU weights, through tokenmill's dense kernel (`dense_linear` in kernels/quant.cpp: packed once at load, one fp32
sum per output, in order of k): faster than oneDNN's packed GEMM up to M=64 (1.2-1.6x at M=1 and 8), up to 5%
slower at M=256, and within 3% of it at M=1024-4096 on an encoder's shapes (K=384/1536;
benchmarks/bench_plain_linear.py). It adds the bias and applies the
activation where each sum ends, in fp32, rounding once (no passes over the output after the product);
every other method applies the activation after its product, through torch (`activate`).

`OneDnnPackedLinear`, where the kernels do not run (no AVX-512): oneDNN's GEMM with the weight reordered
into its blocked layout once at load (the weight packing torch.compile's freezing does; bf16 linears
otherwise reorder it on every call): 1.2-1.3x on the decode shapes (M=64) and 1.8x for one sequence
(M=1), against MKL's sgemm (torch's default fp32 GEMM on CPU) about 2x. NOTE: not batch-invariant:
oneDNN blocks the product differently for different M, so a row's bits change with the batch.
`TorchLinear` (F.linear on the plain weight) is the reference, and serves the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill import kernels
from tokenmill.models.int8_dot import Int8DotLinear
from tokenmill.models.linear_method import Activation, LinearMethod, activate
from tokenmill.models.quantized import QuantizedLinear, Weight


class TorchLinear(LinearMethod):
    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        return True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation = None) -> None:
        self.weight, self.bias, self.activation = weight, bias, activation

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return activate(F.linear(x, self.weight, self.bias), self.activation)


class OneDnnPackedLinear(LinearMethod):
    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        # oneDNN refuses bf16 on CPUs without bf16 instructions.
        return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and
                                                 torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation = None) -> None:
        self.out_features = weight.shape[0]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias, self.activation = bias, activation

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.weight, self.bias, "none", [], "")
        return activate(y.view(*shape[:-1], self.out_features), self.activation)


DENSE_DTYPES = (torch.float32, torch.bfloat16)  # torch.ops.tokenmill.dense_linear's (x of the weight's dtype)


class InvariantPlainLinear(LinearMethod):
    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype in DENSE_DTYPES and kernels.available()

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation = None) -> None:
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.tokenmill.pack_dense(weight)
        self.bias = None if bias is None else bias.float()  # the kernel adds it in fp32 (bf16 widens exactly)
        self.activation = activation or "none"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(self.packed.dtype).contiguous()
        y = torch.ops.tokenmill.dense_linear(rows, self.packed, self.out_features, self.bias, self.activation)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


# In order of preference; the torch method serves every plain weight.
LINEAR_METHODS: tuple[type[LinearMethod], ...] = (Int8DotLinear, QuantizedLinear, InvariantPlainLinear,
                                                  OneDnnPackedLinear, TorchLinear)


def select_linear_method(weight: Weight) -> type[LinearMethod]:
    return next(method for method in LINEAR_METHODS if method.supports(weight))


class Linear(nn.Module):
    """y = act(x W^T + b), through the method `load` chose for W. No weight until loaded."""

    method: LinearMethod

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: Activation = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.activation = activation

    def load(self, weight: Weight, bias: torch.Tensor | None) -> None:
        """Takes the layer's weight (and bias) as loaded, in the model's dtype or quantized, and prepares it once."""
        if tuple(weight.shape) != (self.out_features, self.in_features) or \
                (bias is not None and bias.shape != (self.out_features,)):
            raise ValueError(f"weight {tuple(weight.shape)} and bias {None if bias is None else tuple(bias.shape)} "
                             f"for a linear layer of {self.in_features} -> {self.out_features}")
        self.method = select_linear_method(weight)(weight, bias, self.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(x)

    def forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """forward's values widened to fp32 (a head's logits)."""
        return self.method.apply_fp32(x)

    def extra_repr(self) -> str:
        method = type(self.method).__name__ if hasattr(self, "method") else "not loaded"
        activation = f", activation={self.activation}" if self.activation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"
                f"{activation}, {method}")
