"""The tail of a job: a heavy-tailed batch file run by this tree and by a baseline commit, one after the other.

Writes a job whose output lengths are heavy-tailed (most lines ask for a one-word label, one in
`--long-every` for a long rewrite of its input, max_tokens set accordingly; a few system prompts
shared as in real files), runs it with `tokenmill bench job --plot` from this tree and from a
worktree of `--baseline` (each a fresh process, alternated `--repeats` times), and prints each
run's wall time, thin-batch time and share, prefix-cache hit rate and output tokens:

    python benchmarks/bench_tail.py --out /tmp/tail --baseline dc3785b

The baseline must have `tokenmill bench job`; thin-batch figures and plots come only from trees
that make them. Plots land in OUT (`tail-<run>.png`).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or had not "
         "city river market report price company water school music people system state court team season field "
         "light garden letter north south winter summer paper engine village board member record line order value "
         "bridge island station valley forest ocean signal power metal stone glass table window doctor student").split()
TASKS = [("You label support tickets. Answer with one word: billing, bug, account or other.", 5),
         ("You label reviews. Answer with one word: positive, negative or neutral.", 5),
         ("You rewrite texts in plain, formal English, keeping every fact. Rewrite the whole text.", 400)]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def job(lines: int, long_every: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    out = []
    for i in range(lines):
        system, max_tokens = TASKS[2] if i % long_every == 0 else TASKS[i % 2]
        user = text(rng, rng.randint(120, 200) if max_tokens > 5 else rng.randint(15, 60))
        out.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "max_tokens": max_tokens, "temperature": 0,
                             "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}})
    return out


def run(tree: Path, input_path: Path, out: Path, name: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "tokenmill.cli", "bench", "job"]
    usage = subprocess.run([*command, "--help"], cwd=tree, capture_output=True, text=True).stdout
    plot = ["--plot", str(out / f"tail-{name}.png")] if "--plot" in usage else []  # older trees cannot plot
    result = subprocess.run([*command, str(input_path), "-o", str(out / f"{name}.jsonl"), *plot],
                            cwd=tree, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    summary = json.loads(result.stdout)
    keys = ("wall_time_s", "thin_batch_seconds", "thin_batch_share", "prefix_cache_hit_rate", "completion_tokens",
            "output_tokens_per_s")
    return {"run": name, **{k: summary.get(k) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline", required=True, help="the commit to compare with (a worktree of it is made)")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--long-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    input_path = args.out / "job.jsonl"
    input_path.write_text("".join(json.dumps(line) + "\n" for line in job(args.lines, args.long_every)))
    baseline = args.out / "baseline-tree"
    if not baseline.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=REPO, check=True)
    for i in range(args.repeats):
        for tree, name in ((baseline, f"baseline-{i}"), (REPO, f"this-{i}")):
            print(json.dumps(run(tree, input_path, args.out, name)), flush=True)


if __name__ == "__main__":
    main()
