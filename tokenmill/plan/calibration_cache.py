"""Calibrations kept on disk, so that planning the same job again (or another job on the same
model and machine) does not run the engine again.

One JSON file per key under `~/.cache/tokenmill/plan/`: the key is a hash of what makes step
times differ: the model file (path, size, modification time), the engine settings that shape a
step (dtype, what the weights run as, max_num_seqs, the step's token budget, block size), the CPU
model and the torch thread count, and torch's version. A file holds the grid's timed steps and,
by input fingerprint, each sampled job's steps, output lengths and time per line spent outside the
engine. Written atomically; a file that cannot be read is ignored (and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenmill.engine.engine import Engine
from tokenmill.plan.cost import StepWork
from tokenmill.plan.simulate import Observed

DEFAULT_CACHE_DIR = Path("~/.cache/tokenmill/plan")
FORMAT = 4  # of the files: in the key, so that a file of another format is another key


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(engine: Engine, threads: int) -> dict[str, Any]:
    """What step times depend on, for `engine` run with `threads` torch threads."""
    stat = Path(engine.model_path).stat()
    config = engine.config
    return {"format": FORMAT, "model": str(Path(engine.model_path).resolve()), "model_bytes": stat.st_size,
            "model_mtime_ns": stat.st_mtime_ns, "dtype": str(engine.dtype), "quantization": engine.quantization,
            "max_num_seqs": config.max_num_seqs, "step_tokens": config.step_tokens(engine.task),
            "block_size": config.block_size, "cpu": cpu_model(), "threads": threads, "torch": torch.__version__}


@dataclass
class JobSample:
    """A job's sample, run here: its lines, wall time, time per line outside the engine's steps, its
    timed steps (the first, which may pay one-time set-up, left out) and its outputs' lengths."""

    lines: int
    seconds: float
    overhead_per_line: float
    steps: list[tuple[StepWork, float]]
    observed: list[Observed]


@dataclass
class Calibration:
    """What is known of one model on this machine at one thread count."""

    key: dict[str, Any]
    grid_steps: list[tuple[StepWork, float]] = field(default_factory=list)
    jobs: dict[str, JobSample] = field(default_factory=dict)  # by input fingerprint

    def steps(self, fingerprint: str) -> list[tuple[StepWork, float]]:
        """The steps a job's cost model is fitted on: the grid's and the job's own sample's (not other
        jobs', so that a job's plan does not depend on what was planned before it)."""
        job = self.jobs.get(fingerprint)
        return self.grid_steps + (job.steps if job is not None else [])


def _steps_to_json(steps: list[tuple[StepWork, float]]) -> list[list[float]]:
    return [[*astuple(w), s] for w, s in steps]


def _steps_from_json(rows: list[list[float]]) -> list[tuple[StepWork, float]]:
    return [(StepWork(*map(int, row[:-1])), float(row[-1])) for row in rows]


def _job_to_json(job: JobSample) -> dict[str, Any]:
    return {"lines": job.lines, "seconds": job.seconds, "overhead_per_line": job.overhead_per_line,
            "steps": _steps_to_json(job.steps), "observed": [[o.max_tokens, o.length] for o in job.observed]}


def _job_from_json(data: dict[str, Any]) -> JobSample:
    return JobSample(data["lines"], data["seconds"], data["overhead_per_line"], _steps_from_json(data["steps"]),
                     [Observed(m, n) for m, n in data["observed"]])


class CalibrationCache:
    def __init__(self, folder: Path = DEFAULT_CACHE_DIR) -> None:
        self.folder = folder.expanduser()

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.folder / f"{digest}.json"

    def load(self, key: dict[str, Any]) -> Calibration:
        """The calibration stored for key, or an empty one."""
        try:
            data = json.loads(self.path(key).read_text())
            if data["key"] != key:
                raise ValueError("another key")
            return Calibration(key, _steps_from_json(data["grid_steps"]),
                               {fp: _job_from_json(job) for fp, job in data["jobs"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            return Calibration(key)

    def save(self, calibration: Calibration) -> None:
        path = self.path(calibration.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"key": calibration.key, "grid_steps": _steps_to_json(calibration.grid_steps),
                "jobs": {fp: _job_to_json(job) for fp, job in calibration.jobs.items()}}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
