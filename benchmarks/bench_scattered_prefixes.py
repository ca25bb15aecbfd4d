"""Issue 21's job: shared system prompts scattered over the whole file, a KV pool too small to keep them all.

Writes 3,000 chat lines (/v1/chat/completions, the default model): 300 distinct system prompts of
about 200 tokens, ten lines each, shuffled over the whole file (seeded), each line with a short
distinct user message, temperature 0 and a small max_tokens. Runs it with `tokenmill run
--kv-cache-memory 64MiB` from this tree and from a worktree of `--baseline` (each a fresh process,
alternated `--repeats` times; with `--with-input-order`, this tree with `--input-order` too) and
prints a markdown table: the job's wall time (the summary's: the ordering pass included), hit rate, prompt and
cached tokens, the ordering pass's seconds where the tree reports them, the process's CPU seconds
(model load included; less swayed by other processes than the wall time), the speedup over the
baseline of the same repeat, and the 1-minute load average at the run's start and end.

The ideal hit rate (each shared system prompt computed once) is computed from the prompts' token
ids as the engine gets them (the model's chat template): every distinct full block of
`block_size` tokens (a prompt's leading blocks, chained) computed once, every other full block a
hit; partial blocks are never cached.

    .venv/bin/python benchmarks/bench_scattered_prefixes.py --out /tmp/scattered [--repeats 2] [--with-input-order]

The defaults reproduce the issue's job. max_tokens 8 is an estimate, not measured at 3,000 lines:
the baseline computes about 295,000 prompt tokens (0.42 of 702,794) and 24,000 output tokens, at
1,000-1,500 tokens/s on a quiet machine (300-line runs under load, PERFORMANCE.md's prefill rates):
about 215-320 s, the prompts dominating; if the baseline row is far from 200-250 s, change
`--max-tokens`. `--prompts 30` makes a 300-line check (its whole file fits the baseline's window).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tokenmill.engine.config import EngineConfig
from tokenmill.models.gguf_file import GGUFFile
from tokenmill.models.loader import default_model_path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or had not "
         "city river market report price company water school music people system state court team season field "
         "light garden letter north south winter summer paper engine village board member record line order value "
         "bridge island station valley forest ocean signal power metal stone glass table window doctor student "
         "always never answer politely briefly customer policy refund shipping invoice warranty product account "
         "support question request manager contract detail summary formal style tone source evidence").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def system_prompt(rng: random.Random, index: int, tokens: int, tokenizer: PreTrainedTokenizerBase) -> str:
    """About `tokens` tokens of instructions, distinct from the first words on (no full block shared with another)."""
    text = f"You are assistant number {index} of {rng.choice(WORDS)} {rng.choice(WORDS)}. {sentence(rng, 12)}"
    while len(tokenizer.encode(text, add_special_tokens=False)) < tokens:
        text += " " + sentence(rng, rng.randint(8, 16))
    return text


def job(prompts: int, lines_per_prompt: int, prompt_tokens: int, max_tokens: int,
        tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    rng = random.Random(0)
    systems = [system_prompt(rng, p, prompt_tokens, tokenizer) for p in range(prompts)]
    pairs = [(p, j) for p in range(prompts) for j in range(lines_per_prompt)]
    rng.shuffle(pairs)
    return [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "system", "content": systems[p]},
                                   {"role": "user", "content": f"Request {i}: {sentence(rng, rng.randint(3, 9))}"}]}}
            for i, (p, _) in enumerate(pairs)]


def ideal_hit_rate(lines: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, block_size: int) -> float:
    """Cached / prompt tokens when every distinct chained full block is computed once (an infinite cache)."""
    seen: set[tuple[int, ...]] = set()
    prompt_tokens = cached = 0
    for line in lines:
        text = tokenizer.apply_chat_template(line["body"]["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)  # as tokenmill's Frontend.tokenize_chat
        prompt_tokens += len(ids)
        for end in range(block_size, len(ids) + 1, block_size):
            chained = tuple(ids[:end])  # a block's identity is its tokens and every token before it
            if chained in seen:
                cached += block_size
            seen.add(chained)
    return cached / prompt_tokens


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(tree: Path, input_path: Path, output: Path, kv_cache_memory: str, *extra: str) -> dict[str, Any]:
    """The job's summary, with the process's CPU seconds (load, ordering and job) and the load averages around it."""
    load, cpu = os.getloadavg()[0], cpu_seconds_of_children()
    # NOTE: each tree builds its CPU kernels in its own folder: the trees' sources differ, and one
    # shared build folder would be rebuilt at every alternation.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(output.parent / f"torch-extensions-{tree.name}")}
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o", str(output),
                             "--overwrite", "--kv-cache-memory", kv_cache_memory, *extra],
                            cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"tokenmill run in {tree} failed:\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout)
    if summary["failed"] or summary["failed_internally"]:
        raise SystemExit(f"tokenmill run in {tree}: {summary['failed']} lines failed, see {summary['errors']}")
    return {**summary, "cpu_s": cpu_seconds_of_children() - cpu, "load": f"{load:.1f}-{os.getloadavg()[0]:.1f}"}


def row(name: str, summary: dict[str, Any], speedup: float | None) -> str:
    ordering = summary.get("ordering_seconds")  # only trees with the whole-file ordering pass report it
    return (f"| {name} | {summary['wall_time_s']:.1f} | {'-' if ordering is None else f'{ordering:.1f}'} "
            f"| {summary['prefix_cache_hit_rate']:.3f} | {summary['prompt_tokens']} "
            f"| {summary['cached_prompt_tokens']} "
            f"| {summary['cpu_s']:.0f} | {'-' if speedup is None else f'{speedup:.2f}x'} | {summary['load']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the job, its outputs and the baseline's worktree")
    parser.add_argument("--baseline", default="97df912", help="the commit to compare with (a worktree of it is made)")
    parser.add_argument("--prompts", type=int, default=300, help="distinct system prompts")
    parser.add_argument("--lines-per-prompt", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=200, help="tokens of each system prompt, about")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--kv-cache-memory", default="64MiB")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--with-input-order", action="store_true", help="also run this tree with --input-order")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = GGUFFile(default_model_path()).tokenizer()
    lines = job(args.prompts, args.lines_per_prompt, args.prompt_tokens, args.max_tokens, tokenizer)
    input_path = args.out / "job.jsonl"
    input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ideal = ideal_hit_rate(lines, tokenizer, EngineConfig.block_size)
    baseline = args.out / "baseline-tree"
    if not baseline.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=REPO, check=True)
    print(f"{len(lines)} lines, {args.prompts} system prompts, max_tokens {args.max_tokens}, "
          f"KV pool {args.kv_cache_memory}; ideal hit rate {ideal:.3f} (each distinct full block once)\n")
    print("| run | wall (s) | ordering (s) | hit rate | prompt tokens | cached tokens | process CPU (s) | speedup "
          "| load |\n|---|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    speedups = []
    for i in range(args.repeats):
        before = run(baseline, input_path, args.out / f"baseline-{i}.jsonl", args.kv_cache_memory)
        print(row(f"baseline {args.baseline} #{i}", before, None), flush=True)
        after = run(REPO, input_path, args.out / f"this-{i}.jsonl", args.kv_cache_memory)
        speedups.append(before["wall_time_s"] / after["wall_time_s"])
        print(row(f"this tree #{i}", after, speedups[-1]), flush=True)
        if args.with_input_order:
            unordered = run(REPO, input_path, args.out / f"input-order-{i}.jsonl", args.kv_cache_memory,
                            "--input-order")
            print(row(f"this tree, --input-order #{i}", unordered,
                      before["wall_time_s"] / unordered["wall_time_s"]), flush=True)
    print(f"\nspeedup this/baseline (wall time, median over {args.repeats} repeats): "
          f"{statistics.median(speedups):.2f}x; ideal hit rate {ideal:.3f}")


if __name__ == "__main__":
    main()
