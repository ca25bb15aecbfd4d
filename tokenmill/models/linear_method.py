"""The interface of a linear layer's weight format: see `tokenmill/models/linear.py`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
import torch.nn.functional as F

# What a linear layer applies to its output, chosen when the model is built: torch's F.gelu (erf form) or
# F.gelu(approximate="tanh") (transformers' "gelu_new" and "gelu_pytorch_tanh"), or nothing.
Activation = Literal["gelu", "gelu_tanh"] | None


def activate(y: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The activation through torch, for the methods that cannot fuse it into their product."""
    if activation is None:
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


class LinearMethod(ABC):
    """One layer's weight in one format: prepared once by the constructor, multiplied by `apply`."""

    @classmethod
    @abstractmethod
    def supports(cls, weight: Any) -> bool:
        """Whether this method serves the weight (its format, dtype, device) here."""

    @abstractmethod
    def __init__(self, weight: Any, bias: torch.Tensor | None, activation: Activation = None) -> None:
        """weight: [out_features, in_features] as loaded; bias: [out_features] or None; the activation
        `apply` ends with (fused into the product where the method can, else `activate` after it)."""

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> activation(x W^T + b): [..., out_features]."""

    def apply_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """apply's values widened to fp32 (a head's logits), where a method can store them so itself."""
        return self.apply(x).float()
