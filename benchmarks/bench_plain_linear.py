"""Times the batch-invariant kernel on plain bf16/fp32 weights against oneDNN's packed GEMM, in one run.

    .venv/bin/python benchmarks/bench_plain_linear.py [--dtypes bfloat16 float32] [--rows 1 8 64 256]
                                                       [--shapes smol.qkv ... minilm.down] [--min-time 0.3]

For each dtype, shape (K -> N) of SmolLM2-135M's, Llama-3.2-1B's and all-MiniLM-L6-v2's linear layers and M
rows of x, the time per call of:
- `onednn`: `OneDnnPackedLinear` (the weight reordered into oneDNN's blocked layout once, as at load);
- `invariant`: `InvariantPlainLinear`, torch.ops.tokenmill.dense_linear on the weight packed at load
  (kernels/quant.cpp): out[m, n] the same bits for every M.
Printed: ms per call, GFLOP/s, and invariant's time over onednn's (> 1: slower), per shape and summed over
each model's layer shapes (one decoder layer and the lm_head, each once; one encoder layer). MiniLM's layers
(an encoder's: packed steps of thousands of tokens, `--shapes minilm.qkv minilm.o minilm.up minilm.down
--rows 1024 4096`) have biases, and its up projection a GELU: fused into the kernel's epilogue, F.gelu after
oneDNN's product.

NOTE: as in bench_quant_kernels.py, each time is the best of calls taken in turns for MIN_TIME seconds (the
2 cores are shared), and the calls cycle through copies of each weight totalling at least 96 MB, so that
weights are read from memory as in a model's step (the L3 holds 32 MB).
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import math
import os
from functools import partial

import torch
from bench_quant_kernels import best_times, cycling

from tokenmill import kernels
from tokenmill.models.linear import InvariantPlainLinear, OneDnnPackedLinear

SHAPES = {  # K -> N
    "smol.qkv": (576, 960), "smol.o": (576, 576), "smol.gate_up": (576, 3072), "smol.down": (1536, 576),
    "smol.lm_head": (576, 49152),
    "llama1b.qkv": (2048, 3072), "llama1b.o": (2048, 2048), "llama1b.gate_up": (2048, 16384),
    "llama1b.down": (8192, 2048),
    "minilm.qkv": (384, 1152), "minilm.o": (384, 384), "minilm.up": (384, 1536), "minilm.down": (1536, 384),
}
COPIES_BYTES = 96 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement (at least 3 turns)")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the kernels do not run here (no AVX-512 or no compiler)")
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (1 min)")
    for dtype in (getattr(torch, name) for name in args.dtypes):
        print(f"\n{dtype}: ms per call onednn / invariant, GFLOP/s onednn / invariant, invariant's time / onednn's")
        totals: dict[tuple[str, int], list[float]] = {}
        for name in args.shapes:
            k, n = SHAPES[name]
            copies = math.ceil(COPIES_BYTES / (n * k * dtype.itemsize))
            weights = [torch.randn(n, k).to(dtype) for _ in range(copies)]
            bias = torch.randn(n).to(dtype) if name.startswith("minilm") else None
            activation = "gelu" if name == "minilm.up" else None
            onednn = [OneDnnPackedLinear(w, bias, activation) for w in weights]
            invariant = [InvariantPlainLinear(w, bias, activation) for w in weights]
            for m in args.rows:
                x = torch.randn(m, k).to(dtype)
                times = best_times(args.min_time, {
                    "onednn": cycling([partial(method.apply, x) for method in onednn]),
                    "invariant": cycling([partial(method.apply, x) for method in invariant])})
                a, b = times["onednn"], times["invariant"]
                flops = 2 * m * k * n
                print(f"{name:>16} M={m:<4} {a * 1e3:8.3f} / {b * 1e3:8.3f} ms  {flops / a / 1e9:6.0f} / "
                      f"{flops / b / 1e9:6.0f} GFLOP/s  {b / a:5.2f}")
                total = totals.setdefault((name.split(".")[0], m), [0.0, 0.0, 0.0])
                total[0] += a
                total[1] += b
                total[2] += flops
            del weights, onednn, invariant
        for (model, m), (a, b, flops) in totals.items():
            print(f"{model + ' total':>16} M={m:<4} {a * 1e3:8.3f} / {b * 1e3:8.3f} ms  {flops / a / 1e9:6.0f} / "
                  f"{flops / b / 1e9:6.0f} GFLOP/s  {b / a:5.2f}")
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
