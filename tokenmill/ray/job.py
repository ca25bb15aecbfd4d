"""`tokenmill run --ray`: one batch job across a Ray cluster, still exactly once, in bounded memory.

The driver makes the local runner's first pass (batch/ordering.py): every line validated, prepared
by its endpoint with the model's tokenizer and chat template (a `Frontend` built from the engine
settings; no weights are loaded here) and keyed by its prompt's leading blocks; the bad lines get
their error records from the driver; the rest are sorted on disk (ORDER_FILE in the output folder,
reused by a resume, removed once every line has its record). The driver then streams the ordered
lines to one Ray actor per replica (EngineReplica: one engine each, loaded once) in calls of
`batch_lines` consecutive lines, so lines sharing a prefix anywhere in the file go to the same
replica together, which computes the prefix once (and orders its call as the local runner orders
its window). Each replica has CALLS_PER_REPLICA calls in flight, so its engine never drains
between calls; the next call is read from the order only when one returns, so the driver holds
no more lines than those. Ray restarts a replica that dies and retries its calls on the new
process. With `prefix_order` off (--input-order) there is no first pass: the lines go in file
order, and only the replicas prepare them.

The driver is the only writer. Each run appends the records the replicas return to its own output
shard (`output-NNNNN.jsonl`) and to `errors.jsonl` with the local runner's journal: a record is
durable once, in one shard, and a rerun skips every line that any shard or the error file holds.
A call lost with a dead driver was never written, so it runs again.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.exceptions
from ray.actor import ActorHandle
from tqdm.auto import tqdm

from tokenmill.batch.format import BatchLine, LineError, error_record
from tokenmill.batch.journal import (
    DurableAppender,
    JobLock,
    LineSet,
    cut_torn_tail,
    done_lines,
    input_fingerprint,
    record_id,
)
from tokenmill.batch.ordering import JobOrder, Lines, order_stamp, read_lines, scan_lines
from tokenmill.batch.runner import JobSummary, LineCounts, count_lines, prepare_line, write_summary
from tokenmill.engine.config import EngineConfig
from tokenmill.frontend import Frontend
from tokenmill.models.loader import model_name, resolve_model_path
from tokenmill.ray.replica import CallResult, EngineReplica

ERRORS_FILE = "errors.jsonl"
CUSTOM_IDS_FILE = "custom_ids.sqlite3"  # scratch, for the duplicate check
ORDER_FILE = "order.sqlite3"  # the first pass's, kept until every line has its record
SUMMARY_FILE = "summary.json"
# Lines per replica call: twice a replica's default max_num_seqs keeps its engine full, and a call
# lost with a replica is small.
DEFAULT_BATCH_LINES = 256
# Calls in flight per replica: one running, the next already there when it ends.
CALLS_PER_REPLICA = 2

Call = list[tuple[int, str]]  # (line number, the line for the replica)
Fail = Callable[[int, LineError], None]


@dataclass(kw_only=True)
class RayJobSummary(JobSummary):
    replicas: dict[str, LineCounts] = field(default_factory=dict)  # by host:pid
    shards: list[str] = field(default_factory=list)


def _encode(line: BatchLine) -> str:
    """The line as the replica parses it again (Ray ships plain values, not our objects)."""
    return json.dumps({"custom_id": line.custom_id, "method": "POST", "url": line.url, "body": line.body},
                      ensure_ascii=False)


def _connect(address: str | None) -> bool:
    """Joins the cluster at address (or RAY_ADDRESS), or starts a local one. True if started here."""
    if ray.is_initialized():  # the caller's own Ray session
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    return True


def _shards(output_dir: Path) -> list[Path]:
    """The job's result shards, in the order its runs wrote them."""
    return sorted(p for p in output_dir.glob("output-*.jsonl") if p.stem.removeprefix("output-").isdigit())


def _new_shard(output_dir: Path) -> Path:
    shards = _shards(output_dir)
    number = int(shards[-1].stem.removeprefix("output-")) + 1 if shards else 0
    return output_dir / f"output-{number:05d}.jsonl"


