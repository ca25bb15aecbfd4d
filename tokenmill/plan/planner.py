"""`plan_job`: a batch job known before it runs: its errors, counts, prefix sharing, time and memory.

Steps, each reusing what `tokenmill run` itself runs:
1. Calibrate (or find in the cache, calibration_cache.py): the grid and a sample of the job's lines
   through the loaded engine (calibrate.py), fitted into a `CostModel` of a step's seconds.
2. Simulate the whole job (job_run.py): the batch runner's `LineExecutor` over a `SimulatedEngine`
   (simulate.py) gives the error records, the counts, the prefix cache's hits with prefix-ordered
   admission, the clock and the KV pool's peak; a second simulation in input order gives what
   `--input-order` would hit.
3. With `replicas`, simulate `tokenmill run --ray --replicas N` as Ray would start it here (each
   replica with this machine's CPUs shared among them: ray/job.py), calibrated at that thread count.
Estimated seconds are what the run's summary reports as `wall_time_s`: the job after the model is
loaded (the simulated steps, plus the measured time per line outside the engine's steps).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.batch.journal import input_fingerprint
from tokenmill.engine.engine import Engine
from tokenmill.plan.calibrate import measure_grid, run_sample, torch_threads
from tokenmill.plan.calibration_cache import Calibration, CalibrationCache, JobSample, cpu_model, machine_key
from tokenmill.plan.cost import CostModel
from tokenmill.plan.job_run import simulate_job, simulate_ray_job
from tokenmill.plan.prefixes import SharedPrefix, SharedPrefixes
from tokenmill.plan.simulate import OutputLengths


@dataclass
class CalibrationInfo:
    ran_engine: bool  # False: everything came from the cache
    cache_file: str
    cpu: str
    threads: int
    sample_lines: int
    sample_seconds: float  # the sample's own run (when it ran)
    timed_steps: int  # that the cost model is fitted on


@dataclass
class RayPlan:
    replicas: int
    threads_per_replica: int
    # The slowest replica's share, after the model loads (as long as here: each replica loads its
    # own at once); Ray's own start-up (~9 s on a 2-core machine, docs/PERFORMANCE.md) not included.
    estimated_seconds: float
    estimated_total_tokens_per_s: float
    estimated_prefix_cache_hit_rate: float
    lines_per_replica: list[int]
    peak_kv_bytes_per_replica: int


@dataclass
class Plan:
    input: str
    model: str
    lines: int  # non-blank lines
    lines_by_endpoint: dict[str, int]  # lines that parse, by url
    error_lines: int  # lines that would get an error record
    error_codes: dict[str, int]
    first_errors: list[dict[str, Any]]  # the first error records, exactly as `tokenmill run` writes them
    prompt_tokens: int  # of the lines that would succeed; a line's k prompts summed, each counted once
    prompt_tokens_p50: int  # per line
    prompt_tokens_p95: int
    prompt_tokens_max: int
    lines_with_n_above_1: int
    samples_of_n_above_1: int  # their n summed
    requested_output_tokens: int  # n x max_tokens, summed over the requests that set max_tokens
    requests_without_max_tokens: int  # which may generate up to the context
    context_allowed_output_tokens: int  # n x min(max_tokens, context - prompt), summed: the most the job can generate
    estimated_output_tokens: int
    estimated_cached_prompt_tokens: int
    estimated_prefix_cache_hit_rate: float  # cached / prompt tokens, as the run's summary computes it
    input_order_cached_prompt_tokens: int  # the same with --input-order
    input_order_prefix_cache_hit_rate: float
    shared_prefixes: list[SharedPrefix]  # the largest, by prompt tokens they save
    estimated_seconds: float  # as the run's summary counts wall_time_s (the model loaded before)
    estimated_output_tokens_per_s: float
    estimated_total_tokens_per_s: float
    peak_kv_bytes: int  # of the KV pool resident at the job's peak
    kv_pool_bytes: int  # the whole pool, as the engine sizes it
    prompt_tokens_per_s: float  # this machine's, one prompt at the step budget
    decode_tokens_per_s: float  # at the job's batch size (max_num_seqs) and mean context
    model_load_seconds: float | None  # what loading the model took here (before the job starts)
    calibration: CalibrationInfo
    ray: RayPlan | None


def replica_threads(replicas: int) -> int:
    """The torch threads each replica of `tokenmill run --ray --replicas N` gets on a Ray started
    here: the node's CPUs shared among the replicas (ray/job.py)."""
    # NOTE: Ray counts the machine's logical CPUs as the node's.
    return max(1, (os.cpu_count() or 1) // replicas)


def _calibrate(engine: Engine, input_path: Path, fingerprint: str, threads: int, cache: CalibrationCache,
               sample: bool) -> tuple[Calibration, bool]:
    """The calibration at `threads` (with the job's sample if `sample`), measured where the cache
    lacks it; True if the engine ran."""
    calibration = cache.load(machine_key(engine, threads))
    ran = False
    with torch_threads(threads):
        if not calibration.grid_steps:
            calibration.grid_steps = measure_grid(engine)
            ran = True
        if sample and fingerprint not in calibration.jobs:
            run = run_sample(engine, input_path)
            calibration.jobs[fingerprint] = JobSample(run.lines, run.seconds, run.overhead_per_line, run.steps[1:],
                                                      run.observed)
            ran = True
    if ran:
        cache.save(calibration)
    return calibration, ran


def _percentile(values: np.ndarray, q: float) -> int:
    return int(np.percentile(values, q, method="inverted_cdf")) if len(values) else 0


def _rate(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole else 0.0


def plan_job(engine: Engine, input_path: Path, *, replicas: int | None = None,
             cache: CalibrationCache | None = None, keep_errors: int = 5, shared_prefixes: int = 5,
             model_load_seconds: float | None = None) -> Plan:
    """Plans `tokenmill run INPUT` on `engine`'s model and settings (see the module docstring).
    The engine runs only to calibrate what `cache` lacks; `keep_errors` error records are kept in
    full. Raises ValueError for an embedding model (nothing to simulate: no decode, no prefix cache)."""
    if not isinstance(engine, Engine):
        raise ValueError(f"tokenmill plan estimates jobs of generative models; {engine.model_name} embeds")
    cache = cache or CalibrationCache()
    fingerprint = input_fingerprint(input_path)
    threads = torch.get_num_threads()
    calibration, ran = _calibrate(engine, input_path, fingerprint, threads, cache, sample=True)
    sample = calibration.jobs[fingerprint]
    cost = CostModel.fit(calibration.steps(fingerprint))
    lengths = OutputLengths(sample.observed)
    overhead = sample.overhead_per_line
    prefixes = SharedPrefixes(engine.tokenizer, engine.config.block_size)
    with tempfile.TemporaryDirectory(prefix="tokenmill-plan-") as scratch:
        job = simulate_job(engine, cost, lengths, input_path, fingerprint, Path(scratch), prefixes=prefixes,
                           keep_errors=keep_errors)
        in_order = simulate_job(engine, cost, lengths, input_path, fingerprint, Path(scratch), prefix_order=False)
        ray = None
        if replicas:
            ray = _plan_ray(engine, input_path, fingerprint, Path(scratch), replicas, cache, lengths, overhead,
                            model_load_seconds or 0.0)
            ran = ran or ray[1]
    sim = job.engines[0]
    seconds = job.seconds + overhead * job.lines
    per_line = np.frombuffer(job.line_prompt_tokens, dtype=np.int64)
    mean_context = (job.prompt_tokens + job.completion_tokens / 2) / max(1, job.succeeded)
    return Plan(
        input=str(input_path), model=engine.model_name, lines=job.lines,
        lines_by_endpoint=dict(job.lines_by_endpoint), error_lines=job.error_lines,
        error_codes=dict(job.error_codes), first_errors=job.first_errors, prompt_tokens=job.prompt_tokens,
        prompt_tokens_p50=_percentile(per_line, 50), prompt_tokens_p95=_percentile(per_line, 95),
        prompt_tokens_max=int(per_line.max()) if len(per_line) else 0,
        lines_with_n_above_1=sum(c for n, c in job.lines_with_n.items() if n > 1),
        samples_of_n_above_1=sum(n * c for n, c in job.lines_with_n.items() if n > 1),
        requested_output_tokens=sim.requested_output_tokens,
        requests_without_max_tokens=sim.requests_without_max_tokens,
        context_allowed_output_tokens=sim.context_allowed_output_tokens,
        estimated_output_tokens=job.completion_tokens, estimated_cached_prompt_tokens=job.cached_prompt_tokens,
        estimated_prefix_cache_hit_rate=_rate(job.cached_prompt_tokens, job.prompt_tokens),
        input_order_cached_prompt_tokens=in_order.cached_prompt_tokens,
        input_order_prefix_cache_hit_rate=_rate(in_order.cached_prompt_tokens, in_order.prompt_tokens),
        shared_prefixes=prefixes.largest(shared_prefixes), estimated_seconds=round(seconds, 1),
        estimated_output_tokens_per_s=round(job.completion_tokens / max(seconds, 1e-9), 1),
        estimated_total_tokens_per_s=round((job.prompt_tokens + job.completion_tokens) / max(seconds, 1e-9), 1),
        peak_kv_bytes=sim.blocks_touched * sim.block_bytes, kv_pool_bytes=sim.kv.pool.num_blocks * sim.block_bytes,
        prompt_tokens_per_s=round(cost.prompt_tokens_per_s(engine.scheduler.max_num_batched_tokens), 1),
        decode_tokens_per_s=round(cost.decode_tokens_per_s(engine.config.max_num_seqs, round(mean_context)), 1),
        model_load_seconds=model_load_seconds,
        calibration=CalibrationInfo(ran, str(cache.path(calibration.key)), cpu_model(), threads, sample.lines,
                                    sample.seconds, len(calibration.steps(fingerprint))),
        ray=ray[0] if ray else None)


def _plan_ray(engine: Engine, input_path: Path, fingerprint: str, scratch: Path, replicas: int,
              cache: CalibrationCache, lengths: OutputLengths, overhead: float,
              load_seconds: float) -> tuple[RayPlan, bool]:
    threads = replica_threads(replicas)
    calibration, ran = _calibrate(engine, input_path, fingerprint, threads, cache, sample=False)
    cost = CostModel.fit(calibration.steps(fingerprint))  # the grid's: the job's sample ran at the local threads
    runs = simulate_ray_job(engine, cost, lengths, input_path, fingerprint, scratch, replicas)
    seconds = load_seconds + max(run.seconds + overhead * run.lines for run in runs)
    prompt = sum(run.prompt_tokens for run in runs)
    tokens = prompt + sum(run.completion_tokens for run in runs)
    sims = [run.engines[0] for run in runs]
    return RayPlan(replicas, threads, round(seconds, 1), round(tokens / max(seconds, 1e-9), 1),
                   _rate(sum(run.cached_prompt_tokens for run in runs), prompt), [run.lines for run in runs],
                   max(s.blocks_touched * s.block_bytes for s in sims)), ran
