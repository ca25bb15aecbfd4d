"""What reading a batch input costs besides the requests: the whole-file fingerprint, the line
count, and exact duplicate detection of custom_ids (`CustomIds`), against the set of Python
`hash()` values it replaced (64 bits: a collision fails a valid line).

Writes a file of chat lines (~400 bytes each) with uuid4 custom_ids (random order: the worst case
for the B-tree) or sequential ones, then measures each step in a process of its own, so that its
peak RSS is its own: CPU seconds, and peak RSS over what the process had after its imports.

    .venv/bin/python benchmarks/bench_input_scan.py [--lines 1000000] [--ids uuid|sequential]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

STEPS = ("fingerprint", "count_lines", "hash_set", "custom_ids", "read_lines")


def write_input(path: Path, lines: int, ids: str) -> None:
    rng = random.Random(0)
    words = "the a hotel guest city booking arrive night room please thank you date name travel agent".split()
    with path.open("w") as f:
        for i in range(lines):
            custom_id = f"req-{i:08d}" if ids == "sequential" else str(uuid.UUID(int=rng.getrandbits(128), version=4))
            user = " ".join(rng.choice(words) for _ in range(30))
            f.write(json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "m", "max_tokens": 16, "messages": [
                                    {"role": "system", "content": "You are a terse assistant."},
                                    {"role": "user", "content": user}]}}) + "\n")


def custom_ids_of(path: Path) -> list[str]:
    with path.open("rb") as f:
        return [json.loads(line)["custom_id"] for line in f]


def measure(step: str, path: Path) -> dict[str, float]:
    """Runs one step in this process; its CPU time and the growth of peak RSS it caused."""
    from tokenmill.batch.dedup import CustomIds
    from tokenmill.batch.journal import input_fingerprint
    from tokenmill.batch.ordering import read_lines
    from tokenmill.batch.runner import count_lines

    scratch = path.with_name(path.name + ".custom_ids.sqlite3")
    ids = custom_ids_of(path) if step in ("hash_set", "custom_ids") else []  # not part of the cost
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    scratch_bytes = 0
    if step == "fingerprint":
        input_fingerprint(path)
    elif step == "count_lines":
        count_lines(path)
    elif step == "hash_set":
        seen: set[int] = set()
        for custom_id in ids:
            key = hash(custom_id)
            assert key not in seen
            seen.add(key)
    elif step == "custom_ids":
        with CustomIds(scratch) as claimed:
            for line_no, custom_id in enumerate(ids, 1):
                assert claimed.claim(custom_id, line_no) is None
            scratch_bytes = scratch.stat().st_size
    else:
        for _ in read_lines(path, scratch):
            pass
    cpu = time.process_time() - start
    grown = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024
    return {"cpu_s": round(cpu, 2), "peak_rss_growth_mib": round(grown, 1), "scratch_mib": scratch_bytes >> 20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--ids", choices=("uuid", "sequential"), default="uuid")
    parser.add_argument("--measure", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.file)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.jsonl"
        write_input(path, args.lines, args.ids)
        print(f"{args.lines} lines, {args.ids} custom_ids, {path.stat().st_size / 1e9:.2f} GB")
        for step in STEPS:
            result = subprocess.run([sys.executable, __file__, "--measure", step, "--file", str(path)],
                                    capture_output=True, text=True, check=True)
            print(f"{step:12s} {result.stdout.strip()}")


if __name__ == "__main__":
    main()
