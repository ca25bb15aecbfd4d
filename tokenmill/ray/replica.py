"""One engine replica: a Ray Data actor that runs batches of input lines through its own engine.

Ray Data constructs it once per actor (the model loads once) and calls it with batches of rows
`{"line_no", "line"}`. Each call runs its lines through the same LineExecutor as `tokenmill run`,
and returns one row per line with its encoded record, so the driver, the only writer of the
result files, can journal it; a line failed inside the engine has no record (`internal_error`),
so the driver writes nothing for it and it runs again on the next run of the job. Two calls may
run at once (ActorPoolStrategy's concurrent calls): both feed one engine thread, so the engine
stays busy while the next batch arrives.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tokenmill.batch.format import BatchLine, LineError, parse_line
from tokenmill.batch.runner import LineExecutor, LineTokens
from tokenmill.engine.client import ThreadClient
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.create import create_engine
from tokenmill.engine.threaded import EngineThread

# A finished line's LineTokens, as three result columns (zeros if it failed).
TOKEN_COLUMNS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens")
# One row per finished line: its encoded record ("" if it failed inside the engine), who ran it,
# whether it failed (with an error record, or inside the engine), its tokens.
RESULT_COLUMNS = ("record", "replica", "failed", "internal_error", *TOKEN_COLUMNS)


class EngineReplica:
    def __init__(self, engine_config: EngineConfig, fingerprint: str, threads: int, prefix_order: bool) -> None:
        torch.set_num_threads(threads)
        self.engine_thread = EngineThread(create_engine(engine_config))
        self.fingerprint = fingerprint
        self.prefix_order = prefix_order
        # NOTE: a restarted actor is a new process, so it shows as another replica in the summary.
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        results: dict[str, list[Any]] = {name: [] for name in RESULT_COLUMNS}

        def add_row(record: str, failed: bool, internal_error: bool, tokens: tuple[int, int, int]) -> None:
            for name, value in zip(RESULT_COLUMNS, (record, self.name, failed, internal_error, *tokens)):
                results[name].append(value)

        def sink(line_no: int, record: dict[str, Any], tokens: LineTokens) -> None:
            add_row(json.dumps(record, ensure_ascii=False), tokens is None, False, tokens or (0, 0, 0))

        def undone(line_no: int) -> None:
            add_row("", False, True, (0, 0, 0))

        def lines() -> Iterator[tuple[int, BatchLine | LineError]]:
            for line_no, text in zip(batch["line_no"].tolist(), batch["line"].tolist()):
                try:  # the driver validated the line already; this rebuilds it here
                    line: BatchLine | LineError = parse_line(text, line_no)
                except LineError as e:
                    line = e
                yield line_no, line

        client = ThreadClient(self.engine_thread, priority=0)
        LineExecutor(client, self.fingerprint, sink, undone, prefix_order=self.prefix_order,
                     window=len(batch["line_no"])).run(lines())
        return results
