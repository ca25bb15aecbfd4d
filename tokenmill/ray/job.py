"""`tokenmill run --ray`: one batch job across a Ray cluster, still exactly once.

The driver reads and validates the input once (duplicate custom_ids and resumption need the whole
file's view) and writes the bad lines' errors itself. The other lines go to Ray Data sorted by the
start of their prompts and cut into batches of consecutive lines, so lines that share a prefix go
to the same replica together, which computes the prefix once (and orders its batch as the local
runner orders its window). `map_batches` runs the batches on an actor pool of EngineReplicas, one
engine each, loaded once; Ray restarts a replica that dies and retries its batch elsewhere.

The driver is the only writer. Each run appends the records Ray Data returns to its own output
shard (`output-NNNNN.jsonl`) and to `errors.jsonl` with the local runner's journal: a record is
durable once, in one shard, and a rerun skips every line that any shard or the error file holds.
A batch lost with a dead replica or a dead driver was never written, so it runs again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.data
import ray.exceptions

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
from tokenmill.batch.ordering import read_lines
from tokenmill.batch.runner import JobSummary, LineCounts, LineTokens, count_lines, write_summary
from tokenmill.engine.config import EngineConfig
from tokenmill.models.loader import model_name, resolve_model_path
from tokenmill.ray.replica import TOKEN_COLUMNS, EngineReplica

ERRORS_FILE = "errors.jsonl"
CUSTOM_IDS_FILE = "custom_ids.sqlite3"  # scratch, for the duplicate check
SUMMARY_FILE = "summary.json"
# Lines are ordered by this much of their conversation or prompt: enough to cover a long shared
# system prompt, so that lines sharing one are consecutive.
ORDER_KEY_CHARS = 4096
# Lines per replica call: twice a replica's default max_num_seqs keeps its engine full, and a batch
# lost with a replica is small.
DEFAULT_BATCH_LINES = 256


@dataclass(kw_only=True)
class RayJobSummary(JobSummary):
    replicas: dict[str, LineCounts] = field(default_factory=dict)  # by host:pid
    shards: list[str] = field(default_factory=list)


def _encode(line: BatchLine) -> str:
    """The line as the replica parses it again (Ray ships plain rows, not our objects)."""
    return json.dumps({"custom_id": line.custom_id, "method": "POST", "url": line.url, "body": line.body},
                      ensure_ascii=False)


def _order_key(line: BatchLine) -> str:
    # NOTE: lines whose endpoint gains nothing from prompt order (embeddings) keep input order, as
    # the local runner keeps them.
    if not line.endpoint.prefix_ordered:
        return ""
    prompt = line.body.get(line.endpoint.prompt_field)
    return json.dumps(prompt, ensure_ascii=False)[:ORDER_KEY_CHARS]


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
            for path in [*_shards(output_dir), errors, output_dir / SUMMARY_FILE]:
                path.unlink(missing_ok=True)
        done = LineSet()
        for path in [*_shards(output_dir), errors]:
            cut_torn_tail(path)
            done_lines(path, fingerprint, input_path, done)
        shard = _new_shard(output_dir)
        summary = RayJobSummary(input=str(input_path), output=str(output_dir), errors=str(errors),
                                model=model_name(engine_config.model),
                                quantization=engine_config.quantization, total_lines=count_lines(input_path))
        writer = DurableAppender(shard, errors)
        try:
            pending: list[tuple[str, int, str]] = []  # (order key, line number, line for the replica)
            for line_no, line in read_lines(input_path, output_dir / CUSTOM_IDS_FILE):
                if line_no in done:
                    summary.skipped_already_done += 1
                elif isinstance(line, LineError):
                    writer.append(errors, error_record(record_id(fingerprint, line_no), line))
                    summary.count(None)
                else:
                    pending.append((_order_key(line) if prefix_order else "", line_no, _encode(line)))
            if pending:
                started_ray = _connect(address)
                try:
                    _run_on_replicas(sorted(pending), engine_config, fingerprint, replicas, cpus_per_replica,
                                     batch_lines, prefix_order, writer, shard, errors, summary)
                finally:
                    if started_ray:
                        ray.shutdown()
        finally:
            writer.close()
        if shard.stat().st_size == 0:
            shard.unlink()
        summary.shards = [str(p) for p in _shards(output_dir)]
    summary.finish(time.perf_counter() - start)
    write_summary(summary, output_dir / SUMMARY_FILE)
    return summary


def _run_on_replicas(pending: list[tuple[str, int, str]], engine_config: EngineConfig,
                     fingerprint: str, replicas: int | None, cpus_per_replica: int | None, batch_lines: int,
                     prefix_order: bool, writer: DurableAppender, shard: Path, errors: Path,
                     summary: RayJobSummary) -> None:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    replicas = replicas or len(nodes)
    node_cpus = [int(n["Resources"].get("CPU", 1)) for n in nodes]
    cpus = cpus_per_replica or max(1, min(min(node_cpus), sum(node_cpus) // replicas))
    rows = [{"line_no": line_no, "line": text} for _, line_no, text in pending]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_lines)))
    results = dataset.map_batches(
        EngineReplica, fn_constructor_kwargs={"engine_config": engine_config, "fingerprint": fingerprint,
                                              "threads": cpus, "prefix_order": prefix_order},
        batch_size=batch_lines, num_cpus=cpus,
        # Two calls at a time per replica, so its engine never drains between batches.
        compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=2,
                                           max_concurrent_calls_per_actor=2, enable_true_multi_threading=True))
    try:
        _collect(results, writer, shard, errors, summary)
    except Exception as e:
        cause = _replica_start_failure(e)
        if cause is None:
            raise
        raise ValueError(f"an engine replica could not start: {cause}") from e


def _replica_start_failure(error: BaseException | None) -> str | None:
    """The last line of the error an EngineReplica's constructor raised, if that is what this is."""
    while error is not None:
        if isinstance(error, ray.exceptions.ActorDiedError) and getattr(error, "_actor_init_failed", False):
            return [line for line in error.error_msg.splitlines() if line.strip()][-1]
        error = error.__cause__ or error.__context__
    return None


def _collect(results: ray.data.Dataset, writer: DurableAppender, shard: Path, errors: Path,
             summary: RayJobSummary) -> None:
    for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
        token_counts = zip(*(batch[name].tolist() for name in TOKEN_COLUMNS))
        for record, replica, failed, internal_error, tokens in zip(batch["record"], batch["replica"], batch["failed"],
                                                                   batch["internal_error"], token_counts):
            counts = summary.replicas.setdefault(str(replica), LineCounts())
            if internal_error:  # no record: the line runs again on the next run of the job
                summary.failed_internally += 1
                counts.failed_internally += 1
                continue
            writer.append_encoded(errors if failed else shard, str(record))
            line: LineTokens = None if failed else tokens
            summary.count(line)
            counts.count(line)
