"""`tokenmill bench batched --load`: what it costs to start each engine on a model, measured alike.

Each engine is started three times in a fresh process that loads the model and answers one request of
PP tokens (the grid's first PP) with one token, then exits: once unmeasured, which builds anything built
once per machine (tokenmill's kernels, after a change to their sources) and reads the model's files, then
- warm: with the files in the page cache;
- cold: right after the files were dropped from the page cache with `posix_fadvise(DONTNEED)`, as after
  a reboot. The kernel keeps pages that a process still maps, so this runs before the bench's own engine
  loads; a file mapped by some other process stays cached, and the cold figures are then warm ones. Only
  the model's files are dropped, not the engines' libraries; in a virtual machine the host may still
  cache the disk, so a cold read can be faster than the disk itself.
Columns: `load s` is the engine's own load step (tokenmill's `Engine()`, llama.cpp's `load time`,
OpenVINO's pipeline construction); llama.cpp maps the file and reads weights lazily after it (tokenmill
reads every tensor during its load step), so `to 1st token s` is the whole process, start to exit,
imports included: what a user waits for. `peak RSS` is that process's (the warm one's), every weight page it touched
included. TTFT, measured elsewhere on the warm engine, is one request of PP tokens to its first token.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.engine.config import EngineConfig


@dataclass
class Load:
    engine: str
    files_bytes: int  # the model's files this engine reads
    load_cold: float
    load_warm: float
    first_token_cold: float
    first_token_warm: float
    peak_rss: int
    ttft: dict[int, float] = field(default_factory=dict)  # PP -> seconds, on the warm engine


@dataclass
class Measured:
    stdout: str
    stderr: str
    wall: float
    peak_rss: int


def model_files(path: Path) -> list[Path]:
    """The file itself, or a folder's files (not its subfolders: an OpenVINO export's `hf/` is not read)."""
    return [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())


def read_into_page_cache(files: list[Path]) -> None:
    for path in files:
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass


def drop_from_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_measured(args: list[str], stdin: str = "") -> Measured:
    """Runs a process to its end; raises ValueError with its last words if it fails."""
    with tempfile.TemporaryFile("w+") as inp, tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        inp.write(stdin)
        inp.seek(0)
        start = time.perf_counter()
        process = subprocess.Popen(args, stdin=inp, stdout=out, stderr=err)
        # NOTE: os.wait4 rather than Popen.wait, for this child's own peak RSS (getrusage's RUSAGE_CHILDREN
        # is the largest of all children so far).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        measured = Measured(out.read(), err.read(), wall, usage.ru_maxrss * 1024)
    if process.returncode != 0:
        tail = "\n".join(measured.stderr.strip().splitlines()[-5:])
        raise ValueError(f"{Path(args[0]).name} {' '.join(args[1:3])} ... exited with {process.returncode}:\n{tail}")
    return measured


def cold_and_warm(engine: str, files: list[Path], start: Any) -> Load:
    """`start()` runs one fresh process and returns (its Measured, the engine's load seconds)."""
    start()
    read_into_page_cache(files)  # all of them, the parts that start left unread too
    warm, load_warm = start()
    drop_from_page_cache(files)
    cold, load_cold = start()
    return Load(engine, sum(f.stat().st_size for f in files), load_cold, load_warm, cold.wall, warm.wall,
                warm.peak_rss)


def load_probe() -> None:
    """The fresh tokenmill process: spec on stdin ({config, threads, prompt}), its load seconds on stdout."""
    import torch

    from tokenmill.bench import run_to_completion
    from tokenmill.engine.client import LocalClient, Submission
    from tokenmill.engine.engine import Engine
    from tokenmill.sampling_params import SamplingParams

    spec = json.load(sys.stdin)
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    engine = Engine(EngineConfig(**spec["config"]))
    load_s = time.perf_counter() - start
    run_to_completion(LocalClient(engine), [Submission("probe", None, spec["prompt"],
                                                       SamplingParams(temperature=0, max_tokens=1))])
    print(json.dumps({"load_s": load_s}))


def tokenmill_load(config: EngineConfig, model: Path, threads: int, prompt: list[int]) -> Load:
    spec = json.dumps({"config": asdict(config), "threads": threads, "prompt": prompt})

    def start() -> tuple[Measured, float]:
        measured = run_measured([sys.executable, "-c", "from tokenmill.bench_load import load_probe; load_probe()"],
                                spec)
        return measured, json.loads(measured.stdout.strip().splitlines()[-1])["load_s"]

    return cold_and_warm("tokenmill", model_files(model), start)


def llamacpp_load(binary: str, gguf: Path, threads: int, pp: int) -> Load:
    args = [binary, "-m", str(gguf), "-c", str(pp + 64), "-t", str(threads), "-npp", str(pp), "-ntg", "1", "-npl", "1",
            "--perf", "-lv", "4", "--output-format", "jsonl"]  # NOTE: verbosity 4 for the perf lines

    def start() -> tuple[Measured, float]:
        measured = run_measured(args)
        found = re.search(r"load time =\s*([\d.]+) ms", measured.stderr)
        if found is None:
            raise ValueError(f"{binary} printed no load time")
        return measured, float(found.group(1)) / 1000

    return cold_and_warm("llama.cpp", [gguf], start)


def openvino_load(python: str, folder: Path, spec: dict[str, Any], prompt: list[int]) -> Load:
    probe = json.dumps({**spec, "warmup": None, "ttft": [prompt], "grid": []})

    def start() -> tuple[Measured, float]:
        measured = run_measured([python, str(Path(__file__).with_name("openvino_peer.py"))], probe)
        return measured, json.loads(measured.stdout)["load_s"]

    return cold_and_warm("openvino", model_files(folder), start)


def markdown(loads: list[Load], pp: int) -> str:
    pps = sorted({p for load in loads for p in load.ttft})
    lines = [f"| engine | files MiB | load s cold | load s warm | to 1st token s cold (PP={pp}) | "
             "to 1st token s warm | peak RSS MiB | " + " | ".join(f"TTFT s PP={p}" for p in pps) + " |",
             "|---|" + "---:|" * (6 + len(pps))]
    for load in loads:
        ttft = " | ".join(f"{load.ttft[p]:.3f}" if p in load.ttft else "" for p in pps)
        lines.append(f"| {load.engine} | {load.files_bytes / 2**20:.0f} | {load.load_cold:.2f} | {load.load_warm:.2f} "
                     f"| {load.first_token_cold:.2f} | {load.first_token_warm:.2f} | {load.peak_rss / 2**20:.0f} "
                     f"| {ttft} |")
    return "\n".join(lines)
