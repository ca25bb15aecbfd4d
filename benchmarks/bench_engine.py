"""Output throughput of tokenmill against plain `transformers` generate, on one shared-prefix workload.

    .venv/bin/python benchmarks/bench_engine.py [--dtypes float32 bfloat16] [--threads N] [--json PATH]

Workload: 64 chat requests sharing one ~150-token system prompt (support-ticket triage), user messages
of 20-60 tokens, 64 greedy output tokens each (EOS ignored). The `transformers` peer runs batches of 16,
left-padded, same dtype, min_new_tokens = max_new_tokens = 64. Only generation is timed, after a small
warm-up on each side. "% of GEMM peak" is the model FLOPs actually run, 2 * params (embedding table
excluded, tied lm_head included) per token computed (prompt tokens not served from the prefix cache,
plus output tokens; attention and padding not counted), per second, over a measured torch matmul rate
for the dtype on the same threads.
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import json
import os
import random
import time
from typing import Any

import torch
from transformers import AutoTokenizer

from tokenmill import LLM, SamplingParams
from tokenmill.bench import gemm_peak, transformers_model
from tokenmill.models.loader import default_model_path

NUM_REQUESTS, OUTPUT_TOKENS, HF_BATCH = 64, 64, 16
SYSTEM_PROMPT = (
    "You are the triage assistant for the support desk of Northwind Cloud. Each user message is one "
    "support ticket. Reply with a single JSON object and nothing else, with these keys: \"category\" "
    "(billing, outage, performance, account_access, data_loss, feature_request or other), \"priority\" "
    "(P1 if production is down or data is at risk, P2 if a service is degraded, else P3), \"product\" "
    "(the product named, or null), \"sentiment\" (positive, neutral, frustrated or angry), \"ticket_id\" "
    "(copied exactly, or null) and \"summary\" (one sentence, at most twenty words). "
    "Never promise refunds or ask for passwords."
)
OPENERS = ["Hi team,", "Hello,", "Urgent:", "Good morning,", "Hey support,", ""]
PROBLEMS = [
    "our managed Postgres cluster has been refusing connections since 09:40 UTC",
    "I was charged twice for the March invoice on my business plan",
    "I can no longer log in to the console after enabling two-factor authentication",
    "object storage uploads from eu-west have been very slow all afternoon",
    "a volume snapshot I restored yesterday is missing the last two days of files",
    "it would be great if the load balancer supported weighted routing",
    "our Kubernetes nodes keep getting evicted with out-of-memory errors",
    "the DNS changes I made this morning still have not propagated",
]
DETAILS = [
    "Ticket id is NW-{n}.", "Account {n}, in case you need it.", "This is blocking our release tonight.",
    "We already tried restarting everything twice.", "Nothing changed on our side as far as I know.",
    "Three of my colleagues see the same thing.", "The status page says everything is fine, which it is not.",
    "It started right after your maintenance window.",
]
CLOSERS = ["Thanks.", "Please advise.", "Can someone look at this today?", "Regards, Dana", "", "Cheers, Tomas"]


def user_messages(tokenizer: Any, count: int, seed: int = 0) -> list[str]:
    """Deterministic, distinct tickets of 20-60 tokens, assembled from the pieces above."""
    rng, messages = random.Random(seed), []
    while len(messages) < count:
        details = " ".join(d.format(n=rng.randrange(10_000, 99_999)) for d in rng.sample(DETAILS, rng.randint(0, 3)))
        text = " ".join(p for p in (rng.choice(OPENERS), rng.choice(PROBLEMS) + ".", details, rng.choice(CLOSERS)) if p)
        text = text[0].upper() + text[1:]
        if 20 <= len(tokenizer.encode(text, add_special_tokens=False)) <= 60 and text not in messages:
            messages.append(text)
    return messages


def model_flops_per_token(model: torch.nn.Module) -> int:
    embed = model.get_input_embeddings().weight
    non_embedding = sum(p.numel() for p in model.parameters() if p is not embed)
    return 2 * (non_embedding + embed.numel())  # the tied lm_head is a vocab x hidden matmul per token


def agree_until_eos(ours: list[int], theirs: list[int], eos: int) -> bool:
    end = ours.index(eos) if eos in ours else len(ours)
    return ours[:end] == theirs[:end]


def run_tokenmill(dtype: str, conversations: list[list[dict[str, str]]]) -> tuple[float, list[Any]]:
    llm = LLM(None, dtype=dtype, max_num_seqs=128, max_num_batched_tokens=1024, kv_cache_memory=2 << 30)
    # Warm-up without the benchmark's system prompt, so it does not seed the prefix cache.
    llm.chat([[{"role": "user", "content": "Hello!"}]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def run_hf(dtype: torch.dtype, prompts: list[list[int]], pad_id: int) -> tuple[float, list[list[int]], int]:
    model = transformers_model(default_model_path(), dtype)

    def generate(batch: list[list[int]], new_tokens: int) -> torch.Tensor:
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        return out[:, width:]

    with torch.inference_mode():
        generate(prompts[:2], 4)
        start, outputs = time.perf_counter(), []
        for i in range(0, len(prompts), HF_BATCH):
            outputs += generate(prompts[i:i + HF_BATCH], OUTPUT_TOKENS).tolist()
        elapsed = time.perf_counter() - start
    return elapsed, outputs, model_flops_per_token(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(default_model_path().parent, gguf_file=default_model_path().name)
    system_tokens = len(tokenizer.encode(SYSTEM_PROMPT, add_special_tokens=False))
    users = user_messages(tokenizer, NUM_REQUESTS)
    user_lengths = [len(tokenizer.encode(u, add_special_tokens=False)) for u in users]
    assert 130 <= system_tokens <= 170 and all(20 <= n <= 60 for n in user_lengths)
    conversations = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": u}] for u in users]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False) for c in conversations]
    prompt_tokens = sum(map(len, prompts))
    print(f"workload: {NUM_REQUESTS} requests, system prompt {system_tokens} tokens, user messages "
          f"{min(user_lengths)}-{max(user_lengths)} tokens, {prompt_tokens} prompt tokens, "
          f"{OUTPUT_TOKENS} output tokens each; {args.threads} threads")

    rows: list[dict[str, Any]] = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        peak = gemm_peak(dtype)
        tm_time, tm_out = run_tokenmill(name, conversations)
        assert [o.prompt_token_ids for o in tm_out] == prompts, "tokenmill and HF see different prompt tokens"
        assert all(o.error is None and len(o.outputs[0].token_ids) == OUTPUT_TOKENS for o in tm_out)
        cached = sum(o.num_cached_tokens for o in tm_out)
        hf_time, hf_out, flops_per_token = run_hf(dtype, prompts, tokenizer.pad_token_id or tokenizer.eos_token_id)
        assert all(len(o) == OUTPUT_TOKENS for o in hf_out)
        # ignore_eos goes on past an EOS, min_new_tokens masks it out: outputs can only agree up to it.
        same = sum(agree_until_eos(o.outputs[0].token_ids, h, tokenizer.eos_token_id) for o, h in zip(tm_out, hf_out))
        print(f"{name}: GEMM peak {peak / 1e9:.1f} GFLOP/s; {flops_per_token / 1e6:.0f} MFLOP/token; "
              f"{same}/{NUM_REQUESTS} greedy outputs identical (up to tokenmill's first EOS) to HF's")
        for engine, seconds, hits in (("tokenmill", tm_time, cached), ("transformers", hf_time, None)):
            computed = prompt_tokens - (hits or 0) + NUM_REQUESTS * OUTPUT_TOKENS
            rows.append({"dtype": name, "engine": engine, "seconds": seconds, "gemm_peak_flops": peak,
                         "output_tok_s": NUM_REQUESTS * OUTPUT_TOKENS / seconds, "tokens_computed": computed,
                         "prefix_cache_hit_rate": None if hits is None else hits / prompt_tokens,
                         "share_of_gemm_peak": flops_per_token * computed / seconds / peak, "identical_outputs": same})

    hf = {r["dtype"]: r["output_tok_s"] for r in rows if r["engine"] == "transformers"}
    for r in rows:
        r["ratio_vs_hf_fp32"] = r["output_tok_s"] / hf["float32"] if "float32" in hf else None
        r["ratio_vs_hf_same_dtype"] = r["output_tok_s"] / hf[r["dtype"]]

    def fmt(value: float | None, spec: str, suffix: str = "") -> str:
        return "n/a" if value is None else format(value, spec) + suffix

    print("\n| dtype | engine | output tok/s | vs HF fp32 | vs HF same dtype | prefix-cache hits | % of GEMM peak |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['engine']} | {r['output_tok_s']:.1f} | {fmt(r['ratio_vs_hf_fp32'], '.2f', 'x')} | "
              f"{r['ratio_vs_hf_same_dtype']:.2f}x | {fmt(r['prefix_cache_hit_rate'], '.1%')} | "
              f"{r['share_of_gemm_peak']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "prompt_tokens": prompt_tokens, "system_tokens": system_tokens,
                       "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
