"""`tokenmill run --ray`: a job on a local Ray (2 CPUs, 2 replicas, a tiny model), exactly once
through a killed replica and a killed driver (during the ordering pass and during the run); lines
sharing a prompt anywhere in the file go to one replica call together. Each test starts its own Ray
in a `tokenmill` process, as a user would: ~15-60 s each, so those are marked slow (`pytest -m "not
slow"` skips them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_batch import SYSTEMS, chat_line, job_lines, read_jsonl, write_jsonl

# Ray is an optional extra; the option checks below need no Ray.
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="tokenmill[ray] is not installed")


def ray_command(input_path: Path, output_dir: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o", str(output_dir), "--ray",
            "--replicas", "2", "--model", str(model), "--dtype", "float32", "--max-num-seqs", "8", *extra]


def run_ray(*args: str | Path, timeout: float = 300) -> dict:
    result = subprocess.run(ray_command(*args), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((Path(args[1]) / "summary.json").read_text())


def shard_records(output_dir: Path) -> list[dict]:
    return [r for shard in sorted(output_dir.glob("output-*.jsonl")) for r in read_jsonl(shard)]


def answers(records: list[dict]) -> dict[str, str]:
    return {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in records}


def wait_for_records(output_dir: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if sum(shard.read_bytes().count(b"\n") for shard in output_dir.glob("output-*.jsonl")) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the job ended (or stalled) before it could be interrupted: make it longer")


def wait_for_replicas(count: int, process: subprocess.Popen, timeout: float = 240) -> list[int]:
    """The PIDs of `count` replica processes, in the order their constructors started, once that
    many have. NOTE: one replica can return calls before another's constructor has started (on a
    loaded machine their processes import torch for seconds, side by side); the job cannot end
    without every replica, as the calls given to one wait for it."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline and process.poll() is None:
        seen += [pid for pid in replica_pids() if pid not in seen]
        if len(seen) >= count:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"not {count} replica processes: {seen}")


