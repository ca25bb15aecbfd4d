"""Where the server keeps files and batches: metadata in SQLite, contents on disk.

File ids are generated here; nothing from a request ever becomes part of a file-system path.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self.batches_dir = data_dir / "batches"
        for folder in (self.files_dir, self.batches_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "tokenmill.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, created_at INTEGER, "
                         "path TEXT, object TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, created_at INTEGER, object TEXT)")

    # -- files
    async def create_file(self, filename: str, purpose: str, chunks: AsyncIterator[bytes],
                          limit: int) -> dict[str, Any]:
        file_id = new_id("file-")
        path = self.files_dir / file_id
        tmp = path.with_name(path.name + ".partial")
        size = 0
        try:
            with tmp.open("wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise ValueError(f"file is larger than the limit of {limit} bytes")
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.register_file(path, filename, purpose, file_id)

    def register_file(self, path: Path, filename: str, purpose: str, file_id: str | None = None) -> dict[str, Any]:
        """Adds a file record (or replaces the one with file_id, so registering is idempotent)."""
        file_id = file_id or new_id("file-")
        created = int(time.time())
        obj = {"id": file_id, "object": "file", "bytes": path.stat().st_size, "created_at": created,
               "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
               "status_details": None}
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                             (file_id, created, str(path), json.dumps(obj)))
        return obj

    def get_file(self, file_id: str) -> tuple[dict[str, Any], Path] | None:
        with self._lock:
            row = self._db.execute("SELECT object, path FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else (json.loads(row[0]), Path(row[1]))

    def list_files(self, purpose: str | None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT object FROM files ORDER BY created_at DESC, id").fetchall()
        files = [json.loads(r[0]) for r in rows]
        return [f for f in files if purpose is None or f["purpose"] == purpose]

    def delete_file(self, file_id: str) -> bool:
        found = self.get_file(file_id)
        if found is None:
            return False
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        if found[1].parent == self.files_dir:  # batch results stay with their batch folder
            found[1].unlink(missing_ok=True)
        return True

    # -- batches
    def save_batch(self, batch: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?)",
                             (batch["id"], batch["created_at"], json.dumps(batch)))

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def list_batches(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT object FROM batches ORDER BY created_at DESC, id DESC").fetchall()
        return [json.loads(r[0]) for r in rows]

    def batch_dir(self, batch_id: str) -> Path:
        folder = self.batches_dir / batch_id
        folder.mkdir(exist_ok=True)
        return folder
