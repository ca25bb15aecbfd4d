"""The engine's own CPU kernels (AVX-512, C++), compiled on first use.

- `attention.cpp`: batch-invariant attention over the paged KV pool: decodes read in place (a
  shared prefix read once for all, Hydragen), prompt chunks as small GEMMs; one order of sums for all;
  full attention or a sliding window (keys older than it get probability 0 and are not read).
- `encoder_attention.cpp`: bidirectional attention over packed sequences of any lengths (BERT-style
  encoders): each token attends to all of its own sequence's; a sequence's result is the same in any batch.
- `elementwise.cpp`: a decoder layer's elementwise steps fused, one pass each, for bf16 models:
  residual add + RMSNorm, rope + the K/V writes into the pool, SiLU(gate) * up; and an encoder's
  residual add + LayerNorm (bf16 and fp32).
- `quant.cpp`: weights kept in GGUF's quantized blocks: x W^T straight on the blocks (batch-invariant),
  their dequantization to bf16 (bit for bit gguf's), and quantization of bf16/fp32 weights to Q8_0;
  and x W^T on plain bf16/fp32 weights packed once at load (`dense_linear`), batch-invariant too, with
  the bias and a GELU applied where each sum ends.
- `int8_dot.cpp`: GGUF weights on int8 activations (AVX-512 VNNI): each row of x quantized in blocks of 32,
  integer dot products on the weights' own quants repacked once at load, batch-invariant; bf16 models'
  path for the types it serves (`int8_dot_available()`: VNNI and a working build); and a mixture-of-experts
  layer's routed experts in one call (`int8_moe`).

Built with g++ through torch's extension loader (`-march=native`, cached under
TORCH_EXTENSIONS_DIR, named after this CPU's instruction sets; ~10 s the first time here), and
registered as `torch.ops.tokenmill.*`. `available()` says whether they run here (AVX-512 and a
working build); the constants below state what the kernels accept, as their TORCH_CHECKs do.
Callers decide once, from these, where a kernel serves (`tokenmill/attention/`,
`tokenmill/models/elementwise.py`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ATTENTION_DTYPES = (torch.float32, torch.bfloat16)  # decode_attention's and chunk_attention's
ATTENTION_HEAD_DIMS = (64, 128, 256)
MAX_QUERIES_PER_KV_HEAD = 64  # the attention kernels' per-request scratch
ENCODER_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)
ENCODER_ATTENTION_HEAD_DIM_MULTIPLE = 16  # any head_dim that is a multiple of this; any sequence length
ELEMENTWISE_DTYPES = (torch.bfloat16,)
LAYER_NORM_DTYPES = (torch.float32, torch.bfloat16)  # add_layer_norm's
ROPE_HEAD_DIM_MULTIPLE = 32  # rope_store rotates each half of a head in 16-lane vectors
# gguf.GGMLQuantizationType values that quant_linear and dequantize take:
# Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
QUANT_TYPES = frozenset({2, 3, 6, 7, 8, 12, 13, 14})
INT8_DOT_TYPES = frozenset({2, 3, 6, 8, 12, 14})

# torch.ops.tokenmill.decode_attention:
# (query [B, heads, D], key_cache [slots, kv_heads, D], value_cache, context_slots [B, L] int64,
#  context_lens [B] int64, prefix_slots [P] int64, P a multiple of 16, window=None) -> out [B, heads, D] of
#  query's dtype: each request's one query against prefix_slots (shared by all, possibly empty) then its own
#  context; with a window W (and no prefix), against its context's last W tokens only.
# Under a window, batch invariance asks that each context's row 0 be at a position that is a multiple of 16
# (attention.cpp's header).
DecodeAttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  int | None], torch.Tensor]
# torch.ops.tokenmill.chunk_attention:
# (query [T, heads, D], key_cache, value_cache, query_start [R] int64, num_queries [R] int64,
#  context_slots [R, L] int64, context_lens [R] int64, window=None) -> out [T, heads, D] of query's dtype:
#  request i's queries are rows query_start[i].. of query, its newest tokens, each attending causally to its
#  context (with a window W: to its W newest tokens up to itself); rows no request owns are 0.
ChunkAttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, int | None], torch.Tensor]
# torch.ops.tokenmill.encoder_attention:
# (query [T, heads, D], key, value (views allowed: the last dim contiguous), seq_starts [B + 1] int64 (0, ..., T),
#  scale) -> out [T, heads, D] contiguous, of query's dtype: softmax(scale q k^T) v within each sequence
#  seq_starts[i]..seq_starts[i + 1], in fp32.
# torch.ops.tokenmill.quant_linear: (x [M, K] bf16 or fp32, blocks [N, row_bytes] uint8, qtype) -> [M, N] of x's dtype
# torch.ops.tokenmill.dequantize: (blocks [N, row_bytes] uint8, qtype, in_features K, out=None) -> [N, K] bf16
#  (into `out` when given: a whole weight's fresh tensor costs more in page faults than the decoding)
# torch.ops.tokenmill.quantize_q8_0: (weight [N, K] fp32 or bf16) -> [N, K / 32 * 34] uint8 (Q8_0 blocks)
# torch.ops.tokenmill.pack_dense: (weight [N, K] fp32 or bf16) -> the weight in dense_linear's layout, same dtype
# torch.ops.tokenmill.dense_linear: (x [M, K] of the weight's dtype, packed, N, bias=None [N] fp32 or bf16,
#  activation="none" | "gelu" | "gelu_tanh") -> [M, N]: act(x W^T + b), in fp32 then rounded once (batch-invariant)
# gguf.GGMLQuantizationType values that int8_pack and int8_linear take: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K.
# torch.ops.tokenmill.quantize_rows: (x [M, K] bf16, K a multiple of 32) -> (q [M, K] int8, sums [M, K / 32, 8] fp32):
#  each block of 32 of a row as d * q (d = amax / 127, q rounded to nearest-even), sums = (d, d sum(q), then int32s
#  in fp32's bits: sum(q) times -8, -16 and -128, the sums of its first and last 16 q times -32, 0)
# torch.ops.tokenmill.int8_pack: (blocks [N, row_bytes] uint8, qtype, in_features K) -> uint8
#  [ceil(N / 16), K / block, bytes]: the weight in int8_linear's layout, made once at load
# torch.ops.tokenmill.int8_linear: (q, sums, packed, qtype, out_features N, widened=False) -> [M, N] bf16: x W^T on
#  x's quantized blocks and the weight's exact values, in fp32 then rounded once (batch-invariant); widened: those
#  bf16 values stored as fp32
# torch.ops.tokenmill.int8_moe: (x [T, hidden] bf16, experts [T, top_k] int64, weights [T, top_k] bf16 or fp32,
#  gate_up [E packed weights], gate_up_qtype, down [E], down_qtype, intermediate_size) -> [T, hidden] bf16: a MoE
#  layer's routed experts, each (token, expert) row as int8_linear, the fused silu_mul and int8_linear give it, and
#  each token's rows times its weights summed as torch sums them (models/moe.py), in one call
# torch.ops.tokenmill.add_layer_norm: (x [rows, n] bf16 or fp32 with contiguous rows, residual like x, weight [n],
#  bias [n] (fp32 or x's dtype), eps) -> LayerNorm(x + residual) [rows, n], the sum kept in fp32

SOURCES = [str(Path(__file__).with_name(name))
           for name in ("attention.cpp", "elementwise.cpp", "quant.cpp", "encoder_attention.cpp", "int8_dot.cpp",
                        "layer_stack.cpp")]
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


def cpu_has_avx512() -> bool:
    """Whether torch runs this CPU's AVX-512 code (ATEN_CPU_CAPABILITY=avx2 says no, as a CPU without it would)."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


@functools.cache
def _build() -> bool:
    from torch.utils.cpp_extension import load

    try:
        load(cpu_specific_name("tokenmill_kernels"), sources=SOURCES, extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # no compiler, an old torch: the torch paths still work
        logger.warning("tokenmill's CPU kernels are unavailable, using torch ops: %s", exc)
        return False
    return True


def available() -> bool:
    """Whether the kernels run here: compiles them (or loads them from the cache) on the first call."""
    return cpu_has_avx512() and _build()


def int8_dot_available() -> bool:
    """Whether int8_dot.cpp's ops run here: the kernels, and VNNI (built only where the CPU has it)."""
    return available() and torch._C._dispatch_has_kernel("tokenmill::int8_linear")
