"""`tokenmill run`: a whole OpenAI Batch file through the engine, streamed and crash-safe.

The input is read as a stream; a window of validated, tokenized requests waits in a heap ordered
by prompt token ids, so requests that share a prompt prefix are admitted together and their
shared blocks are computed once and stay cached while the group runs (BatchLLM's global prefix
sharing, within the window). Results are appended as they finish (see journal.py for why that
is exactly once across crashes).
"""

from __future__ import annotations

import heapq
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from tokenmill.batch.format import (
    CHAT_URL,
    BatchLine,
    LineError,
    error_record,
    output_record,
    parse_line,
    tokenize_body,
)
from tokenmill.batch.journal import (
    DurableAppender,
    JobLock,
    cut_torn_tail,
    done_lines,
    input_fingerprint,
    line_of,
    record_id,
)
from tokenmill.engine.engine import Engine
from tokenmill.engine.threaded import LocalClient, ThreadClient


@dataclass
class JobSummary:
    input: str
    output: str
    errors: str
    model: str
    total_lines: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped_already_done: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_time_s: float = 0.0
    output_tokens_per_s: float = 0.0
    total_tokens_per_s: float = 0.0
    prefix_cache_hit_rate: float = 0.0


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
    order_key: list[int]  # the prompt's token ids to group shared prefixes; [] keeps input order
    line_no: int
    line: BatchLine = field(compare=False)
    prompt: str | None = field(compare=False)
    token_ids: list[int] = field(compare=False)


