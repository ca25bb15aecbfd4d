"""Batch invariance (issue 14): a request's tokens and logprobs, bit for bit, whatever ran beside it.

The same requests, on the default model (SmolLM2's Q4_1 GGUF), are run each alone in its own call:
the reference. Every other way of running them must give `==` outputs: token ids, text and every
logprob (the chosen token's and the top two), in bf16 and in fp32: inside a batch of 64 unrelated
prompts, with step budgets of 16, 64 and 256 tokens (the default, which the other cases run with),
with the prefix cache cold, warm and off, under preemption, and on plain bf16 weights; and through
`tokenmill run` with 1 and 128 sequences, after a SIGKILL and a resume, and on Ray with 1 and 2
replicas (every record's choices equal).

The requests cover each attention path: chat prompts share the chat template's system prompt (the
shared-prefix path), two long ones (~300 and ~400 tokens) are split into chunks by every budget and
their contexts cross 256-token spans, one plain completion shares nothing; each is asked greedy
and seeded with n = 2.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_batch import read_jsonl, run_cli, write_jsonl
from test_ray import needs_ray, shard_records

from tokenmill import LLM, SamplingParams
from tokenmill.batch.format import BatchLine, parse_line
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.outputs import RequestOutput, TokenLogprobs

DTYPES = ("bfloat16", "float32")
MAX_TOKENS = 24
KV_MEMORY = "1GiB"  # room for every request here at once: no preemption unless a test asks for it
NOUNS = ("lamp", "barrel", "ledger", "kettle", "anchor", "violin", "saddle", "compass", "lantern", "quilt", "easel")
ADJECTIVES = ("red", "heavy", "old", "cracked", "polished", "tiny", "borrowed")


def inventory(entries: int) -> str:
    """A long user message: ~15 tokens an entry."""
    return " ".join(f"Entry {i}: the {ADJECTIVES[i % 7]} {NOUNS[i % 11]} moved to shelf {i * 37 % 101}."
                    for i in range(entries))


def chat_body(user: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}]}


PROMPTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bees": ("/v1/chat/completions", chat_body("Write three sentences about bees.")),
    "glaciers": ("/v1/chat/completions", chat_body("Explain how glaciers carve valleys.")),
    "chess": ("/v1/chat/completions", chat_body("Give me one chess opening and why it is good.")),
    "inventory-300": ("/v1/chat/completions", chat_body(f"Summarise this inventory: {inventory(19)}")),
    "inventory-400": ("/v1/chat/completions", chat_body(f"Which shelves are empty? {inventory(25)}")),
    "printing": ("/v1/completions", {"prompt": "The history of the printing press began in"}),
}


def batch_line(custom_id: str, url: str, body: dict[str, Any], **sampling: Any) -> dict[str, Any]:
    logprobs = {"logprobs": True, "top_logprobs": 2} if url.endswith("chat/completions") else {"logprobs": 2}
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {**body, **logprobs, **sampling, "max_tokens": MAX_TOKENS, "ignore_eos": True}}


# The requests under test: each prompt greedy, and seeded with two samples.
LINES = [line for i, (name, (url, body)) in enumerate(PROMPTS.items()) for line in (
    batch_line(f"{name}-greedy", url, body, temperature=0),
    batch_line(f"{name}-seeded", url, body, temperature=0.8, top_p=0.95, n=2, seed=1000 + i))]


def unrelated_lines(count: int) -> list[dict[str, Any]]:
    """Other work: chat (some with their own system prompt) and completions, greedy and seeded, of
    varied lengths, so that the batch around the requests under test changes every step."""
    rng = random.Random(14)
    lines = []
    for i in range(count):
        topic = f"the number {i * 7}"
        if i % 3 == 2:
            url, body = "/v1/completions", {"prompt": f"Some facts about {topic}:"}
        else:
            url, body = "/v1/chat/completions", chat_body(f"List {i % 5 + 1} facts about {topic}.")
            if i % 3 == 1:
                body["messages"].insert(0, {"role": "system", "content": f"You are assistant number {i}."})
        sampling = {"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": i}
        line = batch_line(f"other-{i:02d}", url, body, **sampling)
        line["body"]["max_tokens"] = rng.randint(2, 12)
        lines.append(line)
    return lines


OTHERS = unrelated_lines(64)

# A request's answer as the Python API returns it: per sample, token ids, text, finish reason and
# logprobs (each a dict of token id -> Logprob: value, rank, text).
Answer = list[tuple[list[int], str, str | None, list[TokenLogprobs] | None]]


def answer(output: RequestOutput) -> Answer:
    assert output.error is None, output.error
    return [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in output.outputs]


def prepared(llm: LLM, line: BatchLine) -> BatchLine:
    line.endpoint.prepare(llm.frontend, line.call)
    return line


def run_lines(llm: LLM, lines: list[dict[str, Any]]) -> dict[str, RequestOutput]:
    """The lines as `tokenmill run` reads them (same params, same tokens), in one generate call."""
    parsed = [prepared(llm, parse_line(json.dumps(line), number)) for number, line in enumerate(lines, 1)]
    prompts = [p.call.prompts[0][1] for p in parsed]
    outputs = llm.generate(prompts, [p.call.params for p in parsed], use_tqdm=False)
    return {p.custom_id: output for p, output in zip(parsed, outputs)}


@dataclass
class Reference:
    llm: LLM
    outputs: dict[str, RequestOutput]  # each line run alone, custom_id -> output

    def answers(self) -> dict[str, Answer]:
        return {custom_id: answer(output) for custom_id, output in self.outputs.items()}

    def choices(self) -> dict[str, list[dict]]:
        """Each line's choices as a `tokenmill run` record would hold them."""
        lines = {line["custom_id"]: parse_line(json.dumps(line), 1) for line in LINES}
        return {custom_id: lines[custom_id].endpoint.respond(prepared(self.llm, lines[custom_id]).call, [output],
                                                             "r", "m")["choices"]
                for custom_id, output in self.outputs.items()}


