"""Times the quantized-weight kernels on Llama-3.2-1B's linear shapes against oneDNN's bf16 GEMM, in one run.

    .venv/bin/python benchmarks/bench_quant_kernels.py [--types Q8_0 Q4_0 Q4_K Q6_K] [--rows 1 4 8 16 32 64 128 512]
                                                        [--shapes qkv o gate_up down lm_head] [--min-time 0.3]

For each type, shape (K x N) and M rows of x, the median time of:
- `quant`: torch.ops.tokenmill.quant_linear on the blocks;
- `onednn`: oneDNN's bf16 GEMM on the dequantized weight, packed once as at load (`OneDnnPackedLinear`);
- `deq+gemm`: dequantize the whole weight into a buffer kept from call to call (a fresh tensor would cost
  more in page faults than the rest), then a bf16 GEMM on it (the faster of F.linear and reorder + packed
  GEMM): what a caller routing large M to oneDNN pays per call.
The same run measures the machine's references: memory bandwidth (a torch sum over 1 GiB of fp32) and the
bf16 GEMM peak (oneDNN packed, M=512, 2048 x 16384). Printed: per type, ms per call; quant_linear's GB/s of
weight bytes at M=1 and GFLOP/s at each M, as shares of those references; dequantize's GB/s written; and
the crossover: the smallest M from which `deq+gemm` takes less time than `quant` over the shapes together.
The load average (2 shared cores) is printed before and after: figures from a busy machine mean little.
Weights are random blocks with sane fp16 scales (the kernels' speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from tokenmill import kernels
from tokenmill.models.linear import OneDnnPackedLinear

Q = gguf.GGMLQuantizationType
SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048),
          "lm_head": (2048, 49152)}  # K x N
FP16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
               Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of each block's fp16 scales


def median_time(min_time: float, fn: Callable[..., object], *args: object) -> float:
    fn(*args)  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_blocks(qtype: Q, rows: int, in_features: int) -> torch.Tensor:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (rows, in_features // block, type_size), dtype=torch.uint8)
    for offset in FP16_FIELDS[qtype]:
        scales = np.random.default_rng(offset).uniform(0.002, 0.05, (rows, in_features // block))
        blocks[..., offset:offset + 2] = torch.from_numpy(scales.astype(np.float16).view(np.uint8).reshape(
            rows, -1, 2))
    return blocks.reshape(rows, -1)


def dequantize_then_gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: Q, buffer: torch.Tensor,
                         reorder: bool) -> torch.Tensor:
    weight = torch.ops.tokenmill.dequantize(blocks, qtype, x.shape[1], out=buffer)
    return OneDnnPackedLinear(weight, None).apply(x) if reorder else F.linear(x, weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement (at least 3 calls)")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the kernels do not run here (no AVX-512 or no compiler)")
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (1 min)")

    bandwidth = 2**30 / median_time(args.min_time, torch.ones(2**28).sum) / 1e9
    peak_linear = OneDnnPackedLinear(torch.randn(16384, 2048).to(torch.bfloat16), None)
    peak_x = torch.randn(512, 2048).to(torch.bfloat16)
    peak = 2 * 512 * 2048 * 16384 / median_time(args.min_time, peak_linear.apply, peak_x) / 1e9
    print(f"memory bandwidth {bandwidth:.1f} GB/s (torch sum over 1 GiB), bf16 GEMM peak {peak:.0f} GFLOP/s "
          "(oneDNN packed, M=512, 2048 x 16384)")

    xs = {m: torch.randn(m, max(k for k, _ in SHAPES.values())).to(torch.bfloat16) for m in args.rows}
    onednn: dict[tuple[str, int], float] = {}  # the same for every type: a bf16 GEMM
    for name in args.shapes:
        k, n = SHAPES[name]
        linear = OneDnnPackedLinear(torch.randn(n, k).to(torch.bfloat16), None)
        for m in args.rows:
            x = xs[m][:, :k].contiguous()
            onednn[name, m] = median_time(args.min_time, linear.apply, x)

    for type_name in args.types:
        qtype = Q[type_name]
        quant: dict[tuple[str, int], float] = {}
        staged: dict[tuple[str, int], float] = {}
        weight_bytes: dict[str, int] = {}
        dequantize_rate = 0.0
        for name in args.shapes:
            k, n = SHAPES[name]
            blocks = random_blocks(qtype, n, k)
            buffer = torch.empty(n, k, dtype=torch.bfloat16)
            weight_bytes[name] = blocks.numel()
            if name == "gate_up" or dequantize_rate == 0.0:
                seconds = median_time(args.min_time, torch.ops.tokenmill.dequantize, blocks, qtype, k, buffer)
                dequantize_rate = n * k * 2 / seconds / 1e9
            for m in args.rows:
                x = xs[m][:, :k].contiguous()
                quant[name, m] = median_time(args.min_time, torch.ops.tokenmill.quant_linear, x, blocks, qtype)
                staged[name, m] = min(median_time(args.min_time, dequantize_then_gemm, x, blocks, qtype, buffer,
                                                  reorder) for reorder in (False, True))
        print(f"\n{type_name}: ms per call, quant / onednn / deq+gemm; quant's GFLOP/s (share of the peak)")
        print("   M  " + "".join(f"{name:>26}" for name in args.shapes) + f"{'total':>26}  GFLOP/s")
        crossover = None
        for m in args.rows:
            cells = [(quant[s, m], onednn[s, m], staged[s, m]) for s in args.shapes]
            totals = tuple(sum(column) for column in zip(*cells))
            flops = sum(2 * m * SHAPES[s][0] * SHAPES[s][1] for s in args.shapes)
            rate = flops / totals[0] / 1e9
            print(f"{m:>4}  " + "".join(f"{a * 1e3:>8.3f} /{b * 1e3:>7.3f} /{c * 1e3:>7.3f}" for a, b, c in
                                        [*cells, totals]) + f"  {rate:>5.0f} ({rate / peak:.0%})")
            if crossover is None and totals[2] < totals[0]:
                crossover = m
        m1 = [s for s in args.shapes if (s, 1) in quant]
        if m1:
            rate = sum(weight_bytes[s] for s in m1) / sum(quant[s, 1] for s in m1) / 1e9
            print(f"M=1: {rate:.1f} GB/s of weight bytes read = {rate / bandwidth:.0%} of the bandwidth")
        print(f"dequantize into a buffer: {dequantize_rate:.1f} GB/s of bf16 written")
        print(f"crossover: deq+gemm beats quant_linear from M = {crossover if crossover else '(never, up to '}"
              f"{'' if crossover else str(max(args.rows)) + ')'}")
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
