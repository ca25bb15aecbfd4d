"""The server's batches: each runs through the same `BatchJob` as `tokenmill run`, at a lower
priority than interactive requests, on the shared engine thread.

A batch's state lives in the store; its results are appended to files in its own folder, so a
server killed mid-batch resumes it at start-up and finishes it exactly once. Lines that failed
inside the engine have no record: the job runs again at once for them (the journal skips what is
done), a few times at most, after which the batch fails.

A batch object has OpenAI's fields, `usage` included (its tokens: input, of which cached, output),
and one of tokenmill's, `progress`: `elapsed_seconds` (how long its job has run), input and
output tokens per second over that time, `prefix_cache_hit_rate` (cached / input tokens) and
`eta_seconds` (the time left at the current run's rate of lines; null when not running or before
its first line is done). Usage and elapsed time are saved when a run of the job ends: a run cut
by a crash loses its share, though its lines are done (a resumed batch does not run them again).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.batch.runner import BatchJob, JobSummary, count_lines
from tokenmill.endpoints import ENDPOINTS, URLS, check_task
from tokenmill.engine.threaded import EngineThread
from tokenmill.errors import RequestError
from tokenmill.outputs import EngineOutput
from tokenmill.server.metrics import LatencyHistograms, ObservedClient
from tokenmill.server.store import Store, new_id

logger = logging.getLogger(__name__)

BATCH_PRIORITY = 1  # interactive requests are 0: admitted first, preempted last
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
COMPLETION_WINDOW_S = 24 * 3600  # the only window OpenAI offers, "24h"
MAX_RUNS = 3  # of a batch's job, while lines fail inside the engine


class BatchError(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class _Run:
    """A batch's job while it runs, and when this run of it began (time.monotonic())."""

    job: BatchJob
    started: float


def _usage(input_tokens: int = 0, cached_tokens: int = 0, output_tokens: int = 0) -> dict[str, Any]:
    """Token usage in the shape of OpenAI's batch object."""
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _plus(usage: dict[str, Any], summary: JobSummary) -> dict[str, Any]:
    return _usage(usage["input_tokens"] + summary.prompt_tokens,
                  usage["input_tokens_details"]["cached_tokens"] + summary.cached_prompt_tokens,
                  usage["output_tokens"] + summary.completion_tokens)


def _progress(usage: dict[str, Any], elapsed: float, eta: float | None) -> dict[str, Any]:
    per_second = 1 / elapsed if elapsed > 0 else 0.0
    return {"elapsed_seconds": round(elapsed, 3),
            "input_tokens_per_second": round(usage["input_tokens"] * per_second, 1),
            "output_tokens_per_second": round(usage["output_tokens"] * per_second, 1),
            "prefix_cache_hit_rate": round(usage["input_tokens_details"]["cached_tokens"]
                                           / max(1, usage["input_tokens"]), 4),
            "eta_seconds": None if eta is None else round(eta, 1)}


