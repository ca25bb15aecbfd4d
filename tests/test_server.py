"""`tokenmill serve` against the official `openai` client, on a real server process."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key"
KV_CACHE_BYTES = 1 << 26


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, data_dir: Path, *serve_args: str) -> None:
        """`serve_args`: more `tokenmill serve` options, e.g. "--quantization", "none"."""
        self.model, self.data_dir, self.serve_args, self.port = model, data_dir, serve_args, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        args = [sys.executable, "-m", "tokenmill.cli", "serve", "--model", str(self.model), "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--dtype", "float32", "--kv-cache-memory", f"{KV_CACHE_BYTES}B",
                "--api-key", API_KEY, *self.serve_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return self
            except OSError:
                assert self.process.poll() is None, "the server died at start-up"
                time.sleep(0.2)
        self.kill()  # not left running: no fixture's teardown kills a server that never started
        raise TimeoutError("server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"{self.url}/metrics").read().decode()
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}

    def rss_mib(self) -> float:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[Server]:
    running = Server(tiny_models["llama"], tmp_path_factory.mktemp("server")).start()
    yield running
    running.kill()


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


def test_models_say_what_the_weights_run_as(client: openai.OpenAI) -> None:
    listed = client.models.list().data[0].to_dict()
    assert listed["object"] == "model" and listed["quantization"] == "none"  # a float folder, as it is


def test_chat_streamed_equals_non_streamed(client: openai.OpenAI, model: str) -> None:
    plain = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0)
    assert plain.object == "chat.completion" and plain.usage.completion_tokens == 24
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


def test_completions_n_stop_seed_logprobs(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt="one two three", max_tokens=16, temperature=0)
    stop = full.choices[0].text[4:7]
    cut = client.completions.create(model=model, prompt="one two three", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full.choices[0].text.split(stop)[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="one two three", max_tokens=16, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.choices[0].text  # held back text never leaks the stop string
    sampled = client.completions.create(model=model, prompt="one two three", max_tokens=8, temperature=1.0, n=3,
                                        seed=11, logprobs=2)
    again = client.completions.create(model=model, prompt="one two three", max_tokens=8, temperature=1.0, n=3,
                                      seed=11, logprobs=2)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert len(sampled.choices) == 3 and len(sampled.choices[0].logprobs.tokens) == 8
    chat = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=5, logprobs=True,
                                          top_logprobs=3, temperature=0, extra_body={"top_k": 5, "min_p": 0.1})
    assert len(chat.choices[0].logprobs.content) == 5 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 3


def test_errors_have_openai_shape_and_status(server: Server, client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=CHAT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=model, messages="hello")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=model, prompt="word " * 600)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-missing")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    for body, length, status in ((b"not json", 8, 400), (b"", 17 << 20, 413)):
        # The 413 is decided on the declared length, before any of the body is read.
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.putrequest("POST", "/v1/chat/completions")
        connection.putheader("Authorization", f"Bearer {API_KEY}")
        connection.putheader("Content-Length", str(length))
        connection.endheaders(body)
        response = connection.getresponse()
        assert response.status == status
        error = json.loads(response.read())["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
        connection.close()


def batch_file(path: Path, model: str, count: int, max_tokens: int = 6) -> Path:
    lines = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                                  "messages": [{"role": "user", "content": f"Tell me about number {i}."}]}})
             for i in range(count)]
    lines.insert(2, '{"custom_id": "broken", ')
    lines.insert(4, json.dumps({"custom_id": "other-endpoint", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": "x"}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 180) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch still {batch.status}")


def test_batch_lifecycle(tmp_path: Path, client: openai.OpenAI, model: str) -> None:
    uploaded = client.files.create(file=batch_file(tmp_path / "in.jsonl", model, 20).open("rb"), purpose="batch")
    assert client.files.retrieve(uploaded.id).bytes == (tmp_path / "in.jsonl").stat().st_size
    assert client.files.content(uploaded.id).content == (tmp_path / "in.jsonl").read_bytes()
    assert uploaded.id in [f.id for f in client.files.list().data]
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "test"})
    assert batch.status == "validating" and batch.metadata == {"job": "test"}
    done = wait_for(client, batch.id, ("completed", "failed"))
    assert done.status == "completed" and done.completed_at and done.in_progress_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (22, 20, 2)
    results = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(20))
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert sorted(e["error"]["code"] for e in errors) == ["invalid_json", "invalid_url"]
    assert batch.id in [b.id for b in client.batches.list(limit=5).data]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_cancel_keeps_partial_results(tmp_path: Path, client: openai.OpenAI, model: str) -> None:
    uploaded = client.files.create(file=batch_file(tmp_path / "in.jsonl", model, 400, 40).open("rb"),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(client, batch.id, ("in_progress",))
    while client.batches.retrieve(batch.id).request_counts.completed < 5:
        time.sleep(0.1)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    cancelled = wait_for(client, batch.id, ("cancelled",))
    assert 5 <= cancelled.request_counts.completed < 400
    kept = client.files.content(cancelled.output_file_id).text.splitlines()
    assert len(kept) == cancelled.request_counts.completed


def test_concurrent_streams_share_the_batch_and_memory_returns(server: Server, client: openai.OpenAI,
                                                               model: str) -> None:
    def stream(i: int) -> str:
        chunks = client.chat.completions.create(model=model, stream=True, max_tokens=32, temperature=0,
                                                messages=[{"role": "user", "content": f"Count to {i}."}])
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    for _ in range(2):  # warm-up: allocator and pool pages at their working size
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(stream, range(64)))
    idle = server.rss_mib()
    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            texts = list(pool.map(stream, range(64)))
        assert all(texts)
    deadline = time.monotonic() + 10
    while (metrics := server.metrics())["tokenmill_requests_running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metrics["tokenmill_requests_running"] == 0 and metrics["tokenmill_kv_cache_usage_ratio"] == 0
    # NOTE: the KV pool's pages are committed as blocks are first used (new blocks are taken
    # before cached ones are evicted), so memory may grow up to the pool's size, never beyond.
    assert server.rss_mib() < idle * 1.1 + 20 + KV_CACHE_BYTES / 2**20


def test_disconnect_mid_stream_frees_the_request(server: Server, client: openai.OpenAI, model: str) -> None:
    stream = client.completions.create(model=model, prompt="forever", max_tokens=400, temperature=0,
                                       extra_body={"ignore_eos": True}, stream=True)
    next(iter(stream))
    assert server.metrics()["tokenmill_requests_running"] == 1
    stream.close()
    deadline = time.monotonic() + 10
    while server.metrics()["tokenmill_requests_running"] != 0:
        assert time.monotonic() < deadline, "the request kept running after its client left"
        time.sleep(0.1)
    assert server.metrics()["tokenmill_kv_cache_usage_ratio"] == 0


def test_sigkill_mid_batch_then_restart_completes_exactly_once(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    server = Server(tiny_models["llama"], tmp_path / "data").start()
    client = server.client()
    model = client.models.list().data[0].id
    uploaded = client.files.create(file=batch_file(tmp_path / "in.jsonl", model, 300, 24).open("rb"),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    output = tmp_path / "data" / "batches" / batch.id / "output.jsonl"
    while not output.exists() or output.stat().st_size < 50_000:  # past the first fsync
        assert client.batches.retrieve(batch.id).status in ("validating", "in_progress")
        time.sleep(0.05)
    server.kill()
    survivors = output.read_bytes().count(b"\n")
    assert 0 < survivors < 300

    server.start()
    try:
        done = wait_for(server.client(), batch.id, ("completed",))
        results = [json.loads(line) for line in server.client().files.content(done.output_file_id).text.splitlines()]
        ids = [r["custom_id"] for r in results]
        assert len(ids) == len(set(ids)) == 300
        assert (done.request_counts.completed, done.request_counts.failed) == (300, 2)
    finally:
        server.kill()
    assert os.path.exists(tmp_path / "data" / "tokenmill.sqlite3")


def test_structured_output_over_http(client: openai.OpenAI, model: str) -> None:
    colours = ["red", "green", "blue"]
    answer = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0.7,
                                            extra_body={"structured_outputs": {"choice": colours}})
    assert answer.choices[0].message.content in colours and answer.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=model, messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}})
    with pytest.raises(openai.BadRequestError, match="structured output: cannot compile json: Unsupported type"):
        client.chat.completions.create(model=model, messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "wrong"}}}}})


def test_a_batch_past_its_window_expires_with_partial_results(tmp_path: Path, tiny_models: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.engine.config import EngineConfig
    from tokenmill.engine.engine import Engine
    from tokenmill.engine.threaded import EngineThread
    from tokenmill.server import batches as batches_module
    from tokenmill.server.store import Store

    monkeypatch.setattr(batches_module, "COMPLETION_WINDOW_S", 2)  # instead of 24 hours
    engine = Engine(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", kv_cache_memory=1 << 26,
                                 max_num_seqs=4))
    engine_thread = EngineThread(engine)
    try:
        manager = batches_module.BatchManager(Store(tmp_path / "data"), engine_thread)
        path = batch_file(tmp_path / "in.jsonl", engine_thread.frontend.model_name, 2000, 40)
        uploaded = manager.store.register_file(path, "in.jsonl", "batch")
        batch = manager.create(uploaded["id"], "/v1/chat/completions", "24h", None)
        deadline = time.monotonic() + 60
        while (state := manager.get(batch["id"]))["status"] not in ("expired", "completed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state["status"] == "expired" and state["expired_at"] is not None
        assert 0 < state["request_counts"]["completed"] < 2000
        output = manager.store.get_file(state["output_file_id"])[1]
        assert len(output.read_text().splitlines()) == state["request_counts"]["completed"]
    finally:
        engine_thread.stop()


def test_streamed_choices_report_their_finish_once(client: openai.OpenAI, model: str) -> None:
    chunks = list(client.completions.create(model=model, prompt="one two", max_tokens=12, temperature=1.5, seed=2,
                                            n=3, stop=["e"], stream=True))
    finishes = [(c.index, c.finish_reason) for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert sorted(i for i, _ in finishes) == [0, 1, 2]


def test_two_batches_on_one_file_both_complete(tmp_path: Path, client: openai.OpenAI, model: str) -> None:
    uploaded = client.files.create(file=batch_file(tmp_path / "in.jsonl", model, 10).open("rb"), purpose="batch")
    first, second = (client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                           completion_window="24h") for _ in range(2))
    for batch in (first, second):
        done = wait_for(client, batch.id, ("completed", "failed"), timeout=120)
        assert done.status == "completed" and done.request_counts.completed == 10
    assert client.chat.completions.create(model=model, messages=CHAT, max_tokens=2).choices  # engine still alive


def test_batches_page_with_limit_and_after(tmp_path: Path, server: Server, client: openai.OpenAI) -> None:
    (tmp_path / "in.jsonl").write_text("not json\n")  # a batch that finishes at once
    uploaded = client.files.create(file=(tmp_path / "in.jsonl").open("rb"), purpose="batch")
    created = {client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(5)}

    def page(**params: object) -> dict:
        return client.batches.with_raw_response.list(**params).http_response.json()

    everything = page(limit=100)
    ids = [b["id"] for b in everything["data"]]
    assert created <= set(ids) and not everything["has_more"] and len(ids) == len(set(ids))
    # Newest first; batches created within the same second are ordered by id.
    assert [(b["created_at"], b["id"]) for b in everything["data"]] == sorted(
        ((b["created_at"], b["id"]) for b in everything["data"]), reverse=True)
    paged: list[str] = []
    after: str | None = None
    while True:
        current = page(limit=2, **({"after": after} if after else {}))
        data = [b["id"] for b in current["data"]]
        assert 1 <= len(data) <= 2 and (current["first_id"], current["last_id"]) == (data[0], data[-1])
        paged += data
        assert current["has_more"] == (len(paged) < len(ids))
        if not current["has_more"]:
            break
        after = current["last_id"]
    assert paged == ids
    assert [b.id for b in client.batches.list(limit=2)] == ids  # the client's own paging, through `after`
    last = page(limit=2, after=ids[-1])
    assert (last["data"], last["first_id"], last["last_id"], last["has_more"]) == ([], None, None, False)
    with pytest.raises(openai.NotFoundError, match="batch_unknown"):  # not a silent restart from the top
        client.batches.list(limit=2, after="batch_unknown")


def histogram(text: str, name: str, kind: str) -> tuple[list[tuple[float, float]], float, float]:
    """A histogram's cumulative buckets (le, count), sum and count in Prometheus' text format."""
    assert f"# TYPE {name} histogram" in text
    buckets = [(float(le), float(value)) for le, value in
               re.findall(rf'^{name}_bucket{{kind="{kind}",le="([^"]+)"}} (\S+)$', text, re.MULTILINE)]
    total = re.search(rf'^{name}_sum{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
    count = re.search(rf'^{name}_count{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
    assert buckets and total and count
    return buckets, float(total.group(1)), float(count.group(1))


LATENCIES = ("tokenmill_request_queue_time_seconds", "tokenmill_time_to_first_token_seconds",
             "tokenmill_time_per_output_token_seconds", "tokenmill_e2e_request_latency_seconds")


def test_metrics_have_latency_histograms(server: Server, client: openai.OpenAI, model: str) -> None:
    def scrape() -> str:
        return urllib.request.urlopen(f"{server.url}/metrics").read().decode()

    before = {name: histogram(scrape(), name, "interactive") for name in LATENCIES}
    for stream in (False, True, False):
        reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, stream=stream,
                                               extra_body={"ignore_eos": True})
        if stream:
            assert list(reply)[-1].choices[0].finish_reason == "length"
    text = scrape()
    types = {family.name: family.type for family in text_string_to_metric_families(text)}  # parses: well formed
    assert all(types[name] == "histogram" for name in LATENCIES)
    for name in LATENCIES:
        buckets, total, count = histogram(text, name, "interactive")
        assert count - before[name][2] == 3 and total > before[name][1]  # one each: all have 8 tokens
        bounds, counts = [b for b, _ in buckets], [c for _, c in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf") and counts[-1] == count
        assert counts == sorted(counts)  # cumulative
    assert histogram(text, LATENCIES[1], "interactive")[1] <= histogram(text, LATENCIES[3], "interactive")[1]


def test_batch_usage_progress_and_its_gauges(tmp_path: Path, server: Server, client: openai.OpenAI,
                                             model: str) -> None:
    small = client.files.create(file=batch_file(tmp_path / "small.jsonl", model, 10).open("rb"), purpose="batch")
    done = wait_for(client, client.batches.create(input_file_id=small.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h").id, ("completed",))
    records = [json.loads(line)["response"]["body"]["usage"]
               for line in client.files.content(done.output_file_id).text.splitlines()]
    assert done.usage is not None and done.usage.output_tokens == sum(r["completion_tokens"] for r in records) == 60
    assert done.usage.input_tokens == sum(r["prompt_tokens"] for r in records)
    assert done.usage.input_tokens_details.cached_tokens == sum(r["prompt_tokens_details"]["cached_tokens"]
                                                                for r in records)
    progress = done.to_dict()["progress"]
    assert progress["elapsed_seconds"] > 0 and progress["eta_seconds"] is None
    assert progress["output_tokens_per_second"] == pytest.approx(60 / progress["elapsed_seconds"], rel=0.01)
    assert progress["prefix_cache_hit_rate"] == pytest.approx(
        done.usage.input_tokens_details.cached_tokens / done.usage.input_tokens, abs=1e-4)

    large = client.files.create(file=batch_file(tmp_path / "large.jsonl", model, 1000, 64).open("rb"),
                                purpose="batch")
    batch = client.batches.create(input_file_id=large.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(client, batch.id, ("in_progress",))
    while (running := client.batches.retrieve(batch.id)).request_counts.completed < 5:
        time.sleep(0.1)
    metrics = server.metrics()
    client.batches.cancel(batch.id)
    label = f'batch_id="{batch.id}"'
    assert metrics[f'tokenmill_batch_requests{{{label},state="total"}}'] == 1002
    assert metrics[f'tokenmill_batch_requests{{{label},state="completed"}}'] >= running.request_counts.completed
    assert metrics[f'tokenmill_batch_requests{{{label},state="failed"}}'] == 2
    assert metrics[f"tokenmill_batch_elapsed_seconds{{{label}}}"] > 0
    assert metrics[f"tokenmill_batch_eta_seconds{{{label}}}"] > 0
    assert metrics[f"tokenmill_batch_output_tokens_per_second{{{label}}}"] > 0
    assert 0 <= metrics[f"tokenmill_batch_prefix_cache_hit_rate{{{label}}}"] <= 1
    assert running.to_dict()["progress"]["eta_seconds"] > 0
    # The batch's own requests are observed apart from the interactive ones.
    assert metrics['tokenmill_e2e_request_latency_seconds_count{kind="batch"}'] >= 5 + 10
    wait_for(client, batch.id, ("cancelled",))
    assert not any(label in name for name in server.metrics())  # its series end with its job
