"""A checkpoint's tensors as a model family's `load_weights` takes them: each popped once, by transformers' name.

What every family does the same way: a missing weight is an error naming it; a norm or bias must be
a plain tensor; linear layers take their weights as the checkpoint has them (quantized blocks kept,
plain tensors cast to the model's dtype), several checkpoint layers stacked by rows into one fused
layer (q/k/v, gate/up); and, once the model is loaded, a weight nothing took is an error.
"""

from __future__ import annotations

import torch

from tokenmill.models.embedding import TokenEmbedding
from tokenmill.models.linear import Linear
from tokenmill.models.quantized import QuantizedWeight, Weight, stack_rows


class Checkpoint:
    def __init__(self, tensors: dict[str, Weight], dtype: torch.dtype, device: torch.device) -> None:
        """Plain tensors are handed over on `device` (the model's); quantized blocks stay where they are (the CPU,
        whose kernels run them)."""
        self.tensors = tensors
        self.dtype = dtype
        self.device = device

    def take(self, name: str) -> Weight:
        try:
            return self.tensors.pop(name)
        except KeyError:
            raise ValueError(f"weight {name!r} is missing from the checkpoint") from None

    def plain(self, name: str) -> torch.Tensor:
        tensor = self.take(name)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"weight {name!r} is quantized, which only linear layers and the embedding take")
        return tensor.to(self.device)

    def cast(self, weight: Weight) -> Weight:
        """A plain tensor in the model's dtype; quantized blocks as they are."""
        return weight.to(self.device, self.dtype) if isinstance(weight, torch.Tensor) else weight

    def copy_to(self, param: torch.Tensor, name: str) -> None:
        with torch.no_grad():
            param.copy_(self.plain(name))

    def load_linear(self, linear: Linear, names: list[str]) -> None:
        """names: the checkpoint's layers whose weights are stacked, in order, into this one."""
        weight = self.stacked([self.take(f"{name}.weight") for name in names], names)
        bias = torch.cat([self.plain(f"{name}.bias") for name in names]).to(self.dtype) if linear.has_bias else None
        linear.load(weight, bias)

    def stacked(self, weights: list[Weight], names: list[str]) -> Weight:
        """One weight of the weights' rows in order: quantized blocks kept, plain tensors in the model's dtype."""
        if len(weights) == 1:
            return self.cast(weights[0])
        if all(isinstance(w, QuantizedWeight) for w in weights):
            return stack_rows(weights)
        if all(isinstance(w, torch.Tensor) for w in weights):
            return torch.cat(weights).to(self.device, self.dtype)
        raise ValueError(f"weights {names} mix quantized and plain tensors")

    def load_embedding_and_head(self, embedding: TokenEmbedding, head: Linear, tied: bool, lm_head: bool) -> None:
        """The token embedding, and the output head: the checkpoint's own, or the embedding's weights
        where tied; without `lm_head` (an embedder) the head is left unloaded and a stored one dropped."""
        embedding.load(self.cast(self.take("model.embed_tokens.weight")))
        if lm_head and not tied:
            self.load_linear(head, ["lm_head"])
            return
        self.tensors.pop("lm_head.weight", None)
        if lm_head:
            head.load(embedding.weight, None)

    def check_all_used(self) -> None:
        unused = [name for name in self.tensors if "rotary_emb" not in name]
        if unused:
            raise ValueError(f"checkpoint has weights this model does not use: {unused[:5]}")
