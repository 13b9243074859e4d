"""Duplicate ids of a source, on disk: which input first claimed each sample key.

A source's keys live in a SQLite table (key -> input index), so memory does not grow with the
source: SQLite keeps a small page cache and the rest on disk. The first input (in input order)
with a key claims it; a later input with the same key is a duplicate. The decision depends only
on the inputs, so a rerun decides the same way.

A store belongs to a source built with one config fingerprint, and `covered` says up to which
input its rows are complete. A rerun resumes at input `resume` (the end of the parts it keeps):
`reset_from(resume)` drops every row at or after it (a killed run inserted them, ahead of its
committed parts) and the planner claims the keys of inputs [covered, resume) again before going
on, so the rows below `resume` are always those of the inputs the kept parts were built from.

The file is kept under OUT/state/<stage>/ when OUT is a local folder, so that a rerun reads
only the new inputs' ids; elsewhere (s3://...) it lives in a temporary folder for the run, and
a rerun claims the kept inputs' keys again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile

from storage import uri

STATE_DIR = "state"


class SqliteState:
    """A build's state in one SQLite file: opened (and started over when a crash cut it short
    or it is not ours) by the subclass's `_open(fingerprint)`, closed once; where it lives is
    `state_path`."""

    db: sqlite3.Connection

    def __init__(self, path: str, fingerprint: str) -> None:
        self.path = path
        self._tmp: str | None = None  # a temporary folder of ours to remove on close
        self._closed = False
        try:
            self._open(fingerprint)
        except sqlite3.DatabaseError:  # cut short by a crash mid-write, or not ours: start over
            with contextlib.suppress(Exception):
                self.db.close()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path + suffix)
            self._open(fingerprint)

    def _open(self, fingerprint: str) -> None:  # each kind of state has its own tables
        raise TypeError(f"{type(self).__name__} must define _open")

    @staticmethod
    def state_path(out: str, stage: str, name: str) -> tuple[str, str | None]:
        """(the file, a temporary folder or None): under OUT/state/<stage>/ when OUT is a local
        folder, so a rerun reads it again; elsewhere in a temporary folder for the run."""
        if uri.is_local(out):
            folder = uri.join(out, STATE_DIR, stage)
            os.makedirs(folder, exist_ok=True)
            return os.path.join(folder, name), None
        tmp = tempfile.mkdtemp(prefix="vc-state-")
        return os.path.join(tmp, name), tmp

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.db.commit()
        self.db.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


class KeyStore(SqliteState):
    """Sample keys of one source and the input that claimed each."""

    @classmethod
    def for_source(cls, out: str, stage: str, source: str, fingerprint: str) -> KeyStore:
        path, tmp = cls.state_path(out, stage, f"{source}.keys.sqlite")
        store = cls(path, fingerprint)
        store._tmp = tmp
        return store

    def _open(self, fingerprint: str) -> None:
        self.db = sqlite3.connect(self.path, isolation_level="DEFERRED")
        # WAL with synchronous=NORMAL: a killed process loses nothing committed; a lost machine
        # may lose the last commits, which `covered` then does not claim.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, idx INTEGER "
                        "NOT NULL) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        row = self.db.execute("SELECT value FROM meta WHERE name = 'fingerprint'").fetchone()
        if row is None or row[0] != fingerprint:
            self.db.execute("DELETE FROM keys")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (fingerprint,))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('covered', '0')")
        self.db.commit()
        row = self.db.execute("SELECT value FROM meta WHERE name = 'covered'").fetchone()
        self.covered = int(row[0]) if row else 0

    def reset_from(self, index: int) -> None:
        """Forget the claims of inputs `index` and later."""
        self.db.execute("DELETE FROM keys WHERE idx >= ?", (index,))
        self.covered = min(self.covered, index)
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('covered', ?)", (str(self.covered),))
        self.db.commit()

    def claim(self, key: str, index: int) -> int | None:
        """Claim `key` for input `index`; None if it is the first, else the input that has it."""
        cur = self.db.execute("INSERT OR IGNORE INTO keys VALUES (?, ?)", (key, index))
        if cur.rowcount:
            return None
        row = self.db.execute("SELECT idx FROM keys WHERE key = ?", (key,)).fetchone()
        if row[0] >= index:  # this input's own row: a claim already made by this run
            return None
        return int(row[0])

    def checkpoint(self, covered: int) -> None:
        """Commit: every input before `covered` has claimed its key."""
        self.covered = max(self.covered, covered)
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('covered', ?)", (str(self.covered),))
        self.db.commit()
