"""Attention alone: the kernel backend (batch-invariant) against the torch backend (gather + SDPA), per layer.

    .venv/bin/python benchmarks/bench_attention.py [--threads N] [--heads smol 1b gemma3]

Cases, each one layer's attention over a paged pool of random K/V (blocks placed at random, as a
long-running engine leaves them): B decodes with ragged contexts; B decodes sharing a 512-token
prefix (the prefix cache's blocks); one request's 256-token prompt chunk at contexts of 256 and
1,024; and long contexts (4,096 tokens) under a 512-token sliding window, beside the same with
full attention (the window's saving). Heads: SmolLM2's (9 query, 3 KV, D=64), Llama-3.2-1B's
(32 query, 8 KV, D=64) and Gemma 3 270M's (4 query, 1 KV, D=256), bf16. Times are the best of
calls alternated for --min-time seconds (milliseconds); the ratio is kernel / torch.
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import os
from functools import partial

import torch
from bench_quant_kernels import best_times

from tokenmill.attention import AttentionSpec, BatchLayout, CpuKernelAttentionBackend, TorchAttentionBackend

HEADS = {"smol": (9, 3, 64), "1b": (32, 8, 64), "gemma3": (4, 1, 256)}  # query heads, KV heads, head_dim
BLOCK = 16


def layout(contexts: list[int], new: list[int], shared_blocks: int, pool_blocks: int) -> BatchLayout:
    """Requests whose first `shared_blocks` blocks are the same ones; the rest placed at random."""
    free = torch.randperm(pool_blocks - shared_blocks).add(shared_blocks).tolist()
    tables = [list(range(shared_blocks)) + [free.pop() for _ in range((n + BLOCK - 1) // BLOCK - shared_blocks)]
              for n in contexts]
    width = max(map(len, tables))
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return BatchLayout.of(torch.tensor(new), torch.tensor(contexts), block_table, BLOCK)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per case (at least 3 turns)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    long_contexts = [4096 + i * 7 % 30 for i in range(64)]
    # (label, contexts, new tokens, shared blocks, window)
    cases = [("64 decodes, ~210-token contexts", [210 + i * 7 % 30 for i in range(64)], [1] * 64, 0, None),
             ("8 decodes, ~1,000-token contexts", [1000 + i * 7 % 30 for i in range(8)], [1] * 8, 0, None),
             ("64 decodes sharing 512 tokens, ~40 own", [512 + 20 + i % 28 for i in range(64)], [1] * 64, 32, None),
             ("a 256-token prompt chunk, context 256", [256], [256], 0, None),
             ("a 256-token prompt chunk, context 1,024", [1024], [256], 0, None),
             ("64 decodes, ~4,096-token contexts", long_contexts, [1] * 64, 0, None),
             ("64 decodes, ~4,096-token contexts, window 512", long_contexts, [1] * 64, 0, 512),
             ("a 256-token prompt chunk, context 4,096", [4096], [256], 0, None),
             ("a 256-token prompt chunk, context 4,096, window 512", [4096], [256], 0, 512)]
    print(f"threads {args.threads}; per layer, ms (best of the turns alternated for --min-time s)")
    print("| heads | case | kernel | torch | kernel / torch |\n|---|---|---:|---:|---:|")
    for name in args.heads:
        heads, kv_heads, head_dim = HEADS[name]
        spec = AttentionSpec(heads, kv_heads, head_dim, BLOCK, torch.bfloat16, torch.device("cpu"))
        if not CpuKernelAttentionBackend.supports(spec):  # builds the kernels, or says they cannot run here
            raise SystemExit("tokenmill's attention kernels do not run on this machine")
        kernel, reference = CpuKernelAttentionBackend(spec), TorchAttentionBackend(spec)
        for label, contexts, new, shared, window in cases:
            pool_blocks = shared + sum((n + BLOCK - 1) // BLOCK for n in contexts) + 8
            batch = layout(contexts, new, shared, pool_blocks)
            pool = torch.randn(2, pool_blocks * BLOCK, kv_heads, head_dim).to(torch.bfloat16)
            q = torch.randn(sum(new), heads, head_dim).to(torch.bfloat16)
            metas = {"kernel": kernel.build_metadata(batch, window), "torch": reference.build_metadata(batch, window)}
            best = best_times(args.min_time, {
                "kernel": partial(kernel.forward, q, pool, metas["kernel"]),
                "torch": partial(reference.forward, q, pool, metas["torch"])})
            kernel_ms, torch_ms = best["kernel"] * 1e3, best["torch"] * 1e3
            print(f"| {name} | {label} | {kernel_ms:.3f} | {torch_ms:.3f} | {kernel_ms / torch_ms:.2f} |")


if __name__ == "__main__":
    main()
