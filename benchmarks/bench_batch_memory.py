"""Peak RSS of `tokenmill run` against input length, 10^4 to 10^7 lines: it must stay flat (issue 21).

Writes synthetic files whose lines are cheap to answer (max_tokens 1): `--kind completions`,
token-id prompts with one of 4 shared 32-token prefixes; `--kind chat`, short user messages under
one of 4 system prompts (tokenizing through the chat template is what the ordering pass pays for).
Each runs through a real `tokenmill run` process on a tiny random Llama model (SmolLM2's
tokenizer and chat template); peak RSS is the process's own (os.wait4). With `--ray`, the process
is the Ray driver (`tokenmill run --ray`, a local Ray, one replica per node) and its peak RSS is its
own VmHWM, read from /proc as it runs.

Sizes up to `--full-up-to` run to the end. Larger ones are measured over the ordering pass plus the
first `--first-results` results: the output's lines are counted as they land, and the process is
SIGKILLed once it holds that many. Per size: peak RSS, the time to the first result line, the wall
time (to the kill, for those), the ordering pass's seconds (the summary's, finished runs only) and
its disk: the ordering file `<output>.order.sqlite3` (and its journal) just before the kill, or the
summary's `ordering_disk_bytes` (else the largest size seen) for a finished run. With `--ray`,
the output is a folder (its shard, `summary.json`, `order.sqlite3`).

    .venv/bin/python benchmarks/bench_batch_memory.py --kind chat --out /tmp/mem --keep

Inputs and the model are written under `--out` (default: a temporary folder) and reused when there
(a 10^7-line file takes a minute or two to write); `--keep` leaves them for the next run.
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tokenmill.models.gguf_file import GGUFFile
from tokenmill.models.loader import default_model_path

CHUNK_LINES = 100_000
WORDS = ("the of and to in is was for on that with as by at from city river market report price company water "
         "school music people system state court team season field light garden letter north south winter "
         "summer paper engine village board member record line order value bridge island station").split()


def tiny_model(folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    GGUFFile(default_model_path()).tokenizer().save_pretrained(folder)
    return folder


def completions_line(rng: random.Random, prefixes: list[str], suffixes: list[str]) -> Callable[[int], str]:
    """Line i's text: a shared prefix, a random suffix, and two ids from i so that no two prompts are equal."""
    def line(i: int) -> str:
        prompt = f"{prefixes[i % 4]},{rng.choice(suffixes)},{3 + i % 40000},{3 + i // 40000}"
        return (f'{{"custom_id": "r{i}", "method": "POST", "url": "/v1/completions", '
                f'"body": {{"prompt": [{prompt}], "max_tokens": 1, "temperature": 0}}}}\n')
    return line


def chat_line(rng: random.Random, systems: list[str], users: list[str]) -> Callable[[int], str]:
    def line(i: int) -> str:
        messages = (f'[{{"role": "system", "content": "{systems[i % 4]}"}}, '
                    f'{{"role": "user", "content": "{rng.choice(users)} (item {i})"}}]')
        return (f'{{"custom_id": "r{i}", "method": "POST", "url": "/v1/chat/completions", '
                f'"body": {{"messages": {messages}, "max_tokens": 1, "temperature": 0}}}}\n')
    return line


def write_input(path: Path, lines: int, kind: str) -> None:
    """Formats lines from pools of pre-drawn parts, CHUNK_LINES at a time (json.dumps per line is too slow at 10^7)."""
    if path.exists():
        return
    rng = random.Random(0)
    if kind == "completions":
        prefixes = [",".join(str(rng.randrange(3, 49000)) for _ in range(32)) for _ in range(4)]
        suffixes = [",".join(str(rng.randrange(3, 49000)) for _ in range(rng.randint(4, 24))) for _ in range(1024)]
        line = completions_line(rng, prefixes, suffixes)
    else:
        # NOTE: the texts are plain words, so they need no JSON escaping.
        systems = [f"You are assistant {s}. " + " ".join(rng.choices(WORDS, k=40)) for s in range(4)]
        users = [" ".join(rng.choices(WORDS, k=rng.randint(5, 20))).capitalize() + "?" for _ in range(1024)]
        line = chat_line(rng, systems, users)
    partial = path.with_name(path.name + ".partial")  # renamed when whole, so a rerun never reuses half a file
    with partial.open("w") as f:
        for start in range(0, lines, CHUNK_LINES):
            f.write("".join(line(i) for i in range(start, min(lines, start + CHUNK_LINES))))
    partial.rename(path)


class LineCounter:
    """Counts the lines appended so far to a file that may not exist yet."""

    def __init__(self, path: Path) -> None:
        self.path, self.file, self.lines = path, None, 0

    def count(self) -> int:
        if self.file is None:
            if not self.path.exists():
                return 0
            self.file = self.path.open("rb")
        while chunk := self.file.read(1 << 20):
            self.lines += chunk.count(b"\n")
        return self.lines

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def ordering_disk_bytes(output: Path, ray: bool) -> int:
    folder, pattern = (output, "order.sqlite3*") if ray else \
        (output.parent, f"{output.name.removesuffix('.jsonl')}.order.sqlite3*")
    return sum(p.stat().st_blocks * 512 for p in folder.glob(pattern) if p.exists())


