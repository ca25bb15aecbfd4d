"""A whole batch job through a `SimulatedEngine`, driven by the batch runner's own `LineExecutor`:
what `tokenmill run` would write and count, with the model's words left out.

`simulate_job` reads the input as the run does: in prefix order, a first pass (`JobOrder.build`
over `scan_lines`, in the scratch folder) through the executor's own prepare and fail, then the
lines in its order; in input order, `read_lines`. The lines go to a `LineExecutor` over a
`LocalClient` of the simulated engine, so each line is prepared by its endpoint, ordered in the
window heap and admitted through `drive`'s in-flight window exactly as in a real run, and a bad
line becomes the very error record the run would write. `simulate_ray_job` does the same per
replica for `tokenmill run --ray`.
"""

from __future__ import annotations

import functools
import threading
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.batch.format import BatchLine, LineError
from tokenmill.batch.journal import LineSet
from tokenmill.batch.ordering import JobOrder, Lines, ScannedLines, read_lines, scan_lines
from tokenmill.batch.runner import LineExecutor, LineTokens, prepare_line
from tokenmill.endpoints import Prompt
from tokenmill.engine.client import LocalClient
from tokenmill.engine.engine import Engine
from tokenmill.frontend import Frontend
from tokenmill.plan.cost import CostModel
from tokenmill.plan.prefixes import SharedPrefixes
from tokenmill.plan.simulate import OutputLengths, SimulatedEngine

# Engine request ids of a simulated run: the executor's own format with a fixed run id, so that
# the same line draws the same output lengths in every simulation of the job.
SIMULATED_RUN_ID = "plan"


@dataclass
class JobRun:
    """What a simulated run of a job wrote and counted."""

    lines: int = 0  # non-blank lines read
    lines_by_endpoint: Counter[str] = field(default_factory=Counter)  # lines that parse, by url
    lines_with_n: Counter[int] = field(default_factory=Counter)  # lines that parse, by their n
    error_lines: int = 0
    error_codes: Counter[str] = field(default_factory=Counter)
    first_errors: list[dict[str, Any]] = field(default_factory=list)  # the first error records, in order written
    succeeded: int = 0
    line_prompt_tokens: array[int] = field(default_factory=lambda: array("q"))  # per succeeded line
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # the simulated engine's clock
    engines: list[SimulatedEngine] = field(default_factory=list)

    def sink(self, line_no: int, record: dict[str, Any], tokens: LineTokens, keep_errors: int) -> None:
        if tokens is None:
            self.error_lines += 1
            self.error_codes[record["error"]["code"]] += 1
            if len(self.first_errors) < keep_errors:
                self.first_errors.append(record)
            return
        self.succeeded += 1
        self.line_prompt_tokens.append(tokens[0])
        self.prompt_tokens += tokens[0]
        self.cached_prompt_tokens += tokens[1]
        self.completion_tokens += tokens[2]

    def count(self, line: BatchLine | LineError) -> None:
        self.lines += 1
        if isinstance(line, BatchLine):
            self.lines_by_endpoint[line.url] += 1
            self.lines_with_n[getattr(line.call.params, "n", 1)] += 1

    def counted(self, lines: Lines) -> Lines:
        for line_no, line in lines:
            self.count(line)
            yield line_no, line

    def counted_scan(self, lines: ScannedLines) -> ScannedLines:
        for line_no, offset, size, line in lines:
            self.count(line)
            yield line_no, offset, size, line

    @property
    def hit_rate(self) -> float:
        return self.cached_prompt_tokens / max(1, self.prompt_tokens)


def _executor(engine: SimulatedEngine, run: JobRun, fingerprint: str, prefix_order: bool, window: int | None,
              keep_errors: int) -> LineExecutor:
    def undone(line_no: int) -> None:
        raise AssertionError("a simulated step cannot fail")

    executor = LineExecutor(LocalClient(engine), fingerprint,
                            lambda line_no, record, tokens: run.sink(line_no, record, tokens, keep_errors),
                            undone, prefix_order=prefix_order, window=window)
    executor.run_id = SIMULATED_RUN_ID
    run.engines.append(engine)
    return executor


def _first_pass(path: Path, lines: ScannedLines, prepare: Callable[[BatchLine], list[Prompt]],
                fail: Callable[[int, LineError], None], block_size: int) -> JobOrder:
    """The run's first pass over `lines` (ordering.py), into `path`."""
    order = JobOrder.build(path, path.stem, lines, prepare, fail, LineSet(), block_size, threading.Event())
    assert order is not None  # None only when cancelled
    return order


def simulate_job(engine: Engine, cost: CostModel, lengths: OutputLengths, input_path: Path, fingerprint: str,
                 scratch: Path, *, prefix_order: bool = True, prefixes: SharedPrefixes | None = None,
                 keep_errors: int = 5) -> JobRun:
    """The job as `tokenmill run` (with `--input-order` when not prefix_order) would run it.
    `scratch` is a folder for the duplicate check's table and the first pass's file."""
    run = JobRun()
    sim = SimulatedEngine(engine, cost, lengths, prefixes)
    executor = _executor(sim, run, fingerprint, prefix_order, None, keep_errors)
    custom_ids = scratch / f"ids-{prefix_order}.sqlite3"
    if prefix_order:
        order = _first_pass(scratch / "order.sqlite3", run.counted_scan(scan_lines(input_path, custom_ids)),
                            executor.prepare, executor.fail, engine.config.block_size)
        executor.run(order.lines(input_path, LineSet()))
        order.remove()
    else:
        executor.run(run.counted(read_lines(input_path, custom_ids)))
    run.seconds = sim.clock
    return run


def simulate_ray_job(engine: Engine, cost: CostModel, lengths: OutputLengths, input_path: Path, fingerprint: str,
                     scratch: Path, replicas: int) -> list[JobRun]:
    """Each replica's share of `tokenmill run --ray --replicas N`: the driver's first pass (bad lines
    fail there, counted by no replica) and its order, cut into calls of DEFAULT_BATCH_LINES
    consecutive ordered lines, the calls dealt to the replicas in turn, each replica one engine.

    NOTE: the driver hands a replica its next call when one of its two in flight finishes, so
    replicas of equal speed take turns; each replica is modelled as one executor over its calls'
    lines in order, its window two calls, as the two calls in flight feed one engine.
    """
    from tokenmill.ray.job import CALLS_PER_REPLICA, DEFAULT_BATCH_LINES

    order = _first_pass(scratch / "ray-order.sqlite3", scan_lines(input_path, scratch / "ids-ray.sqlite3"),
                        functools.partial(prepare_line, Frontend.from_engine(engine)), lambda line_no, error: None,
                        engine.config.block_size)
    runs = []
    for replica in range(replicas):
        mine = (item for i, item in enumerate(order.lines(input_path, LineSet()))
                if i // DEFAULT_BATCH_LINES % replicas == replica)
        run = JobRun()
        sim = SimulatedEngine(engine, cost, lengths)
        _executor(sim, run, fingerprint, True, CALLS_PER_REPLICA * DEFAULT_BATCH_LINES, 0).run(run.counted(mine))
        run.seconds = sim.clock
        runs.append(run)
    order.remove()
    return runs
