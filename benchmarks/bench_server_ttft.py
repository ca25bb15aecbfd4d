"""Time to first token of interactive requests on `tokenmill serve`, idle and while a batch runs.

Starts a real server on the default model, measures streamed TTFT of a few chat requests on an
idle server, then submits a batch job through /v1/batches and measures again while it runs.

    .venv/bin/python benchmarks/bench_server_ttft.py [--batch-lines 400] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ttft(client: openai.OpenAI, model: str, i: int) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(model=model, stream=True, max_tokens=16, temperature=0, messages=[
        {"role": "user", "content": f"Give me one fact about the number {i}."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            elapsed = time.perf_counter() - start
            stream.close()
            return elapsed
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-lines", type=int, default=400)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port),
                                   "--data-dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
            model = client.models.list().data[0].id
            ttft(client, model, -1)  # warm-up
            idle = [ttft(client, model, i) for i in range(args.samples)]

            system = "You are a support assistant. Classify the ticket as billing, shipping or technical. " * 4
            lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": model, "max_tokens": 32, "temperature": 0, "messages": [
                                     {"role": "system", "content": system},
                                     {"role": "user", "content": f"Ticket {i}: my order {i * 37} has a problem."}]}})
                     for i in range(args.batch_lines)]
            path = Path(tmp) / "batch.jsonl"
            path.write_text("\n".join(lines) + "\n")
            batch = client.batches.create(input_file_id=client.files.create(file=path.open("rb"), purpose="batch").id,
                                          endpoint="/v1/chat/completions", completion_window="24h")
            while client.batches.retrieve(batch.id).request_counts.completed < 10:
                time.sleep(0.2)
            busy = [ttft(client, model, i) for i in range(args.samples)]
            state = client.batches.retrieve(batch.id)
            print(f"batch of {args.batch_lines} lines, {state.request_counts.completed} done when measuring ended "
                  f"({state.status})")
            print("| server | TTFT median (ms) | TTFT max (ms) |\n|---|---:|---:|")
            for name, values in (("idle", idle), ("batch running", busy)):
                print(f"| {name} | {statistics.median(values) * 1000:.0f} | {max(values) * 1000:.0f} |")
        finally:
            server.kill()


if __name__ == "__main__":
    main()
