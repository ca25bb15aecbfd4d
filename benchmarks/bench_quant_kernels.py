"""Times the quantized-weight kernels on Llama-3.2-1B's linear shapes against oneDNN's bf16 GEMM, in one run.

    .venv/bin/python benchmarks/bench_quant_kernels.py [--types Q8_0 Q4_0 Q4_K Q6_K] [--rows 1 4 8 16 32 64 128 512]
                                                        [--shapes qkv o gate_up down lm_head] [--min-time 0.4]

For each type, shape (K x N) and M rows of x, the time of:
- `quant`: torch.ops.tokenmill.quant_linear on the blocks;
- `int8`: the int8-activation path bf16 models take (models/int8_dot.py): quantize_rows on x, then int8_linear
  on the blocks packed once by int8_pack (types it serves; others print "-");
- `onednn`: oneDNN's bf16 GEMM on the dequantized weight, packed once as at load (`OneDnnPackedLinear`);
- `deq+gemm`: dequantize the whole weight into a buffer kept from call to call (a fresh tensor would cost
  more in page faults than the rest), then a bf16 GEMM on it (the faster of F.linear and reorder + packed
  GEMM): what a caller routing large M to oneDNN pays per call.
The same run measures the machine's references: memory bandwidth (a torch sum over 1 GiB of fp32) and the
bf16 GEMM peak (oneDNN packed, M=512, 2048 x 16384). Printed: per type, ms per call; quant_linear's and int8's
GB/s of weight bytes at M=1 and GFLOP/s at each M, as shares of those references; dequantize's GB/s written; and
the crossover: the smallest M from which `deq+gemm` takes less time than `quant`, over the shapes together
and per shape.

NOTE: each time is the best of calls taken in turns with the alternatives for MIN_TIME seconds: the 2 cores
are shared, and a parallel region waits a whole scheduler slice (8 ms here) for a thread another process
holds, so medians on a busy machine measure the neighbours. M=1 cycles through copies of each weight
totalling 96 MB, so that it is read from memory as in a model's decode step (the L3 holds 32 MB). The load
average is printed before and after. Weights are random blocks with sane fp16 scales (the kernels' speed
does not depend on the values).
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import itertools
import math
import os
import time
from collections.abc import Callable
from functools import partial

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from tokenmill import kernels
from tokenmill.models.linear import OneDnnPackedLinear

Q = gguf.GGMLQuantizationType
SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048),
          "lm_head": (2048, 49152)}  # K x N
COPIES_BYTES = 96 * 2**20  # M=1 reads each weight from this many bytes of copies: past the L3
FP16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
               Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of each block's fp16 scales


def best_times(min_time: float, calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The best time of each call, the calls taken in turns for min_time seconds (at least 3 turns)."""
    for call in calls.values():  # warm-up
        call()
    best = dict.fromkeys(calls, float("inf"))
    start, turns = time.perf_counter(), 0
    while turns < 3 or time.perf_counter() - start < min_time:
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - t)
        turns += 1
    return best


