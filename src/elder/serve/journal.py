"""The service's write-ahead journal: every accepted change (an edit, a replacement, a forget) is written to SQLite
in WAL mode with full sync before the client is answered, numbered in the order it will be applied."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from elder.errors import ElderError

KINDS = ("edit", "replace", "forget")


class JournalError(ElderError, RuntimeError):
    """The journal cannot be opened or disagrees with the service's settings."""


@dataclass(frozen=True)
class Op:
    """One accepted change: `seq` orders it; `record` is the edit's JSON form (None for a forget)."""

    seq: int
    kind: str
    edit_id: str
    record: dict | None
    submitted: float


class Journal:
    """ops(seq, kind, edit_id, record, submitted) plus failures(seq, error) and meta(key, value)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed op survives a power cut, not only a kill
            self._db.executescript("""
                CREATE TABLE IF NOT EXISTS ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
                    edit_id TEXT NOT NULL, record TEXT, submitted REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS failures (seq INTEGER PRIMARY KEY, error TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            """)
        except sqlite3.DatabaseError as error:
            raise JournalError(f"cannot open the journal {self.path}: {error}") from None

    def append(self, ops: list[tuple[str, str, dict | None]]) -> list[int]:
        """Write (kind, edit_id, record) ops in one transaction; their sequence numbers once durable."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seqs = [self._db.execute("INSERT INTO ops (kind, edit_id, record, submitted) VALUES (?, ?, ?, ?)",
                                         (kind, edit_id, None if record is None else json.dumps(record), now)).lastrowid
                        for kind, edit_id, record in ops]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return seqs

    def after(self, seq: int, limit: int | None = None) -> list[Op]:
        """The ops numbered after `seq`, in order."""
        query = "SELECT seq, kind, edit_id, record, submitted FROM ops WHERE seq > ? ORDER BY seq"
        with self._lock:
            rows = self._db.execute(query + (" LIMIT ?" if limit else ""), (seq, limit) if limit else (seq,)).fetchall()
        return [Op(s, k, e, None if r is None else json.loads(r), t) for s, k, e, r, t in rows]

    def count_after(self, seq: int) -> int:
        """How many ops are numbered after `seq` (without reading them)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM ops WHERE seq > ?", (seq,)).fetchone()[0]

    def op(self, seq: int) -> Op | None:
        """One op by number."""
        found = self.after(seq - 1, 1)
        return found[0] if found and found[0].seq == seq else None

    def last_of(self, edit_id: str) -> Op | None:
        """The newest op naming an edit id."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM ops WHERE edit_id = ? ORDER BY seq DESC LIMIT 1",
                                   (edit_id,)).fetchone()
        return None if row is None else self.op(row[0])

    def fail(self, seq: int, error: str) -> None:
        """Record that an op could not be applied (written before the checkpoint that passes it)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO failures (seq, error) VALUES (?, ?)", (seq, error))

    def failure(self, seq: int) -> str | None:
        """Why an op failed, if it did."""
        with self._lock:
            row = self._db.execute("SELECT error FROM failures WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else row[0]

    def failures(self) -> int:
        """How many ops failed."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM failures").fetchone()[0]

    def meta(self) -> dict:
        """What the service was started with the first time (method, settings, model)."""
        with self._lock:
            return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def set_meta(self, values: dict) -> None:
        """Record the service's method, settings and model, once."""
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in values.items()])

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
