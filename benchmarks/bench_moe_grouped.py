"""A/B of a MoE model's decode step: its routed experts in one kernel call a layer (`int8_moe`) against an expert at
a time (torch ops around a kernel call per expert and projection), alternated step by step in one engine.

    .venv/bin/python benchmarks/bench_moe_grouped.py --model FILE.gguf [--batch 16] [--prompt 128] [--rounds 20]
                                                     [--threads 2] [--profile grouped|per-expert]

The model must load with grouped experts (a GGUF whose experts the int8 kernels serve, in bf16): e.g. the files
`benchmarks/bench_moe.py --gguf q8_0,q4_k_m` writes. B requests of PROMPT random tokens are prefilled, then ROUNDS
pairs of decode steps run, one step on each path in alternating order; the median and minimum step (wall and this
process's CPU time) of each path are printed. With --profile, torch.profiler's table over 8 more steps of that path.
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import random
import statistics
import time

import torch

from tokenmill.bench import lockstep_requests
from tokenmill.engine.client import LocalClient, drive
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.models.moe import SparseMoeBlock
from tokenmill.sampling_params import SamplingParams

PROFILED_STEPS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", choices=["grouped", "per-expert"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # NOTE: speculation off: a decode step here is one token per sequence.
    client = LocalClient(Engine(EngineConfig(
        model=args.model, dtype="bfloat16", max_num_seqs=args.batch, speculative="off", kv_cache_memory="2GiB",
        max_num_batched_tokens=max(args.batch * (args.prompt % EngineConfig.block_size + 1), 256))))
    blocks = [m for m in client.engine.runner.model.modules() if isinstance(m, SparseMoeBlock)]
    grouped = [block.grouped_experts for block in blocks]
    if None in grouped:
        raise SystemExit(f"{args.model}: its experts do not run grouped here (not all on the int8 kernels)")

    def use(on: bool) -> None:
        for block, experts in zip(blocks, grouped):
            block.grouped_experts = experts if on else None

    rng = random.Random(0)
    vocab = client.frontend.vocab_size
    prompts = {f"r{i}": [rng.randrange(3, vocab) for _ in range(args.prompt)] for i in range(args.batch)}
    params = SamplingParams(temperature=0, max_tokens=2 * args.rounds + PROFILED_STEPS + 8, ignore_eos=True)
    decode = lockstep_requests(client, prompts, params)
    steps = drive(client, iter(decode), window=len(decode))  # one engine step per next()
    for _ in range(3):  # the prompts, then warm-up decode steps
        next(steps)
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for on in (True, False) if r % 2 else (False, True):
            use(on)
            start, start_cpu = time.perf_counter(), time.process_time()
            next(steps)
            wall[on].append(time.perf_counter() - start)
            cpu[on].append(time.process_time() - start_cpu)
    for on, name in ((False, "per expert"), (True, "grouped")):
        print(f"B={args.batch} {args.threads} threads, {name}: step median {statistics.median(wall[on]) * 1e3:.1f} ms "
              f"(min {min(wall[on]) * 1e3:.1f}), CPU median {statistics.median(cpu[on]) * 1e3:.1f} ms "
              f"(min {min(cpu[on]) * 1e3:.1f}) over {args.rounds} steps")
    if args.profile:
        use(args.profile == "grouped")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_STEPS):
                next(steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    for _ in steps:
        pass


if __name__ == "__main__":
    main()
