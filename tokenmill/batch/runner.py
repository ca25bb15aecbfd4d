"""`tokenmill run`: a whole OpenAI Batch file through the engine, streamed and crash-safe.

A first pass puts the whole file in prompt-prefix order, in bounded memory (ordering.py), so that
lines sharing a prompt prefix anywhere in the file are admitted together: their shared blocks are
computed once and stay cached while the group runs (BatchLLM's global prefix sharing). The second
pass streams the lines in that order through a window of validated, tokenized requests waiting in
a heap ordered by predicted output length, longest first (in powers of two: lengths.py), then as
read, so that the longest requests do not start last, alone at the job's end. `--input-order` skips
the first pass. Results are appended as they finish (see journal.py for why that is exactly once
across crashes).

A line may ask for k prompts (an embeddings line's inputs, a completions line's prompt list): they
run as k engine requests, and the line's record is written when the last of them finishes.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tokenmill.batch.format import BatchLine, LineError, error_record, output_record
from tokenmill.batch.journal import (
    DurableAppender,
    JobLock,
    LineSet,
    cut_torn_tail,
    done_lines,
    input_fingerprint,
    line_of,
    record_id,
)
from tokenmill.batch.lengths import LengthPredictor
from tokenmill.batch.ordering import JobOrder, Lines, order_stamp, read_lines, scan_lines, scratch_database
from tokenmill.endpoints import Prompt, check_task
from tokenmill.engine.client import EngineClient, Submission, drive
from tokenmill.errors import RequestError
from tokenmill.frontend import Frontend
from tokenmill.outputs import EngineOutput, RequestOutput

# A finished line's prompt, cached prompt and completion tokens; None for a failed line.
LineTokens = tuple[int, int, int] | None


def line_tokens(outputs: list[EngineOutput]) -> tuple[int, int, int]:
    """A finished line's prompt, cached prompt and completion tokens, over its k requests."""
    return (sum(len(o.prompt_token_ids) for o in outputs), sum(o.num_cached_tokens for o in outputs),
            sum(len(c.token_ids) for o in outputs if isinstance(o, RequestOutput) for c in o.outputs))


@dataclass
class LineCounts:
    """What finished lines add up to: a job's, or (on Ray) one replica's share of it."""

    succeeded: int = 0
    failed: int = 0  # with an error record: the request's own fault
    # Failed inside the engine (a bug, an out-of-memory; logged): no record is written, so these
    # lines run again on the next run of the job.
    failed_internally: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0

    def count(self, tokens: LineTokens) -> None:
        if tokens is None:
            self.failed += 1
            return
        self.succeeded += 1
        self.prompt_tokens += tokens[0]
        self.cached_prompt_tokens += tokens[1]
        self.completion_tokens += tokens[2]


@dataclass(kw_only=True)
class JobSummary(LineCounts):
    input: str
    output: str
    errors: str
    model: str
    quantization: str  # what the weights ran as (frontend.py); a Ray job's: the setting replicas were given
    total_lines: int = 0
    skipped_already_done: int = 0
    wall_time_s: float = 0.0
    output_tokens_per_s: float = 0.0
    total_tokens_per_s: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    # The engine's thin-batch time while the job ran (EngineStats.thin_batch_seconds: under half of
    # max_num_seqs running, none waiting), and its share of the wall time; None on Ray.
    thin_batch_seconds: float | None = None
    thin_batch_share: float | None = None
    # The first pass that put the whole file in prefix order (ordering.py): its time (next to none
    # when an earlier run's was reused) and its scratch file's size; None in input order.
    ordering_seconds: float | None = None
    ordering_disk_bytes: int | None = None

    def hit_rate(self) -> float:
        return self.cached_prompt_tokens / max(1, self.prompt_tokens)

    def record_ordering(self, order: JobOrder, seconds: float) -> None:
        self.ordering_seconds = round(seconds, 3)
        self.ordering_disk_bytes = order.disk_bytes()

    def finish(self, elapsed: float) -> None:
        self.wall_time_s = round(elapsed, 3)
        self.output_tokens_per_s = round(self.completion_tokens / elapsed, 1)
        self.total_tokens_per_s = round((self.prompt_tokens + self.completion_tokens) / elapsed, 1)
        self.prefix_cache_hit_rate = round(self.hit_rate(), 4)
        if self.thin_batch_seconds is not None:
            self.thin_batch_seconds = round(self.thin_batch_seconds, 3)
            self.thin_batch_share = round(self.thin_batch_seconds / elapsed, 4)


