"""Time (and optionally profile) the engine's decode step at a given batch size.

    .venv/bin/python benchmarks/bench_decode_step.py [--batch 64] [--prompt 128] [--shared] [--steps 32]
                                                     [--dtype bfloat16] [--threads N] [--profile | --ab-layer-stack]

B requests with random prompts of PROMPT tokens (one prompt shared by all with --shared) are
prefilled, then STEPS decode steps of all B together are timed one by one; the median step is
printed. With --profile, torch.profiler's table over the last steps follows. With --ab-layer-stack,
the steps alternate between the model's layer stack (models/layer_stack.py) and its Python layers
(the stack set aside), and each path's median wall and CPU time is printed: an A/B in one process,
robust to a load that drifts (the CPU time of all threads: with one thread, robust to a shared core's
load too).
"""

from __future__ import annotations

import tokenmill.openmp_runtime  # noqa: F401  (before torch: OpenMP's idle spin as the CLI and `import tokenmill` set it)

# isort: split

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from tokenmill.bench import check_lockstep, lockstep_requests
from tokenmill.engine.client import LocalClient, drive
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--shared", action="store_true", help="all requests share one prompt")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", help="a .gguf file or HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--threads", type=int, help="torch's threads (default: torch's own choice)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--ab-layer-stack", action="store_true", help="alternate steps with and without the stack")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    first_step = args.batch * (args.prompt % EngineConfig.block_size + 1)  # all B in one step
    # NOTE: speculation off: a decode step here is one token per sequence (drafts, on by default in
    # small batches, would verify several and end the requests steps early).
    client = LocalClient(Engine(EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization,
                                             max_num_seqs=max(args.batch, 1), speculative="off",
                                             max_num_batched_tokens=max(first_step, 256), kv_cache_memory="2GiB")))
    rng = random.Random(0)
    vocab = client.frontend.vocab_size
    shared = [rng.randrange(3, vocab) for _ in range(args.prompt)]
    prompts = {f"r{i}": shared if args.shared else [rng.randrange(3, vocab) for _ in range(args.prompt)]
               for i in range(args.batch)}
    # All prompts first, then all sequences decode in lockstep (as `tokenmill bench batched` does).
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    decode = lockstep_requests(client, prompts, params)
    preemptions = client.metrics().num_preemptions
    steps = drive(client, iter(decode), window=len(decode))  # one engine step per next()
    finished: dict[str, RequestOutput] = {}

    def step() -> None:
        finished.update((o.request_id, o) for o in next(steps) if o.finished)

    for _ in range(2):  # warm-up decode steps (the first also submits the requests)
        step()

    if args.ab_layer_stack:
        ab_layer_stack(client, step, args.steps)
        return
    times = []
    profiled = args.steps // 4 if args.profile else 0
    for _ in range(args.steps - profiled):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    prof = None
    if profiled:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(profiled):
                step()
    for outputs in steps:  # the last few steps, for the outputs' cached-token counts
        finished.update((o.request_id, o) for o in outputs if o.finished)
    check_lockstep(client, prompts, {i: finished[i].num_cached_tokens for i in prompts}, preemptions)
    print(f"B={args.batch} prompt={args.prompt}{' shared' if args.shared else ''} {args.dtype}: "
          f"decode step median {statistics.median(times) * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) over {len(times)} steps")
    if prof is not None:
        print(f"profile over {profiled} steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def ab_layer_stack(client: LocalClient, step: Callable[[], None], steps: int) -> None:
    """Times `steps` decode steps, every other one with the model's layer stack set aside."""
    model = client.engine.runner.model
    stack = model.layer_stack
    if stack is None:
        raise SystemExit("the model has no layer stack here")
    times: dict[str, list[tuple[float, float]]] = {"stack": [], "layers": []}
    for i in range(steps):
        path = ("stack", "layers")[i % 2]
        model.layer_stack = stack if path == "stack" else None
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        times[path].append((time.perf_counter() - wall, time.process_time() - cpu))
    model.layer_stack = stack
    medians = {path: [statistics.median(t[k] for t in runs) * 1e3 for k in (0, 1)] for path, runs in times.items()}
    for path, (wall, cpu) in medians.items():
        print(f"{path}: wall median {wall:.2f} ms, CPU median {cpu:.2f} ms over {len(times[path])} steps")
    print(f"layers / stack: wall {medians['layers'][0] / medians['stack'][0]:.3f}x, "
          f"CPU {medians['layers'][1] / medians['stack'][1]:.3f}x")


if __name__ == "__main__":
    main()
