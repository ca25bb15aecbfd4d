"""Measuring this machine: engine steps timed on a fixed grid and on a sample of the job's own lines.

Two measurements, both through the loaded engine's real step (`TimedClient` times each one and
reads the work of the batch its scheduler hands over):
- `measure_grid`: the machine's prompt and decode speed across batch sizes up to the job's
  (max_num_seqs) and contexts (shared or each its own), greedy, random and seeded rows, on
  synthetic prompts: ~20 s here for the default model, once per model, settings and machine.
- `run_sample`: a few dozen of the job's lines, spread across the file, run as `tokenmill run`
  runs them (a `BatchJob` on a file of those lines): their real output lengths, more timed steps in
  the job's own shapes, and the time spent outside the engine's steps per line (tokenizing,
  records, the journal).
`Calibration` (calibration_cache.py) keeps both per model, engine settings and machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.batch.format import BatchLine
from tokenmill.batch.ordering import read_lines
from tokenmill.batch.runner import BatchJob, count_lines
from tokenmill.engine.client import LocalClient, Submission, drive
from tokenmill.engine.engine import Engine
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.outputs import EngineOutput, RequestOutput
from tokenmill.plan.cost import StepWork, read_batch
from tokenmill.plan.simulate import Observed
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

# The job's lines run for their output lengths: this share of them, within these bounds.
# NOTE: the sample decodes at a smaller batch than the job, less efficiently: at 3% of the lines it
# takes 2-5% of the job's time here (docs/PERFORMANCE.md); the floor of 5 lines takes more on jobs
# of fewer than ~150 long lines.
SAMPLE_FRACTION = 0.03
MIN_SAMPLE_LINES, MAX_SAMPLE_LINES = 5, 48
# The grid: decode batches (fractions of max_num_seqs) at two contexts, and long prompts.
GRID_BATCH_FRACTIONS = (1.0, 0.25, 1 / 16)
GRID_CONTEXTS = (128, 1024)
GRID_DECODE_STEPS = 6
GRID_DISTINCT_DECODE_STEPS = 32  # their signal (the keys read) is small against a step's fixed cost
GRID_PROMPT_TOKENS = (2048, 512)  # two prompts, computed step_tokens at a time


class TimedClient(LocalClient):
    """A LocalClient that times every engine step with the work of its batch, and keeps every
    finished sequence's output length with its request's max_tokens. Use it as a context manager:
    leaving it gives the engine its scheduler back untouched."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.steps: list[tuple[StepWork, float]] = []
        self.observed: list[Observed] = []
        self._max_tokens: dict[str, int | None] = {}
        self._work: StepWork | None = None
        schedule = engine.scheduler.schedule

        def reading_schedule() -> ScheduledBatch:
            batch = schedule()
            self._work = read_batch(batch, engine.kv.block_size).work if batch.seqs else None
            return batch

        # NOTE: the engine's own step runs unchanged; only the batch its scheduler returns is read
        # on the way, before the step advances it (until __exit__ removes this instance attribute).
        engine.scheduler.schedule = reading_schedule  # type: ignore[method-assign]

    def __enter__(self) -> TimedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.scheduler.schedule

    def add(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams | PoolingParams,
            stream: bool = False) -> None:
        if isinstance(params, SamplingParams):
            self._max_tokens[request_id] = params.max_tokens
        super().add(request_id, prompt, token_ids, params, stream)

    def next_outputs(self, timeout: float = 0.5) -> list[EngineOutput]:
        start = time.perf_counter()
        outputs = super().next_outputs(timeout)
        if self._work is not None:
            self.steps.append((self._work, time.perf_counter() - start))
            self._work = None
        for output in outputs:
            if isinstance(output, RequestOutput) and output.finished and output.error is None:
                max_tokens = self._max_tokens.pop(output.request_id)
                self.observed.extend(Observed(max_tokens, len(c.token_ids)) for c in output.outputs)
        return outputs