def _beside(output: Path, suffix: str) -> Path:
    name = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(name + suffix)


def default_errors_path(output: Path) -> Path:
    return _beside(output, ".errors.jsonl")


def summary_path(output: Path) -> Path:
    return _beside(output, ".summary.json")


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


@dataclass(order=True)
class _Pending:
    # (-the predicted output length's class, the order lines were read in); () keeps input order
    order_key: tuple[int, int] | tuple[()]
    line_no: int
    line: BatchLine = field(compare=False)
    prompts: list[Prompt] = field(compare=False)  # one per engine request
    arrival: int = field(compare=False)  # lines read before this one


@dataclass
class _Gathering:
    """A line whose requests are in the engine: their outputs, by input index, as they finish."""

    line: BatchLine
    request_id: str  # the line's; its k requests, if k > 1, are this + "-<index>"
    outputs: list[EngineOutput | None]
    remaining: int


def prepare_line(frontend: Frontend, line: BatchLine) -> list[Prompt]:
    """The line's engine requests' prompts, checked against the model (a line it cannot serve
    fails) and tokenized; grammars compiled. The executor's, and the Ray driver's first pass."""
    try:
        check_task(frontend, line.endpoint)
        line.endpoint.prepare(frontend, line.call)
        return line.call.prompts
    except RequestError as e:
        raise LineError(e.code, f"line {line.line_no}: {e.message}", line.custom_id,
                        line.endpoint.blamed_param(e.param)) from None


# Where each finished line goes: (line number, its output or error record, its tokens, or None for
# an error record).
RecordSink = Callable[[int, dict[str, Any], LineTokens], None]


class LineExecutor:
    """Runs validated lines through an engine client and hands each one's record to `sink`.

    Tokenizes as it reads, keeps up to `window` engine requests waiting in a heap ordered by
    predicted output length class, then as they were read (in prefix order, so requests sharing a
    prefix are admitted together), and `drive`s them through
    `client`: in this thread, or through a shared engine thread (the server; a Ray replica). A line
    whose request failed inside the engine gets no record: it goes to `undone`, and runs again on
    the next run of the job. Setting `cancel` stops it after the requests in flight are aborted.
    Used by BatchJob here and by each Ray replica.
    """

    def __init__(self, client: EngineClient, fingerprint: str, sink: RecordSink, undone: Callable[[int], None], *,
                 prefix_order: bool = True, window: int | None = None, cancel: threading.Event | None = None) -> None:
        self.client = client
        self.fingerprint = fingerprint
        self.sink = sink
        self.undone = undone
        self.prefix_order = prefix_order
        self.window = window or max(1024, 8 * client.frontend.config.max_num_seqs)
        self.cancel = cancel or threading.Event()
        self.lengths = LengthPredictor(client.frontend.max_model_len)
        # Engine request ids must be unique among everything the engine runs (the server runs many
        # jobs, maybe on the same file); record ids stay fingerprint-based, for resuming.
        self.run_id = secrets.token_hex(6)

    def fail(self, line_no: int, error: LineError) -> None:
        self.sink(line_no, error_record(record_id(self.fingerprint, line_no), error), None)

    def prepare(self, line: BatchLine) -> list[Prompt]:
        return prepare_line(self.client.frontend, line)

    def _order_key(self, line: BatchLine, prompts: list[Prompt], arrival: int) -> tuple[int, int] | tuple[()]:
        if not self.prefix_order or not line.endpoint.prefix_ordered:
            return ()
        # NOTE: lines arrive in prefix order (ordering.py: the whole file's, or a Ray call's share of
        # it), so among lines of one length class the order they came in keeps each group together.
        max_tokens = getattr(line.call.params, "max_tokens", None)
        return -self.lengths.length_class(prompts[0][1], max_tokens), arrival

    def _requests(self, lines: Lines,
                  in_flight: dict[str, tuple[_Gathering, int]]) -> Iterator[Submission]:
        """The lines' requests, each line's the first in prompt order among up to `window` requests
        read ahead. A line is read whenever fewer than `window` wait, however many requests it
        brings, so a line of more than `window` inputs cannot stall the job."""
        pending: list[_Pending] = []
        arrivals = itertools.count()
        waiting = 0  # engine requests in `pending`
        exhausted = False
        keyed_at = self.lengths.version
        while not self.cancel.is_set():
            if keyed_at != self.lengths.version:  # finished lines changed a group's predicted length
                keyed_at = self.lengths.version
                for entry in pending:
                    entry.order_key = self._order_key(entry.line, entry.prompts, entry.arrival)
                heapq.heapify(pending)
            while not exhausted and waiting < self.window:
                item = next(lines, None)
                if item is None:
                    exhausted = True
                    break
                line_no, line = item
                try:
                    if isinstance(line, LineError):
                        raise line
                    prompts = self.prepare(line)
                except LineError as e:
                    self.fail(line_no, e)
                    continue
                arrival = next(arrivals)
                heapq.heappush(pending, _Pending(self._order_key(line, prompts, arrival), line_no, line, prompts,
                                                 arrival))
                waiting += len(prompts)
            if not pending:
                return
            entry = heapq.heappop(pending)
            waiting -= len(entry.prompts)
            line = entry.line
            request_id = f"{line.endpoint.id_prefix}-{self.run_id}-{line.line_no}"
            count = len(entry.prompts)
            gathering = _Gathering(line, request_id, [None] * count, count)
            for index, (prompt, token_ids) in enumerate(entry.prompts):
                one_id = f"{request_id}-{index}" if count > 1 else request_id  # a single one as OpenAI's id
                in_flight[one_id] = (gathering, index)
                yield Submission(one_id, prompt, token_ids, line.call.params)

    def _finish(self, gathering: _Gathering) -> None:
        line, endpoint = gathering.line, gathering.line.endpoint
        outputs = [o for o in gathering.outputs if o is not None]
        error = endpoint.failure(outputs)
        for output in outputs:
            if isinstance(output, RequestOutput):
                for completion in output.outputs:
                    self.lengths.record(output.prompt_token_ids, len(completion.token_ids))
        if error is None:
            body = endpoint.respond(line.call, outputs, gathering.request_id, self.client.frontend.model_name)
            self._succeed(gathering, body, line_tokens(outputs))
        elif error.internal:
            self.undone(line.line_no)
        else:
            self.fail(line.line_no, LineError(error.code, f"line {line.line_no}: {error.message}", line.custom_id,
                                               endpoint.blamed_param(error.param)))

    def _succeed(self, gathering: _Gathering, body: dict[str, Any], tokens: LineTokens) -> None:
        line_no = gathering.line.line_no
        self.sink(line_no, output_record(record_id(self.fingerprint, line_no), gathering.line, gathering.request_id,
                                         body), tokens)

    def run(self, lines: Lines) -> None:
        if self.cancel.is_set():
            return
        in_flight: dict[str, tuple[_Gathering, int]] = {}
        with contextlib.closing(drive(self.client, self._requests(lines, in_flight))) as steps:
            for outputs in steps:
                for output in outputs:
                    gathering, index = in_flight.pop(output.request_id)
                    gathering.outputs[index] = output
                    gathering.remaining -= 1
                    if not gathering.remaining:
                        self._finish(gathering)
                if self.cancel.is_set():
                    break  # closing `steps` aborts the requests in flight


