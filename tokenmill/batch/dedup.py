"""Exact duplicate detection of custom_ids over an input of any length, in bounded memory.

The ids claimed so far are the keys of an SQLite table (a B-tree in a scratch file; in memory only
a bounded page cache), so two distinct ids are never taken for one, and a file of 10^7 lines costs
no more memory than one of ten. The scratch file lives for one pass over the input: a run reads the
whole input again (duplicates are judged the same on a resume as in the first run), so a file left
by a killed run is simply replaced.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType

# Pages of the table kept in memory (SQLite's cache_size, in KiB): enough for the interior pages of
# the B-tree of 10^7 uuid ids (~7 MB; 0.66 MB measured for 10^6), so that an insert reads about one
# leaf page. Caches of 32 and 64 MiB were no faster at 10^7 ids (docs/PERFORMANCE.md).
CACHE_KIB = 8 << 10


class CustomIds:
    """The custom_ids claimed by earlier lines, in a scratch SQLite file at path (removed on close)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        # check_same_thread=False: the pass may be finalized (closing this) on another thread than
        # the one that began it, e.g. a generator collected later; it is only ever used by one.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # NOTE: no journal and no fsync: the file is scratch, never read after a crash. The whole
        # pass is one transaction, never committed (the file is deleted instead), so pages reach
        # the file only when they leave the cache.
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "locking_mode=EXCLUSIVE", f"cache_size={-CACHE_KIB}"):
            self.db.execute(f"PRAGMA {pragma}")
        # Keys are the id's exact code points: surrogatepass also encodes lone surrogates, which
        # JSON escapes can produce and strict UTF-8 (and so an SQLite TEXT) cannot hold.
        self.db.execute("CREATE TABLE custom_ids (custom_id BLOB PRIMARY KEY, line_no INTEGER NOT NULL) WITHOUT ROWID")
        self.db.execute("BEGIN")

    def claim(self, custom_id: str, line_no: int) -> int | None:
        """Claims custom_id for line_no; returns the line that claimed it first, if one did."""
        key = custom_id.encode("utf-8", "surrogatepass")
        try:
            self.db.execute("INSERT INTO custom_ids VALUES (?, ?)", (key, line_no))
        except sqlite3.IntegrityError:
            return self.db.execute("SELECT line_no FROM custom_ids WHERE custom_id = ?", (key,)).fetchone()[0]
        return None

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> CustomIds:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