class BatchJob:
    """One batch file through the engine. `client` is how it reaches the engine: in this thread
    (the default, for `tokenmill run`) or through the server's shared engine thread. Setting
    `cancel` stops it after the requests in flight are aborted; what is done stays done."""

    def __init__(self, engine: Engine, input_path: Path, output: Path, errors: Path | None = None,
                 client: LocalClient | ThreadClient | None = None, prefix_order: bool = True,
                 window: int | None = None, use_tqdm: bool = True, cancel: threading.Event | None = None,
                 endpoint: str | None = None) -> None:
        self.engine = engine
        self.endpoint = endpoint  # when set, every line's url must be this one (the server's batches)
        self.client = client or LocalClient(engine)
        self.cancel = cancel or threading.Event()
        self.input = input_path
        self.output = output
        self.errors = errors or default_errors_path(output)
        self.prefix_order = prefix_order
        self.window = window or max(1024, 8 * self.engine.config.max_num_seqs)
        self.use_tqdm = use_tqdm
        self.fingerprint = input_fingerprint(input_path)
        self.model_name = self.engine.model_name
        self.summary = JobSummary(str(input_path), str(output), str(self.errors), self.model_name)
        self.previously_succeeded = self.previously_failed = 0  # by earlier runs of the same job
        # Engine request ids must be unique among everything the engine runs (the server runs many
        # jobs, maybe on the same file); record ids stay fingerprint-based, for resuming.
        self.run_id = secrets.token_hex(6)

    def _lines(self, done: set[int]) -> Iterator[tuple[int, BatchLine | LineError]]:
        """Validated lines not yet done, in file order. Duplicate custom_ids fail after the first."""
        seen: set[int] = set()  # hashes of custom_ids: ~50 bytes a line, not the lines themselves
        with self.input.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                # NOTE: lines done in an earlier run are validated again, only so that `seen` holds
                # exactly the custom_ids it held then: a resumed job judges duplicates the same way.
                try:
                    line = parse_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"), line_no)
                    if self.endpoint is not None and line.url != self.endpoint:
                        raise LineError("invalid_url", f"line {line_no}: url {line.url} is not the batch's endpoint "
                                                       f"{self.endpoint}", line.custom_id)
                    key = hash(line.custom_id)
                    if key in seen:
                        raise LineError("duplicate_custom_id",
                                        f"line {line_no}: custom_id {line.custom_id!r} was used by an earlier line",
                                        line.custom_id)
                    seen.add(key)
                    item: BatchLine | LineError = line
                except LineError as e:
                    item = e
                if line_no in done:
                    self.summary.skipped_already_done += 1
                else:
                    yield line_no, item

    def _compile(self, line: BatchLine) -> None:
        try:
            self.engine.structured.compile(line.params.structured_outputs)
        except ValueError as e:
            raise LineError("invalid_value", f"line {line.line_no}: {e}", line.custom_id, "response_format") from None

    def _tokenize(self, line: BatchLine) -> tuple[str | None, list[int]]:
        try:
            return tokenize_body(self.engine.tokenizer, line.url, line.body)
        except LineError as e:
            raise LineError(e.code, f"line {line.line_no}: {e.message}", line.custom_id, e.param) from None

    def run(self, overwrite: bool = False) -> JobSummary:
        """Runs the job to its end, resuming what earlier runs did unless `overwrite`."""
        start = time.perf_counter()
        for path in (self.output, self.errors):
            path.parent.mkdir(parents=True, exist_ok=True)
        with JobLock(self.output) as lock:
            lock.claim(self.errors, overwrite)
            for path in (self.output, self.errors):
                if overwrite:
                    path.unlink(missing_ok=True)
                cut_torn_tail(path)
            done_ok, done_failed = done_lines(self.output, self.fingerprint), done_lines(self.errors, self.fingerprint)
            self.previously_succeeded, self.previously_failed = len(done_ok), len(done_failed)
            done = done_ok | done_failed
            self.summary.total_lines = count_lines(self.input)
            writer = DurableAppender(self.output, self.errors)
            try:
                self._run(done, writer)
            finally:
                writer.close()
        s = self.summary
        elapsed = time.perf_counter() - start
        s.wall_time_s = round(elapsed, 3)
        s.output_tokens_per_s = round(s.completion_tokens / elapsed, 1)
        s.total_tokens_per_s = round((s.prompt_tokens + s.completion_tokens) / elapsed, 1)
        s.prefix_cache_hit_rate = round(s.cached_prompt_tokens / max(1, s.prompt_tokens), 4)
        return s

    def _fail(self, writer: DurableAppender, line_no: int, error: LineError) -> None:
        writer.append(self.errors, error_record(record_id(self.fingerprint, line_no), error))
        self.summary.failed += 1

    def _run(self, done: set[int], writer: DurableAppender) -> None:
        client = self.client
        summary = self.summary
        lines = self._lines(done)
        pending: list[_Pending] = []
        in_flight: dict[str, BatchLine] = {}
        capacity = 2 * self.engine.config.max_num_seqs
        exhausted = False
        bar = tqdm(total=summary.total_lines, initial=len(done), desc="requests", unit="req",
                   disable=not self.use_tqdm, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            while not self.cancel.is_set():
                while not exhausted and len(pending) < self.window:
                    item = next(lines, None)
                    if item is None:
                        exhausted = True
                        break
                    line_no, line = item
                    try:
                        if isinstance(line, LineError):
                            raise line
                        prompt, token_ids = self._tokenize(line)
                        if line.params.structured_outputs is not None:  # in this thread, then cached
                            self._compile(line)
                    except LineError as e:
                        self._fail(writer, line_no, e)
                        bar.update(1)
                        continue
                    order_key = token_ids if self.prefix_order else []
                    heapq.heappush(pending, _Pending(order_key, line_no, line, prompt, token_ids))
                while pending and len(in_flight) < capacity:
                    entry = heapq.heappop(pending)
                    prefix = "chatcmpl" if entry.line.url == CHAT_URL else "cmpl"
                    request_id = f"{prefix}-{self.run_id}-{entry.line_no}"
                    client.add(request_id, entry.prompt, entry.token_ids, entry.line.params)
                    in_flight[request_id] = entry.line
                if self.cancel.is_set() or (not in_flight and exhausted and not pending):
                    break
                for output in client.next_outputs():
                    line = in_flight.pop(output.request_id)
                    bar.update(1)
                    if output.error is not None:
                        self._fail(writer, line.line_no,
                                   LineError("invalid_request", f"line {line.line_no}: {output.error}", line.custom_id))
                        continue
                    writer.append(self.output, output_record(record_id(self.fingerprint, line.line_no), line,
                                                             output, self.model_name))
                    summary.succeeded += 1
                    summary.prompt_tokens += len(output.prompt_token_ids)
                    summary.cached_prompt_tokens += output.num_cached_tokens
                    summary.completion_tokens += sum(len(c.token_ids) for c in output.outputs)
                    elapsed = time.perf_counter() - start
                    hit = summary.cached_prompt_tokens / max(1, summary.prompt_tokens)
                    bar.set_postfix_str(f"out {summary.completion_tokens / elapsed:.0f} tok/s, "
                                        f"prefix hits {hit:.0%}", refresh=False)
        finally:
            for request_id in in_flight:
                client.abort(request_id)
            bar.close()


def sort_output(path: Path) -> None:
    """Rewrites a result file in input-line order (atomically)."""
    offsets: list[tuple[int, int, int]] = []
    with path.open("rb") as f:
        pos = 0
        for raw in f:
            offsets.append((line_of(json.loads(raw)["id"]), pos, len(raw)))
            pos += len(raw)
    offsets.sort()
    tmp = path.with_name(path.name + ".sorting")
    with path.open("rb") as src, tmp.open("wb") as dst:
        for _, pos, length in offsets:
            src.seek(pos)
            dst.write(src.read(length))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def write_summary(summary: JobSummary, output: Path) -> Path:
    path = summary_path(output)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    os.replace(tmp, path)
    return path
