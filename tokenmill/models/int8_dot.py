"""GGUF weights multiplied on int8 activations: bf16 models' linear method for the types kernels/int8_dot.cpp serves.

Each row of x is quantized in blocks of 32 (int8, an fp32 scale: amax / 127), and multiplied by the weight's own
quants in integers (AVX-512 VNNI), its blocks repacked once at load into 16-feature lanes; fp32 sums in an order
that depends on the row alone, so batch-invariant as every kernel method is. Against quant_linear (the blocks
widened to bf16), one thread, a 1B-shaped model's decode step: Q4_K_M 1.9x at B=1 (no widening: the weights read
at the memory's speed), 1.5x at B=32 and 1.4x at B=64 (vpdpbusd: 64 products an instruction, vdpbf16ps 32);
Q8_0 1.4x at B=1; SmolLM2 Q4_1 1.4x at B=1, 1.6x at B=64 (1.2x quantization="none"'s plain bf16 weights). The
cost: each block of 32 activations rounded to 8 bits. SmolLM2 Q4_1 against its fp32 dequantization,
teacher-forced: top-1 94.3%, KL 0.0052 nats (bf16 activations on quant_linear: 96.0-96.4%, ~0.0013;
tests/test_int8_dot.py). Chosen at load (`QuantizedWeight.int8_activations`,
set by loader.prepare_weights for bf16 models); fp32 models keep QuantizedLinear, the accuracy mode. A fused
projection of several types (a Q4_K_M file's Q6_K value rows beside Q4_K query and key) quantizes x once and
concatenates the parts' outputs.

`GroupedInt8Experts`: a mixture-of-experts layer's routed experts (models/moe.py) in one kernel call a step
(`int8_moe`), where each expert's gate_up and down are one block type each: the step's (token, expert) pairs grouped
by expert, each expert's rows through its weights as Int8DotLinear multiplies them, SiLU(gate) * up as the fused
silu_mul, and each token's weighted sum as SparseMoeBlock's torch ops, bit for bit, in one parallel region instead of
a kernel call (and its Python, and its thread wake-up) per expert and projection and the ops around them.
"""

from __future__ import annotations

import torch

from tokenmill import kernels
from tokenmill.models.linear_method import Activation, LinearMethod, activate
from tokenmill.models.quantized import QuantizedWeight, StackedQuantizedWeight


def int8_dot_serves(weight: QuantizedWeight) -> bool:
    """Whether the int8 kernels take the weight's type here."""
    return int(weight.qtype) in kernels.INT8_DOT_TYPES and kernels.int8_dot_available()


class Int8DotLinear(LinearMethod):
    @classmethod
    def supports(cls, weight: object) -> bool:
        parts = weight.parts if isinstance(weight, StackedQuantizedWeight) else (weight,)
        return all(isinstance(p, QuantizedWeight) and p.int8_activations and int8_dot_serves(p) for p in parts)

    def __init__(self, weight: QuantizedWeight | StackedQuantizedWeight, bias: torch.Tensor | None,
                 activation: Activation = None) -> None:
        parts = weight.parts if isinstance(weight, StackedQuantizedWeight) else (weight,)
        self.in_features = weight.shape[1]
        # (packed blocks, qtype, out_features) per part; the file's blocks are not kept (a tied embedding keeps its
        # own for lookups).
        self.parts = [(torch.ops.tokenmill.int8_pack(p.blocks, int(p.qtype), p.in_features), int(p.qtype), p.shape[0])
                      for p in parts]
        self.bias, self.activation = bias, activation

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, widened=False)

    def apply_fp32(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: the kernel stores the bf16 values as fp32 itself: at B=64 a 262,144-token head's output widened
        # afterwards was a 33 MB read and a 67 MB write a step. With a bias or an activation, those would apply
        # to unrounded values: widened afterwards then, so that the values stay apply's.
        if self.bias is None and self.activation is None:
            return self._product(x, widened=True)
        return self.apply(x).float()

    def _product(self, x: torch.Tensor, widened: bool) -> torch.Tensor:
        """widened: the product's bf16 values stored as fp32 by the kernel."""
        shape = x.shape
        q, sums = torch.ops.tokenmill.quantize_rows(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous())
        outputs = [torch.ops.tokenmill.int8_linear(q, sums, packed, qtype, n, widened)
                   for packed, qtype, n in self.parts]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        y = y if widened else y.to(x.dtype)
        if self.bias is not None:
            y += self.bias
        return activate(y.view(*shape[:-1], y.shape[-1]), self.activation)


class GroupedInt8Experts:
    """A layer's routed experts on int8 activations, for all of a step's tokens in one kernel call (`int8_moe`):
    each (token, expert) pair's row through the expert's gate_up, SiLU(gate) * up and down as Int8DotLinear and the
    fused silu_mul compute it, then each token's rows times its routing weights, summed as SparseMoeBlock sums them."""

    @classmethod
    def of(cls, experts: list[tuple[LinearMethod, LinearMethod]]) -> GroupedInt8Experts | None:
        """experts: each expert's (gate_up, down) methods as loaded. None unless all are Int8DotLinear of one block
        type per projection, with no bias or activation (as experts are)."""
        projections = list(zip(*experts))
        if not all(isinstance(m, Int8DotLinear) and len(m.parts) == 1 and m.bias is None and m.activation is None
                   for methods in projections for m in methods):
            return None
        if any(len({m.parts[0][1:] for m in methods}) > 1 for methods in projections):
            return None
        return cls(*projections)

    def __init__(self, gate_up: list[Int8DotLinear], down: list[Int8DotLinear]) -> None:
        # The experts' own packed weights (nothing copied), and each projection's block type.
        self.gate_up = [m.parts[0][0] for m in gate_up]
        self.down = [m.parts[0][0] for m in down]
        (_, self.gate_up_qtype, gate_up_features), (_, self.down_qtype, _) = gate_up[0].parts[0], down[0].parts[0]
        self.intermediate_size = gate_up_features // 2

    def __call__(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] bf16; experts, weights: [T, top_k] (int64; bf16 or fp32), each token's choices in order."""
        return torch.ops.tokenmill.int8_moe(x, experts, weights, self.gate_up, self.gate_up_qtype, self.down,
                                            self.down_qtype, self.intermediate_size)
