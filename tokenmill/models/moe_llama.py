"""Mixture-of-experts families on the Llama body: Qwen3-MoE, Mixtral and Qwen2-MoE.

Each is models/llama.py's model (its attention with Qwen3's q/k norms or Mistral's sliding window, its norms,
rope and head) with models/moe.py's `SparseMoeBlock` in place of the MLP in the layers the config makes
sparse; `routing_of` reads what differs between the families from their configs, as transformers 5.24 does:
- Qwen3-MoE and Qwen2-MoE: softmax, top-k, renormalised only if `norm_topk_prob`, the weights rounded to
  the model's dtype; a layer is sparse unless listed in `mlp_only_layers` or off `decoder_sparse_step`
  (then a dense MLP of `intermediate_size`). Qwen2-MoE adds a shared expert behind a sigmoid gate.
- Mixtral: every layer sparse; softmax, top-k, always renormalised, the weights kept in fp32; experts of
  `intermediate_size`, named w1 (gate), w3 (up), w2 (down) under `block_sparse_moe` in its checkpoints.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from tokenmill.models.elementwise import select_elementwise_ops
from tokenmill.models.llama import LlamaForCausalLM, head_dim_of
from tokenmill.models.moe import Routing, SparseMoeBlock


def routing_of(config: PretrainedConfig) -> Routing:
    if config.model_type == "mixtral":
        return Routing(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size,
                       renormalize=True, fp32_weights=True, modules=("block_sparse_moe", "mlp"),
                       expert_names=("w1", "w3", "w2"))
    return Routing(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                   renormalize=config.norm_topk_prob, fp32_weights=False, modules=("mlp",),
                   expert_names=("gate_proj", "up_proj", "down_proj"),
                   shared_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0))


def is_sparse(config: PretrainedConfig, layer: int) -> bool:
    """Whether the layer's feed-forward is a mixture of experts (Qwen's rule; Mixtral has no dense layers)."""
    if config.model_type == "mixtral":
        return True
    return (layer not in config.mlp_only_layers and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0)


class MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(config, max_positions, dtype, device)
        routing = routing_of(config)
        ops = select_elementwise_ops(device, dtype, head_dim_of(config))
        for i, layer in enumerate(self.layers):
            if is_sparse(config, i):
                layer.mlp = SparseMoeBlock(config.hidden_size, routing, ops)
