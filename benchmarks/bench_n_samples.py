"""An n > 1 job: many chat requests asking for n samples each, timed end to end.

    .venv/bin/python benchmarks/bench_n_samples.py [--requests 32] [--n 8] [--max-tokens 64]

Prints the job's generated tokens/s and the engine's computed tokens (prompt work included), so
two ways of running n samples can be compared on the same job (docs/PERFORMANCE.md, issue 13).
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import json
import time

import torch

from tokenmill import LLM, SamplingParams

TOPICS = ["a robot who learns to paint", "the history of tea", "a lighthouse keeper's day", "how bridges stand",
          "a cat who runs a bakery", "the water cycle", "a letter to a future self", "why the sky is blue"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    llm = LLM(None, dtype=args.dtype, kv_cache_memory=2 << 30)
    system = "You are a writer. Answer in a few sentences, plainly, without lists. " * 4
    chats = [[{"role": "system", "content": system},
              {"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]} (take {i})."}]
             for i in range(args.requests)]
    params = SamplingParams(n=args.n, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=1,
                            ignore_eos=True)
    llm.chat(chats[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    computed_before = llm.engine.stats.computed_tokens
    start = time.perf_counter()
    outputs = llm.chat(chats, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(json.dumps({"requests": args.requests, "n": args.n, "threads": torch.get_num_threads(),
                      "wall_s": round(elapsed, 3), "generated_tok_per_s": round(generated / elapsed, 1),
                      "computed_tokens": llm.engine.stats.computed_tokens - computed_before,
                      "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs)}))


if __name__ == "__main__":
    main()