def _grid_groups(engine: Engine) -> Iterator[list[Submission]]:
    """Synthetic requests, in groups run one after another: long prompts alone; batches of each size
    decoding over a shared context (computed once, then found in the cache by the batch) and short
    suffixes of their own, greedy, then drawn at random, then seeded; a few decodes over long
    contexts of their own (nothing shared to read once)."""
    rng = random.Random(0)
    vocab = engine.vocab_size

    def tokens(count: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(count)]

    prompt_only = SamplingParams(max_tokens=1, temperature=0)
    for length in GRID_PROMPT_TOKENS:
        yield [Submission(f"grid-prompt-{length}", None, tokens(min(length, engine.max_model_len - 1)), prompt_only)]
    max_seqs = engine.config.max_num_seqs
    greedy = SamplingParams(max_tokens=GRID_DECODE_STEPS, temperature=0, ignore_eos=True)
    contexts = sorted({min(c, engine.max_model_len - GRID_DISTINCT_DECODE_STEPS) for c in GRID_CONTEXTS})
    for context in contexts:
        shared = tokens(context - 16)
        for batch in sorted({max(1, int(max_seqs * fraction)) for fraction in GRID_BATCH_FRACTIONS}, reverse=True):
            yield [Submission(f"grid-{context}-{batch}-{i}", None, shared + tokens(16), greedy) for i in range(batch)]
    shared = tokens(contexts[0] - 16)
    for name, seed in (("random", None), ("seeded", 0)):
        params = SamplingParams(max_tokens=GRID_DECODE_STEPS, temperature=1.0, seed=seed, ignore_eos=True)
        yield [Submission(f"grid-{name}-{i}", None, shared + tokens(16), params) for i in range(max_seqs)]
    distinct = SamplingParams(max_tokens=GRID_DISTINCT_DECODE_STEPS, temperature=0, ignore_eos=True)
    yield [Submission(f"grid-distinct-{i}", None, tokens(contexts[-1]), distinct)
           for i in range(max(2, int(max_seqs * GRID_BATCH_FRACTIONS[-1])))]


def measure_grid(engine: Engine) -> list[tuple[StepWork, float]]:
    """The grid's steps through the engine, timed, in this thread's torch threads."""
    with TimedClient(engine) as client:
        # NOTE: a group at a time, so that its decode steps run at its batch size alone rather than
        # mixed with the next group's prompts.
        for group in _grid_groups(engine):
            for _ in drive(client, iter(group)):
                pass
        return client.steps[1:]  # the first step pays one-time set-up


@dataclass
class SampleRun:
    lines: int
    seconds: float  # the BatchJob's wall time
    steps: list[tuple[StepWork, float]]  # every step, the first (which may pay one-time set-up) included
    observed: list[Observed]

    @property
    def overhead_per_line(self) -> float:
        """Seconds per line spent outside the engine's steps."""
        return max(0.0, self.seconds - sum(s for _, s in self.steps)) / max(1, self.lines)


def sample_size(lines: int) -> int:
    return min(lines, MAX_SAMPLE_LINES, max(MIN_SAMPLE_LINES, math.ceil(SAMPLE_FRACTION * lines)))


def run_sample(engine: Engine, input_path: Path) -> SampleRun:
    """Runs a sample of input_path's valid lines, evenly spread over the file, as `tokenmill run` would."""
    with tempfile.TemporaryDirectory(prefix="tokenmill-plan-") as scratch:
        sample = Path(scratch) / "sample.jsonl"
        total = count_lines(input_path)
        count = sample_size(total)
        wanted = {i * total // count for i in range(count)}
        written = 0
        with sample.open("w") as f:
            for ordinal, (_, line) in enumerate(read_lines(input_path, Path(scratch) / "ids.sqlite3")):
                if ordinal in wanted and isinstance(line, BatchLine):
                    f.write(json.dumps({"custom_id": line.custom_id, "method": "POST", "url": line.url,
                                        "body": line.body}, ensure_ascii=False) + "\n")
                    written += 1
        with TimedClient(engine) as client:
            summary = BatchJob(client, sample, Path(scratch) / "out.jsonl", use_tqdm=False).run(overwrite=True)
        return SampleRun(written, summary.wall_time_s, client.steps, client.observed)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Runs the body with this many torch threads, then restores the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
