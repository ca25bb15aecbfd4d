"""Prompt-lookup speculative decoding on an extraction job at small batches: tokens/s with and without it.

The job's outputs copy spans of their inputs (copy a record, pull out the clauses that mention a
party, fix the typos of a paragraph): where prompt lookup finds its drafts. For each batch size B
(every B requests run together, max_num_seqs = B, one engine per setting, greedy), prints the
decode tokens/s with `speculative="off"` and `"ngram"` (the issue's measure: tokens produced by steps
that only decode, over those steps' time; prefill steps are the same work either way) and their
ratio, then the end-to-end output tokens/s (prefill included) and theirs, the drafts kept, and
whether the tokens are identical (they must be):

    python benchmarks/bench_speculation.py                       # default model, B = 1, 2, 4
    python benchmarks/bench_speculation.py --model M.gguf --batch 1,4 --requests 8
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import dataclasses
import json
import random
import time

import torch

from tokenmill import LLM, SamplingParams

NAMES = ["Larkspur Supplies", "Quay Street", "Galway", "Northwind Traders", "Ada Byrne", "Tomas Keane"]
ITEMS = ["oak chairs", "walnut tables", "steel shelves", "linen curtains", "brass lamps", "glass vases"]


def record(rng: random.Random) -> str:
    lines = [f"Invoice {rng.randint(1000, 9999)} from {rng.choice(NAMES)}, dated {rng.randint(1, 28)} March 2024."]
    for _ in range(rng.randint(4, 7)):
        lines.append(f"- {rng.randint(1, 40)} {rng.choice(ITEMS)} at {rng.randint(5, 900)} euros each, "
                     f"for {rng.choice(NAMES)} at {rng.randint(1, 99)} {rng.choice(NAMES)}.")
    return "\n".join(lines)


TASKS = ["Copy the invoice below exactly, line by line.", "List every line of the invoice that mentions {name}, "
         "copied exactly.", "Rewrite the invoice below as the same lines with each price in brackets."]


def prompts(count: int) -> list[list[dict[str, str]]]:
    rng = random.Random(0)
    return [[{"role": "user", "content": rng.choice(TASKS).format(name=rng.choice(NAMES)) + "\n\n" + record(rng)}]
            for _ in range(count)]


def run(model: str | None, batch: int, speculative: str, conversations: list, max_tokens: int) -> dict:
    llm = LLM(model, max_num_seqs=batch, speculative=speculative)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.chat(conversations[:batch], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm up
    stats = llm.engine.stats
    before = dataclasses.replace(stats)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outputs]
    generated = sum(len(t) for t in tokens)
    decode_tok_s = (stats.decode_tokens - before.decode_tokens) / (stats.decode_seconds - before.decode_seconds)
    return {"tokens": tokens, "seconds": seconds, "tok_s": generated / seconds, "generated": generated,
            "decode_tok_s": decode_tok_s, "drafted": stats.draft_tokens - before.draft_tokens,
            "kept": stats.accepted_draft_tokens - before.accepted_draft_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--batch", default="1,2,4")
    parser.add_argument("--requests", type=int, default=8, help="requests per batch size (a multiple of B)")
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    conversations = prompts(args.requests)
    print(f"threads {torch.get_num_threads()}")
    print("| B | decode tok/s off | ngram | ngram / off | end to end off | ngram | ngram / off | drafts kept | "
          "identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        off = run(args.model, batch, "off", conversations, args.max_tokens)
        ngram = run(args.model, batch, "ngram", conversations, args.max_tokens)
        print(f"| {batch} | {off['decode_tok_s']:.1f} | {ngram['decode_tok_s']:.1f} | "
              f"{ngram['decode_tok_s'] / off['decode_tok_s']:.2f} | {off['tok_s']:.1f} | {ngram['tok_s']:.1f} | "
              f"{ngram['tok_s'] / off['tok_s']:.2f} | {ngram['kept']} of {ngram['drafted']} | "
              f"{off['tokens'] == ngram['tokens']} |", flush=True)
        print(json.dumps({"B": batch, "generated": off["generated"], "off_s": round(off["seconds"], 2),
                          "ngram_s": round(ngram["seconds"], 2)}), flush=True)


if __name__ == "__main__":
    main()
