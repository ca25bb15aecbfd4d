"""The whole-file prefix order of `tokenmill run` (batch/ordering.py): scattered shared prompts
admitted together, bounded-memory pieces, and crash safety of the ordering pass."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_batch import chat_line, kill_job_when, read_jsonl, run_cli, write_jsonl

from tokenmill.batch.journal import LineSet
from tokenmill.batch.ordering import HASH_BYTES, JobOrder, order_key

# Ten system prompts, each long enough for several full blocks, shared by ten lines each.
SYSTEMS = [f"You are reviewer {i} of the {i}th office. Classify the message as yes or no, and only that. " * 4
           for i in range(10)]


def scattered_lines(count: int, seed: int = 0) -> list[dict]:
    lines = [chat_line(f"req-{i:05d}", SYSTEMS[i % len(SYSTEMS)], f"message {i} about item {i * 7 % 13}",
                       max_tokens=2, temperature=0, ignore_eos=True) for i in range(count)]
    random.Random(seed).shuffle(lines)
    return lines


def test_line_set_holds_what_was_added() -> None:
    lines = LineSet()
    added = {1, 8, 9, 4_000_001, 10_000_000}
    for line_no in [*added, 9]:
        lines.add(line_no)
    assert len(lines) == len(added)
    assert all(n in lines for n in added)
    assert not any(n in lines for n in (0, 2, 7, 10, 4_000_000, 10_000_001, 10**9))
    assert len(lines.bits) < 2 << 20  # 10^7 lines in about a megabyte


def test_order_keys_sort_like_a_trie_of_blocks() -> None:
    a, b, c = list(range(100, 116)), list(range(200, 216)), list(range(300, 316))
    keys = {"a": order_key(a, 16), "ab": order_key(a + b, 16), "abc": order_key(a + b + c + [7], 16),
            "ac": order_key(a + c, 16), "b": order_key(b + a, 16)}
    assert len(keys["abc"]) == 3 * HASH_BYTES and order_key(a[:15], 16) == b""  # full blocks only
    assert keys["abc"].startswith(keys["ab"]) and keys["ab"].startswith(keys["a"])
    # Whatever order the hashes give, the prompts starting with block a are consecutive, and among
    # them those starting with a, b.
    ranked = sorted(keys, key=keys.get)
    starting_with_a = sorted(ranked.index(name) for name in ("a", "ab", "abc", "ac"))
    assert starting_with_a == list(range(starting_with_a[0], starting_with_a[0] + 4))
    assert abs(ranked.index("ab") - ranked.index("abc")) == 1


def test_scattered_shared_prompts_are_admitted_together(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """100 lines, ten system prompts scattered through the file, a window of 8 lines (as a file far
    larger than the window would be) and a KV pool of 32 blocks, too small to keep every prompt: the
    whole-file order admits each prompt's lines together and computes each prompt once; the window
    alone cannot."""
    from tokenmill import LLM
    from tokenmill.batch.runner import BatchJob
    from tokenmill.engine.client import LocalClient

    input_path = write_jsonl(tmp_path / "in.jsonl", scattered_lines(100))
    lines = read_jsonl(input_path)
    summaries, switches = {}, {}
    for prefix_order in (True, False):
        llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 18, max_num_seqs=4)
        assert llm.engine.kv.pool.num_blocks == 32
        admitted: list[int] = []  # line numbers, as the real engine is asked to admit them
        add_request = llm.engine.add_request

        def recording_add(request_id: str, *args: object, **kwargs: object) -> object:
            admitted.append(int(request_id.rsplit("-", 1)[1]))  # noqa: B023 (called before the loop moves on)
            return add_request(request_id, *args, **kwargs)  # noqa: B023

        llm.engine.add_request = recording_add
        output = tmp_path / f"out-{prefix_order}.jsonl"
        summaries[prefix_order] = BatchJob(LocalClient(llm.engine), input_path, output, prefix_order=prefix_order,
                                           window=8, use_tqdm=False).run()
        groups = [lines[line_no - 1]["body"]["messages"][0]["content"] for line_no in admitted]
        switches[prefix_order] = sum(a != b for a, b in zip(groups, groups[1:]))
        assert summaries[prefix_order].succeeded == 100
        assert not output.with_name(f"out-{prefix_order}.order.sqlite3").exists()  # removed once done
    assert switches[True] == len(SYSTEMS) - 1 and switches[False] > 50
    ordered, in_order = summaries[True], summaries[False]
    assert ordered.ordering_disk_bytes > 0 and in_order.ordering_seconds is None

    # The ideal: each group's shared full blocks computed once, by its first line.
    prompts: dict[str, list[list[int]]] = {}
    for line in lines:
        messages = line["body"]["messages"]
        prompts.setdefault(messages[0]["content"], []).append(llm.frontend.tokenize_chat(messages)[1])
    ideal = 0
    for group in prompts.values():
        shared = next(i for i, column in enumerate(zip(*group)) if len(set(column)) > 1)
        ideal += (len(group) - 1) * (shared // 16 * 16)
    assert ordered.cached_prompt_tokens >= ideal > in_order.cached_prompt_tokens * 1.5


def test_sigkill_during_the_ordering_pass_then_rerun_completes_exactly_once(
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    lines: list[dict | str] = list(scattered_lines(1500, seed=1))
    lines[1] = "{not json"
    lines[1000] = lines[3]  # a duplicate custom_id, judged in the first pass
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    building = tmp_path / "out.order.sqlite3.building"
    kill_job_when(input_path, output, tiny_models["llama"], building.exists)
    assert not (tmp_path / "out.order.sqlite3").exists() and not read_jsonl(output)

    run_cli(input_path, "-o", output, "--model", tiny_models["llama"], "--dtype", "float32", timeout=600)
    records, errors = read_jsonl(output), read_jsonl(tmp_path / "out.errors.jsonl")
    expected = Counter(line["custom_id"] for line in lines if isinstance(line, dict)) + Counter([None])
    assert Counter(r["custom_id"] for r in records + errors) == expected  # the bad JSON line has no custom_id
    assert len({r["id"] for r in records + errors}) == 1500
    assert sorted(e["error"]["code"] for e in errors) == ["duplicate_custom_id", "invalid_json"]
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["succeeded"] == 1498 and summary["ordering_seconds"] > 0
    assert not building.exists() and not (tmp_path / "out.order.sqlite3").exists()


def test_sigkill_during_the_run_keeps_the_order_for_the_rerun(tmp_path: Path, tiny_models: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill import LLM
    from tokenmill.batch.runner import BatchJob
    from tokenmill.engine.client import LocalClient

    lines = scattered_lines(300, seed=2)
    for line in lines:
        line["body"]["max_tokens"] = 8
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    kill_job_when(input_path, output, tiny_models["llama"], lambda: output.stat().st_size > 50_000)
    order = tmp_path / "out.order.sqlite3"
    survivors = output.read_bytes().count(b"\n")  # whole records; the rerun cuts a torn last one
    assert order.exists() and survivors

    def ordered_again(*args: object) -> None:
        raise AssertionError("the rerun ordered the file again instead of reusing the finished first pass")

    monkeypatch.setattr(JobOrder, "build", ordered_again)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", max_num_seqs=8)
    summary = BatchJob(LocalClient(llm.engine), input_path, output, use_tqdm=False).run()
    assert summary.skipped_already_done == survivors and summary.succeeded == 300 - survivors
    ids = [r["custom_id"] for r in read_jsonl(output)]
    assert len(ids) == len(set(ids)) == 300
    assert not order.exists()


def test_a_cancelled_ordering_pass_leaves_nothing(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from tokenmill import LLM
    from tokenmill.batch.ordering import scan_lines
    from tokenmill.batch.runner import LineExecutor
    from tokenmill.engine.client import LocalClient

    input_path = write_jsonl(tmp_path / "in.jsonl", scattered_lines(50))
    llm = LLM(str(tiny_models["llama"]), dtype="float32", max_num_seqs=4)
    cancel = threading.Event()
    executor = LineExecutor(LocalClient(llm.engine), "f", lambda *record: None, lambda line_no: None, cancel=cancel)

    def cancelling_scan() -> Iterator[tuple[int, int, int, object]]:
        for i, item in enumerate(scan_lines(input_path, tmp_path / "ids.sqlite3")):
            if i == 20:
                cancel.set()
            yield item

    path = tmp_path / "order.sqlite3"
    assert JobOrder.build(path, "s", cancelling_scan(), executor.prepare, executor.fail, LineSet(), 16, cancel) is None
    assert list(tmp_path.glob("order*")) == []
