"""fp32 linear layers through oneDNN.

On this class of CPU (AMD EPYC with AVX-512) torch's default fp32 GEMM, MKL's sgemm, reaches about
half of what oneDNN does on the model's shapes (measured: M=64, 576x3072, ~200 vs ~380 GFLOP/s).
bf16 linears already go through oneDNN, so only fp32 is rerouted.
"""

from __future__ import annotations

import torch
from torch import nn


class OneDNNLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.weight = linear.weight.detach().to_mkldnn()
        self.bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._C._nn.mkldnn_linear(x.reshape(-1, shape[-1]).to_mkldnn(), self.weight, self.bias)
        return y.to_dense().view(*shape[:-1], self.out_features)


def use_onednn_linears(model: nn.Module) -> None:
    """Swaps every fp32 nn.Linear of a CPU model for a OneDNNLinear (weights repacked once)."""
    if not torch.backends.mkldnn.is_available():
        return
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            weight = child.weight if isinstance(child, nn.Linear) else None
            if weight is not None and weight.dtype == torch.float32 and weight.device.type == "cpu":
                setattr(parent, name, OneDNNLinear(child))