def remove_outputs(output: Path, ray: bool) -> None:
    if ray:
        shutil.rmtree(output, ignore_errors=True)
        return
    for path in output.parent.glob(output.name.removesuffix(".jsonl") + ".*"):
        path.unlink()


def own_peak_rss_mib(pid: int) -> float:
    """The process's own peak RSS so far (VmHWM); 0 once it has exited (a zombie has no VmHWM)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


def measure(model: Path, input_path: Path, output: Path, stop_after: int | None, ray: bool) -> dict[str, Any]:
    """Runs `tokenmill run` to the end, or SIGKILLs it once OUTPUT holds `stop_after` lines."""
    remove_outputs(output, ray)  # a stale output would be counted as this run's results
    log = output.with_name(output.name.removesuffix(".jsonl") + ".log")
    load, start = os.getloadavg()[0], time.perf_counter()
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o", str(output),
                                    "--overwrite", "--model", str(model), "--dtype", "float32",
                                    "--kv-cache-memory", "16MiB", *(["--ray"] if ray else [])],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    results, first_result, disk, killed = LineCounter(output / "output-00000.jsonl" if ray else output), None, 0, False
    driver_peak = 0.0
    while True:
        # NOTE: a Ray driver reaps the Ray processes it started, and wait4's maximum covers reaped
        # descendants (the replicas' engines among them), so the driver's own peak is sampled instead.
        driver_peak = max(driver_peak, own_peak_rss_mib(process.pid)) if ray else 0.0
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # this child's own peak, not the maximum of all
        if pid:
            break
        lines = results.count()
        if lines and first_result is None:
            first_result = time.perf_counter() - start
        disk = ordering_disk_bytes(output, ray) if stop_after is not None else \
            max(disk, ordering_disk_bytes(output, ray))
        if stop_after is not None and lines >= stop_after:
            os.kill(process.pid, signal.SIGKILL)
            _, status, usage = os.wait4(process.pid, 0)
            killed = True
            break
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if first_result is None and results.count():  # it finished between two looks
        first_result = wall
    results.close()
    if not killed and os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tokenmill run failed on {input_path}:\n{log.read_text()[-3000:]}")
    summary_file = output / "summary.json" if ray else \
        output.with_name(output.name.removesuffix(".jsonl") + ".summary.json")
    summary = {} if killed else json.loads(summary_file.read_text())
    remove_outputs(output, ray)
    return {"rss_mib": driver_peak if ray else usage.ru_maxrss / 1024, "first_result_s": first_result, "wall_s": wall,
            "ordering_s": summary.get("ordering_seconds"), "disk_bytes": summary.get("ordering_disk_bytes", disk),
            "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", default="10000,100000,1000000,10000000")
    parser.add_argument("--kind", choices=("completions", "chat"), default="completions")
    parser.add_argument("--full-up-to", type=int, default=100_000, help="larger inputs are cut after --first-results")
    parser.add_argument("--first-results", type=int, default=100_000)
    parser.add_argument("--out", type=Path, help="where inputs, the model and outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="leave the inputs and the model in --out for a rerun")
    parser.add_argument("--ray", action="store_true", help="measure the Ray driver (`tokenmill run --ray`)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-batch-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(out / "model")
    print(f"`--kind {args.kind}`{' --ray (the driver)' if args.ray else ''}, one output token a line; a tiny Llama, "
          "float32, KV pool 16 MiB\n\n"
          "| input lines | measured over | peak RSS (MiB) | first result (s) | wall (s) | ordering (s) "
          "| ordering disk (MiB) | load |\n|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    inputs = []
    for lines in map(int, args.lines.split(",")):
        inputs.append(out / f"in-{args.kind}-{lines}.jsonl")
        write_input(inputs[-1], lines, args.kind)
        cut = lines > args.full_up_to
        output = out / (f"out-{args.kind}-{lines}-ray" if args.ray else f"out-{args.kind}-{lines}.jsonl")
        m = measure(model, inputs[-1], output, args.first_results if cut else None, args.ray)
        over = f"ordering + first {args.first_results}" if cut else "all"
        first = "-" if m["first_result_s"] is None else f"{m['first_result_s']:.1f}"
        ordering = "-" if m["ordering_s"] is None else f"{m['ordering_s']:.1f}"
        print(f"| {lines} | {over} | {m['rss_mib']:.0f} | {first} | {m['wall_s']:.1f} | {ordering} "
              f"| {(m['disk_bytes'] or 0) / 2**20:.1f} | {m['load']:.1f} |", flush=True)
    if args.keep:
        print(f"\ninputs and model kept in {out}")
    elif args.out is None:
        shutil.rmtree(out)
    else:
        shutil.rmtree(model)
        for path in inputs:
            path.unlink()


if __name__ == "__main__":
    main()
