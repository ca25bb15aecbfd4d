"""`/v1/embeddings` lines in `tokenmill run` (and `--ray`) on the real all-MiniLM-L6-v2: OpenAI's
request and response shapes, bad lines, vectors equal to sentence-transformers', exactly once
across a SIGKILL and a failure inside the engine."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from openai.types import CreateEmbeddingResponse
from sentence_transformers import SentenceTransformer
from test_batch import kill_job_when, read_jsonl, run_cli, write_jsonl
from test_ray import needs_ray, run_ray, shard_records

from tokenmill.batch.format import LineError, parse_line
from tokenmill.endpoints.embeddings import MAX_INPUTS, EmbeddingCall, Embeddings
from tokenmill.outputs import EmbeddingOutput, EmbeddingRequestOutput

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "Paris is the capital of France.",
    "How do I reset my password?",
    "Stock markets fell sharply on Monday after the announcement.",
    "She plays the violin in an orchestra.",
    "Photosynthesis turns light into chemical energy.",
    "The meeting has been moved to Thursday afternoon.",
    "Rust and Python are programming languages.",
    "A short one.",
    "Mountains covered in snow rise above the quiet valley where the river bends.",
]
LONG = " ".join(f"word{i}" for i in range(400))  # well past MiniLM's 256 tokens
COSINE = 0.99999


@pytest.fixture(scope="module")
def reference(minilm_path: Path) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_path), device="cpu")


def embedding_line(custom_id: str, input_: object, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "all-MiniLM-L6-v2", "input": input_, **body}}


def vectors(body: dict) -> list[np.ndarray]:
    """A response body's vectors, decoded as the official client decodes base64."""
    return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="float32") if isinstance(d["embedding"], str)
            else np.array(d["embedding"], dtype=np.float32) for d in body["data"]]


def assert_same_directions(ours: list[np.ndarray], theirs: np.ndarray) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= COSINE


def test_bodies_are_checked_as_openai_checks_them() -> None:
    def params(body: dict) -> object:
        return parse_line(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": body}),
                          7).call

    assert params({"input": "hi"}).inputs == ["hi"]
    assert params({"input": ["a", "b"], "user": "u", "model": "any"}).inputs == ["a", "b"]
    assert params({"input": [1, 2, 3]}).inputs == [[1, 2, 3]]
    assert params({"input": [[1], [2, 3]]}).inputs == [[1], [2, 3]]
    request = params({"input": "hi", "encoding_format": "base64", "dimensions": 8, "normalize": False,
                      "truncate_prompt_tokens": -1})
    assert request.encoding_format == "base64"
    pooling = request.params
    assert (pooling.dimensions, pooling.normalize, pooling.truncate_prompt_tokens) == (8, False, -1)
    assert params({"input": "hi"}).encoding_format == "float"

    bad = [({"input": ""}, "invalid_value", "input", "must not be empty"),
           ({"input": []}, "invalid_value", "input", "must not be empty"),
           ({"input": ["a", ""]}, "invalid_value", "input", "input[1] is empty"),
           ({"input": [[1], []]}, "invalid_value", "input", "input[1] is empty"),
           ({"input": [1, "a"]}, "invalid_type", "input", "a list of token ids"),
           ({"input": [True, 2]}, "invalid_type", "input", "a list of token ids"),
           ({"input": {"text": "a"}}, "invalid_type", "input", "a list of strings"),
           ({}, "invalid_type", "input", "body.input must be"),
           ({"input": ["x"] * (MAX_INPUTS + 1)}, "invalid_value", "input", f"at most {MAX_INPUTS}"),
           ({"input": "a", "encoding_format": "int8"}, "invalid_value", "encoding_format", '"int8"'),
           ({"input": "a", "dimensions": 0}, "invalid_value", "dimensions", "dimensions must be"),
           ({"input": "a", "dimensions": 3.5}, "invalid_value", "dimensions", "dimensions must be"),
           ({"input": "a", "normalize": "yes"}, "invalid_value", "normalize", "normalize must be"),
           ({"input": "a", "truncate_prompt_tokens": 0}, "invalid_value", "truncate_prompt_tokens", "-1 or"),
           ({"input": "a", "temperature": 0}, "unsupported_parameter", "temperature", "body.temperature"),
           ({"input": "a", "messages": []}, "unsupported_parameter", "messages", "not supported by /v1/embeddings")]
    with pytest.raises(LineError, match="url must be"):
        parse_line(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/moderations", "body": {}}), 1)
    for body, code, param, words in bad:
        with pytest.raises(LineError) as caught:
            params(body)
        error = caught.value
        assert (error.code, error.param, error.custom_id) == (code, param, "x"), body
        assert error.message.startswith("line 7: ") and words in error.message, (body, error.message)


def embedding_response(outputs: list[EmbeddingRequestOutput], encoding_format: str, model: str) -> dict:
    call = Embeddings().parse({"input": ["a", "b"], "encoding_format": encoding_format})
    assert isinstance(call, EmbeddingCall)
    return Embeddings().respond(call, outputs, "r", model)


def test_base64_is_little_endian_float32_as_the_client_decodes() -> None:
    embedding = [0.1, -2.5, 3e-8, 1.0]
    outputs = [EmbeddingRequestOutput("r-0", "a", [1, 2], EmbeddingOutput(embedding)),
               EmbeddingRequestOutput("r-1", None, [3], EmbeddingOutput([0.5] * 4))]
    body = embedding_response(outputs, "base64", "m")
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in body["data"]] == [0, 1] and body["object"] == "list" and body["model"] == "m"
    assert base64.b64decode(body["data"][0]["embedding"]) == np.array(embedding, dtype="<f4").tobytes()
    assert vectors(body)[0].tolist() == np.array(embedding, dtype=np.float32).tolist()
    CreateEmbeddingResponse.model_validate(embedding_response(outputs, "float", "m"))


