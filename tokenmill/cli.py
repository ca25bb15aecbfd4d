"""The `tokenmill` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tokenmill.batch.runner import BatchJob, JobSummary, default_errors_path, summary_path, write_summary
from tokenmill.engine.config import (
    DEFAULT_STEP_TOKENS,
    DTYPES,
    GPU_STEP_TOKENS,
    QUANTIZATIONS,
    SPECULATIVE,
    TASKS,
    EngineConfig,
)


def _fatal(message: str) -> int:
    print(f"tokenmill: error: {message}", file=sys.stderr)
    return 2


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings given on the command line; raises ValueError for a bad one."""
    return EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization, task=args.task,
                        max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
                        speculative=args.speculative, device=args.device,
                        gpu_memory_utilization=args.gpu_memory_utilization)


def _report(summary: JobSummary, summary_file: Path) -> int:
    """Prints the summary; exit status 1 if lines failed inside the engine (they have no record yet)."""
    print(json.dumps(asdict(summary), indent=2))
    print(f"summary written to {summary_file}", file=sys.stderr)
    if summary.failed_internally:
        print(f"tokenmill: {summary.failed_internally} lines failed inside the engine (the log above says why) and "
              "have no record: run the same command again to run them", file=sys.stderr)
        return 1
    return 0


def _unreadable(input_path: Path) -> str | None:
    """Why the input file cannot be read, if it cannot."""
    if not input_path.is_file():
        return f"cannot read input file {str(input_path)!r}"
    try:
        input_path.open("rb").close()
    except OSError as e:
        return f"cannot read input file {str(input_path)!r}: {e.strerror}"
    return None


def run_command(args: argparse.Namespace) -> int:
    input_path, output = Path(args.input), Path(args.output)
    errors = Path(args.errors) if args.errors else default_errors_path(output)
    if problem := _unreadable(input_path):
        return _fatal(problem)
    try:
        config = _engine_config(args)
    except ValueError as e:
        return _fatal(str(e))
    if args.ray:
        return _run_on_ray(args, config, input_path, output)
    if args.ray_address or args.replicas or args.cpus_per_replica or args.batch_lines:
        return _fatal("--ray-address, --replicas, --cpus-per-replica and --batch-lines go with --ray")
    from tokenmill.engine.client import LocalClient
    from tokenmill.engine.create import create_engine

    try:
        job = BatchJob(LocalClient(create_engine(config)), input_path, output, errors,
                       prefix_order=not args.input_order)
        summary = job.run(overwrite=args.overwrite, sort=args.sorted)
    except ValueError as e:  # model that cannot load, another job's output, a locked output
        return _fatal(str(e))
    except OSError as e:  # e.g. an output folder that cannot be written
        return _fatal(f"{e.strerror}: {e.filename}")
    return _report(summary, write_summary(summary, summary_path(output)))


def _run_on_ray(args: argparse.Namespace, config: EngineConfig, input_path: Path, output_dir: Path) -> int:
    if args.errors or args.sorted:
        return _fatal("with --ray, OUTPUT is a folder of result shards with errors.jsonl in it: "
                      "--errors and --sorted do not apply")
    try:
        from tokenmill.ray import run_batch
    except ImportError as e:
        return _fatal(f"--ray needs Ray: pip install \"tokenmill[ray]\" ({e})")
    try:
        summary = run_batch(input_path, output_dir, config, replicas=args.replicas,
                            cpus_per_replica=args.cpus_per_replica, address=args.ray_address,
                            batch_lines=args.batch_lines,
                            prefix_order=not args.input_order, overwrite=args.overwrite)
    except ValueError as e:
        return _fatal(str(e))
    except OSError as e:
        return _fatal(f"{e.strerror}: {e.filename}")
    return _report(summary, output_dir / "summary.json")


