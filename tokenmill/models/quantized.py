"""Weights kept in ggml's block formats, and the linear method that multiplies by them.

A `QuantizedWeight` is a weight [out_features, in_features] as a GGUF file stores it: one row of
bytes per output feature, each row in_features / block_size blocks (`gguf.GGML_QUANT_SIZES`).
`QuantizedLinear` multiplies by it through the C++ kernels (kernels/quant.cpp): bf16 activations on
the bf16 values `dequantize` gives, fp32 ones (the accuracy mode) on the blocks' exact fp32 values,
fp32 sums in an order that depends on the row alone. A fused projection whose parts have different
types (a Q4_K_M file's Q6_K value projection beside Q4_K query and key) keeps one run of blocks per
type and concatenates outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from tokenmill.models.linear_method import Activation, LinearMethod, activate


@dataclass(frozen=True)
class QuantizedWeight:
    blocks: torch.Tensor  # uint8 [out_features, row_bytes]
    qtype: GGMLQuantizationType
    in_features: int
    # Multiplied on int8 activations (models/int8_dot.py), set at load for bf16 models (loader.prepare_weights).
    int8_activations: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.in_features

    def dequantize(self) -> torch.Tensor:
        """fp32 [out_features, in_features]: gguf's own dequantization, as transformers reads a GGUF."""
        return torch.from_numpy(gguf_dequantize(self.blocks.numpy(), self.qtype)).reshape(self.shape)


@dataclass(frozen=True)
class StackedQuantizedWeight:
    """Row blocks of different types stacked: the output features of `parts` in order."""
    parts: tuple[QuantizedWeight, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].in_features


Weight = torch.Tensor | QuantizedWeight | StackedQuantizedWeight  # a linear layer's weight, as loaded


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | StackedQuantizedWeight:
    """One weight of the parts' output features in order; runs of one type share one block tensor."""
    runs: list[list[QuantizedWeight]] = []
    for part in parts:
        if part.in_features != parts[0].in_features:
            raise ValueError(f"cannot stack weights of {part.in_features} and {parts[0].in_features} inputs")
        if runs and runs[-1][0].qtype == part.qtype:
            runs[-1].append(part)
        else:
            runs.append([part])
    merged = tuple(run[0] if len(run) == 1 else replace(run[0], blocks=torch.cat([p.blocks for p in run]))
                   for run in runs)
    return merged[0] if len(merged) == 1 else StackedQuantizedWeight(merged)


def quantize_q8_0(weight: torch.Tensor) -> QuantizedWeight:
    """A float weight as Q8_0 blocks (32 values, one fp16 scale), byte for byte gguf's quantization."""
    return QuantizedWeight(torch.ops.tokenmill.quantize_q8_0(weight.contiguous()), GGMLQuantizationType.Q8_0,
                           weight.shape[1])


class QuantizedLinear(LinearMethod):
    @classmethod
    def supports(cls, weight: object) -> bool:
        return isinstance(weight, (QuantizedWeight, StackedQuantizedWeight))

    def __init__(self, weight: QuantizedWeight | StackedQuantizedWeight, bias: torch.Tensor | None,
                 activation: Activation = None) -> None:
        self.parts = weight.parts if isinstance(weight, StackedQuantizedWeight) else (weight,)
        self.in_features = weight.shape[1]
        self.bias, self.activation = bias, activation

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # bf16 runs on the weights' bf16 values; fp32 (and fp16, widened) on their exact fp32 values.
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
        rows = x.reshape(-1, self.in_features).to(dtype).contiguous()
        outputs = [torch.ops.tokenmill.quant_linear(rows, part.blocks, int(part.qtype)) for part in self.parts]
        y = (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)).to(x.dtype)
        if self.bias is not None:
            y += self.bias
        return activate(y.view(*shape[:-1], y.shape[-1]), self.activation)


def dequantize_rows(weight: QuantizedWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[len(ids), in_features] in dtype: the rows `ids` of the weight, as the kernels widen them for
    that dtype (bf16: the kernels' bf16 values; fp32 and others: gguf's exact fp32 values)."""
    rows = weight.blocks[ids]
    if dtype == torch.bfloat16:
        return torch.ops.tokenmill.dequantize(rows, int(weight.qtype), weight.in_features)
    return QuantizedWeight(rows, weight.qtype, weight.in_features).dequantize().to(dtype)
