"""The token embedding, kept as loaded: a plain tensor, or ggml blocks whose looked-up rows are widened.

A quantized embedding stays quantized (an 8B model's is 0.5 GB as Q4_K, 2 GB in bf16): a step
widens only the rows of its tokens. A tied lm_head multiplies by the same weight, whichever it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.models.quantized import QuantizedWeight, dequantize_rows


class TokenEmbedding(nn.Module):
    weight: torch.Tensor | QuantizedWeight

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = (num_embeddings, embedding_dim)
        self.dtype = dtype

    def load(self, weight: torch.Tensor | QuantizedWeight) -> None:
        """weight: [num_embeddings, embedding_dim], in the model's dtype or quantized."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"embedding {tuple(weight.shape)} for a model of {self.shape}")
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, QuantizedWeight):
            return dequantize_rows(self.weight, ids, self.dtype)
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        weight = getattr(self, "weight", None)
        kind = "not loaded" if weight is None else weight.qtype.name if isinstance(weight, QuantizedWeight) else \
            str(weight.dtype)
        return f"{self.shape[0]}, {self.shape[1]}, {kind}"
