"""The interface of a linear layer's weight format: see `tokenmill/models/linear.py`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class LinearMethod(ABC):
    """One layer's weight in one format: prepared once by the constructor, multiplied by `apply`."""

    @classmethod
    @abstractmethod
    def supports(cls, weight: Any) -> bool:
        """Whether this method serves the weight (its format, dtype, device) here."""

    @abstractmethod
    def __init__(self, weight: Any, bias: torch.Tensor | None) -> None:
        """weight: [out_features, in_features] as loaded; bias: [out_features] or None."""

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
