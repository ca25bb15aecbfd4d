"""The engine's own thread: a step loop that many clients share.

The server runs one `EngineThread` (and each Ray replica one): every HTTP request and every batch
job hands it requests through a `ThreadClient` (engine/client.py) and gets outputs back through a
callback, so all of them share one continuous batch. The step loop is the only code that touches
the engine; other threads read only its `frontend` and `metrics()` (see `Engine`'s docstring).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engine.create import AnyEngine
from tokenmill.engine.engine import EngineMetrics
from tokenmill.errors import INTERNAL_ERROR, RequestError
from tokenmill.frontend import Frontend
from tokenmill.outputs import EngineOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Sink = Callable[[EngineOutput], None]


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams | PoolingParams
    priority: int
    stream: bool
    sink: Sink


class EngineThread:
    def __init__(self, engine: AnyEngine) -> None:
        self.engine = engine
        self.frontend = Frontend.from_engine(engine)  # built here, before the loop owns the engine
        self._commands: queue.SimpleQueue[_Add | str | None] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._loop, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def add(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams | PoolingParams,
            sink: Sink, priority: int = 0, stream: bool = False) -> None:
        """Queues a request; its outputs (and an immediate error, if any) go to sink, in this thread."""
        self._commands.put(_Add(request_id, prompt, token_ids, params, priority, stream, sink))

    def abort(self, request_id: str) -> None:
        self._commands.put(request_id)

    def metrics(self) -> EngineMetrics:
        return self.engine.metrics()  # NOTE: safe from any thread, by Engine's contract

    def stop(self) -> None:
        self._commands.put(None)
        self._thread.join()

    def _apply(self, command: _Add | str) -> None:
        if isinstance(command, str):
            self.engine.abort_request(command)
            self._sinks.pop(command, None)
            return
        try:
            failed = self.engine.add_request(command.request_id, command.prompt, command.token_ids,
                                             command.params, command.priority, command.stream)
        except Exception as e:  # e.g. an id already in use: that request fails, the loop goes on
            failed = RequestOutput(command.request_id, command.prompt, command.token_ids, [], finished=True,
                                   error=RequestError("invalid_request", str(e)))
        if failed is not None:
            command.sink(failed)
        else:
            self._sinks[command.request_id] = command.sink

    def _loop(self) -> None:
        while True:
            # Block for work only when the engine has none; otherwise take what has arrived.
            try:
                command = self._commands.get(block=not self.engine.has_unfinished_requests())
                while True:
                    if command is None:
                        return
                    self._apply(command)
                    command = self._commands.get_nowait()
            except queue.Empty:
                pass
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                logger.exception("engine step failed; failing the requests in flight")
                for request_id, sink in list(self._sinks.items()):
                    self.engine.abort_request(request_id)
                    sink(RequestOutput(request_id, None, [], [], finished=True,
                                       error=RequestError(INTERNAL_ERROR, "internal engine error")))
                self._sinks.clear()
                continue
            for output in outputs:
                sink = self._sinks.pop(output.request_id) if output.finished else self._sinks.get(output.request_id)
                if sink is None:
                    continue
                try:
                    sink(output)
                except Exception:  # a consumer gone wrong must not stop everyone else's requests
                    logger.exception("delivering the output of %s failed", output.request_id)
