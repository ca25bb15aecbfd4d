"""`tokenmill run --ray`: a job on a local Ray (2 CPUs, 2 replicas, a tiny model), exactly once
through a killed replica and a killed driver. Each test starts its own Ray in a `tokenmill`
process, as a user would: ~15-40 s each, so those are marked slow (`pytest -m "not slow"` skips them).
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
from test_batch import job_lines, read_jsonl, write_jsonl

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


def replica_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"MapBatches(EngineReplica)" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


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
    for record in records:  # same record ids (resumable the same way) and the same usage
        assert record["id"] == by_id[record["custom_id"]]["id"]
        assert record["response"]["body"]["usage"] == by_id[record["custom_id"]]["response"]["body"]["usage"]
        assert record["response"]["body"]["model"] == "llama"

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
        victims = replica_pids()
        assert len(victims) == 2
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    ids = Counter(r["custom_id"] for r in shard_records(output_dir))
    assert len(ids) == 320 and max(ids.values()) == 1
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["succeeded"] == 320 and summary["failed"] == 0


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

    summary = run_ray(input_path, output_dir, tiny_models["llama"], "--batch-lines", "16")
    assert summary["skipped_already_done"] == survivors  # not computed again
    assert summary["succeeded"] == 320 - survivors
    assert len(summary["shards"]) == 2  # the killed run's and the rerun's
    records = shard_records(output_dir)
    assert Counter(r["custom_id"] for r in records) == Counter(f"req-{i:04d}" for i in range(320))


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
