"""One engine replica: a Ray actor that runs calls of consecutive ordered input lines through its own engine.

The driver starts it once per replica (the model loads once) and calls `run` with a call's lines,
`(line number, line as JSON)`. Each call runs its lines through the same LineExecutor as `tokenmill
run` and returns a `CallResult`: each line's encoded record and tokens, so the driver, the only
writer of the result files, can journal them. A line failed inside the engine has no record, so the
driver writes nothing for it and it runs again on the next run of the job. Two calls run at once
(the actor's max_concurrency): both feed one engine thread, so the engine stays busy while the next
call arrives.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.batch.format import BatchLine, LineError, parse_line
from tokenmill.batch.runner import LineExecutor, LineTokens
from tokenmill.engine.client import ThreadClient
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.create import create_engine
from tokenmill.engine.threaded import EngineThread


@dataclass
class CallResult:
    replica: str  # host:pid
    # One per finished line: its encoded record (None: it failed inside the engine, no record) and
    # its tokens (None: the record is an error record).
    lines: list[tuple[str | None, LineTokens]] = field(default_factory=list)


class EngineReplica:
    def __init__(self, engine_config: EngineConfig, fingerprint: str, threads: int, prefix_order: bool) -> None:
        torch.set_num_threads(threads)
        self.engine_thread = EngineThread(create_engine(engine_config))
        self.fingerprint = fingerprint
        self.prefix_order = prefix_order
        # NOTE: a restarted actor is a new process, so it shows as another replica in the summary.
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, lines: list[tuple[int, str]]) -> CallResult:
        result = CallResult(self.name)

        def sink(line_no: int, record: dict[str, Any], tokens: LineTokens) -> None:
            result.lines.append((json.dumps(record, ensure_ascii=False), tokens))

        def undone(line_no: int) -> None:
            result.lines.append((None, None))

        def parsed() -> Iterator[tuple[int, BatchLine | LineError]]:
            for line_no, text in lines:
                try:  # the driver validated the line already; this rebuilds it here
                    line: BatchLine | LineError = parse_line(text, line_no)
                except LineError as e:
                    line = e
                yield line_no, line

        client = ThreadClient(self.engine_thread, priority=0)
        LineExecutor(client, self.fingerprint, sink, undone, prefix_order=self.prefix_order,
                     window=len(lines)).run(parsed())
        return result
