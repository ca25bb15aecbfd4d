"""`tokenmill plan` against `tokenmill run` on three jobs of different shapes (docs/PERFORMANCE.md).

Writes each job, plans it (`tokenmill plan --json`, then again, from the calibration cache), runs
it (`tokenmill run --overwrite`) and prints the plan's estimates beside the run's summary:

    python benchmarks/plan_jobs.py --out /tmp/plan-jobs                 # all three shapes
    python benchmarks/plan_jobs.py --out /tmp/plan-jobs --shape classify --lines 500

The shapes (sized so that each run takes 1-3 minutes on the default model on a 2-core machine):
- classify: short lines sharing one ~200-token system prompt, max_tokens 6, greedy;
- summarize: distinct ~400-900-token documents, "summarize" with max_tokens 96, greedy;
- extract: a ~500-token few-shot prompt shared by every line, then a short text, n=4 samples at
  temperature 0.8 (seeded), max_tokens 40.
Prompts are made of plain English words drawn at random (seeded): the figures are about timing and
sharing, not about what the model says.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or had not "
         "but their have one all they been has its more also new first after who other two would time some years "
         "city river market report price company water school music people system state court team season field "
         "light garden letter north south winter summer paper engine village board member record line order value "
         "bridge island station valley forest ocean signal power metal stone glass table window doctor student "
         "author science history country language animal plant weather energy travel money health family "
         "friend").split()
DEFAULT_LINES = {"classify": 2000, "summarize": 150, "extract": 300}


def text(rng: random.Random, words: int) -> str:
    sentences, left = [], words
    while left > 0:
        length = min(left, rng.randint(8, 20))
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
        left -= length
    return " ".join(sentences)


def chat(custom_id: str, messages: list[dict[str, str]], **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tokenmill", "messages": messages, **body}}


def job(shape: str, lines: int) -> list[dict[str, Any]]:
    rng = random.Random(shape)
    if shape == "classify":
        system = ("You label customer messages. Answer with exactly one word: positive, negative or neutral. "
                  + text(rng, 160))
        return [chat(f"classify-{i}", [{"role": "system", "content": system},
                                       {"role": "user", "content": text(rng, rng.randint(10, 50))}],
                     max_tokens=6, temperature=0) for i in range(lines)]
    if shape == "summarize":
        return [chat(f"summarize-{i}", [{"role": "user", "content": "Summarize this document in three sentences.\n\n"
                                         + text(rng, rng.randint(320, 720))}], max_tokens=96, temperature=0)
                for i in range(lines)]
    if shape == "extract":
        shots: list[dict[str, str]] = [{"role": "system", "content": "Extract the place and the year from the text "
                                                                     "as JSON with keys place and year."}]
        for _ in range(6):
            shots += [{"role": "user", "content": text(rng, 50)},
                      {"role": "assistant", "content": json.dumps({"place": rng.choice(WORDS).title(),
                                                                   "year": rng.randint(1800, 2024)})}]
        return [chat(f"extract-{i}", [*shots, {"role": "user", "content": text(rng, rng.randint(20, 60))}],
                     max_tokens=40, n=4, temperature=0.8, seed=i) for i in range(lines)]
    raise ValueError(shape)


def tokenmill(*args: str | Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return result, time.perf_counter() - start


def measure(shape: str, lines: int, out: Path, model: list[str]) -> dict[str, Any]:
    path = out / f"{shape}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in job(shape, lines)))
    first, first_wall = tokenmill("plan", path, "--json", *model)
    second, second_wall = tokenmill("plan", path, "--json", *model)
    plan = json.loads(first.stdout)
    assert not json.loads(second.stdout)["calibration"]["ran_engine"]
    _, run_wall = tokenmill("run", path, "-o", out / f"{shape}-out.jsonl", "--overwrite", *model)
    summary = json.loads((out / f"{shape}-out.summary.json").read_text())
    return {"shape": shape, "lines": lines, "estimated_s": plan["estimated_seconds"], "run_s": summary["wall_time_s"],
            "time_ratio": round(plan["estimated_seconds"] / summary["wall_time_s"], 3),
            "estimated_hit_rate": plan["estimated_prefix_cache_hit_rate"],
            "run_hit_rate": summary["prefix_cache_hit_rate"],
            "hit_rate_diff_pp": round(100 * (plan["estimated_prefix_cache_hit_rate"]
                                             - summary["prefix_cache_hit_rate"]), 2),
            "estimated_output_tokens": plan["estimated_output_tokens"],
            "run_output_tokens": summary["completion_tokens"],
            "sample_lines": plan["calibration"]["sample_lines"], "sample_s": plan["calibration"]["sample_seconds"],
            "plan_wall_s": round(first_wall, 1), "cached_plan_wall_s": round(second_wall, 1),
            "run_process_wall_s": round(run_wall, 1), "model_load_s": plan["model_load_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the jobs and their results")
    parser.add_argument("--shape", choices=list(DEFAULT_LINES), action="append", help="default: all three")
    parser.add_argument("--lines", type=int, help="lines per job (default: each shape's own)")
    parser.add_argument("--model", help="passed to tokenmill plan and run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = ["--model", args.model] if args.model else []
    for shape in args.shape or list(DEFAULT_LINES):
        print(json.dumps(measure(shape, args.lines or DEFAULT_LINES[shape], args.out, model)), flush=True)


if __name__ == "__main__":
    main()
