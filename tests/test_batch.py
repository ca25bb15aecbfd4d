"""`tokenmill run`: the OpenAI Batch format, bad lines, crash safety, exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

SYSTEMS = [f"You are classifier number {i}. Read the message and answer with one word: yes or no. " * 3
           for i in range(4)]


def chat_line(custom_id: str, system: str, user: str, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "anything", "messages": [{"role": "system", "content": system},
                                                       {"role": "user", "content": user}], **body}}


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run_cli(*args: str | Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_bad_lines_become_errors_and_good_lines_succeed(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    good = [chat_line(f"chat-{i}", SYSTEMS[i % 4], f"message {i}", max_tokens=4, temperature=0) for i in range(6)]
    good.append({"custom_id": "completion-1", "method": "POST", "url": "/v1/completions",
                 "body": {"prompt": "Once upon a time", "max_tokens": 5, "logprobs": 2, "temperature": 0}})
    good.append(chat_line("chat-logprobs", SYSTEMS[0], "hi", max_completion_tokens=3, logprobs=True,
                          top_logprobs=2, n=2, temperature=0.7, seed=5))
    bad: list[dict | str] = [
        '{"custom_id": "broken", "method": "POST",',
        {"method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
        {**chat_line("chat-0", SYSTEMS[0], "again"), "custom_id": "chat-0"},
        {**chat_line("get", SYSTEMS[0], "x"), "method": "GET"},
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},  # a generative model
        {"custom_id": "string-body", "method": "POST", "url": "/v1/completions", "body": "prompt"},
        chat_line("negative", SYSTEMS[0], "x", max_tokens=-5),
        chat_line("hot", SYSTEMS[0], "x", temperature="hot"),
        {"custom_id": "no-list", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": "hi"}},
        chat_line("top-p", SYSTEMS[0], "x", top_p=3),
        chat_line("too-long", SYSTEMS[0], "word " * 600),
        {"custom_id": "", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
    ]
    expected_codes = ["invalid_json", "missing_custom_id", "duplicate_custom_id", "invalid_method", "wrong_task",
                      "invalid_body", "invalid_value", "invalid_type", "invalid_type", "invalid_value",
                      "context_length_exceeded", "missing_custom_id"]
    lines = good[:3] + bad[:6] + [""] + good[3:] + bad[6:]
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    result = run_cli(input_path, "-o", output, "--model", tiny_models["llama"], "--dtype", "float32",
                     "--quantization", "int8")

    records = read_jsonl(output)
    assert sorted(r["custom_id"] for r in records) == sorted(line["custom_id"] for line in good)
    for record in records:
        body = record["response"]["body"]
        assert record["error"] is None and record["response"]["status_code"] == 200
        if body["object"] == "chat.completion":
            parsed = ChatCompletion.model_validate(body)
            generated = [len(c.logprobs.content) for c in parsed.choices if c.logprobs is not None]
        else:
            parsed = Completion.model_validate(body)
            generated = [len(c.logprobs.tokens) for c in parsed.choices if c.logprobs is not None]
        assert parsed.model == "llama"  # the job's model answers, whatever the body asked for
        if generated:
            assert parsed.usage.completion_tokens == sum(generated)
    by_id = {r["custom_id"]: r["response"]["body"] for r in records}
    assert len(by_id["chat-logprobs"]["choices"]) == 2
    assert len(by_id["chat-logprobs"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert len(by_id["completion-1"]["choices"][0]["logprobs"]["tokens"]) == 5
    assert by_id["chat-1"]["usage"]["completion_tokens"] == 4

    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    line_numbers = [int(e["id"].rsplit("_", 1)[1]) for e in errors]
    bad_line_numbers = [i + 1 for i, line in enumerate(lines) if line in bad]
    assert sorted(line_numbers) == bad_line_numbers
    errors.sort(key=lambda e: int(e["id"].rsplit("_", 1)[1]))
    assert [e["error"]["code"] for e in errors] == expected_codes
    for error, number in zip(errors, bad_line_numbers):
        assert error["error"]["message"].startswith(f"line {number}:")
    assert errors[2]["custom_id"] == "chat-0" and errors[0]["custom_id"] is None

    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["succeeded"], summary["failed"], summary["skipped_already_done"]) == (len(good), len(bad), 0)
    assert summary["completion_tokens"] > 0 and '"succeeded"' in result.stdout
    assert summary["quantization"] == "Q8_0"  # the folder's linear weights and embedding, quantized at load


def test_fatal_problems_exit_nonzero_with_one_line(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    missing = run_cli(tmp_path / "nope.jsonl", "-o", tmp_path / "o.jsonl", check=False)
    assert missing.returncode == 2 and "cannot read input" in missing.stderr and "Traceback" not in missing.stderr
    input_path = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", SYSTEMS[0], "x", max_tokens=2)])
    bad_model = run_cli(input_path, "-o", tmp_path / "o.jsonl", "--model", tmp_path / "no-model", check=False)
    assert bad_model.returncode == 2 and "model not found" in bad_model.stderr
    assert "Traceback" not in bad_model.stderr


def job_lines(count: int) -> list[dict]:
    return [chat_line(f"req-{i:04d}", SYSTEMS[i % 4], f"message number {i} about item {i * 7 % 13}",
                      max_tokens=24, temperature=0, ignore_eos=True) for i in range(count)]


def kill_job_when(input_path: Path, output: Path, model: Path, ready: Callable[[], bool]) -> None:
    """Starts `tokenmill run` on input_path and SIGKILLs it once OUTPUT exists and `ready()` holds."""
    args = [sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o", str(output),
            "--model", str(model), "--dtype", "float32", "--max-num-seqs", "8"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and ready():
            break
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be killed: make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_sigkill_mid_job_then_rerun_completes_exactly_once(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(400))
    output = tmp_path / "out.jsonl"
    kill_job_when(input_path, output, tiny_models["llama"],
                  lambda: output.stat().st_size > 100_000)  # well past the first fsync
    with output.open("ab") as f:  # what a crash mid-write leaves: half a record
        f.write(b'{"id": "batch_req_torn", "custom_')

    survivors = output.read_bytes().rsplit(b"\n", 1)[0].count(b"\n") + 1
    assert 0 < survivors < 400
    run_cli(input_path, "-o", output, "--model", tiny_models["llama"], "--dtype", "float32")
    records = read_jsonl(output)
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids)) == 400
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["skipped_already_done"] == survivors  # not computed again
    assert summary["succeeded"] == 400 - survivors

    # The same job run in one go gives the same answers.
    fresh = tmp_path / "fresh.jsonl"
    run_cli(input_path, "-o", fresh, "--model", tiny_models["llama"], "--dtype", "float32", "--sorted")
    fresh_records = read_jsonl(fresh)
    assert [r["custom_id"] for r in fresh_records] == [f"req-{i:04d}" for i in range(400)]  # --sorted
    answers = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in fresh_records}
    assert {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in records} == answers


def test_changed_input_is_reported_and_overwrite_starts_over(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(3))
    output = tmp_path / "out.jsonl"
    common = ["--model", tiny_models["llama"], "--dtype", "float32"]
    run_cli(input_path, "-o", output, *common)
    write_jsonl(input_path, job_lines(5))
    changed = run_cli(input_path, "-o", output, *common, check=False)
    assert changed.returncode == 2 and "input changed" in changed.stderr
    run_cli(input_path, "-o", output, *common, "--overwrite")
    assert len(read_jsonl(output)) == 5


@pytest.mark.parametrize("prefix_order", [True, False])
def test_prefix_order_groups_shared_prompts(prefix_order: bool, tmp_path: Path,
                                            tiny_models: dict[str, Path]) -> None:
    from tokenmill import LLM
    from tokenmill.batch.runner import BatchJob
    from tokenmill.engine.client import LocalClient

    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(64))
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26, max_num_seqs=4)
    admitted: list[int] = []
    add_request = llm.engine.add_request

    def recording_add(request_id: str, *args: object, **kwargs: object) -> object:
        admitted.append(int(request_id.rsplit("-", 1)[1]))
        return add_request(request_id, *args, **kwargs)

    llm.engine.add_request = recording_add  # observe the admission order of the real engine
    summary = BatchJob(LocalClient(llm.engine), input_path, tmp_path / "out.jsonl", prefix_order=prefix_order,
                       use_tqdm=False).run()
    assert summary.succeeded == 64
    groups = [(line - 1) % 4 for line in admitted]
    switches = sum(a != b for a, b in zip(groups, groups[1:]))
    assert switches <= 3 if prefix_order else switches > 30


def test_long_lines_are_admitted_first_in_their_prefix_groups(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """Length-aware admission: the lines asking for long outputs (every fifth) start first, still
    grouped by system prompt; the summary reports the time the batch ran thin."""
    from tokenmill import LLM
    from tokenmill.batch.runner import BatchJob
    from tokenmill.engine.client import LocalClient

    lines = [chat_line(f"req-{i:04d}", SYSTEMS[i % 4], f"message number {i}", temperature=0, ignore_eos=True,
                       max_tokens=40 if i % 5 == 0 else 3) for i in range(60)]
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26, max_num_seqs=4)
    admitted: list[int] = []
    add_request = llm.engine.add_request

    def recording_add(request_id: str, *args: object, **kwargs: object) -> object:
        admitted.append(int(request_id.rsplit("-", 1)[1]) - 1)
        return add_request(request_id, *args, **kwargs)

    llm.engine.add_request = recording_add
    summary = BatchJob(LocalClient(llm.engine), input_path, tmp_path / "out.jsonl", use_tqdm=False).run()
    assert summary.succeeded == 60
    long = [i for i in admitted if i % 5 == 0]
    assert admitted[:len(long)] == long
    groups = [i % 4 for i in long]
    assert sum(a != b for a, b in zip(groups, groups[1:])) <= 3
    assert summary.prefix_cache_hit_rate > 0.7

    # Three lines on an engine of 8 sequences: every step runs under half of them, none waiting.
    few = write_jsonl(tmp_path / "few.jsonl", lines[:3])
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26, max_num_seqs=8)
    summary = BatchJob(LocalClient(llm.engine), few, tmp_path / "few-out.jsonl", use_tqdm=False).run()
    assert 0 < summary.thin_batch_seconds <= summary.wall_time_s
    assert summary.thin_batch_share == pytest.approx(summary.thin_batch_seconds / summary.wall_time_s, rel=0.01)


def test_output_lengths_learn_from_a_groups_finished_requests() -> None:
    from tokenmill.batch.lengths import GROUP_TOKENS, MIN_FINISHED, LengthPredictor

    lengths = LengthPredictor(context_tokens=1000)
    task_a, task_b = [1] * GROUP_TOKENS + [5, 6], [2] * GROUP_TOKENS + [5, 6]
    assert lengths.predict(task_a, None) == 1000 - len(task_a)  # no max_tokens: the context's room
    assert lengths.predict(task_a, 300) == 300
    for _ in range(MIN_FINISHED - 1):
        lengths.record(task_a[:GROUP_TOKENS] + [9], 20)
    assert lengths.predict(task_a, 300) == 300 and lengths.version == 0  # too few to go by
    lengths.record(task_a, 40)
    assert lengths.predict(task_a, 300) == 25 and lengths.predict(task_a, 10) == 10
    assert lengths.predict(task_b, 300) == 300  # another group learns nothing from it
    assert lengths.version == 1
    assert lengths.length_class(task_a, 300) < lengths.length_class(task_b, 300)


def test_resume_judges_lines_as_the_first_run_did(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    lines: list[dict | str] = [
        {**chat_line("a", SYSTEMS[0], "x", max_tokens=2), "method": "GET"},  # invalid: does not claim "a"
        chat_line("a", SYSTEMS[0], "caf\udcff", max_tokens=2),  # valid, and its text is not UTF-8 below
        chat_line("b", SYSTEMS[1], "y", max_tokens=2),
    ]
    input_path = tmp_path / "in.jsonl"
    text = "".join(json.dumps(line) + "\n" for line in lines).replace("\\udcff", "\udcff")
    input_path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    output = tmp_path / "out.jsonl"
    common = ["--model", tiny_models["llama"], "--dtype", "float32"]
    run_cli(input_path, "-o", output, *common)
    first = read_jsonl(output)
    assert sorted(r["custom_id"] for r in first) == ["a", "b"]
    # A crash lost the record of line 2 ("a"); the rerun must give it the same fate.
    output.write_text("".join(json.dumps(r) + "\n" for r in first if r["custom_id"] != "a"))
    run_cli(input_path, "-o", output, *common)
    assert sorted(r["custom_id"] for r in read_jsonl(output)) == ["a", "b"]
    assert [e["error"]["code"] for e in read_jsonl(tmp_path / "out.errors.jsonl")] == ["invalid_method"]


def test_overwrite_never_deletes_a_running_jobs_files(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from tokenmill.batch.journal import JobLock

    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(2))
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "batch_req_x_1"}\n')
    with JobLock(output):  # another run holds the output
        result = run_cli(input_path, "-o", output, "--model", tiny_models["llama"], "--overwrite", check=False)
    assert result.returncode == 2 and "another tokenmill run" in result.stderr
    assert output.read_text() == '{"id": "batch_req_x_1"}\n'


def test_resume_with_another_errors_file_is_refused(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(2) + ["not json"])
    output = tmp_path / "out.jsonl"
    common = ["--model", tiny_models["llama"], "--dtype", "float32"]
    run_cli(input_path, "-o", output, "--errors", tmp_path / "first.errors.jsonl", *common)
    moved = run_cli(input_path, "-o", output, *common, check=False)  # the default errors path now
    assert moved.returncode == 2 and "first.errors.jsonl" in moved.stderr
    run_cli(input_path, "-o", output, "--errors", tmp_path / "first.errors.jsonl", *common)
    assert len(read_jsonl(tmp_path / "first.errors.jsonl")) == 1 and len(read_jsonl(output)) == 2


def test_a_same_size_edit_deep_in_a_resumed_input_is_refused(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    input_path = write_jsonl(tmp_path / "in.jsonl", job_lines(6000))
    original = input_path.read_bytes()
    assert len(original) > 2 << 20  # the edit below lies far past the first MiB
    output = tmp_path / "out.jsonl"
    kill_job_when(input_path, output, tiny_models["llama"],
                  lambda: output.read_bytes().count(b"\n") >= 8)  # some lines done, most not
    done = output.read_bytes()
    done = done[:done.rfind(b"\n") + 1]  # the rerun may cut a torn last record, nothing else

    # One character of a late line's prompt, the size unchanged.
    edited = original.replace(b"message number 5990 about", b"message number 5999 about")
    assert len(edited) == len(original) and original.index(b"message number 5990 about") > 2 << 20
    input_path.write_bytes(edited)
    refused = run_cli(input_path, "-o", output, "--model", tiny_models["llama"], "--dtype", "float32", check=False)
    assert refused.returncode == 2 and "input changed" in refused.stderr and str(input_path) in refused.stderr
    assert "Traceback" not in refused.stderr
    assert output.read_bytes() == done and not (tmp_path / "out.summary.json").exists()


def test_duplicate_custom_ids_are_judged_exactly(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    # Distinct ids that differ by case, a space, normalization, a NUL, a lone surrogate (a JSON
    # escape can make one) or only their last character: none is another's duplicate.
    distinct = ["a", "A", "a ", "\u00e9", "e\u0301", "x", "x\u0000y", "\ud800", "\udc00", "k" * 5000 + "1",
                "k" * 5000 + "2"]
    repeated = {"a": 1, "e\u0301": 5, "\ud800": 8, "k" * 5000 + "2": 11}  # id: the line that claims it first
    ids = distinct + list(repeated)
    input_path = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": cid, "method": "POST", "url": "/v1/completions",
         "body": {"prompt": f"line {n}", "max_tokens": 2, "temperature": 0}} for n, cid in enumerate(ids, 1)])
    output, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    common = ["--model", tiny_models["llama"], "--dtype", "float32"]

    def check_results() -> None:
        assert sorted(r["custom_id"] for r in read_jsonl(output)) == sorted(distinct)
        failed = sorted(((int(e["id"].rsplit("_", 1)[1]), e["custom_id"], e["error"]) for e in read_jsonl(errors)),
                        key=lambda f: f[0])
        assert [(line, cid) for line, cid, _ in failed] == [(n, cid) for n, cid in enumerate(ids, 1) if n > 11]
        for line, cid, error in failed:
            assert error["code"] == "duplicate_custom_id"
            assert error["message"] == f"line {line}: custom_id {cid!r} was used by line {repeated[cid]}"

    run_cli(input_path, "-o", output, *common)
    check_results()
    assert not (tmp_path / "out.custom_ids.sqlite3").exists()  # the scratch table is gone with the run
    # A crash lost the records of a first claimant and of a duplicate: the rerun judges them again.
    kept_output = [r for r in read_jsonl(output) if r["custom_id"] != "\ud800"]
    kept_errors = [e for e in read_jsonl(errors) if e["custom_id"] != "a"]
    output.write_text("".join(json.dumps(r) + "\n" for r in kept_output))
    errors.write_text("".join(json.dumps(e) + "\n" for e in kept_errors))
    run_cli(input_path, "-o", output, *common)
    check_results()
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["succeeded"], summary["failed"], summary["skipped_already_done"]) == (1, 1, len(ids) - 2)
