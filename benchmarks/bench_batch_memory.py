"""Peak RSS of `tokenmill run` against input length: it must stay flat, since the input is streamed.

Writes synthetic /v1/completions files of 10k and 100k lines (token-id prompts, max_tokens=1), runs
each through a real `tokenmill run` process on a tiny random Llama model, and prints peak RSS.

    .venv/bin/python benchmarks/bench_batch_memory.py [--lines 10000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tokenmill.models.gguf_file import GGUFFile
from tokenmill.models.loader import default_model_path


def tiny_model(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    GGUFFile(default_model_path()).tokenizer().save_pretrained(folder)
    return folder


def write_input(path: Path, lines: int) -> None:
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 49000) for _ in range(32)] for _ in range(4)]
    with path.open("w") as f:
        for i in range(lines):
            prompt = prefixes[i % 4] + [rng.randrange(3, 49000) for _ in range(rng.randint(4, 24))]
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": prompt, "max_tokens": 1, "temperature": 0}}) + "\n")


def peak_rss_mib(model: Path, input_path: Path, output: Path) -> tuple[float, float]:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o", str(output),
                                "--model", str(model), "--dtype", "float32", "--kv-cache-memory", "16MiB"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the maximum over all children
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tokenmill run failed on {input_path}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", default="10000,100000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = tiny_model(root / "model")
        print("| input lines | peak RSS (MiB) | wall (s) |\n|---:|---:|---:|")
        for lines in map(int, args.lines.split(",")):
            input_path = root / f"in-{lines}.jsonl"
            write_input(input_path, lines)
            rss, wall = peak_rss_mib(model, input_path, root / f"out-{lines}.jsonl")
            print(f"| {lines} | {rss:.0f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