def run_batch(input_path: str | os.PathLike, output_dir: str | os.PathLike, engine_config: EngineConfig | None = None,
              *, replicas: int | None = None, cpus_per_replica: int | None = None, address: str | None = None,
              batch_lines: int | None = None, prefix_order: bool = True, overwrite: bool = False) -> RayJobSummary:
    """Runs an OpenAI Batch file on Ray into output_dir, resuming what earlier runs did unless
    `overwrite`. By default one replica per node; by default the cluster's CPUs are shared among
    the replicas (no more than the smallest node has, so that each fits on one)."""
    input_path, output_dir = Path(input_path), Path(output_dir)
    batch_lines = batch_lines or DEFAULT_BATCH_LINES
    engine_config = engine_config or EngineConfig()
    resolve_model_path(engine_config.model)  # a clear error now, not in every replica
    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    errors = output_dir / ERRORS_FILE
    fingerprint = input_fingerprint(input_path)
    with JobLock(output_dir / "output") as lock:
        lock.claim(errors, overwrite)
        if overwrite:
            for path in [*_shards(output_dir), errors, output_dir / SUMMARY_FILE, output_dir / ORDER_FILE]:
                path.unlink(missing_ok=True)
        done = LineSet()
        for path in [*_shards(output_dir), errors]:
            cut_torn_tail(path)
            done_lines(path, fingerprint, input_path, done)
            if path != errors and path.stat().st_size == 0:  # a run killed before its first result's
                path.unlink()
        shard = _new_shard(output_dir)
        summary = RayJobSummary(input=str(input_path), output=str(output_dir), errors=str(errors),
                                model=model_name(engine_config.model), quantization=engine_config.quantization,
                                total_lines=count_lines(input_path), skipped_already_done=len(done))
        writer = DurableAppender(shard, errors)
        bar = tqdm(total=summary.total_lines, initial=len(done), desc="requests", unit="req", dynamic_ncols=True)

        def fail(line_no: int, error: LineError) -> None:
            writer.append(errors, error_record(record_id(fingerprint, line_no), error))
            summary.count(None)
            bar.update(1)

        try:
            order = None
            if prefix_order:
                order = _order(input_path, output_dir, fingerprint, engine_config, done, fail, summary)
                lines = order.lines(input_path, done)
            else:
                lines = ((line_no, line) for line_no, line in read_lines(input_path, output_dir / CUSTOM_IDS_FILE)
                         if line_no not in done)
            calls = _calls(lines, batch_lines, fail)
            if (first := next(calls, None)) is not None:
                started_ray = _connect(address)
                try:
                    _run_on_replicas(itertools.chain([first], calls), engine_config, fingerprint, replicas,
                                     cpus_per_replica, prefix_order, writer, shard, errors, summary, bar)
                finally:
                    if started_ray:
                        ray.shutdown()
            if order is not None and not summary.failed_internally:  # every line has its record
                order.remove()
        finally:
            bar.close()
            writer.close()
        if shard.stat().st_size == 0:
            shard.unlink()
        summary.shards = [str(p) for p in _shards(output_dir)]
    summary.finish(time.perf_counter() - start)
    write_summary(summary, output_dir / SUMMARY_FILE)
    return summary


def _order(input_path: Path, output_dir: Path, fingerprint: str, engine_config: EngineConfig, done: LineSet,
           fail: Fail, summary: RayJobSummary) -> JobOrder:
    """The job's prefix order: an earlier run's, or built now (bad lines get their error records as it goes)."""
    start = time.perf_counter()
    stamp = order_stamp(fingerprint, summary.model, engine_config.block_size)
    order = JobOrder.reuse_or_build(output_dir / ORDER_FILE, stamp,
                                    lambda: scan_lines(input_path, output_dir / CUSTOM_IDS_FILE), summary.total_lines,
                                    functools.partial(prepare_line, Frontend.from_config(engine_config)), fail, done,
                                    engine_config.block_size, threading.Event(), progress=True)
    assert order is not None  # None only when cancelled
    summary.record_ordering(order, time.perf_counter() - start)
    return order


def _calls(lines: Lines, batch_lines: int, fail: Fail) -> Iterator[Call]:
    """The lines, in calls of `batch_lines` consecutive ones; a line that does not parse gets its error record."""
    call: Call = []
    for line_no, line in lines:
        if isinstance(line, LineError):
            fail(line_no, line)
            continue
        call.append((line_no, _encode(line)))
        if len(call) == batch_lines:
            yield call
            call = []
    if call:
        yield call


def _run_on_replicas(calls: Iterator[Call], engine_config: EngineConfig, fingerprint: str, replicas: int | None,
                     cpus_per_replica: int | None, prefix_order: bool, writer: DurableAppender, shard: Path,
                     errors: Path, summary: RayJobSummary, bar: tqdm) -> None:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    replicas = replicas or len(nodes)
    node_cpus = [int(n["Resources"].get("CPU", 1)) for n in nodes]
    cpus = cpus_per_replica or max(1, min(min(node_cpus), sum(node_cpus) // replicas))
    # NOTE: Ray restarts an actor that dies (not one whose constructor raised) and retries its
    # calls on the new process, as often as it takes (Ray Data's actor pools do the same).
    actor = ray.remote(EngineReplica).options(num_cpus=cpus, max_concurrency=CALLS_PER_REPLICA, max_restarts=-1,
                                              max_task_retries=-1)
    pool = [actor.remote(engine_config, fingerprint, cpus, prefix_order) for _ in range(replicas)]

    def collect(result: CallResult) -> None:
        counts = summary.replicas.setdefault(result.replica, LineCounts())
        for record, tokens in result.lines:
            if record is None:  # no record: the line runs again on the next run of the job
                summary.failed_internally += 1
                counts.failed_internally += 1
                continue
            writer.append_encoded(errors if tokens is None else shard, record)
            summary.count(tokens)
            counts.count(tokens)
        bar.update(len(result.lines))

    try:
        _stream(calls, pool, collect)
    except ray.exceptions.RayActorError as e:
        if not e.actor_init_failed:
            raise
        cause = [line for line in e.error_msg.splitlines() if line.strip()][-1]
        raise ValueError(f"an engine replica could not start: {cause}") from e


def _stream(calls: Iterator[Call], pool: list[ActorHandle], collect: Callable[[CallResult], None]) -> None:
    """Each call to a replica with fewer than CALLS_PER_REPLICA in flight, each result collected as it
    comes; the next call is read only when there is a replica free to take it."""
    free = deque(replica for _ in range(CALLS_PER_REPLICA) for replica in pool)  # one entry per free slot
    in_flight: dict[ray.ObjectRef, ActorHandle] = {}

    def collect_one() -> None:
        [ready], _ = ray.wait(list(in_flight), num_returns=1)
        free.append(in_flight.pop(ready))
        collect(ray.get(ready))

    for call in calls:
        if not free:
            collect_one()
        replica = free.popleft()
        in_flight[replica.run.remote(call)] = replica
    while in_flight:
        collect_one()
