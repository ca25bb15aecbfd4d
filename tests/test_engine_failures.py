"""A failure inside the engine (a bug, an out-of-memory) fails only the requests of its step, and the
faces treat it as the engine's fault, not the request's: a batch job writes no record for those
lines and runs them on its next run, exactly once; the server answers 500 and goes on.

The failure is real: the real model runner raises inside a real engine step.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import uvicorn
from test_batch import job_lines, read_jsonl, write_jsonl

from tokenmill.cli import main
from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.threaded import EngineThread
from tokenmill.server.app import create_app
from tokenmill.server.batches import BatchManager
from tokenmill.server.store import Store

RUN = ModelRunner.run


def fail_steps(monkeypatch: pytest.MonkeyPatch, when: Callable[[ScheduledBatch], bool], times: int = 1) -> list[int]:
    """Makes the model runner raise, as an out-of-memory would, in the next `times` steps whose batch
    `when` picks. Returns a list that gets one entry per failure made."""
    made: list[int] = []

    def run(runner: ModelRunner, batch: ScheduledBatch) -> object:
        if len(made) < times and when(batch):
            made.append(len(batch.seqs))
            raise RuntimeError("injected: out of memory")
        return RUN(runner, batch)

    monkeypatch.setattr(ModelRunner, "run", run)
    return made


def answers(records: list[dict]) -> dict[str, str]:
    return {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in records}


def test_a_failed_step_leaves_its_lines_for_the_next_run(tmp_path: Path, tiny_models: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(24) + ["not json"])
    output = tmp_path / "out.jsonl"
    args = ["run", str(input_path), "-o", str(output), "--model", str(tiny_models["llama"]), "--dtype", "float32",
            "--max-num-seqs", "4"]
    steps = itertools.count(1)
    failed = fail_steps(monkeypatch, lambda batch: next(steps) == 3)
    assert main(args) == 1
    err = capsys.readouterr().err
    first = json.loads((tmp_path / "out.summary.json").read_text())
    assert failed and first["failed_internally"] == failed[0]  # the requests of that one step
    assert "lines failed inside the engine" in err and "run the same command again" in err
    assert (first["succeeded"], first["failed"]) == (24 - failed[0], 1)
    written = read_jsonl(output)
    assert len(written) == 24 - failed[0]
    assert [e["error"]["code"] for e in read_jsonl(tmp_path / "out.errors.jsonl")] == ["invalid_json"]

    monkeypatch.setattr(ModelRunner, "run", RUN)
    assert main(args) == 0
    second = json.loads((tmp_path / "out.summary.json").read_text())
    assert (second["succeeded"], second["failed_internally"]) == (failed[0], 0)
    assert second["skipped_already_done"] == 24 - failed[0] + 1
    records = read_jsonl(output)
    assert sorted(r["custom_id"] for r in records) == sorted(f"req-{i:04d}" for i in range(24))
    assert len(read_jsonl(tmp_path / "out.errors.jsonl")) == 1
    # The failed step left nothing behind in the prefix cache: the answers are a clean run's.
    assert main([*args[:3], str(tmp_path / "clean.jsonl"), *args[4:]]) == 0
    assert answers(records) == answers(read_jsonl(tmp_path / "clean.jsonl"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[openai.OpenAI]:
    """A real server in this process (so that its engine can be made to fail), on a real port."""
    engine_thread = EngineThread(Engine(EngineConfig(model=str(tiny_models["llama"]), dtype="float32",
                                                     kv_cache_memory="64MiB", max_num_seqs=4)))
    batches = BatchManager(Store(tmp_path / "data"), engine_thread)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(engine_thread, batches.store, batches, None), port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not web.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    web.should_exit = True
    thread.join()
    engine_thread.stop()


MARK = [7, 7, 7, 7, 7, 7, 7, 7, 7]  # a prompt start that no other request here has


def marked(batch: ScheduledBatch, min_output_tokens: int = 0) -> bool:
    return any(s.token_ids[:len(MARK)] == MARK and s.num_output_tokens >= min_output_tokens for s in batch.seqs)


def test_the_server_answers_500_for_a_failure_inside_the_engine(server: openai.OpenAI, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = server.models.list().data[0].id
    failed = fail_steps(monkeypatch, marked, times=2)
    for stream in (False, True):  # both fail in their first step, before any token is sent
        with pytest.raises(openai.InternalServerError) as e:
            server.completions.create(model=model, prompt=MARK + [1], max_tokens=4, stream=stream)
        assert (e.value.type, e.value.code) == ("server_error", "internal_error")
    assert len(failed) == 2
    ok = server.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 4

    failed = fail_steps(monkeypatch, lambda batch: marked(batch, min_output_tokens=2))
    stream = server.completions.create(model=model, prompt=MARK + [2], max_tokens=16, stream=True,
                                       extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError, match="internal engine error"):
        list(stream)  # the failure comes after the first tokens: as an error event
    assert failed

    # A request's own fault stays a 400 naming its code and field; a chat prompt is its messages.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            server.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 600}],
                                           stream=stream)
        assert (e.value.code, e.value.param) == ("context_length_exceeded", "messages")


def test_a_server_batch_runs_lines_failed_inside_the_engine_again(server: openai.OpenAI, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    lines = job_lines(12)
    uploaded = server.files.create(file=write_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
    steps = itertools.count(1)
    failed = fail_steps(monkeypatch, lambda batch: next(steps) == 2)
    batch = server.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := server.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert failed and batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (12, 0)
    records = [json.loads(line) for line in server.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in records) == sorted(line["custom_id"] for line in lines)
