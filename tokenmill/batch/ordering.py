"""Reading a batch input: in file order, or the whole job in prompt-prefix order in bounded memory.

Lines that share a prompt prefix may lie anywhere in a batch file (tasks concatenated, or the file
shuffled); computing each shared prefix once needs them admitted together (BatchLLM's global prefix
sharing), and a window of the file cannot see them all. So the job is read twice:

1. `JobOrder.build` streams the input once (`scan_lines`: each line parsed, its custom_id checked
   for duplicates), prepares each line as its endpoint does (the chat template applied, tokenized; a
   line that fails gets its error record now, through `fail`) and keys it by its first prompt's
   leading full blocks: their chained hashes (the prefix cache's own, kv/manager.py), HASH_BYTES
   each, up to KEY_BLOCKS. Lines whose prompts share k blocks share their keys' first k hashes, so
   in key order they are consecutive, and among them those that share more blocks are too (a
   trie's order). Each line is a row (key, line number, byte offset, size) of an SQLite table in a
   scratch file; indexing it by key is SQLite's external merge sort, in bounded memory.
2. `JobOrder.lines` reads the rows back in key order, and each line from the input at its offset.

The scratch file is written under a temporary name and renamed once complete, so a file at the
final name is a finished first pass: a resumed job reuses it (if its stamp, the input's fingerprint
and the block size, matches) and skips the lines done since; the job removes it once every line has
its record. A line whose endpoint gains nothing from prompt order (embeddings) has an empty key:
such lines come first, in input order.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from tokenmill.batch.dedup import CustomIds
from tokenmill.batch.format import BatchLine, LineError, parse_line
from tokenmill.batch.journal import LineSet
from tokenmill.endpoints import Prompt
from tokenmill.kv.manager import next_block_hash

# A key covers the first KEY_BLOCKS full blocks of a prompt (1,024 tokens at block size 16): enough
# for a long shared system prompt or few-shot preamble; lines that agree further stay in line order.
KEY_BLOCKS = 64
# Bytes kept of each block's hash: 2^-64 is the chance that two different blocks at the same depth
# under the same parent would sort as one (harmless then: it only orders, the cache compares in full).
HASH_BYTES = 8
# SQLite's page cache (its cache_size, in KiB), which also bounds the sorter's memory when indexing.
CACHE_KIB = 32 << 10
ROWS_PER_INSERT = 4096

Lines = Iterator[tuple[int, BatchLine | LineError]]  # (line number, the line or what is wrong with it)
ScannedLines = Iterator[tuple[int, int, int, BatchLine | LineError]]  # (line number, offset, size, ...)


def _parse(raw: bytes, line_no: int) -> BatchLine:
    return parse_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"), line_no)


def scan_lines(path: Path, custom_ids: Path, endpoint: str | None = None) -> ScannedLines:
    """Every non-blank line of path with its byte offset and size, validated, in file order. A
    custom_id that an earlier valid line claimed fails (judged exactly, in the scratch file
    custom_ids: see dedup.py); with `endpoint`, every line's url must be it (the server's batches)."""
    with path.open("rb") as f, CustomIds(custom_ids) as claimed:
        offset = 0
        for line_no, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                line = _parse(raw, line_no)
                if endpoint is not None and line.url != endpoint:
                    raise LineError("invalid_url", f"line {line_no}: url {line.url} is not the batch's endpoint "
                                                   f"{endpoint}", line.custom_id)
                first = claimed.claim(line.custom_id, line_no)
                if first is not None:
                    raise LineError("duplicate_custom_id",
                                    f"line {line_no}: custom_id {line.custom_id!r} was used by line {first}",
                                    line.custom_id)
                item: BatchLine | LineError = line
            except LineError as e:
                item = e
            yield line_no, start, len(raw), item


def read_lines(path: Path, custom_ids: Path, endpoint: str | None = None) -> Lines:
    """`scan_lines` without the offsets."""
    for line_no, _, _, item in scan_lines(path, custom_ids, endpoint):
        yield line_no, item


def order_key(token_ids: list[int], block_size: int) -> bytes:
    """The leading full blocks' chained hashes, HASH_BYTES of each."""
    parent, parts = b"", []
    for start in range(0, min(len(token_ids) // block_size, KEY_BLOCKS) * block_size, block_size):
        parent = next_block_hash(parent, token_ids[start:start + block_size])
        parts.append(parent[:HASH_BYTES])
    return b"".join(parts)


def order_stamp(fingerprint: str, model: str, block_size: int, endpoint: str | None = None) -> str:
    """What a job's order depends on: its input, the model that tokenizes it, the block size that
    keys it, and the endpoint the job's lines must have (a server batch's)."""
    return f"{fingerprint} {model} block_size={block_size} endpoint={endpoint}"


def scratch_database(path: Path) -> sqlite3.Connection:
    """An SQLite file for a job's scratch tables: no journal, no fsync, a bounded page cache."""
    # check_same_thread=False: the ordered lines may be read on another thread than the one that
    # opened them (a generator handed to an engine thread); only one ever uses the connection.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # NOTE: no journal and no fsync: a crash leaves a file that is never read again (the first
    # pass's is renamed into place only when complete; the next build replaces a torn one).
    for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size={-CACHE_KIB}"):
        db.execute(f"PRAGMA {pragma}")
    return db


class JobOrder:
    """A finished first pass: a job's lines keyed by prompt prefix, in the SQLite file at path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def reuse(cls, path: Path, stamp: str) -> JobOrder | None:
        """The first pass an earlier run of the same job finished, if path holds one with this stamp."""
        if not path.exists():
            return None
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                found = db.execute("SELECT stamp FROM meta").fetchone()
            finally:
                db.close()
        except sqlite3.DatabaseError:  # not an order file, or torn by a crash of the machine
            found = None
        return cls(path) if found == (stamp,) else None

    @classmethod
    def build(cls, path: Path, stamp: str, lines: ScannedLines, prepare: Callable[[BatchLine], list[Prompt]],
              fail: Callable[[int, LineError], None], done: LineSet, block_size: int,
              cancel: threading.Event) -> JobOrder | None:
        """The first pass over `lines`, skipping those in `done`; None if `cancel` was set during it."""
        building = path.with_name(path.name + ".building")
        building.unlink(missing_ok=True)
        db = scratch_database(building)
        try:
            db.execute("CREATE TABLE meta (stamp TEXT NOT NULL)")
            db.execute("CREATE TABLE lines (key BLOB NOT NULL, line_no INTEGER NOT NULL, offset INTEGER NOT NULL, "
                       "size INTEGER NOT NULL)")
            db.execute("BEGIN")
            rows: list[tuple[bytes, int, int, int]] = []
            for line_no, offset, size, item in lines:
                if cancel.is_set():
                    return None
                if line_no in done:
                    continue
                try:
                    if isinstance(item, LineError):
                        raise item
                    prompts = prepare(item)
                except LineError as e:
                    fail(line_no, e)
                    continue
                key = order_key(prompts[0][1], block_size) if item.endpoint.prefix_ordered else b""
                rows.append((key, line_no, offset, size))
                if len(rows) == ROWS_PER_INSERT:
                    db.executemany("INSERT INTO lines VALUES (?, ?, ?, ?)", rows)
                    rows.clear()
            db.executemany("INSERT INTO lines VALUES (?, ?, ?, ?)", rows)
            # A covering index: reading it in order reads nothing else.
            db.execute("CREATE INDEX ordered ON lines (key, line_no, offset, size)")
            db.execute("INSERT INTO meta VALUES (?)", (stamp,))
            db.execute("COMMIT")
        finally:
            db.close()
            if cancel.is_set():
                building.unlink(missing_ok=True)
        os.replace(building, path)
        return cls(path)

    @classmethod
    def reuse_or_build(cls, path: Path, stamp: str, scan: Callable[[], ScannedLines], total_lines: int,
                       prepare: Callable[[BatchLine], list[Prompt]], fail: Callable[[int, LineError], None],
                       done: LineSet, block_size: int, cancel: threading.Event, progress: bool) -> JobOrder | None:
        """The job's prefix order: an earlier run's with this stamp (`order_stamp`), or built now over
        `scan()` with a progress bar; None if `cancel` was set meanwhile."""
        order = cls.reuse(path, stamp)
        if order is not None:
            return order
        lines = tqdm(scan(), total=total_lines, desc="ordering", unit="line", disable=not progress,
                     dynamic_ncols=True, leave=False)
        with contextlib.closing(lines):
            return cls.build(path, stamp, lines, prepare, fail, done, block_size, cancel)

    def lines(self, input_path: Path, done: LineSet) -> Lines:
        """The lines not in `done`, in key order, each parsed again from the input."""
        db = scratch_database(self.path)
        try:
            with input_path.open("rb") as f:
                for line_no, offset, size in db.execute("SELECT line_no, offset, size FROM lines "
                                                        "ORDER BY key, line_no"):
                    if line_no in done:
                        continue
                    f.seek(offset)
                    try:
                        item: BatchLine | LineError = _parse(f.read(size), line_no)
                    except LineError as e:  # it parsed in the first pass; the fingerprint says the file is the same
                        item = e
                    yield line_no, item
        finally:
            db.close()

    def disk_bytes(self) -> int:
        return self.path.stat().st_size

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