@pytest.fixture(scope="module")
def reference() -> Callable[..., Reference]:
    """Per dtype (and weights), every line run alone on a fresh engine: the outputs all others must equal."""
    made: dict[tuple[str, str], Reference] = {}

    def get(dtype: str, quantization: str = "auto") -> Reference:
        if (dtype, quantization) not in made:
            llm = LLM(dtype=dtype, quantization=quantization, kv_cache_memory=KV_MEMORY)
            outputs = {k: v for line in LINES for k, v in run_lines(llm, [line]).items()}
            made[dtype, quantization] = Reference(llm, outputs)
        return made[dtype, quantization]
    return get


def mixed_in(lines: list[dict[str, Any]], others: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lines spread among others, in a fixed shuffled order."""
    mixed = lines + others
    random.Random(0).shuffle(mixed)
    return mixed


def assert_same(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Per custom_id; names the ones that differ (a full diff of logprobs would bury them)."""
    assert actual.keys() == expected.keys()
    different = [custom_id for custom_id in expected if actual[custom_id] != expected[custom_id]]
    assert not different, f"{len(different)} of {len(expected)} requests differ: {different}"


def assert_same_answers(expected: dict[str, Answer], outputs: dict[str, RequestOutput]) -> None:
    assert_same(expected, {custom_id: answer(outputs[custom_id]) for custom_id in expected})


def test_long_prompts_are_long(reference: Callable[..., Reference]) -> None:
    """The long prompts are longer than the default step budget, 256 tokens."""
    frontend = reference("bfloat16").llm.frontend
    lengths = {name: len(frontend.tokenize_chat(body["messages"])[1] if "messages" in body
                         else frontend.tokenize(body["prompt"])[1]) for name, (url, body) in PROMPTS.items()}
    assert 280 < lengths["inventory-300"] < 350 and 350 < lengths["inventory-400"] < 450, lengths


@pytest.mark.parametrize("dtype", DTYPES)
def test_inside_a_batch_of_64_unrelated_prompts(dtype: str, reference: Callable[..., Reference]) -> None:
    expected = reference(dtype).answers()
    llm = LLM(dtype=dtype, kv_cache_memory=KV_MEMORY)  # a cold prefix cache
    outputs = run_lines(llm, mixed_in(LINES, OTHERS))
    assert_same_answers(expected, outputs)
    assert llm.engine.metrics().num_preemptions == 0


def test_plain_weights_inside_a_batch_with_a_small_budget(reference: Callable[..., Reference]) -> None:
    """The weights of a Hugging Face folder: the model's, all in bf16 (not the GGUF's blocks)."""
    expected = reference("bfloat16", "none").answers()
    llm = LLM(dtype="bfloat16", quantization="none", kv_cache_memory=KV_MEMORY, max_num_batched_tokens=64)
    assert_same_answers(expected, run_lines(llm, mixed_in(LINES, OTHERS)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("budget", [16, 64])
def test_step_budgets(budget: int, dtype: str, reference: Callable[..., Reference]) -> None:
    expected = reference(dtype).answers()
    llm = LLM(dtype=dtype, kv_cache_memory=KV_MEMORY, max_num_batched_tokens=budget)
    assert_same_answers(expected, run_lines(llm, LINES))


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_prefix_cache(dtype: str, reference: Callable[..., Reference]) -> None:
    """The reference engine again: every prompt is in its cache now, but for its last block."""
    ref = reference(dtype)
    outputs = run_lines(ref.llm, LINES)
    assert_same_answers(ref.answers(), outputs)
    for output in outputs.values():
        assert output.num_cached_tokens == (len(output.prompt_token_ids) - 1) // 16 * 16


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_cache_off(dtype: str, reference: Callable[..., Reference]) -> None:
    expected = reference(dtype).answers()
    llm = LLM(dtype=dtype, kv_cache_memory=KV_MEMORY, enable_prefix_caching=False)
    assert_same_answers(expected, run_lines(llm, LINES))
    assert llm.engine.stats.cached_prompt_tokens == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_preemption(dtype: str, reference: Callable[..., Reference]) -> None:
    ref = reference(dtype)
    engine = ref.llm.engine
    block_bytes = ModelRunner.kv_bytes_per_block(engine.runner.model, engine.config.block_size, engine.dtype)
    # 48 blocks: the longest request (~28 blocks) fits alone, not beside the other long one.
    llm = LLM(dtype=dtype, kv_cache_memory=48 * block_bytes)
    assert_same_answers(ref.answers(), run_lines(llm, LINES))
    assert llm.engine.metrics().num_preemptions > 0


def test_seeds_and_samples_draw_apart(reference: Callable[..., Reference]) -> None:
    """Seed 1's first sample and seed 0's second are different streams (they were one as seed + index)."""
    llm = reference("bfloat16").llm
    params = [SamplingParams(temperature=1.0, n=2, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True)
              for seed in (0, 1)]
    seed0, seed1 = llm.generate(["Once upon a time", "Once upon a time"], params, use_tqdm=False)
    assert seed0.outputs[1].token_ids != seed1.outputs[0].token_ids
    assert seed0.outputs[0].token_ids != seed0.outputs[1].token_ids


# `tokenmill run`: the job is the requests under test among a few others.
CLI_OTHERS = 4


def job_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", mixed_in(LINES, OTHERS[:CLI_OTHERS]))


def record_choices(records: list[dict]) -> dict[str, list[dict]]:
    assert all(r["error"] is None for r in records), [r["error"] for r in records if r["error"]]
    return {r["custom_id"]: r["response"]["body"]["choices"] for r in records}


CLI_ARGS = ("--dtype", "bfloat16", "--kv-cache-memory", KV_MEMORY)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict]]]:
    """The job run in one go with the default 128 sequences: its input and each line's choices."""
    folder = tmp_path_factory.mktemp("clean")
    input_path = job_file(folder)
    run_cli(input_path, "-o", folder / "out.jsonl", "--max-num-seqs", "128", *CLI_ARGS)
    choices = record_choices(read_jsonl(folder / "out.jsonl"))
    assert len(choices) == len(LINES) + CLI_OTHERS
    return input_path, choices