def test_run_embeds_as_sentence_transformers(tmp_path: Path, minilm_path: Path, reference: SentenceTransformer) -> None:
    ids = [reference.tokenizer.encode(s) for s in SENTENCES[5:8]]
    good = [
        embedding_line("one", SENTENCES[0]),
        embedding_line("list", SENTENCES[1:5]),
        embedding_line("ids", ids[0]),
        embedding_line("id-lists", ids[1:3]),
        embedding_line("base64", SENTENCES[8:10], encoding_format="base64"),
        embedding_line("raw", SENTENCES[10], normalize=False),
        embedding_line("truncated", LONG, truncate_prompt_tokens=-1),
        embedding_line("cut-short", [LONG, SENTENCES[11]], truncate_prompt_tokens=16),
        embedding_line("user", SENTENCES[11], user="user-1"),
    ]
    bad = [  # (line, error code, param, words in the message)
        ({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
          "body": {"messages": [{"role": "user", "content": "hi"}]}},
         "wrong_task", "model", "embeds text; it cannot serve /v1/chat/completions"),
        ({"custom_id": "completion", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}},
         "wrong_task", "model", "it cannot serve /v1/completions"),
        (embedding_line("empty", ""), "invalid_value", "input", "must not be empty"),
        (embedding_line("mixed", [1, "a"]), "invalid_type", "input", "body.input must be"),
        (embedding_line("format", "a", encoding_format="int8"), "invalid_value", "encoding_format", "float or base64"),
        (embedding_line("dimensions", "a", dimensions=128), "invalid_value", "dimensions", "not trained"),
        (embedding_line("unknown", "a", pooling="max"), "unsupported_parameter", "pooling", "body.pooling"),
        (embedding_line("too-long", LONG), "context_length_exceeded", "input", "truncate_prompt_tokens"),
        (embedding_line("too-long-third", [SENTENCES[0], SENTENCES[1], LONG]), "context_length_exceeded", "input",
         "input[2]: "),
        (embedding_line("bad-id", [[5, 10**9]]), "invalid_value", "input", "token ids"),
        (embedding_line("one", "again"), "duplicate_custom_id", None, "was used by line 1"),
    ]
    lines = [line for pair in zip(good, [b[0] for b in bad]) for line in pair] + [b[0] for b in bad[len(good):]]
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    run_cli(input_path, "-o", output, "--model", minilm_path, "--dtype", "float32", "--sorted")

    records = read_jsonl(output)
    assert [r["custom_id"] for r in records] == [line["custom_id"] for line in good]  # --sorted: input order
    bodies = {r["custom_id"]: r["response"]["body"] for r in records}
    for record, line in zip(records, good):
        body, inputs = record["response"]["body"], line["body"]["input"]
        count = len(inputs) if isinstance(inputs, list) and not isinstance(inputs[0], int) else 1
        assert record["error"] is None and record["response"]["status_code"] == 200
        assert record["response"]["request_id"].startswith("embd-")
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(count))
        assert all(d["object"] == "embedding" for d in body["data"])
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        assert body["model"] == Path(minilm_path).name  # the job's model, as chat lines report it
        if line["body"].get("encoding_format") != "base64":
            CreateEmbeddingResponse.model_validate(body)

    def encode(texts: list[str]) -> np.ndarray:
        return reference.encode(texts, convert_to_numpy=True)

    assert_same_directions(vectors(bodies["one"]), encode(SENTENCES[:1]))
    assert_same_directions(vectors(bodies["list"]), encode(SENTENCES[1:5]))
    assert_same_directions(vectors(bodies["ids"]) + vectors(bodies["id-lists"]), encode(SENTENCES[5:8]))
    assert_same_directions(vectors(bodies["base64"]), encode(SENTENCES[8:10]))
    assert_same_directions(vectors(bodies["user"]), encode(SENTENCES[11:12]))
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors(bodies["one"]))  # the folder normalises
    assert_same_directions(vectors(bodies["truncated"]), encode([LONG]))  # truncated at 256 tokens, as ST does
    assert bodies["truncated"]["usage"]["prompt_tokens"] == 256
    raw, = vectors(bodies["raw"])
    unnormalised = SentenceTransformer(modules=[reference[0], reference[1]], device="cpu").encode([SENTENCES[10]])
    assert_same_directions([raw], unnormalised)
    assert abs(np.linalg.norm(raw) / np.linalg.norm(unnormalised[0]) - 1) < 1e-5
    reference.max_seq_length = 16
    try:
        assert_same_directions(vectors(bodies["cut-short"]), encode([LONG, SENTENCES[11]]))
    finally:
        reference.max_seq_length = 256
    assert bodies["cut-short"]["usage"]["prompt_tokens"] == 16 + len(reference.tokenizer.encode(SENTENCES[11]))

    errors = sorted(read_jsonl(tmp_path / "out.errors.jsonl"), key=lambda e: int(e["id"].rsplit("_", 1)[1]))
    assert [e["custom_id"] for e in errors] == [b[0]["custom_id"] for b in bad]
    for error, (_, code, param, words) in zip(errors, bad):
        body = error["response"]["body"]["error"]
        assert (error["error"]["code"], body["param"]) == (code, param), error
        assert words in error["error"]["message"], error["error"]["message"]
        assert error["response"]["status_code"] == 400

    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["succeeded"], summary["failed"]) == (len(good), len(bad))
    assert summary["prompt_tokens"] == sum(b["usage"]["prompt_tokens"] for b in bodies.values())
    assert summary["completion_tokens"] == 0 and summary["cached_prompt_tokens"] == 0


