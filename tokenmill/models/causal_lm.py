"""What every generating model family gives the engine: one module class per family, chosen once at load.

The model runner, the embedding runner and the loader know a model only through `CausalLM`:
- `kv_layout`: the KV pool's shape per layer (heads, head_dim) and each layer's sliding window;
- `forward(input_ids, positions, kv_cache, attention, metas)`: the flat ragged batch (every
  scheduled token of every request in one row, no padding) to the final hidden states. `metas`
  holds the step's attention metadata once per distinct window of `kv_layout.windows` (None: full
  causal attention), built by the backend chosen at start-up; a layer reads the one for its window.
- `compute_logits(hidden)`: fp32 logits of the chosen rows;
- `load_weights(tensors, lm_head)`: a checkpoint's tensors by transformers' names, each popped as it
  is used; a missing or unused one is an error. Without `lm_head` (a model used as an embedder) the
  head is left unloaded.
A model is built on the meta device, moved, then `reset_buffers` fills what is computed, not loaded.
Families are listed by architecture in models/families.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from tokenmill.attention import AttentionBackend, AttentionMetadata
from tokenmill.models.quantized import Weight

StepMetadata = Mapping[int | None, AttentionMetadata]  # window (None: full attention) -> the step's metadata


@dataclass(frozen=True)
class KVLayout:
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]  # per layer: its sliding window in tokens (None: full attention)

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    @property
    def distinct_windows(self) -> frozenset[int | None]:
        return frozenset(self.windows)


def sliding_windows(config: PretrainedConfig) -> tuple[int | None, ...]:
    """Each layer's window as transformers applies it: a window of W lets a token attend to itself and
    the W - 1 tokens before it. From `layer_types` where the config lists them ("sliding_attention"
    layers take `sliding_window`), else, as Mistral does, every layer's `sliding_window` if set."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if types := getattr(config, "layer_types", None):
        return tuple(window if kind == "sliding_attention" else None for kind in types[:layers])
    return (window,) * layers


class CausalLM(nn.Module, ABC):
    config: PretrainedConfig
    dtype: torch.dtype
    kv_layout: KVLayout

    @abstractmethod
    def reset_buffers(self) -> None:
        """Fills the buffers computed rather than loaded (rope tables); called after leaving the meta device."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attention: AttentionBackend, metas: StepMetadata) -> torch.Tensor:
        """[T] token ids and positions -> the final hidden states, [T, hidden]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, hidden] -> fp32 logits, [R, vocab]."""

    @abstractmethod
    def load_weights(self, tensors: dict[str, Weight], lm_head: bool = True) -> None:
        """Loads a transformers-named state dict (see the module docstring); ValueError names what is wrong."""
