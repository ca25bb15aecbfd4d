"""`POST /v1/embeddings` and `/v1/batches` of embeddings on a real `tokenmill serve` with the real
all-MiniLM-L6-v2, through the official `openai` client: the same vectors as sentence-transformers
and as `tokenmill run`, errors in OpenAI's shape, a disconnecting client's requests dropped."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from sentence_transformers import SentenceTransformer
from test_batch import read_jsonl, run_cli, write_jsonl
from test_embeddings_batch import LONG, SENTENCES, assert_same_directions, embedding_line, vectors
from test_server import API_KEY, Server, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Iterator[Server]:
    running = Server(minilm_path, tmp_path_factory.mktemp("server")).start()
    yield running
    running.kill()


@pytest.fixture(scope="module")
def reference(minilm_path: Path) -> SentenceTransformer:
    return SentenceTransformer(str(minilm_path), device="cpu")


def as_arrays(response: openai.types.CreateEmbeddingResponse) -> list[np.ndarray]:
    return [np.array(d.embedding, dtype=np.float32) for d in response.data]


def test_the_client_gets_sentence_transformers_vectors(client: openai.OpenAI, model: str,
                                                       reference: SentenceTransformer) -> None:
    expected = reference.encode(SENTENCES[:4])
    one = client.embeddings.create(model=model, input=SENTENCES[0])  # the client asks for base64 by default
    assert one.object == "list" and one.model == model and len(one.data) == 1 and one.data[0].index == 0
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(reference.tokenizer.encode(SENTENCES[0]))
    assert_same_directions(as_arrays(one), expected[:1])

    floats = client.embeddings.create(model=model, input=SENTENCES[:4], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    assert_same_directions(as_arrays(floats), expected)
    # Asked for explicitly, base64 comes back as the server sent it: little-endian float32 bytes.
    encoded = client.embeddings.create(model=model, input=SENTENCES[:4], encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in encoded.data]
    assert [a.tolist() for a in decoded] == [a.tolist() for a in as_arrays(floats)]  # float32 exactly

    ids = [reference.tokenizer.encode(s) for s in SENTENCES[:3]]
    assert_same_directions(as_arrays(client.embeddings.create(model=model, input=ids[0])), expected[:1])
    assert_same_directions(as_arrays(client.embeddings.create(model=model, input=ids)), expected[:3])
    cut = client.embeddings.create(model=model, input=LONG, extra_body={"truncate_prompt_tokens": -1})
    assert cut.usage.prompt_tokens == 256
    raw = client.embeddings.create(model=model, input=SENTENCES[0], user="someone", extra_body={"normalize": False})
    assert abs(np.linalg.norm(as_arrays(raw)[0]) - 1) > 1e-3
    assert_same_directions(as_arrays(raw), expected[:1])


def test_errors_have_openai_shape_and_status(server: Server, client: openai.OpenAI, model: str) -> None:
    def bad_request(param: str, words: str, **kwargs: object) -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(**{"model": model, "encoding_format": "float", **kwargs})
        error = caught.value.body
        assert error["param"] == param and words in error["message"], error
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"

    bad_request("dimensions", "not trained", input="a", dimensions=64)
    bad_request("input", "input[1]: ", input=["a", LONG])
    bad_request("input", "must not be empty", input="")
    bad_request("input", "input[1] is empty", input=["a", ""])
    bad_request("encoding_format", "float or base64", input="a", encoding_format="int8")
    bad_request("pooling", "body.pooling", input="a", extra_body={"pooling": "max"})
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="a")
    with pytest.raises(openai.BadRequestError, match="embeds text; it cannot serve /v1/chat/completions"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="it cannot serve /v1/completions"):
        client.completions.create(model=model, prompt="hi")
    # NOTE: a line whose other input failed is aborted by the engine's thread after the 400 is sent: nothing waits
    # once it has come round to it.
    deadline = time.monotonic() + 30
    while server.metrics()["tokenmill_requests_waiting"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metrics()["tokenmill_requests_waiting"] == 0


def test_batches_of_embeddings_run_as_tokenmill_run(tmp_path: Path, client: openai.OpenAI, model: str,
                                                    minilm_path: Path) -> None:
    lines = [embedding_line(f"req-{i}", SENTENCES[i % 12: i % 12 + 1 + i % 3], model=model,
                            encoding_format=("float", "base64")[i % 2]) for i in range(24)]
    lines.insert(3, embedding_line("too-long", LONG))
    lines.insert(5, {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"messages": [{"role": "user", "content": "hi"}]}})
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    uploaded = client.files.create(file=input_path.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="cannot serve /v1/chat/completions"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    done = wait_for(client, batch.id, ("completed", "failed"))
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (26, 24, 2)
    records = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert sorted(e["error"]["code"] for e in errors) == ["context_length_exceeded", "invalid_url"]

    run_cli(input_path, "-o", tmp_path / "local.jsonl", "--model", minilm_path, "--dtype", "float32")
    local = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(tmp_path / "local.jsonl")}
    assert sorted(r["custom_id"] for r in records) == sorted(local) == sorted(f"req-{i}" for i in range(24))
    for record in records:
        body = record["response"]["body"]
        assert body["usage"] == local[record["custom_id"]]["usage"]
        assert_same_directions(vectors(body), np.stack(vectors(local[record["custom_id"]])))


def test_a_client_that_leaves_has_its_inputs_dropped(server: Server, model: str) -> None:
    inputs = [f"{i} " + LONG[:1000] for i in range(2048)]  # ~250 tokens each: minutes of work
    body = json.dumps({"model": model, "input": inputs, "truncate_prompt_tokens": -1}).encode()
    finished_before = server.metrics()["tokenmill_requests_finished_total"]
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while server.metrics()["tokenmill_requests_waiting"] < 1000:
            assert time.monotonic() < deadline, "the inputs never reached the engine"
            time.sleep(0.1)
    left = time.monotonic()
    while (waiting := server.metrics()["tokenmill_requests_waiting"]) > 0:
        assert time.monotonic() - left < 10, f"{waiting} inputs kept running after their client left"
        time.sleep(0.1)
    assert server.metrics()["tokenmill_requests_finished_total"] - finished_before < 2048  # dropped, not computed