def cycling(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One call per use, each of calls in turn."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def random_blocks(qtype: Q, rows: int, in_features: int) -> torch.Tensor:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = torch.randint(0, 256, (rows, in_features // block, type_size), dtype=torch.uint8)
    for offset in FP16_FIELDS[qtype]:
        scales = np.random.default_rng(offset).uniform(0.002, 0.05, (rows, in_features // block))
        blocks[..., offset:offset + 2] = torch.from_numpy(scales.astype(np.float16).view(np.uint8).reshape(
            rows, -1, 2))
    return blocks.reshape(rows, -1)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, qtype: Q, out_features: int) -> torch.Tensor:
    q, sums = torch.ops.tokenmill.quantize_rows(x)
    return torch.ops.tokenmill.int8_linear(q, sums, packed, qtype, out_features)


def dequantize_then_gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: Q, buffer: torch.Tensor,
                         reorder: bool) -> torch.Tensor:
    weight = torch.ops.tokenmill.dequantize(blocks, qtype, x.shape[1], out=buffer)
    return OneDnnPackedLinear(weight, None).apply(x) if reorder else F.linear(x, weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--min-time", type=float, default=0.4, help="seconds per measurement (at least 3 turns)")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the kernels do not run here (no AVX-512 or no compiler)")
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (1 min)")

    ones = torch.ones(2**28)
    bandwidth = 2**30 / best_times(args.min_time, {"sum": ones.sum})["sum"] / 1e9
    del ones
    peak_linear = OneDnnPackedLinear(torch.randn(16384, 2048).to(torch.bfloat16), None)
    peak_x = torch.randn(512, 2048).to(torch.bfloat16)
    peak_time = best_times(args.min_time, {"gemm": partial(peak_linear.apply, peak_x)})["gemm"]
    peak = 2 * 512 * 2048 * 16384 / peak_time / 1e9
    print(f"memory bandwidth {bandwidth:.1f} GB/s (torch sum over 1 GiB), bf16 GEMM peak {peak:.0f} GFLOP/s "
          "(oneDNN packed, M=512, 2048 x 16384)")

    xs = {m: torch.randn(m, max(k for k, _ in SHAPES.values())).to(torch.bfloat16) for m in args.rows}
    for type_name in args.types:
        qtype = Q[type_name]
        times: dict[tuple[str, int], dict[str, float]] = {}
        weight_bytes: dict[str, int] = {}
        dequantize_rate = 0.0
        for name in args.shapes:
            k, n = SHAPES[name]
            blocks = [random_blocks(qtype, n, k) for _ in range(math.ceil(COPIES_BYTES / (n * k * 2)))]
            linears = [OneDnnPackedLinear(torch.ops.tokenmill.dequantize(b, qtype, k), None) for b in blocks]
            blocks += [random_blocks(qtype, n, k) for _ in range(math.ceil(COPIES_BYTES / blocks[0].numel()) -
                                                                 len(blocks))]
            serves = int(qtype) in kernels.INT8_DOT_TYPES and kernels.int8_dot_available()
            packs = [torch.ops.tokenmill.int8_pack(b, qtype, k) for b in blocks] if serves else []  # (copies as blocks)
            buffer = torch.empty(n, k, dtype=torch.bfloat16)
            weight_bytes[name] = blocks[0].numel()
            if name == "gate_up" or dequantize_rate == 0.0:
                deq = partial(torch.ops.tokenmill.dequantize, blocks[0], qtype, k, out=buffer)
                dequantize_rate = n * k * 2 / best_times(args.min_time, {"deq": deq})["deq"] / 1e9
            for m in args.rows:
                x = xs[m][:, :k].contiguous()
                copies = len(blocks) if m == 1 else 1
                int8 = {"int8": cycling([partial(int8_linear, x, p, qtype, n) for p in packs[:copies]])} if packs \
                    else {}
                times[name, m] = {"int8": math.nan} | best_times(args.min_time, {
                    "quant": cycling([partial(torch.ops.tokenmill.quant_linear, x, b, qtype) for b in blocks[:copies]]),
                    **int8,
                    "onednn": cycling([partial(linear.apply, x) for linear in linears[:copies]]),
                    "deq+linear": cycling([partial(dequantize_then_gemm, x, b, qtype, buffer, False)
                                           for b in blocks[:copies]]),
                    "deq+packed": cycling([partial(dequantize_then_gemm, x, b, qtype, buffer, True)
                                           for b in blocks[:copies]])})
            del blocks, linears, packs
        print(f"\n{type_name}: ms per call, quant / int8 / onednn / deq+gemm; quant's and int8's GFLOP/s (share of "
              "the peak)")
        print("   M  " + "".join(f"{name:>35}" for name in args.shapes) + f"{'total':>35}  GFLOP/s quant, int8")
        crossover: dict[str, int | None] = dict.fromkeys([*args.shapes, "total"])
        for m in args.rows:
            cells = {s: (times[s, m]["quant"], times[s, m]["int8"], times[s, m]["onednn"],
                         min(times[s, m]["deq+linear"], times[s, m]["deq+packed"])) for s in args.shapes}
            cells["total"] = tuple(sum(column) for column in zip(*cells.values()))
            flops = sum(2 * m * SHAPES[s][0] * SHAPES[s][1] for s in args.shapes)
            rate, int8_rate = flops / cells["total"][0] / 1e9, flops / cells["total"][1] / 1e9
            print(f"{m:>4}  " + "".join(f"{a * 1e3:>8.3f} /{b * 1e3:>8.3f} /{c * 1e3:>7.3f} /{d * 1e3:>7.3f}"
                                        for a, b, c, d in cells.values()) +
                  f"  {rate:>5.0f} ({rate / peak:.0%}), {int8_rate:>5.0f} ({int8_rate / peak:.0%})")
            for s, (quant, _, _, staged) in cells.items():
                if crossover[s] is None and staged < quant:
                    crossover[s] = m
        if 1 in args.rows:
            for method in ("quant", "int8"):
                rate = sum(weight_bytes.values()) / sum(times[s, 1][method] for s in args.shapes) / 1e9
                print(f"M=1 {method}: {rate:.1f} GB/s of the file's weight bytes = {rate / bandwidth:.0%} of the "
                      "bandwidth")
        print(f"dequantize into a buffer: {dequantize_rate:.1f} GB/s of bf16 written")
        print("crossover (deq+gemm faster from M =): " + ", ".join(
            f"{s} {'never' if m is None else m}" for s, m in crossover.items()) + f" (up to M={max(args.rows)})")
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
