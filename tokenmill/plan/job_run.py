"""A whole batch job through a `SimulatedEngine`, driven by the batch runner's own `LineExecutor`:
what `tokenmill run` would write and count, with the model's words left out.

`simulate_job` reads the input with `read_lines` (parse_line, the duplicate custom_id check) and
hands the lines to a `LineExecutor` over a `LocalClient` of the simulated engine, so each line is
prepared by its endpoint, ordered in the window heap (or in input order) and admitted through
`drive`'s in-flight window exactly as in a real run, and a bad line becomes the very error record
the run would write. `simulate_ray_job` does the same per replica for `tokenmill run --ray`.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.batch.format import BatchLine, LineError
from tokenmill.batch.ordering import read_lines
from tokenmill.batch.runner import LineExecutor, LineTokens
from tokenmill.engine.client import LocalClient
from tokenmill.engine.engine import Engine
from tokenmill.plan.cost import CostModel
from tokenmill.plan.prefixes import SharedPrefixes
from tokenmill.plan.simulate import OutputLengths, SimulatedEngine

# Engine request ids of a simulated run: the executor's own format with a fixed run id, so that
# the same line draws the same output lengths in every simulation of the job.
SIMULATED_RUN_ID = "plan"
Lines = Iterator[tuple[int, BatchLine | LineError]]  # read_lines' items


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

    def counted(self, lines: Lines) -> Lines:
        for line_no, line in lines:
            self.lines += 1
            if isinstance(line, BatchLine):
                self.lines_by_endpoint[line.url] += 1
                self.lines_with_n[getattr(line.call.params, "n", 1)] += 1
            yield line_no, line

    @property
    def hit_rate(self) -> float:
        return self.cached_prompt_tokens / max(1, self.prompt_tokens)


def _run(engine: SimulatedEngine, run: JobRun, lines: Lines,
         fingerprint: str, prefix_order: bool, window: int | None, keep_errors: int) -> None:
    def undone(line_no: int) -> None:
        raise AssertionError("a simulated step cannot fail")

    executor = LineExecutor(LocalClient(engine), fingerprint,
                            lambda line_no, record, tokens: run.sink(line_no, record, tokens, keep_errors),
                            undone, prefix_order=prefix_order, window=window)
    executor.run_id = SIMULATED_RUN_ID
    executor.run(lines)
    run.engines.append(engine)


def simulate_job(engine: Engine, cost: CostModel, lengths: OutputLengths, input_path: Path, fingerprint: str,
                 scratch: Path, *, prefix_order: bool = True, prefixes: SharedPrefixes | None = None,
                 keep_errors: int = 5) -> JobRun:
    """The job as `tokenmill run` (with `--input-order` when not prefix_order) would run it.
    `scratch` is a folder for the duplicate check's table."""
    run = JobRun()
    sim = SimulatedEngine(engine, cost, lengths, prefixes)
    _run(sim, run, run.counted(read_lines(input_path, scratch / f"ids-{prefix_order}.sqlite3")), fingerprint,
         prefix_order, None, keep_errors)
    run.seconds = sim.clock
    return run


def simulate_ray_job(engine: Engine, cost: CostModel, lengths: OutputLengths, input_path: Path, fingerprint: str,
                     scratch: Path, replicas: int) -> list[JobRun]:
    """Each replica's share of `tokenmill run --ray --replicas N`: the driver's validation and its
    order (lines sorted by the start of their prompt), cut as Ray Data cuts them (ceil(lines / 256)
    blocks of consecutive lines, sizes as even as can be, one replica call each), the calls dealt
    to the replicas in turn, each replica one engine.

    NOTE: Ray Data hands a replica its next call when one of its two in flight finishes, so
    replicas of equal speed take turns; each replica is modelled as one executor over its calls'
    lines in order, its window two calls, as the two calls in flight feed one engine.
    """
    from tokenmill.ray.job import DEFAULT_BATCH_LINES, _order_key

    valid = sorted(((_order_key(line), line_no, line) for line_no, line in
                    read_lines(input_path, scratch / "ids-ray.sqlite3") if isinstance(line, BatchLine)),
                   key=lambda entry: entry[:2])
    calls = max(1, -(-len(valid) // DEFAULT_BATCH_LINES))
    size, remainder = divmod(len(valid), calls)  # as ray.data.from_items splits them
    bounds = [i * size + min(i, remainder) for i in range(calls + 1)]
    runs = []
    for replica in range(replicas):
        mine = [(line_no, line) for call in range(replica, calls, replicas)
                for _, line_no, line in valid[bounds[call]:bounds[call + 1]]]
        run = JobRun()
        sim = SimulatedEngine(engine, cost, lengths)
        _run(sim, run, run.counted(iter(mine)), fingerprint, True, 2 * DEFAULT_BATCH_LINES, 0)
        run.seconds = sim.clock
        runs.append(run)
    return runs