def plan_command(args: argparse.Namespace) -> int:
    input_path = Path(args.input)
    if problem := _unreadable(input_path):
        return _fatal(problem)
    if args.replicas is not None and args.replicas < 1:
        return _fatal(f"--replicas must be at least 1, got {args.replicas}")
    try:
        config = _engine_config(args)
    except ValueError as e:
        return _fatal(str(e))
    from tokenmill.engine.create import create_engine
    from tokenmill.plan import format_table, plan_job, plan_json

    try:
        start = time.perf_counter()
        engine = create_engine(config)
        plan = plan_job(engine, input_path, replicas=args.replicas,
                        model_load_seconds=round(time.perf_counter() - start, 1))
    except ValueError as e:  # a model that cannot load, or one that embeds
        return _fatal(str(e))
    except ImportError as e:
        return _fatal(f"--replicas plans a Ray job and needs Ray: pip install \"tokenmill[ray]\" ({e})")
    print(json.dumps(plan_json(plan), indent=2) if args.json else format_table(plan))
    return 0


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.engine.create import create_engine
    from tokenmill.engine.threaded import EngineThread
    from tokenmill.server.app import create_app
    from tokenmill.server.batches import BatchManager
    from tokenmill.server.store import Store

    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY")
    data_dir = Path(args.data_dir).expanduser()
    try:
        engine = create_engine(_engine_config(args))
        store = Store(data_dir)
    except (ValueError, OSError) as e:
        return _fatal(str(e))
    engine_thread = EngineThread(engine)
    batches = BatchManager(store, engine_thread)
    batches.resume()
    app = create_app(engine_thread, store, batches, api_key)
    print(f"tokenmill: serving {engine_thread.frontend.model_name} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    import torch

    from tokenmill import bench
    from tokenmill.engine.engine import Engine
    from tokenmill.models.loader import default_model_path

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = _engine_config(args)
        if args.bench == "job":
            print(json.dumps(bench.job(Engine(config), Path(args.input), Path(args.output),
                                       Path(args.plot) if args.plot else None), indent=2))
            return 0
        model = Path(args.model) if args.model else default_model_path()
        gguf = Path(args.gguf) if args.gguf else (model if model.suffix == ".gguf" else None)
        peers = bench.Peers(args.llama_batched_bench, gguf, Path(args.openvino) if args.openvino else None,
                            args.openvino_python, args.transformers)
        print(bench.batched(config, ints(args.npp), ints(args.ntg), ints(args.npl), args.pps, torch.get_num_threads(),
                            peers, args.load, Path(args.jsonl) if args.jsonl else None,
                            Path(args.plot) if args.plot else None))
    except (ValueError, RuntimeError) as e:  # a model that cannot load, a point not measurable in lockstep
        return _fatal(str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill", description="Batch inference for large language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an OpenAI Batch file (JSONL) to an output file, resumably")
    run.add_argument("input", help="the requests, one OpenAI Batch API line each")
    run.add_argument("-o", "--output", required=True,
                     help="results (JSONL), appended as they finish; with --ray, a folder of result shards")
    run.add_argument("--errors", help="failed lines (default: OUTPUT with .errors.jsonl)")
    run.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    run.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    run.add_argument("--sorted", action="store_true", help="rewrite OUTPUT in input order at the end")
    run.add_argument("--input-order", action="store_true",
                     help="admit requests in file order instead of grouping shared prompt prefixes")
    run.add_argument("--ray", action="store_true",
                     help="run on Ray (pip install \"tokenmill[ray]\"); OUTPUT is then a folder of result shards")
    run.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else start a local Ray)")
    run.add_argument("--replicas", type=int, help="engine replicas (default: one per node)")
    run.add_argument("--cpus-per-replica", type=int, help="default: the cluster's CPUs shared among the replicas")
    run.add_argument("--batch-lines", type=int,
                     help="lines a replica takes at a time, and retries together if it dies (default: 256)")
    run.set_defaults(handler=run_command)
    plan = commands.add_parser("plan", help="what `tokenmill run` would do with a batch file: its errors, tokens, "
                                            "prefix-cache savings, time and memory, before running it")
    plan.add_argument("input", help="the requests, one OpenAI Batch API line each")
    plan.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    plan.add_argument("--replicas", type=int, help="also estimate `tokenmill run --ray --replicas N` on a Ray "
                                                   "started here (the CPUs shared among the replicas)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=plan_command)
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server, /v1/files and /v1/batches included")
    serve.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require this key as a bearer token (or set TOKENMILL_API_KEY)")
    serve.add_argument("--data-dir", default="~/.cache/tokenmill/server", help="where files and batches are kept")
    serve.set_defaults(handler=serve_command)
    bench_parser = commands.add_parser("bench", help="throughput benchmarks, side by side with llama.cpp and OpenVINO")
    kinds = bench_parser.add_subparsers(dest="bench", required=True)
    batched = kinds.add_parser("batched", help="llama-batched-bench's grid: PP, TG, B")
    batched.add_argument("--npp", default="128,512", help="prompt lengths")
    batched.add_argument("--ntg", default="128", help="generated lengths")
    batched.add_argument("--npl", default="1,8,32,64", help="parallel sequences")
    batched.add_argument("--pps", action="store_true", help="the parallel sequences share one prompt")
    batched.add_argument("--llama-batched-bench", help="path of llama.cpp's llama-batched-bench, to run it too")
    batched.add_argument("--gguf", help="GGUF file for llama.cpp (default: --model's, if a .gguf file)")
    batched.add_argument("--openvino", help="a folder that `optimum-cli export openvino` wrote, to run OpenVINO "
                                            "GenAI on the same prompts too (benchmarks/export_openvino.py)")
    batched.add_argument("--openvino-python", default=sys.executable,
                         help="an interpreter with openvino-genai, for --openvino (default: this one)")
    batched.add_argument("--load", action="store_true",
                         help="also measure each engine's cold and warm start, peak RSS and time to first token")
    batched.add_argument("--transformers", action="store_true",
                         help="run transformers' generate on the same grid too (same weights, dtype, threads)")
    batched.add_argument("--jsonl", help="also write the rows as JSON lines here")
    batched.add_argument("--plot", help="write S_TG against B as a PNG here")
    job_parser = kinds.add_parser("job", help="time a whole batch file")
    job_parser.add_argument("input")
    job_parser.add_argument("-o", "--output", default="bench-output.jsonl")
    job_parser.add_argument("--plot", help="write the sequences running and output tokens/s over time as a PNG here")
    for sub in (batched, job_parser):
        sub.add_argument("--model", help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
        sub.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    bench_parser.set_defaults(handler=bench_command)
    for sub in (run, plan, serve, batched, job_parser):
        # The defaults are EngineConfig's, which checks the values.
        sub.add_argument("--dtype", default=EngineConfig.dtype, choices=["auto", *DTYPES],
                         help="auto: bfloat16 where the CPU has native bf16 instructions, else float32")
        sub.add_argument("--quantization", default=EngineConfig.quantization, choices=QUANTIZATIONS,
                         help="auto: keep a GGUF's quantized weights (a folder's as they are); none: every weight "
                              "in --dtype; int8: linear weights as Q8_0 blocks (default: %(default)s)")
        sub.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                         help="sequences in flight (default: %(default)s)")
        sub.add_argument("--task", default=EngineConfig.task, choices=TASKS,
                         help="auto: embed with a sentence-transformers folder or a BERT model, else generate; "
                              "embed: use a Llama-family model as an embedder (default: %(default)s)")
        sub.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                         help=f"tokens of one step (default: {DEFAULT_STEP_TOKENS['generate']} for generation, "
                              f"{DEFAULT_STEP_TOKENS['embed']} for embeddings; {GPU_STEP_TOKENS} on a GPU)")
        sub.add_argument("--speculative", default=EngineConfig.speculative, choices=SPECULATIVE,
                         help="ngram: draft tokens by prompt lookup when the batch is small, outputs unchanged; "
                              "off: never (default: %(default)s)")
        sub.add_argument("--kv-cache-memory", default=EngineConfig.kv_cache_memory,
                         help="KV cache size: bytes with a unit (4GiB, 512MB) or a fraction of the available RAM "
                              "(0.2, 20%%; default: %(default)s; on a GPU, bytes only: see --gpu-memory-utilization)")
        sub.add_argument("--device", default=EngineConfig.device,
                         help="auto: CUDA where torch sees a GPU, else the CPU; cpu; cuda or cuda:N "
                              "(default: %(default)s)")
        sub.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization,
                         help="on a GPU, the share of its memory for the weights, a step's activations and the KV "
                              "cache together (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("tokenmill: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
