"""`tokenmill plan`: what it says of a job against what `tokenmill run` then does with it.

The real engine (a tiny random model, fast) for both: the plan's error records are the run's, its
counts are exact on a hand-made file, its prefix-cache estimate is the run's summary within two
points (with a KV pool small enough to evict), and a second plan of the same job comes from the
calibration cache without running the engine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_batch import SYSTEMS, chat_line, read_jsonl, run_cli, write_jsonl
from test_ray import needs_ray
from torch.utils.cpp_extension import _get_build_directory

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.plan import CalibrationCache, Plan, format_table, plan_job

# A pool of 40 blocks of 16 tokens and 4 sequences at a time: the job's shared prefixes are
# evicted and recomputed, so the estimate has to follow the engine's LRU, not just count sharing.
SMALL_POOL = {"kv_cache_memory": "320KiB", "max_num_seqs": 4}


def engine_args(config: dict[str, object]) -> list[str]:
    return [arg for name, value in config.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def tiny(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def engine(tiny: Path) -> Engine:
    return Engine(EngineConfig(model=str(tiny), dtype="float32", **SMALL_POOL))


def plan_of(engine: Engine, path: Path, tmp_path: Path, **kwargs: object) -> Plan:
    return plan_job(engine, path, cache=CalibrationCache(tmp_path / "cache"), keep_errors=100, **kwargs)


def job_with_bad_lines(path: Path) -> Path:
    good = [chat_line(f"req-{i}", SYSTEMS[i % 4], f"message {i} " * (1 + i % 9), max_tokens=3, temperature=0)
            for i in range(48)]
    bad: list[dict | str] = [
        '{"custom_id": "broken",',
        {**chat_line("req-3", SYSTEMS[0], "again"), "custom_id": "req-3"},
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        chat_line("too-long", SYSTEMS[0], "word " * 600),
        chat_line("hot", SYSTEMS[1], "x", temperature="hot"),
        {"custom_id": "bad-prompt", "method": "POST", "url": "/v1/completions", "body": {"prompt": [[49999999]]}},
    ]
    return write_jsonl(path, good[:20] + bad[:3] + good[20:] + bad[3:])


def test_errors_and_prefix_cache_are_the_runs(engine: Engine, tiny: Path, tmp_path: Path) -> None:
    input_path = job_with_bad_lines(tmp_path / "in.jsonl")
    plan = plan_of(engine, input_path, tmp_path)
    run_cli(input_path, "-o", tmp_path / "out.jsonl", "--model", tiny, "--dtype", "float32", *engine_args(SMALL_POOL))

    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    by_line = sorted(errors, key=lambda record: record["id"])
    assert sorted(plan.first_errors, key=lambda record: record["id"]) == by_line  # every field, ids included
    assert plan.error_lines == len(errors) == 6
    assert plan.error_codes == {"invalid_json": 1, "duplicate_custom_id": 1, "wrong_task": 1,
                                "context_length_exceeded": 1, "invalid_type": 1, "invalid_value": 1}
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert plan.prompt_tokens == summary["prompt_tokens"]
    assert plan.estimated_output_tokens == summary["completion_tokens"]  # max_tokens=3, a random model: no EOS
    assert abs(plan.estimated_prefix_cache_hit_rate - summary["prefix_cache_hit_rate"]) <= 0.02
    assert 0 < plan.estimated_prefix_cache_hit_rate < 0.9  # evictions: the pool cannot keep every prefix


def test_counts_are_exact(engine: Engine, tmp_path: Path) -> None:
    chats = [chat_line(f"c{i}", SYSTEMS[0], f"question {i} " * (i + 1), max_tokens=5) for i in range(3)]
    # No max_tokens: up to the context, which a prompt this long leaves short (a random model never stops).
    unbounded = chat_line("n3", SYSTEMS[1], "three answers please " + "word " * 380, n=3, temperature=0.8)
    completion = {"custom_id": "p2", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": ["Once upon a time", "In a galaxy"], "max_tokens": 3, "n": 2}}
    input_path = write_jsonl(tmp_path / "in.jsonl", [*chats, "", unbounded, completion, "{oops", chats[0]])
    plan = plan_of(engine, input_path, tmp_path)

    tokenizer = engine.tokenizer

    def chat_tokens(line: dict) -> int:
        text = tokenizer.apply_chat_template(line["body"]["messages"], tokenize=False, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))

    per_line = sorted([*map(chat_tokens, chats), chat_tokens(unbounded),
                       sum(len(tokenizer.encode(p)) for p in completion["body"]["prompt"])])
    assert (plan.lines, plan.error_lines) == (7, 2)
    assert plan.lines_by_endpoint == {"/v1/chat/completions": 4, "/v1/completions": 1}
    assert plan.prompt_tokens == sum(per_line)
    nearest_rank = [per_line[math.ceil(q * len(per_line)) - 1] for q in (0.5, 0.95)]
    assert [plan.prompt_tokens_p50, plan.prompt_tokens_p95, plan.prompt_tokens_max] == [*nearest_rank, per_line[-1]]
    assert (plan.lines_with_n_above_1, plan.samples_of_n_above_1) == (2, 5)
    assert plan.requested_output_tokens == 3 * 5 + 2 * 2 * 3
    assert plan.requests_without_max_tokens == 1
    assert plan.context_allowed_output_tokens == 3 * 5 + 2 * 2 * 3 + 3 * (engine.max_model_len - chat_tokens(unbounded))
    assert [e["custom_id"] for e in plan.first_errors] == [None, "c0"]


def test_a_second_plan_comes_from_the_cache(engine: Engine, tmp_path: Path) -> None:
    lines = [chat_line(f"r{i}", SYSTEMS[i % 2], f"item {i}", max_tokens=4) for i in range(30)]
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    first = plan_of(engine, input_path, tmp_path)
    steps = engine.stats.steps
    second = plan_of(engine, input_path, tmp_path)
    assert first.calibration.ran_engine and not second.calibration.ran_engine
    assert engine.stats.steps == steps  # the engine did not step
    assert first.estimated_seconds == second.estimated_seconds > 0
    assert first.estimated_prefix_cache_hit_rate == second.estimated_prefix_cache_hit_rate
    assert "measured now" in format_table(first) and "from the cache" in format_table(second)


def test_json_keys_from_the_command(tiny: Path, tmp_path: Path) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", SYSTEMS[0], f"item {i}", max_tokens=2)
                                                     for i in range(12)] + ["not json"])
    # A home of its own for the calibration cache; the kernels' build stays where it is.
    env = {**os.environ, "HOME": str(tmp_path), "TORCH_EXTENSIONS_DIR": _get_build_directory("", False)}
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "plan", str(input_path), "--model", str(tiny),
                             "--dtype", "float32", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert {"lines", "error_lines", "prompt_tokens", "estimated_seconds", "estimated_prefix_cache_hit_rate",
            "first_errors", "shared_prefixes", "peak_kv_bytes", "calibration", "ray"} <= plan.keys()
    assert (plan["lines"], plan["error_lines"]) == (13, 1)
    assert 0 <= plan["estimated_prefix_cache_hit_rate"] <= 1 and plan["estimated_seconds"] > 0
    assert list((tmp_path / ".cache" / "tokenmill" / "plan").glob("*.json"))


@needs_ray
def test_ray_replicas_share_the_job(engine: Engine, tmp_path: Path) -> None:
    lines = [chat_line(f"r{i}", SYSTEMS[i % 4], f"item {i}", max_tokens=2) for i in range(600)]
    plan = plan_of(engine, write_jsonl(tmp_path / "in.jsonl", lines), tmp_path, replicas=2)
    assert plan.ray is not None and plan.ray.replicas == 2
    assert sum(plan.ray.lines_per_replica) == 600 and min(plan.ray.lines_per_replica) > 0
    assert plan.ray.threads_per_replica == max(1, (os.cpu_count() or 1) // 2)