def replica_pids() -> list[int]:
    """The replicas' processes: Ray titles an actor's `ray::EngineReplica...` from its constructor
    on. NOTE: a child that a replica forks (its kernel build's ninja) bears that title until it
    execs, so a titled process whose parent is titled too is left out."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ray::EngineReplica" in (entry / "cmdline").read_bytes():
                # /proc/PID/stat: "pid (name) state ppid ...", the name being anything
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    return [pid for pid, parent in parents.items() if parent not in parents]


@pytest.mark.slow
@needs_ray
def test_two_replicas_match_the_local_runner(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    lines = job_lines(120)
    input_path = write_jsonl(tmp_path / "in.jsonl", [*lines[:60], "not json", lines[3], *lines[60:]])
    summary = run_ray(input_path, tmp_path / "ray", tiny_models["llama"], "--batch-lines", "16")

    local = subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o",
                            str(tmp_path / "local.jsonl"), "--model", str(tiny_models["llama"]), "--dtype", "float32",
                            "--max-num-seqs", "8"], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    local_records = read_jsonl(tmp_path / "local.jsonl")
    records = shard_records(tmp_path / "ray")
    assert len(records) == 120
    assert answers(records) == answers(local_records)
    by_id = {r["custom_id"]: r for r in local_records}
    for record in records:  # same record ids (resumable the same way) and the same token counts
        assert record["id"] == by_id[record["custom_id"]]["id"]
        usage, local_usage = (r["response"]["body"]["usage"] for r in (record, by_id[record["custom_id"]]))
        assert {**usage, "prompt_tokens_details": None} == {**local_usage, "prompt_tokens_details": None}
        assert record["response"]["body"]["model"] == "llama"
    # NOTE: which lines find their prompt cached differs: the local run computes each of the 4
    # system prompts once; on Ray, each replica computes those its calls bring it once.
    computed = sum(r["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for r in records)
    assert computed <= 4 * 2

    errors = read_jsonl(tmp_path / "ray" / "errors.jsonl")
    assert sorted(e["error"]["code"] for e in errors) == ["duplicate_custom_id", "invalid_json"]
    assert errors == read_jsonl(tmp_path / "local.errors.jsonl")
    assert summary["succeeded"] == 120 and summary["failed"] == 2 and summary["total_lines"] == 122
    # NOTE: not "both replicas took batches": one that is slow to load may find none left.
    assert 1 <= len(summary["replicas"]) <= 2, summary["replicas"]
    assert sum(r["succeeded"] for r in summary["replicas"].values()) == 120
    assert summary["completion_tokens"] == 120 * 24
    assert summary["prefix_cache_hit_rate"] > 0.5  # lines sharing a system prompt went together


@pytest.mark.slow
@needs_ray
def test_a_killed_replica_is_restarted_and_the_job_completes_exactly_once(
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(320))
    output_dir = tmp_path / "out"
    process = subprocess.Popen(ray_command(input_path, output_dir, tiny_models["llama"], "--batch-lines", "16"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(output_dir, 32, process)
        replicas = wait_for_replicas(2, process)
        # NOTE: the replica up last, so that it still has calls to run: either its first two, or,
        # when both were up by the 32nd record, those it holds while the driver has more (20 calls
        # of 16 lines, 2 in flight per replica).
        os.kill(replicas[-1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    ids = Counter(r["custom_id"] for r in shard_records(output_dir))
    assert len(ids) == 320 and max(ids.values()) == 1
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["succeeded"] == 320 and summary["failed"] == 0
    restarted = {int(name.rsplit(":", 1)[1]) for name in summary["replicas"]} - set(replicas)
    assert restarted, summary["replicas"]  # a new process, not one of the two, returned calls


@pytest.mark.slow
@needs_ray
def test_driver_killed_then_rerun_completes_without_recomputing(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(320))
    output_dir = tmp_path / "out"
    command = ray_command(input_path, output_dir, tiny_models["llama"], "--batch-lines", "16")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_records(output_dir, 48, process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    shard = output_dir / "output-00000.jsonl"
    with shard.open("ab") as f:  # what a crash mid-write leaves: half a record
        f.write(b'{"id": "batch_req_torn", "custom_')
    survivors = shard.read_bytes().count(b"\n")
    assert 0 < survivors < 320
    assert (output_dir / "order.sqlite3").exists()  # the finished first pass, kept for the rerun

    summary = run_ray(input_path, output_dir, tiny_models["llama"], "--batch-lines", "16")
    assert summary["skipped_already_done"] == survivors  # not computed again
    assert summary["succeeded"] == 320 - survivors
    assert len(summary["shards"]) == 2  # the killed run's and the rerun's
    records = shard_records(output_dir)
    assert Counter(r["custom_id"] for r in records) == Counter(f"req-{i:04d}" for i in range(320))
    assert not (output_dir / "order.sqlite3").exists()


@pytest.mark.slow
@needs_ray
def test_scattered_shared_prompts_go_to_one_replica_call_together(tmp_path: Path,
                                                                  tiny_models: dict[str, Path]) -> None:
    """Six system prompts, eight lines each, dealt through the file in turn: calls of 16 ordered
    lines take two whole groups each (the response ids name the replica call's run)."""
    lines = [chat_line(f"req-{i:02d}", f"You are grader {i % 6}. Say pass or fail, nothing else. " * 4,
                       f"essay number {i}", max_tokens=2, temperature=0) for i in range(48)]
    summary = run_ray(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out", tiny_models["llama"],
                      "--batch-lines", "16")
    records = shard_records(tmp_path / "out")
    assert len(records) == 48 and summary["succeeded"] == 48

    def call_of(record: dict) -> str:  # a call's LineExecutor names its requests "<prefix>-<run id>-<line>"
        return record["response"]["body"]["id"].split("-")[1]

    calls: dict[int, set[str]] = {}
    for record in records:
        calls.setdefault(int(record["custom_id"].removeprefix("req-")) % 6, set()).add(call_of(record))
    assert all(len(group) == 1 for group in calls.values()), calls
    assert Counter(call for group in calls.values() for call in group) == Counter(
        {call: 2 for group in calls.values() for call in group})  # 3 calls of 2 groups
    assert summary["ordering_seconds"] > 0 and summary["ordering_disk_bytes"] > 0
    assert not (tmp_path / "out" / "order.sqlite3").exists()  # every line has its record


@pytest.mark.slow
@needs_ray
def test_driver_killed_while_ordering_then_rerun_completes_exactly_once(
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    lines: list[dict | str] = [chat_line(f"req-{i:04d}", SYSTEMS[i % 4], f"item {i}", max_tokens=1, temperature=0)
                               for i in range(4000)]
    for i in range(0, 400, 5):  # errors the driver writes early in its first pass
        lines[i] = "{not json" if i % 2 else {"custom_id": f"embed-{i}", "method": "POST",
                                              "url": "/v1/embeddings", "body": {"input": "x"}}
    lines[3000] = lines[1]  # a duplicate custom_id
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output_dir = tmp_path / "out"
    building, errors = output_dir / "order.sqlite3.building", output_dir / "errors.jsonl"
    process = subprocess.Popen(ray_command(input_path, output_dir, tiny_models["llama"], "--batch-lines", "64"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if building.exists() and errors.exists() and errors.stat().st_size:
                break
            time.sleep(0.01)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    written = read_jsonl(errors)
    assert written and not (output_dir / "order.sqlite3").exists() and not shard_records(output_dir), \
        "the driver was not killed during its ordering pass"

    summary = run_ray(input_path, output_dir, tiny_models["llama"], "--batch-lines", "64", timeout=600)
    assert summary["skipped_already_done"] == len(written)
    records, errors_now = shard_records(output_dir), read_jsonl(errors)
    expected = Counter(line["custom_id"] for line in lines if isinstance(line, dict)) + Counter([None] * 40)
    assert Counter(r["custom_id"] for r in records + errors_now) == expected  # bad JSON has no custom_id
    assert len({r["id"] for r in records + errors_now}) == 4000
    assert Counter(e["error"]["code"] for e in errors_now) == {"invalid_json": 40, "wrong_task": 40,
                                                                "duplicate_custom_id": 1}
    assert summary["succeeded"] == len(records) == 4000 - 81
    assert not building.exists() and not (output_dir / "order.sqlite3").exists()


def test_options_that_do_not_apply_are_refused(tmp_path: Path) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(1))
    for extra in (["--ray", "--sorted"], ["--ray", "--errors", str(tmp_path / "e.jsonl")], ["--replicas", "2"]):
        result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o",
                                 str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.startswith("tokenmill: error: "), result.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_ray
def test_a_replica_that_cannot_start_is_a_clear_error(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(4))
    command = ray_command(input_path, tmp_path / "out", tiny_models["llama"], "--kv-cache-memory", "100B")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("tokenmill: error: an engine replica could not start: "
                                              "ValueError: kv_cache_memory=100 holds no KV block (8192 bytes each)")
