"""Attention over the paged KV cache: the backends, and the choice of one when the model runner starts.

`select_attention_backend` takes the first backend in `ATTENTION_BACKENDS` that supports the spec
here. A new kind of attention (sliding window) or device (CUDA) is one backend class and one entry.
"""

from __future__ import annotations

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, AttentionSpec, BatchLayout
from tokenmill.attention.cpu_kernel_backend import CpuKernelAttentionBackend
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.attention.triton_backend import TritonAttentionBackend

# In order of preference; the torch backend runs everywhere.
ATTENTION_BACKENDS: tuple[type[AttentionBackend], ...] = (TritonAttentionBackend, CpuKernelAttentionBackend,
                                                          TorchAttentionBackend)


def select_attention_backend(spec: AttentionSpec) -> AttentionBackend:
    return next(backend for backend in ATTENTION_BACKENDS if backend.supports(spec))(spec)


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionMetadata", "AttentionSpec", "BatchLayout",
           "CpuKernelAttentionBackend", "TorchAttentionBackend", "TritonAttentionBackend",
           "select_attention_backend"]
