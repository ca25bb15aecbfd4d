"""Bidirectional attention over packed sequences (BERT-style encoders): torch.ops.tokenmill.encoder_attention
against torch's SDPA called the way transformers' BERT calls it, one layer's attention per call.

    .venv/bin/python benchmarks/bench_encoder_attention.py [--threads 2] [--min-time 1.0]

Cases: 64 sequences of lengths uniform in 5..200, 64 of 128..256 (fixed seeds), and 64 of 80 tokens
each (no padding: transformers passes no mask, SDPA's best case); heads / head_dim 12/32
(all-MiniLM-L6-v2) and 12/64 (bge-base, e5-base); bf16 and fp32. q, k, v are views into one fused
projection output [T, 3 * heads * D], the tokens of all sequences end to end.
- `kernel`: encoder_attention on those views.
- `torch`: q, k, v gathered into padded [B, Lmax, heads, D] tensors, viewed as [B, heads, Lmax, D] (as
  BERT's self-attention does), SDPA with the boolean mask transformers' masking_utils builds for BERT
  ([B, 1, Lmax, Lmax], built once outside the timing: a model builds it once per forward), and the
  output gathered back to the packed rows: what a packed model would pay to use SDPA.
- `sdpa`: the SDPA call alone, for reference (with all lengths equal, a view would do for the gathers:
  `sdpa` is then the figure to beat).
Printed: ms per call (the best of calls alternated for --min-time seconds: the cores are shared),
kernel / torch, and GFLOP/s of the unpadded work, 4 sum(L_i^2) heads D. The load average is printed
before and after: figures taken while it is above ~0.5 measure the neighbours too.

Here (AMD EPYC Zen 4, 2 threads, torch 2.13; per cell the best of 15 runs on a shared machine), ms:
kernel / torch (sdpa alone), kernel GFLOP/s:
    5..200   MiniLM bf16  5.2 / 56 (50), 241    fp32  9.4 / 74 (55), 134
             bge    bf16 10.4 / 90 (81), 241    fp32 16.9 / 118 (76), 149
    128..256 MiniLM bf16 13.6 / 87 (76), 278    fp32 24.5 / 110 (82), 154
             bge    bf16 26.5 / 141 (126), 285  fp32 45.9 / 201 (131), 165
    80 (all) MiniLM bf16  2.9 / 15 (14.0), 220  fp32  5.2 / 17 (11.7), 120
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import os
from functools import partial

import torch
import torch.nn.functional as F
from bench_quant_kernels import best_times
from transformers import BertConfig
from transformers.masking_utils import create_bidirectional_mask

from tokenmill import kernels

HEADS = {"MiniLM 12/32": (12, 32), "bge-base 12/64": (12, 64)}
LENGTHS = {"5..200": (5, 200), "128..256": (128, 256), "80 (all)": (80, 80)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, batch: int, longest: int,
                mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Pad (rows: each packed token's row in [B * Lmax]), SDPA as BERT calls it, unpad."""
    heads, head_dim = q.shape[1:]

    def pad(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(batch * longest, heads, head_dim).index_copy_(0, rows, x)
        return padded.view(batch, longest, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch * longest, heads, head_dim)[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per case (at least 3 turns)")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("tokenmill's kernels do not run on this machine")
    torch.set_num_threads(args.threads)
    config = BertConfig()
    config._attn_implementation = "sdpa"
    print(f"threads {args.threads}; load average {os.getloadavg()[0]:.2f}; ms per call (best of the turns)")
    print("| lengths | heads/D | dtype | kernel | torch | sdpa | kernel / torch | kernel GFLOP/s | torch GFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for lengths_name, (low, high) in LENGTHS.items():
        lengths = torch.randint(low, high + 1, (64,), generator=torch.Generator().manual_seed(low))
        batch, longest, total = len(lengths), int(lengths.max()), int(lengths.sum())
        seq_starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        rows = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths.tolist())])
        padding_mask = torch.arange(longest)[None, :] < lengths[:, None]
        mask = create_bidirectional_mask(config=config, inputs_embeds=torch.zeros(batch, longest, 1),
                                         attention_mask=padding_mask)
        for heads_name, (heads, head_dim) in HEADS.items():
            flops = 4 * (lengths.double() ** 2).sum().item() * heads * head_dim
            scale = head_dim**-0.5
            for dtype_name, dtype in DTYPES.items():
                qkv = torch.randn(total, 3 * heads * head_dim).to(dtype)
                q, k, v = qkv.view(total, 3, heads, head_dim).unbind(1)
                padded = [x.new_zeros(batch * longest, heads, head_dim).index_copy_(0, rows, x)
                          .view(batch, longest, heads, head_dim).transpose(1, 2) for x in (q, k, v)]
                best = best_times(args.min_time, {
                    "kernel": partial(torch.ops.tokenmill.encoder_attention, q, k, v, seq_starts, scale),
                    "torch": partial(padded_sdpa, q, k, v, rows, batch, longest, mask, scale),
                    "sdpa": partial(F.scaled_dot_product_attention, *padded, attn_mask=mask, scale=scale)})
                kernel, reference, sdpa = best["kernel"], best["torch"], best["sdpa"]
                print(f"| {lengths_name} | {heads_name} | {dtype_name} | {kernel * 1e3:.2f} | {reference * 1e3:.2f} "
                      f"| {sdpa * 1e3:.2f} | {kernel / reference:.3f} | {flops / kernel / 1e9:.0f} "
                      f"| {flops / reference / 1e9:.0f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
