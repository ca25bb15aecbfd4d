"""How the faces reach the engine: one `EngineClient` protocol, in the caller's thread or through
the shared engine thread, and `drive`, the one loop that keeps a window of requests in flight.

No face touches the `Engine` itself: they add requests, read outputs and abort through a client,
tokenize and compile grammars with its `frontend`, and read its `metrics()`. Only `LocalClient`
and the `EngineThread` (engine/threaded.py) step the engine.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from tokenmill.engine.create import AnyEngine
from tokenmill.engine.engine import EngineMetrics
from tokenmill.engine.threaded import EngineThread, Sink
from tokenmill.frontend import Frontend
from tokenmill.outputs import EngineOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams


class EngineClient(Protocol):
    frontend: Frontend  # the engine's tokenizer, chat template, model name, settings, grammar compiler

    def add(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams | PoolingParams,
            stream: bool = False) -> None:
        """Queues a request. One that cannot run comes back from `next_outputs` as a finished output
        with its `RequestError`. A `stream` request reports after every step that adds to it."""

    def next_outputs(self, timeout: float = 0.5) -> list[EngineOutput]:
        """The outputs ready now: after one engine step (in-thread), or whatever arrived within
        `timeout` (threaded; maybe none, so that callers can check for a cancel)."""

    def abort(self, request_id: str) -> None:
        """Drops a request (its KV blocks are freed); it reports nothing more."""

    def metrics(self) -> EngineMetrics: ...


class LocalClient:
    """Drives the engine in the caller's thread (`LLM`, `tokenmill run`, `tokenmill bench`)."""

    def __init__(self, engine: AnyEngine) -> None:
        self.engine = engine
        self.frontend = Frontend.from_engine(engine)
        self._failed: list[EngineOutput] = []  # requests that could not run, reported by the next call

    def add(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams | PoolingParams,
            stream: bool = False) -> None:
        failed = self.engine.add_request(request_id, prompt, token_ids, params, stream=stream)
        if failed is not None:
            self._failed.append(failed)

    def next_outputs(self, timeout: float = 0.5) -> list[EngineOutput]:
        failed, self._failed = self._failed, []
        return failed + self.engine.step()

    def abort(self, request_id: str) -> None:
        self._failed = [o for o in self._failed if o.request_id != request_id]
        self.engine.abort_request(request_id)

    def metrics(self) -> EngineMetrics:
        return self.engine.metrics()


class ThreadClient:
    """Hands requests to a shared EngineThread at a priority (lower runs first): the server's HTTP
    requests and batch jobs, a Ray replica's batches.

    Outputs wait in a queue for `next_outputs`, unless `sink` is given: then the engine thread hands
    each output to it at once (the server's handlers pass one that wakes their event loop).
    """

    def __init__(self, engine_thread: EngineThread, priority: int, sink: Sink | None = None) -> None:
        self.engine_thread = engine_thread
        self.frontend = engine_thread.frontend
        self.priority = priority
        self._outputs: queue.SimpleQueue[EngineOutput] = queue.SimpleQueue()
        self._sink = sink or self._outputs.put

    def add(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams | PoolingParams,
            stream: bool = False) -> None:
        self.engine_thread.add(request_id, prompt, token_ids, params, self._sink, self.priority, stream)

    def next_outputs(self, timeout: float = 0.5) -> list[EngineOutput]:
        try:
            outputs = [self._outputs.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                outputs.append(self._outputs.get_nowait())
            except queue.Empty:
                return outputs

    def abort(self, request_id: str) -> None:
        self.engine_thread.abort(request_id)

    def metrics(self) -> EngineMetrics:
        return self.engine_thread.metrics()


class Submission(NamedTuple):
    request_id: str
    prompt: str | None  # the text the token ids came from, if any; only handed back in outputs
    token_ids: list[int]
    params: SamplingParams | PoolingParams


def drive(client: EngineClient, requests: Iterator[Submission],
          window: int | None = None) -> Iterator[list[EngineOutput]]:
    """Runs requests through client with at most `window` of them in flight (default: twice
    max_num_seqs, enough to keep the batch full and few enough to bound memory), pulling the next
    from `requests` only when one finishes, so a lazy input is read as it is needed.

    Yields what each `next_outputs` call returned of these requests (maybe nothing: the caller can
    check for a cancel between calls). Ends when every request has finished; closed early or
    interrupted, it aborts the requests in flight, leaving the engine clean.
    """
    window = window or 2 * client.frontend.config.max_num_seqs
    in_flight: set[str] = set()
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < window:
                request = next(requests, None)
                if request is None:
                    exhausted = True
                    break
                client.add(*request)
                in_flight.add(request.request_id)
            if not in_flight:
                return
            outputs = [o for o in client.next_outputs() if o.request_id in in_flight]
            in_flight.difference_update(o.request_id for o in outputs if o.finished)
            yield outputs
    finally:
        for request_id in in_flight:
            client.abort(request_id)
