"""Crash-safe result files: the output and error files are themselves the job's journal.

Records are appended as requests finish and made durable in chunks (flush + fsync). Each record's
id names its input line, so a rerun reads which lines are done from the files themselves; a torn
last line left by a crash is cut away first. A record is either durable or recomputed, never both:
every line ends up exactly once in OUTPUT or ERRORS.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import IO, Any

SYNC_EVERY_RECORDS = 64
SYNC_EVERY_SECONDS = 2.0


def input_fingerprint(path: Path) -> str:
    """A hash of the whole input file: an edit anywhere in it, even one that keeps its size, gives
    another fingerprint, so a rerun cannot mix records of two versions of the input."""
    # NOTE: one pass before the job starts, like counting its lines: 0.3 s per 10^6 lines of ~400
    # bytes (SHA-256 at ~1.4 GB/s), against hours of inference for such a file (docs/PERFORMANCE.md).
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


def record_id(fingerprint: str, line_no: int) -> str:
    return f"batch_req_{fingerprint}_{line_no}"


def line_of(record_id_: str) -> int:
    return int(record_id_.rsplit("_", 1)[1])


def cut_torn_tail(path: Path) -> None:
    """Truncates a file after its last complete line (a crash may have left half a record)."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                pos = pos - step + newline + 1
                break
            pos -= step
        if pos != size:
            f.truncate(pos)


class LineSet:
    """A set of input line numbers as a bit array: 1.25 MB for 10^7 lines, where a set of ints
    would take hundreds of MB, so a resumed job's memory does not grow with its input."""

    def __init__(self) -> None:
        self.bits = bytearray()
        self.count = 0

    def add(self, line_no: int) -> None:
        byte, bit = divmod(line_no, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))  # grows geometrically
        if not self.bits[byte] >> bit & 1:
            self.bits[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, line_no: int) -> bool:
        byte, bit = divmod(line_no, 8)
        return byte < len(self.bits) and bool(self.bits[byte] >> bit & 1)

    def __len__(self) -> int:
        return self.count


def done_lines(path: Path, fingerprint: str, input_path: Path, done: LineSet | None = None) -> LineSet:
    """Adds to `done` (a new LineSet by default) the input line numbers that have a record in path;
    raises ValueError if the records are of another input than input_path as it is now (another
    file, or this one edited since)."""
    done = LineSet() if done is None else done
    if not path.exists():
        return done
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                rid = json.loads(raw)["id"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number} is not a tokenmill result record: repair or remove the "
                                 "file, or rerun with --overwrite") from None
            if not rid.startswith(f"batch_req_{fingerprint}_"):
                raise ValueError(f"{path} holds results of a different input: the input changed since the first "
                                 f"run ({input_path} was edited, or that run read another file); rerun with "
                                 "--overwrite to start over")
            done.add(line_of(rid))
    return done


class JobLock:
    """One run per output file at a time. The lock file also remembers where the job's errors go,
    since a resumed run must read the same error file to know which lines already failed."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".lock")
        self.file: IO[str] | None = None

    def __enter__(self) -> JobLock:
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another tokenmill run is writing {self.path.with_suffix('')}") from None
        return self

    def claim(self, errors: Path, overwrite: bool) -> None:
        """Records errors as this job's error file; refuses a resume that names another one."""
        assert self.file is not None
        self.file.seek(0)
        previous = self.file.read().strip()
        current = str(errors.resolve())
        if previous and previous != current and not overwrite:
            raise ValueError(f"an earlier run of this job wrote its errors to {previous}: pass --errors {previous} "
                             "to resume it, or --overwrite to start over")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(current)
        self.file.flush()

    def __exit__(self, *exc: object) -> None:
        # NOTE: the lock file is left in place: unlinking it would let a waiting process lock the
        # old inode while a new one locks a fresh file at the same path.
        assert self.file is not None
        self.file.close()


class DurableAppender:
    """Appends JSON lines to several files, fsyncing them together every few records or seconds."""

    def __init__(self, *paths: Path) -> None:
        self.files = {p: p.open("ab") for p in paths}
        self.unsynced = 0
        self.last_sync = time.monotonic()

    def append(self, path: Path, record: dict[str, Any]) -> None:
        self.append_encoded(path, json.dumps(record, ensure_ascii=False))

    def append_encoded(self, path: Path, record: str) -> None:
        """Appends a record already encoded as one line of JSON."""
        # One write call per whole line: a crash tears at most the last line.
        # NOTE: a JSON escape in the input can make a lone surrogate (say in a custom_id), which
        # UTF-8 cannot encode; json.dumps only puts one inside a string, where backslashreplace
        # writes it as the same JSON escape again.
        self.files[path].write(record.encode("utf-8", "backslashreplace") + b"\n")
        self.unsynced += 1
        if self.unsynced >= SYNC_EVERY_RECORDS or time.monotonic() - self.last_sync >= SYNC_EVERY_SECONDS:
            self.sync()

    def sync(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        self.unsynced = 0
        self.last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        for f in self.files.values():
            f.close()