def job_texts(i: int) -> list[str]:
    return [f"sentence number {i} about item {i * 7 % 13}", f"another text {i} " * (1 + i % 5)]


def test_sigkill_mid_job_then_rerun_writes_every_line_once(tmp_path: Path, minilm_path: Path,
                                                           reference: SentenceTransformer) -> None:
    count = 600
    input_path = write_jsonl(tmp_path / "in.jsonl", [embedding_line(f"req-{i:04d}", job_texts(i),
                                                                    encoding_format=("float", "base64")[i % 2])
                                                     for i in range(count)])
    output = tmp_path / "out.jsonl"
    kill_job_when(input_path, output, minilm_path, lambda: output.stat().st_size > 1_000_000)  # past an fsync
    with output.open("ab") as f:  # what a crash mid-write leaves: half a record
        f.write(b'{"id": "batch_req_torn", "custom_')
    survivors = output.read_bytes().rsplit(b"\n", 1)[0].count(b"\n") + 1
    assert 0 < survivors < count

    run_cli(input_path, "-o", output, "--model", minilm_path, "--dtype", "float32", "--sorted")
    records = read_jsonl(output)
    assert [r["custom_id"] for r in records] == [f"req-{i:04d}" for i in range(count)]
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["skipped_already_done"], summary["succeeded"]) == (survivors, count - survivors)
    ours = [v for r in records for v in vectors(r["response"]["body"])]  # each line's vectors are its own
    assert_same_directions(ours, reference.encode([t for i in range(count) for t in job_texts(i)]))


