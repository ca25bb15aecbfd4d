"""A mixture-of-experts feed-forward layer: a router picks each token's top-k experts; tokens are grouped by expert.

`SparseMoeBlock(config, routing, ops)` takes a layer's normed hidden states [T, hidden] and returns its
feed-forward output [T, hidden], as transformers' sparse MoE blocks do (Qwen2-MoE, Qwen3-MoE, Mixtral):
- routing: softmax over the router's logits in fp32, the top k, renormalised to sum to one where the model
  does (`Routing`), the weights kept in fp32 (Mixtral) or rounded to the model's dtype (Qwen);
- each expert, SiLU(x gate^T) * (x up^T) down^T with gate and up fused into one weight at load, runs once per
  step on all of the step's tokens routed to it: the (token, expert) pairs are sorted by expert, so each
  expert's weights are read once and multiplied as one GEMM over a contiguous run of rows; experts with no
  tokens are skipped. A token's k results are weighted and summed in its own top-k order, as transformers'
  grouped_mm path sums them, so a token's output never depends on the other tokens of the step (each
  expert's linear is row-wise batch-invariant where the kernels run: models/linear.py); where every expert
  runs on int8 activations (a bf16 model's GGUF blocks), the routed experts and the weighted sums are one kernel
  call a step (`GroupedInt8Experts` in models/int8_dot.py, chosen once at load), the same bits as the torch ops;
- a shared expert, where the config has one (Qwen2-MoE), runs on every token, scaled by sigmoid(x w_gate).
Weights load from one tensor per expert and projection (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2.weight`: what published checkpoints have and transformers 5.24's
save_pretrained writes) or from the experts stacked, each projection one tensor of every expert's rows in
turn: transformers 5's modules as they are (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj`
[E, H, F]), or a GGUF file's `ffn_gate/up/down_exps` (`mlp.experts.gate_proj`, `up_proj`, `down_proj`: plain
[E, rows, cols], or quantized blocks of E * rows rows; models/gguf_file.py). Each expert's weight is a view of
its rows (a quantized expert keeps the file's blocks); gate and up are stacked per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from tokenmill.models.checkpoint import Checkpoint
from tokenmill.models.elementwise import ElementwiseOps
from tokenmill.models.int8_dot import GroupedInt8Experts
from tokenmill.models.linear import Linear
from tokenmill.models.quantized import QuantizedWeight, Weight


@dataclass(frozen=True)
class Routing:
    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's
    renormalize: bool  # the top-k probabilities rescaled to sum to one
    fp32_weights: bool  # the weights applied in fp32 (Mixtral), else rounded to the model's dtype first (Qwen)
    modules: tuple[str, ...]  # the block's names in a checkpoint's layers: "mlp"; Mixtral's also "block_sparse_moe"
    expert_names: tuple[str, str, str]  # each expert's gate, up and down projections in per-expert checkpoints
    shared_intermediate_size: int = 0  # the shared expert's (Qwen2-MoE); 0: none


class Expert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, ops: ElementwiseOps) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, routing: Routing, ops: ElementwiseOps) -> None:
        super().__init__()
        self.routing = routing
        self.gate = Linear(hidden_size, routing.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(Expert(hidden_size, routing.intermediate_size, ops)
                                     for _ in range(routing.num_experts))
        self.grouped_experts: GroupedInt8Experts | None = None  # set by load_weights where it serves
        if routing.shared_intermediate_size:
            self.shared_expert = Expert(hidden_size, routing.shared_intermediate_size, ops)
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, hidden] -> each token's expert weights and experts, [T, top_k] each, best first."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.routing.top_k, dim=-1)
        if self.routing.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return (weights if self.routing.fp32_weights else weights.to(x.dtype)), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if self.grouped_experts is not None:
            out = self.grouped_experts(x, experts, weights)
        else:
            out = self.routed_experts(x, experts, weights)
        if self.routing.shared_intermediate_size:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def routed_experts(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token's experts on its row, their outputs weighted and summed: torch ops, an expert at a time."""
        tokens, hidden = x.shape
        pairs = experts.flatten()  # pair i is token i // top_k's (i % top_k)-th choice
        order = torch.argsort(pairs, stable=True)
        grouped = x.index_select(0, order // self.routing.top_k)  # the pairs' rows, expert by expert
        counts = torch.bincount(pairs, minlength=self.routing.num_experts).tolist()
        outputs, start = [], 0
        for expert, count in zip(self.experts, counts):
            if count:
                outputs.append(expert(grouped[start:start + count]))
                start += count
        by_pair = torch.empty_like(grouped).index_copy_(0, order, torch.cat(outputs))
        weighted = by_pair.view(tokens, -1, hidden) * weights.unsqueeze(-1)
        # NOTE: in fp32, as torch sums a bf16 tensor (its bf16 sum over a middle dim took 3x as long).
        return weighted.float().sum(dim=1).to(x.dtype)

    def load_weights(self, checkpoint: Checkpoint, layer_prefix: str) -> None:
        """The router's and the experts' weights, per expert or stacked (see the module docstring)."""
        module = next((m for m in self.routing.modules if f"{layer_prefix}{m}.gate.weight" in checkpoint.tensors),
                      self.routing.modules[0])
        p = f"{layer_prefix}{module}."
        checkpoint.load_linear(self.gate, [f"{p}gate"])
        if f"{p}experts.down_proj" in checkpoint.tensors:
            names = [f"{p}experts.{n}" for n in (["gate_up_proj"] if f"{p}experts.gate_up_proj" in checkpoint.tensors
                                                  else ["gate_proj", "up_proj"])]
            gate_up = [expert_slices(checkpoint.take(name), name, len(self.experts)) for name in names]
            down = expert_slices(checkpoint.take(f"{p}experts.down_proj"), f"{p}experts.down_proj", len(self.experts))
            for e, expert in enumerate(self.experts):
                expert.gate_up_proj.load(checkpoint.stacked([parts[e] for parts in gate_up], names), None)
                expert.down_proj.load(checkpoint.cast(down[e]), None)
        else:
            gate_name, up_name, down_name = self.routing.expert_names
            for e, expert in enumerate(self.experts):
                q = f"{p}experts.{e}."
                checkpoint.load_linear(expert.gate_up_proj, [f"{q}{gate_name}", f"{q}{up_name}"])
                checkpoint.load_linear(expert.down_proj, [f"{q}{down_name}"])
        if self.routing.shared_intermediate_size:
            q = f"{p}shared_expert."
            checkpoint.load_linear(self.shared_expert.gate_up_proj, [f"{q}gate_proj", f"{q}up_proj"])
            checkpoint.load_linear(self.shared_expert.down_proj, [f"{q}down_proj"])
            checkpoint.load_linear(self.shared_expert_gate, [f"{p}shared_expert_gate"])
        self.grouped_experts = GroupedInt8Experts.of([(e.gate_up_proj.method, e.down_proj.method)
                                                      for e in self.experts])


def expert_slices(weight: Weight, name: str, experts: int) -> list[Weight]:
    """Each expert's weight in a stacked one (plain [E, rows, cols], or E * rows rows, plain or quantized), as
    views of its rows: no copies."""
    rows = weight.blocks if isinstance(weight, QuantizedWeight) else weight
    if not isinstance(rows, torch.Tensor) or (rows.dim() == 3 and rows.shape[0] != experts) or \
            rows.reshape(-1, rows.shape[-1]).shape[0] % experts:
        raise ValueError(f"{name} of shape {tuple(weight.shape)} does not stack the config's {experts} experts")
    views = rows.reshape(experts, -1, rows.shape[-1]).unbind()
    if isinstance(weight, QuantizedWeight):
        return [replace(weight, blocks=view) for view in views]  # its type and int8 mark kept
    return list(views)