def test_run_equals_the_api_alone(clean_run: tuple[Path, dict[str, list[dict]]],
                                  reference: Callable[..., Reference]) -> None:
    _, choices = clean_run
    expected = reference("bfloat16").choices()
    assert_same(expected, {custom_id: choices[custom_id] for custom_id in expected})


def test_run_with_one_sequence_at_a_time(tmp_path: Path, clean_run: tuple[Path, dict[str, list[dict]]]) -> None:
    input_path, choices = clean_run
    run_cli(input_path, "-o", tmp_path / "out.jsonl", "--max-num-seqs", "1", *CLI_ARGS)
    assert_same(choices, record_choices(read_jsonl(tmp_path / "out.jsonl")))


def test_sigkill_and_resume(tmp_path: Path, clean_run: tuple[Path, dict[str, list[dict]]]) -> None:
    input_path, choices = clean_run
    output = tmp_path / "out.jsonl"
    # One sequence at a time, so that the job is killed with some lines written and most not.
    args = [sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o", str(output),
            "--max-num-seqs", "1", *CLI_ARGS]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    survivors = output.read_bytes().count(b"\n")
    assert 4 <= survivors < len(choices)

    run_cli(input_path, "-o", output, "--max-num-seqs", "128", *CLI_ARGS)
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["skipped_already_done"] == survivors
    records = read_jsonl(output)
    assert len(records) == len(choices)
    assert_same(choices, record_choices(records))


@pytest.mark.slow
@needs_ray
@pytest.mark.parametrize("replicas", [1, 2])
def test_ray_replicas_equal_the_local_run(replicas: int, tmp_path: Path,
                                          clean_run: tuple[Path, dict[str, list[dict]]]) -> None:
    # NOTE: replicas share the machine's cores: on 2 cores, 2 replicas run one torch thread each, the
    # local run two.
    input_path, choices = clean_run
    command = [sys.executable, "-m", "tokenmill.cli", "run", str(input_path), "-o", str(tmp_path / "ray"), "--ray",
               "--replicas", str(replicas), "--batch-lines", "8", "--max-num-seqs", "8", *CLI_ARGS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(choices, record_choices(shard_records(tmp_path / "ray")))