class BatchJob:
    """One batch file through the engine, its results appended to OUTPUT and ERRORS (the journal).
    `client` and `cancel` are passed to the LineExecutor; what is done stays done."""

    def __init__(self, client: EngineClient, input_path: Path, output: Path, errors: Path | None = None, *,
                 prefix_order: bool = True, window: int | None = None, use_tqdm: bool = True,
                 cancel: threading.Event | None = None, endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        self.client = client
        self.cancel = cancel or threading.Event()
        self.input = input_path
        self.output = output
        self.errors = errors or default_errors_path(output)
        self.prefix_order = prefix_order
        self.window = window
        self.use_tqdm = use_tqdm
        self.fingerprint = input_fingerprint(input_path)
        self.custom_ids = _beside(output, ".custom_ids.sqlite3")  # scratch, for the duplicate check
        self.order_path = _beside(output, ".order.sqlite3")  # the first pass's, kept until the job is done
        self.summary = JobSummary(input=str(input_path), output=str(output), errors=str(self.errors),
                                  model=client.frontend.model_name, quantization=client.frontend.quantization)
        self.previously_succeeded = self.previously_failed = 0  # by earlier runs of the same job

    def run(self, overwrite: bool = False, sort: bool = False) -> JobSummary:
        """Runs the job to its end, resuming what earlier runs did unless `overwrite`; with `sort`,
        then rewrites OUTPUT in input order (still holding the lock, so no other run appends to
        the file being replaced)."""
        start = time.perf_counter()
        for path in (self.output, self.errors):
            path.parent.mkdir(parents=True, exist_ok=True)
        with JobLock(self.output) as lock:
            lock.claim(self.errors, overwrite)
            for path in (self.output, self.errors):
                if overwrite:
                    path.unlink(missing_ok=True)
                cut_torn_tail(path)
            done = done_lines(self.output, self.fingerprint, self.input)
            self.previously_succeeded = len(done)
            done_lines(self.errors, self.fingerprint, self.input, done)  # a line is in one file only
            self.previously_failed = len(done) - self.previously_succeeded
            self.summary.total_lines = count_lines(self.input)
            writer = DurableAppender(self.output, self.errors)
            thin_before = self.client.metrics().stats.thin_batch_seconds
            try:
                self._run(done, writer)
            finally:
                writer.close()
                self.summary.thin_batch_seconds = self.client.metrics().stats.thin_batch_seconds - thin_before
            if sort:
                sort_output(self.output)
        self.summary.finish(time.perf_counter() - start)
        return self.summary

    def _run(self, done: LineSet, writer: DurableAppender) -> None:
        summary = self.summary
        summary.skipped_already_done = len(done)
        bar = tqdm(total=summary.total_lines, initial=len(done), desc="requests", unit="req",
                   disable=not self.use_tqdm, dynamic_ncols=True)
        start = time.perf_counter()

        def sink(line_no: int, record: dict[str, Any], tokens: LineTokens) -> None:
            writer.append(self.errors if tokens is None else self.output, record)
            summary.count(tokens)
            bar.update(1)
            if tokens is not None:
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"in {summary.prompt_tokens / elapsed:.0f} tok/s, "
                                    f"out {summary.completion_tokens / elapsed:.0f} tok/s, "
                                    f"prefix hits {summary.hit_rate():.0%}", refresh=False)

        def undone(line_no: int) -> None:
            summary.failed_internally += 1

        executor = LineExecutor(self.client, self.fingerprint, sink, undone, prefix_order=self.prefix_order,
                                window=self.window, cancel=self.cancel)
        try:
            if not self.prefix_order:
                # NOTE: lines done in an earlier run are read again, only so that duplicates are
                # judged exactly as they were then.
                executor.run((line_no, line) for line_no, line in read_lines(self.input, self.custom_ids,
                                                                             self.endpoint) if line_no not in done)
            elif (order := self._order(executor, done)) is not None:  # None: cancelled during the first pass
                executor.run(order.lines(self.input, done))
                if not self.cancel.is_set() and not summary.failed_internally:  # every line has its record
                    order.remove()
        finally:
            bar.close()

    def _order(self, executor: LineExecutor, done: LineSet) -> JobOrder | None:
        """The job's prefix order: an earlier run's, or built now (bad lines get their error records
        as it goes); None if the job was cancelled meanwhile."""
        start = time.perf_counter()
        block_size = self.client.frontend.config.block_size
        order = JobOrder.reuse_or_build(self.order_path,
                                        order_stamp(self.fingerprint, self.summary.model, block_size, self.endpoint),
                                        lambda: scan_lines(self.input, self.custom_ids, self.endpoint),
                                        self.summary.total_lines, executor.prepare, executor.fail, done,
                                        block_size, self.cancel, self.use_tqdm)
        if order is not None:
            self.summary.record_ordering(order, time.perf_counter() - start)
        return order


def sort_output(path: Path) -> None:
    """Rewrites a result file in input-line order (atomically), in bounded memory: the records'
    offsets are sorted by line in a scratch SQLite table."""
    offsets = path.with_name(path.name + ".sorting.sqlite3")
    offsets.unlink(missing_ok=True)
    db = scratch_database(offsets)
    try:
        db.execute("CREATE TABLE records (line_no INTEGER PRIMARY KEY, offset INTEGER NOT NULL, size INTEGER NOT NULL)")
        db.execute("BEGIN")
        with path.open("rb") as f:
            pos = 0
            for raw in f:
                db.execute("INSERT INTO records VALUES (?, ?, ?)", (line_of(json.loads(raw)["id"]), pos, len(raw)))
                pos += len(raw)
        tmp = path.with_name(path.name + ".sorting")
        with path.open("rb") as src, tmp.open("wb") as dst:
            for pos, length in db.execute("SELECT offset, size FROM records ORDER BY line_no"):
                src.seek(pos)
                dst.write(src.read(length))
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        db.close()
        offsets.unlink(missing_ok=True)
    os.replace(tmp, path)


def write_summary(summary: JobSummary, path: Path) -> Path:
    """Writes the summary as JSON at path, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    os.replace(tmp, path)
    return path