class BatchManager:
    def __init__(self, store: Store, engine_thread: EngineThread) -> None:
        self.store = store
        self.engine_thread = engine_thread
        self.runs: dict[str, _Run] = {}
        self.cancels: dict[str, threading.Event] = {}
        self.latency: LatencyHistograms | None = None  # set by the app's metrics: batch requests' latencies
        self._lock = threading.Lock()

    def resume(self) -> None:
        """Restarts the batches a previous server process left unfinished."""
        for batch in self.store.list_batches():
            if batch["status"] in ACTIVE:
                logger.info("resuming batch %s", batch["id"])
                self._start(batch["id"], cancelled=batch["status"] == "cancelling")

    def create(self, input_file_id: Any, endpoint: Any, completion_window: Any, metadata: Any) -> dict[str, Any]:
        if not isinstance(input_file_id, str) or self.store.get_file(input_file_id) is None:
            raise BatchError(404, f"no file with id {input_file_id!r}", "input_file_id")
        if endpoint not in ENDPOINTS:
            raise BatchError(400, f"endpoint must be one of {', '.join(URLS)}", "endpoint")
        try:  # refused now rather than failing every line
            check_task(self.engine_thread.frontend, ENDPOINTS[endpoint])
        except RequestError as e:
            raise BatchError(400, e.message, "endpoint") from None
        if completion_window != "24h":
            raise BatchError(400, "completion_window must be '24h'", "completion_window")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise BatchError(400, "metadata must be at most 16 string keys and string values", "metadata")
        now = int(time.time())
        batch = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + COMPLETION_WINDOW_S, "finalizing_at": None, "completed_at": None,
                 "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
                 "usage": _usage(), "progress": _progress(_usage(), 0.0, None)}
        with self._lock:  # a cancel that finds the batch also finds its cancel event
            self.store.save_batch(batch)
            self._start(batch["id"])
        return batch

    def get(self, batch_id: str) -> dict[str, Any] | None:
        """The batch object, with live counts, usage and progress while its job runs."""
        with self._lock:  # the saved usage and a live run's never count the same run twice (see _end_run)
            batch = self.store.get_batch(batch_id)
            run = self.runs.get(batch_id)
        if batch is None:
            return None
        usage = batch.get("usage") or _usage()  # a batch saved before usage was kept has none
        elapsed = (batch.get("progress") or {}).get("elapsed_seconds", 0.0)
        eta = None
        if run is not None:
            counts = batch["request_counts"] = self._counts(run.job, batch["request_counts"]["total"])
            usage = _plus(usage, run.job.summary)
            ran = time.monotonic() - run.started
            elapsed += ran
            done_now = run.job.summary.succeeded + run.job.summary.failed
            if done_now and batch["status"] == "in_progress":
                eta = (counts["total"] - counts["completed"] - counts["failed"]) * ran / done_now
        batch["usage"], batch["progress"] = usage, _progress(usage, elapsed, eta)
        return batch

    def list(self) -> list[dict[str, Any]]:
        return [self.get(b["id"]) or b for b in self.store.list_batches()]

    def running(self) -> list[dict[str, Any]]:
        """The batches whose job is running now."""
        return [batch for batch_id in list(self.runs) if (batch := self.get(batch_id)) is not None]

    def cancel(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            batch = self.store.get_batch(batch_id)
            if batch is None:
                return None
            if batch["status"] in ("validating", "in_progress"):
                batch.update(status="cancelling", cancelling_at=int(time.time()))
                self.store.save_batch(batch)
                if batch_id in self.cancels:
                    self.cancels[batch_id].set()
        return self.get(batch_id)

    @staticmethod
    def _counts(job: BatchJob, total: int) -> dict[str, int]:
        s = job.summary
        return {"total": total, "completed": job.previously_succeeded + s.succeeded,
                "failed": job.previously_failed + s.failed}

    def _start(self, batch_id: str, cancelled: bool = False) -> None:
        cancel = threading.Event()
        if cancelled:
            cancel.set()
        self.cancels[batch_id] = cancel
        threading.Thread(target=self._run, args=(batch_id, cancel), name=f"batch-{batch_id}", daemon=True).start()

    def _update(self, batch_id: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            batch = self.store.get_batch(batch_id)
            assert batch is not None
            if batch["status"] == "cancelling" and fields.get("status") == "in_progress":
                fields.pop("status")  # a cancel arrived meanwhile: it wins
            batch.update(fields)
            self.store.save_batch(batch)
            return batch

    def _end_run(self, batch_id: str, run: _Run) -> None:
        """Saves a finished run's counts, tokens and time with its batch, dropping it from the live runs
        at once (so that `get` counts it once, and its counts do not go back meanwhile)."""
        with self._lock:
            self.runs.pop(batch_id, None)
            batch = self.store.get_batch(batch_id)
            assert batch is not None
            usage = _plus(batch.get("usage") or _usage(), run.job.summary)
            elapsed = (batch.get("progress") or {}).get("elapsed_seconds", 0.0) + time.monotonic() - run.started
            batch.update(request_counts=self._counts(run.job, batch["request_counts"]["total"]), usage=usage,
                         progress=_progress(usage, elapsed, None))
            self.store.save_batch(batch)

    def _observe(self, output: EngineOutput) -> None:
        if self.latency is not None:
            self.latency.observe(output, "batch")

    def _register_results(self, batch_id: str, output: Path, errors: Path) -> dict[str, str]:
        """File records for a batch's non-empty result files. Their ids derive from the batch's,
        so registering again after a restart replaces rather than duplicates them."""
        files: dict[str, str] = {}
        for key, path, kind in (("output_file_id", output, "output"), ("error_file_id", errors, "errors")):
            if path.exists() and path.stat().st_size > 0:
                file_id = f"file-{batch_id.removeprefix('batch_')}-{kind}"
                files[key] = self.store.register_file(path, f"{batch_id}_{path.name}", "batch_output", file_id)["id"]
        return files

    def _run(self, batch_id: str, cancel: threading.Event) -> None:
        try:
            self._run_job(batch_id, cancel)
        except Exception as e:
            logger.exception("batch %s failed", batch_id)
            self._update(batch_id, status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": [{"code": "internal_error", "message": str(e),
                                                             "param": None, "line": None}]})
        finally:
            self.runs.pop(batch_id, None)
            self.cancels.pop(batch_id, None)

    def _run_job(self, batch_id: str, cancel: threading.Event) -> None:
        batch = self.store.get_batch(batch_id)
        assert batch is not None
        found = self.store.get_file(batch["input_file_id"])
        total = count_lines(found[1]) if found is not None else 0
        folder = self.store.batch_dir(batch_id)
        output, errors = folder / "output.jsonl", folder / "errors.jsonl"
        if found is None or total == 0:
            message = "the input file was deleted" if found is None else "the input file has no requests"
            self._update(batch_id, status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": [{"code": "invalid_file", "message": message,
                                                             "param": "input_file_id", "line": None}]},
                         **self._register_results(batch_id, output, errors))  # what an earlier run did
            return
        self._update(batch_id, status="in_progress", in_progress_at=batch["in_progress_at"] or int(time.time()),
                     request_counts={"total": total, "completed": 0, "failed": 0})
        # Past its completion window a batch stops, keeping what is done, as "expired".
        expired = threading.Event()
        deadline = threading.Timer(max(0.0, batch["expires_at"] - time.time()), lambda: (expired.set(), cancel.set()))
        deadline.daemon = True
        deadline.start()
        try:
            for _ in range(MAX_RUNS):
                started = time.monotonic()
                job = BatchJob(ObservedClient(self.engine_thread, BATCH_PRIORITY, self._observe), found[1], output,
                               errors, use_tqdm=False, cancel=cancel, endpoint=batch["endpoint"])
                run = self.runs[batch_id] = _Run(job, started)
                job.run()
                self._end_run(batch_id, run)
                if cancel.is_set() or not job.summary.failed_internally:
                    break
                logger.warning("batch %s: %d requests failed inside the engine; running them again", batch_id,
                               job.summary.failed_internally)
        finally:
            deadline.cancel()
        cancelled = cancel.is_set() and not expired.is_set()
        job.order_path.unlink(missing_ok=True)  # kept for a resume; a batch that ends here never resumes
        self._update(batch_id, status="cancelling" if cancelled else "finalizing",
                     finalizing_at=None if cancelled else int(time.time()))
        counts = self._counts(job, total)
        files = self._register_results(batch_id, output, errors)
        now = int(time.time())
        final = {"status": "expired", "expired_at": now} if expired.is_set() else \
            {"status": "cancelled", "cancelled_at": now} if cancelled else {"status": "completed", "completed_at": now}
        if final["status"] == "completed" and job.summary.failed_internally:
            message = (f"{job.summary.failed_internally} requests failed inside the engine in {MAX_RUNS} runs of the "
                       "batch (see the server's log); the output file holds the others")
            final = {"status": "failed", "failed_at": now,
                     "errors": {"object": "list", "data": [{"code": "internal_error", "message": message,
                                                            "param": None, "line": None}]}}
        self._update(batch_id, request_counts=counts, **files, **final)
