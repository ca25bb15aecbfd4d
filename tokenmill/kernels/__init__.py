"""The engine's own CPU kernels (AVX-512, C++), compiled on first use.

- `attention.cpp`: decode attention read in place from the paged KV pool, and attention of many
  decode queries to one shared prefix (Hydragen) as two small bf16 GEMMs.
- `elementwise.cpp`: a decoder layer's elementwise steps fused, one pass each, for bf16 models:
  residual add + RMSNorm, rope + the K/V writes into the pool, SiLU(gate) * up.

Built with g++ through torch's extension loader (`-march=native`, cached under
TORCH_EXTENSIONS_DIR, named after this CPU's instruction sets; ~10 s the first time here).
Where the CPU lacks AVX-512 or the build fails, the accessors return None / False and callers keep
their torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_QUERY_HEADS = 256  # the decode kernel's per-request scratch (kMaxHeads in attention.cpp)

# (query [B, heads, D], key_cache [slots, kv_heads, D], value_cache, context_slots [B, L] int64,
#  context_lens [B] int64) -> (out [B, heads, D] fp32, lse [B, heads] fp32)
DecodeAttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                 tuple[torch.Tensor, torch.Tensor]]
# (query [B, heads, D] bf16, key_cache, value_cache, prefix_slots [P] int64, suffix_out [B, heads, D] fp32,
#  suffix_lse [B, heads] fp32) -> out [B, heads, D] bf16: attention of every query to the same P slots,
#  merged with its attention to the rest of its context (the decode kernel's outputs).
PrefixAttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                 torch.Tensor]

SOURCES = [str(Path(__file__).with_name(name)) for name in ("attention.cpp", "elementwise.cpp")]
# -fopenmp: at::parallel_for is OpenMP inline code (torch's own libgomp, already loaded).
# -ffp-contract=off: no multiply-add fused where torch's ops round in between (bit-exact ops).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]


def cpu_specific_name(name: str) -> str:
    """Names a build after this CPU's instruction sets: it is compiled with -march=native, and a
    build cache shared between machines (a home folder on a cluster) must not hand it to another CPU."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        cpuinfo = ""
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return f"{name}_{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


@functools.cache
def _build() -> bool:
    """Compiles (or loads from its cache) the kernels; False where they cannot run (no AVX-512, no compiler)."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    from torch.utils.cpp_extension import load

    try:
        load(cpu_specific_name("tokenmill_kernels"), sources=SOURCES, extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # no compiler, an old torch: the torch paths still work
        logger.warning("tokenmill's CPU kernels are unavailable, using torch ops: %s", exc)
        return False
    return True


def decode_attention_kernel() -> DecodeAttentionKernel | None:
    """The decode kernel, or None where it cannot run."""
    return torch.ops.tokenmill.decode_attention if _build() else None


def prefix_attention_kernel() -> PrefixAttentionKernel | None:
    """The shared-prefix kernel (bf16 only), or None where it cannot run."""
    return torch.ops.tokenmill.prefix_attention if _build() else None


def fused_elementwise(dtype: torch.dtype) -> bool:
    """Whether the fused ops (`rms_norm`, `add_rms_norm`, `rope_store`, `silu_mul`) serve this dtype (bf16 only)."""
    return dtype == torch.bfloat16 and _build()
