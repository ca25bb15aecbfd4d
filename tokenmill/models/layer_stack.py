"""A model's decoder layers for a whole step, in one C++ call (kernels/layer_stack.cpp): the Llama family's
(`LlamaLayerStack`) and Gemma 3's (`GemmaLayerStack`).

Built at load where every layer is the family's plain one (Llama: attention without q/k norms, a SiLU MLP; Gemma 3:
its four (1 + weight) norms, q/k norms and GELU-tanh MLP) with every projection on the int8 kernels (Int8DotLinear,
no bias) and the fused elementwise ops; it serves every step under the kernel attention backend (decodes, prompt
chunks, drafted tokens being verified: speculation's steps most of all, whose few rows leave the per-layer overhead
exposed). It calls the very ops the model's Python layers call, in the same order on the same tensors, so the outputs
are the same bits (a step's numbers do not depend on which path ran it; tests/test_layer_stack.py). Layers come in
groups that share rope tables and a window's attention metadata: one for a Llama model, Gemma 3's local and global
layers two. Why: a decode step of SmolLM2-135M Q4_1 (30 layers, ~25 small calls each) spent ~3 ms in Python and op
dispatch, serially, beside ~6 ms of kernels bound by memory with 2 threads (which is why int8 activations, 1.2x a
step on one thread, moved it by 3% on two). Full engine steps, A/B in one process, 2 threads, quiet: B=1 10.2 -> 7.3
ms, B=8 16.7 -> 13.0, B=64 71.5 -> 66.8 (median).
"""

from __future__ import annotations

import torch

from tokenmill.attention.cpu_kernel_backend import KernelMetadata
from tokenmill.models.causal_lm import StepMetadata
from tokenmill.models.int8_dot import Int8DotLinear
from tokenmill.models.linear import Linear

Projection = tuple[list[torch.Tensor], list[int], list[int]]  # Int8DotLinear's parts: packed, qtypes, out_features


def int8_projection(linear: Linear) -> Projection | None:
    """The layer's weight as the stack takes it, or None where it is not on the int8 kernels alone."""
    method = linear.method
    if not isinstance(method, Int8DotLinear) or method.bias is not None or method.activation:
        return None
    packed, qtypes, sizes = zip(*method.parts)
    return list(packed), list(qtypes), list(sizes)


class LayerStack:
    """A C++ stack and the window of each of its groups of layers."""

    def __init__(self, stack: torch.ScriptObject, windows: list[int | None]) -> None:
        self.stack = stack
        self.windows = windows

    def forward(self, x: torch.Tensor, ropes: list[tuple[torch.Tensor, torch.Tensor]], kv_cache: torch.Tensor,
                metas: StepMetadata) -> torch.Tensor | None:
        """The final hidden states, or None where another attention backend runs the step: the caller runs the layers
        itself. ropes: each group's cos and sin_signed rows for the step's positions."""
        metadata: list[torch.Tensor | None] = []
        windows: list[int | None] = []
        for window in self.windows:
            meta = metas[window]
            if not isinstance(meta, KernelMetadata):
                return None
            d, c = meta.decodes, meta.chunks
            metadata += (meta.slot_mapping, *((d.rows, d.context_slots, d.context_lens, d.prefix_slots) if d else
                                              (None,) * 4),
                         *((c.query_start, c.num_queries, c.context_slots, c.context_lens) if c else (None,) * 4))
            windows += (d.window if d else None, c.window if c else None)
        cos, sin_signed = zip(*ropes)
        return self.stack.forward(x, list(cos), list(sin_signed), kv_cache, metadata, windows)


class LlamaLayerStack(LayerStack):
    """models/llama.py's layers, every one under `window`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, final_norm: torch.Tensor,
                 window: int | None) -> None:
        super().__init__(torch.classes.tokenmill.LayerStack(num_heads, num_kv_heads, head_dim, eps,
                                                            final_norm.detach()), [window])

    def add_layer(self, input_norm: torch.Tensor, post_norm: torch.Tensor, qkv: Projection, o: Projection,
                  gate_up: Projection, down: Projection) -> None:
        self.stack.add_layer(input_norm.detach(), post_norm.detach(), *qkv, *o, *gate_up, *down)


class GemmaLayerStack(LayerStack):
    """models/gemma3.py's layers; `windows`: each group's (the layer types', in the order of the ropes forward
    takes)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, final_scale: torch.Tensor,
                 windows: list[int | None]) -> None:
        super().__init__(torch.classes.tokenmill.GemmaLayerStack(num_heads, num_kv_heads, head_dim, eps,
                                                                 final_scale.detach(), len(windows)), windows)

    def add_layer(self, group: int, norm_scales: list[torch.Tensor], qk_scale: torch.Tensor, qkv: Projection,
                  o: Projection, gate_up: Projection, down: Projection) -> None:
        """norm_scales: input, post-attention, pre-feedforward and post-feedforward (gemma3.NORMS' order)."""
        self.stack.add_layer(group, *(scale.detach() for scale in norm_scales), qk_scale.detach(), *qkv, *o, *gate_up,
                             *down)