def test_a_line_of_more_inputs_than_the_window_runs(tmp_path: Path, minilm_path: Path) -> None:
    from tokenmill.batch.runner import LineExecutor
    from tokenmill.engine.client import LocalClient
    from tokenmill.engine.config import EngineConfig
    from tokenmill.engine.create import create_engine

    sizes = [7, 1, 12, 2]
    lines = [parse_line(json.dumps(embedding_line(f"line-{n}", SENTENCES[:size])), n) for n, size in
             enumerate(sizes, 1)]
    client = LocalClient(create_engine(EngineConfig(model=str(minilm_path), dtype="float32", max_num_seqs=2)))
    written: list[tuple[int, dict]] = []
    LineExecutor(client, "f", lambda line_no, record, tokens: written.append((line_no, record)), lambda n: None,
                 window=3).run(iter([(line.line_no, line) for line in lines]))
    assert [line_no for line_no, _ in written] == [1, 2, 3, 4]  # whole lines, in input order
    for (_, record), size in zip(written, sizes):
        assert len(record["response"]["body"]["data"]) == size


def test_a_failure_inside_the_engine_leaves_the_whole_line_for_the_next_run(
        tmp_path: Path, minilm_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.cli import main
    from tokenmill.engine.embedding_runner import EncoderRunner

    input_path = write_jsonl(tmp_path / "in.jsonl", [embedding_line(f"req-{i}", job_texts(i) + [SENTENCES[i]])
                                                     for i in range(8)])
    output = tmp_path / "out.jsonl"
    args = ["run", str(input_path), "-o", str(output), "--model", str(minilm_path), "--dtype", "float32",
            "--max-num-seqs", "2"]
    run = EncoderRunner.run
    steps: list[int] = []

    def failing_third_step(runner: EncoderRunner, prompts: list[list[int]]) -> object:
        steps.append(len(prompts))
        if len(steps) == 3:  # two inputs of line 2 (its second and third) fail; its first succeeded
            raise RuntimeError("injected: out of memory")
        return run(runner, prompts)

    monkeypatch.setattr(EncoderRunner, "run", failing_third_step)
    assert main(args) == 1
    first = json.loads((tmp_path / "out.summary.json").read_text())
    assert (first["succeeded"], first["failed"], first["failed_internally"]) == (7, 0, 1)
    assert "req-1" not in [r["custom_id"] for r in read_jsonl(output)]

    monkeypatch.setattr(EncoderRunner, "run", run)
    assert main(args) == 0
    second = json.loads((tmp_path / "out.summary.json").read_text())
    assert (second["succeeded"], second["skipped_already_done"]) == (1, 7)
    records = read_jsonl(output)
    assert sorted(r["custom_id"] for r in records) == [f"req-{i}" for i in range(8)]
    assert all(len(r["response"]["body"]["data"]) == 3 for r in records)


@pytest.mark.slow
@needs_ray
def test_ray_embeds_as_the_local_runner(tmp_path: Path, minilm_path: Path) -> None:
    lines = [embedding_line(f"req-{i}", job_texts(i)) for i in range(40)]
    input_path = write_jsonl(tmp_path / "in.jsonl", [*lines[:20], embedding_line("bad", ""),
                             {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                              "body": {"messages": [{"role": "user", "content": "hi"}]}}, *lines[20:]])
    summary = run_ray(input_path, tmp_path / "ray", minilm_path, "--batch-lines", "8")
    run_cli(input_path, "-o", tmp_path / "local.jsonl", "--model", minilm_path, "--dtype", "float32")
    local = {r["custom_id"]: r for r in read_jsonl(tmp_path / "local.jsonl")}
    records = shard_records(tmp_path / "ray")
    assert sorted(r["custom_id"] for r in records) == sorted(local)
    for record in records:
        assert record["id"] == local[record["custom_id"]]["id"]
        assert record["response"]["body"]["usage"] == local[record["custom_id"]]["response"]["body"]["usage"]
        assert_same_directions(vectors(record["response"]["body"]),
                               np.stack(vectors(local[record["custom_id"]]["response"]["body"])))
    errors = read_jsonl(tmp_path / "ray" / "errors.jsonl")
    assert sorted(e["error"]["code"] for e in errors) == ["invalid_value", "wrong_task"]
    assert (summary["succeeded"], summary["failed"], summary["completion_tokens"]) == (40, 2, 0)
