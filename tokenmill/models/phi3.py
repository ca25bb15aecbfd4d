"""Phi-3 (transformers' Phi3ForCausalLM: Phi-3, Phi-3.5-mini, Phi-4-mini): the Llama family with Phi-3's rope.

The checkpoint stores q/k/v and gate/up fused, as tokenmill's layers are: they load as they are
(llama.py's `fused_or_parts`). A `sliding_window` applies to every layer, as transformers' Phi-3
applies it (`causal_lm.sliding_windows`). No biases. What differs is the rope:
- longrope (rope_type "longrope", formerly "su"): the inverse frequencies divided by `short_factor`
  or `long_factor`, cos and sin multiplied by the attention factor. transformers picks the factors
  from the sequence length at each forward (long past `original_max_position_embeddings`, the cache
  recomputed when a sequence crosses it). NOTE: a paged engine cannot re-rotate keys already cached,
  and a step mixes sequences of every length, so the factors are chosen once per engine, from the
  context it runs with (max_model_len): short where it is at most original_max_position_embeddings
  (then every sequence is exactly transformers'), long otherwise (exactly transformers' for a
  sequence longer than that from its prompt on; a shorter one gets the long factors where
  transformers uses the short ones). vLLM switches a whole step to the long factors when any of its
  positions passes the original context, so keys cached before keep the short ones. Run with
  max_model_len <= original_max_position_embeddings for the short factors.
- partial_rotary_factor (Phi-4-mini: 0.75): only the first rotary_dims of each head rotate, each
  dim with the one rotary_dims / 2 after it. NOTE: the fused rope kernel rotates a whole head, each
  dim with the one head_dim / 2 after it; so each head's q and k dims are kept in another order
  (`rotary_order`: [rotary first half, unrotated first half, rotary second half, unrotated second
  half]: the projection's rows permuted at load, the KV pool holding keys so) and the unrotated
  dims get cos 1, sin 0 (x * 1 + y * 0 is x). q . k is the same sum of products in another order;
  values are not permuted, so the attention output is in transformers' order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig

from tokenmill.models.llama import LlamaForCausalLM, head_dim_of, rope_tables
from tokenmill.models.quantized import QuantizedWeight, Weight

logger = logging.getLogger(__name__)


def rotary_dims_of(config: PretrainedConfig) -> int:
    return int(head_dim_of(config) * config.rope_parameters.get("partial_rotary_factor", 1.0))


def uses_long_factors(config: PretrainedConfig, max_positions: int) -> bool:
    """Whether an engine of `max_positions` runs longrope's long factors (see the module docstring)."""
    params = config.rope_parameters
    return params.get("rope_type") == "longrope" and max_positions > params["original_max_position_embeddings"]


def rotary_order(head_dim: int, rotary_dims: int) -> torch.Tensor:
    """[head_dim]: the transformers dim each of a head's dims holds here (see the module docstring)."""
    if rotary_dims % 2 or (head_dim - rotary_dims) % 2:
        raise ValueError(f"a rotary share of {rotary_dims} of {head_dim} dims is not supported (odd)")
    half, unrotated_half = rotary_dims // 2, (head_dim - rotary_dims) // 2
    return torch.cat((torch.arange(half), torch.arange(rotary_dims, rotary_dims + unrotated_half),
                      torch.arange(half, rotary_dims), torch.arange(rotary_dims + unrotated_half, head_dim)))


def widen(table: torch.Tensor, head_dim: int, fill: float) -> torch.Tensor:
    """A rope table of the rotary dims [rows, rotary_dims] (two equal halves) as [rows, head_dim] in
    `rotary_order`, `fill` for the unrotated dims."""
    half = table.shape[1] // 2
    padding = table.new_full((table.shape[0], head_dim // 2 - half), fill)
    return torch.cat((table[:, :half], padding, table[:, half:], padding), dim=1)


def permute_rows(weight: Weight, order: torch.Tensor) -> Weight:
    """The weight's output features (rows) in `order`; a quantized weight's block rows likewise."""
    if isinstance(weight, QuantizedWeight):
        return dataclasses.replace(weight, blocks=weight.blocks[order])
    if isinstance(weight, torch.Tensor):
        return weight[order]
    raise ValueError("a stacked quantized projection cannot be permuted")


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(config, max_positions, dtype, device)
        if config.rope_parameters.get("rope_type") == "longrope":
            logger.info("longrope: the %s factors for a context of %d tokens (original_max_position_embeddings %d)",
                        "long" if uses_long_factors(config, max_positions) else "short", max_positions,
                        config.rope_parameters["original_max_position_embeddings"])

    def compute_rope_tables(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.config.rope_parameters
        seq_len = params["original_max_position_embeddings"] + 1 \
            if uses_long_factors(self.config, self.max_positions) else None
        cos, sin = rope_tables(self.config, rows, seq_len)
        head_dim = self.kv_layout.head_dim
        return widen(cos, head_dim, 1.0), widen(sin, head_dim, 0.0)

    def load_weights(self, tensors: dict[str, Weight], lm_head: bool = True) -> None:
        """Permutes the q and k rows into `rotary_order` where only a share of each head rotates."""
        head_dim, rotary_dims = self.kv_layout.head_dim, rotary_dims_of(self.config)
        if rotary_dims < head_dim:
            order = rotary_order(head_dim, rotary_dims)
            q_rows, kv_rows = (torch.arange(heads)[:, None] * head_dim + order for heads in
                               (self.kv_layout.num_heads, self.kv_layout.num_kv_heads))
            q_size, kv_size = q_rows.numel(), kv_rows.numel()
            orders = {"q_proj": q_rows.flatten(), "k_proj": kv_rows.flatten(),
                      "qkv_proj": torch.cat((q_rows.flatten(), q_size + kv_rows.flatten(),
                                             torch.arange(q_size + kv_size, q_size + 2 * kv_size)))}
            for i in range(self.kv_layout.num_layers):
                for name, rows in orders.items():
                    if (key := f"model.layers.{i}.self_attn.{name}.weight") in tensors:
                        tensors[key] = permute_rows(tensors[key], rows)
        super().load_weights(tensors, lm_head)


def gguf_config_values(metadata: dict[str, Any], tensor: Callable[[str], torch.Tensor],
                       tensor_names: set[str]) -> dict[str, Any]:
    """The config llama.cpp's Phi-3 keys give beyond transformers' GGUF key table: the rotary share
    (rope.dimension_count), the window (0: none), and longrope's factors, which llama.cpp writes as
    tensors (rope_factors_long/short.weight) beside the original context and the attention factor."""
    head_dim = metadata["phi3.embedding_length"] // metadata["phi3.attention.head_count"]
    rotary_dims = metadata.get("phi3.rope.dimension_count", head_dim)
    values: dict[str, Any] = {"partial_rotary_factor": rotary_dims / head_dim,
                              "sliding_window": metadata.get("phi3.attention.sliding_window") or None}
    if int(head_dim * values["partial_rotary_factor"]) != rotary_dims:
        raise ValueError(f"rope.dimension_count {rotary_dims} is no share of the head's {head_dim} dims")
    if (original := metadata.get("phi3.rope.scaling.original_context_length")) is not None:
        values["original_max_position_embeddings"] = original
    if "rope_factors_long.weight" in tensor_names:
        values["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": original,
                                  "long_factor": tensor("rope_factors_long.weight").tolist(),
                                  "short_factor": tensor("rope_factors_short.weight").tolist()}
        if (attention_factor := metadata.get("phi3.rope.scaling.attn_factor")) is not None:
            values["rope_scaling"]["attention_factor"] = attention_factor
    return values
