"""Throughput of one mixed batch workload over a grid of scheduler settings (max_num_seqs x token budget).

    .venv/bin/python benchmarks/bench_scheduler.py [--seqs 32 64 128 256] [--budgets 256 512 1024 2048]
                                                   [--prompt-only] [--dtype bfloat16] [--json PATH]

Workload (default model): 192 support-ticket chat requests sharing one ~150-token system prompt
(user messages of 20-60 tokens) and 32 long "documents" of 300-900 random tokens with no shared
prefix; greedy, EOS ignored, max_tokens drawn from 16-128 per request, so that requests finish at
different steps and the scheduler keeps refilling the batch. With --prompt-only: 48 prompts of 800
random tokens, max_tokens 1, no prefix cache (prompt processing alone). Each setting gets a fresh
engine (an empty prefix cache) and a small warm-up; the whole generate call is timed.
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import json
import random
import time
from typing import Any

import torch
from bench_engine import SYSTEM_PROMPT, user_messages

from tokenmill import LLM, SamplingParams


def workload(llm: LLM, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    tokenizer = llm.get_tokenizer()
    prompts = []
    for user in user_messages(tokenizer, 192, seed):
        conversation = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    vocab = llm.frontend.vocab_size
    prompts += [[rng.randrange(3, vocab) for _ in range(rng.randint(300, 900))] for _ in range(32)]
    rng.shuffle(prompts)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(16, 128), ignore_eos=True) for _ in prompts]
    return prompts, params


def prompt_only_workload(llm: LLM, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    vocab = llm.frontend.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(800)] for _ in range(48)]
    return prompts, [SamplingParams(temperature=0, max_tokens=1)] * len(prompts)


def run(dtype: str, max_num_seqs: int, budget: int, prompt_only: bool) -> dict[str, Any]:
    llm = LLM(None, dtype=dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, kv_cache_memory=2 << 30,
              enable_prefix_caching=not prompt_only)
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    prompts, params = prompt_only_workload(llm) if prompt_only else workload(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(map(len, prompts))
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": budget, "seconds": seconds,
            "output_tok_s": output_tokens / seconds, "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached,
            "output_tokens": output_tokens, "computed_tok_s": (prompt_tokens - cached + output_tokens) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--prompt-only", action="store_true", help="the prompt-only job instead of the mixed one")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    rows = []
    print(f"{torch.get_num_threads()} threads, {args.dtype}")
    print("| max_num_seqs | max_num_batched_tokens | wall s | output tok/s | computed tok/s |")
    print("|---:|---:|---:|---:|---:|")
    for seqs in args.seqs:
        for budget in args.budgets:
            r = run(args.dtype, seqs, budget, args.prompt_only)
            rows.append(r)
            print(f"| {seqs} | {budget} | {r['seconds']:.1f} | {r['output_tok_s']:.0f} | {r['computed_tok_s']:.0f} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
