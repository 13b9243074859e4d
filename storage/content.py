"""Content decisions of a build, on disk: which sample first had each content key, the shingle
hashes and LSH buckets of the kept samples, every duplicate and leak decided, and the
content hashes of media files already read.

One SQLite file for all sources (OUT/state/<stage>/content.sqlite on a local OUT, a temporary
folder elsewhere), so memory does not grow with the corpus. A sample is named by (rank, idx):
its source's position in the config and its input index. Sources are planned in config order
and inputs in input order, so the first claimant of a key is the sample a fresh build keeps.

Reruns: a source that resumes at input `idx` drops its rows from there (`reset_from`); a later
source whose duplicate pointed at a dropped row, or whose kept row an earlier source now claims
(an earlier source grew), is marked displaced at that input, and its planner rebuilds from the
range that holds it, so a rerun decides what a fresh build would.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import numpy as np

from storage.dedupe import SqliteState

STATE_DIR = "state"

_SCHEMA = [
    "DROP TABLE IF EXISTS sigs",  # the MinHash signatures an older index kept instead
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS covered (rank INTEGER PRIMARY KEY, idx INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS exact (key TEXT PRIMARY KEY, rank INTEGER, idx INTEGER, "
    "id TEXT) WITHOUT ROWID",
    # a kept sample's shingle hashes (transforms.dedupe.shingle_hashes): an LSH candidate's
    # Jaccard is computed on them, not estimated from MinHash signatures (which only find it)
    "CREATE TABLE IF NOT EXISTS kept (rank INTEGER, idx INTEGER, id TEXT, shingles BLOB, "
    "PRIMARY KEY (rank, idx)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS bands (band INTEGER, h INTEGER, rank INTEGER, idx INTEGER, "
    "PRIMARY KEY (band, h, rank, idx)) WITHOUT ROWID",
    # kind: duplicate_content | near_duplicate | eval_contamination; kept_rank -1: a benchmark
    "CREATE TABLE IF NOT EXISTS dups (rank INTEGER, idx INTEGER, kind TEXT, id TEXT, "
    "kept_rank INTEGER, kept_idx INTEGER, kept_id TEXT, score REAL, action TEXT, "
    "PRIMARY KEY (rank, idx, kind)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS dups_kept ON dups (kept_rank, kept_idx)",
    "CREATE TABLE IF NOT EXISTS displaced (rank INTEGER, idx INTEGER, PRIMARY KEY (rank, idx)) "
    "WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
    "sha256 TEXT) WITHOUT ROWID",
    # near_image.action reject: each distinct image of a kept sample, with the first such
    # sample, and its pHash cut into chunks (phash_chunks) for the search
    "CREATE TABLE IF NOT EXISTS images (sha TEXT PRIMARY KEY, phash INTEGER, rank INTEGER, "
    "idx INTEGER, id TEXT) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS images_at ON images (rank, idx)",
    "CREATE TABLE IF NOT EXISTS image_chunks (c INTEGER, v INTEGER, sha TEXT, "
    "PRIMARY KEY (c, v, sha)) WITHOUT ROWID",
    # pHashes by content hash, like `files`: kept whatever the decisions' fingerprint
    "CREATE TABLE IF NOT EXISTS phashes (sha TEXT PRIMARY KEY, phash INTEGER) WITHOUT ROWID",
]

MASK64 = (1 << 64) - 1
CACHE_KB = 64 * 1024  # SQLite's page cache for the index, in KiB (flat: whatever N)
# Pages in the write-ahead log before SQLite copies them back into the file (its default is
# 1000): a page the random band inserts dirty in many ranges is copied back once, not each time.
WAL_PAGES = 20_000


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def phash_chunks(value: int, max_distance: int) -> list[tuple[int, int]]:
    """(chunk, value) of the 64 bits cut into max_distance + 1 chunks: two hashes at most
    max_distance bits apart agree on one chunk at least, whole (an index on chunks finds
    them). Values as SQLite's signed 64-bit integers (a whole hash is one chunk at 0)."""
    n = max_distance + 1
    out = []
    for c in range(n):
        lo, hi = 64 * c // n, 64 * (c + 1) // n
        v = (value >> lo) & ((1 << (hi - lo)) - 1)
        out.append((c, _signed(v)))
    return out


class ContentIndex(SqliteState):
    """The build's content decisions (see the module's docstring)."""

    def __init__(self, path: str, fingerprint: str, sources: list[str]) -> None:
        self.sources = sources  # part of what _open fingerprints
        super().__init__(path, fingerprint)

    @classmethod
    def for_build(cls, out: str, stage: str, fingerprint: str, sources: list[str]
                  ) -> ContentIndex:
        path, tmp = cls.state_path(out, stage, "content.sqlite")
        index = cls(path, fingerprint, sources)
        index._tmp = tmp
        return index

    def _open(self, fingerprint: str) -> None:
        self.db = sqlite3.connect(self.path, isolation_level="DEFERRED", check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # A bounded page cache (the default is 2 MB): the band and key tables are looked up at
        # random, and each page missed is a read from the OS. Memory stays flat whatever N.
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KB}")
        self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
        for stmt in _SCHEMA:
            self.db.execute(stmt)
        # The decisions depend on the dedupe settings and the sources' order: either changed,
        # every decision is made again (the file hashes stay).
        fp = json.dumps([fingerprint, self.sources])
        row = self.db.execute("SELECT value FROM meta WHERE name = 'fingerprint'").fetchone()
        if row is None or row[0] != fp:
            for table in ("covered", "exact", "kept", "bands", "dups", "displaced", "images",
                          "image_chunks"):
                self.db.execute(f"DELETE FROM {table}")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (fp,))
        self.db.commit()

    # -- coverage and reruns ------------------------------------------------------------------
    def covered(self, rank: int) -> int:
        row = self.db.execute("SELECT idx FROM covered WHERE rank = ?", (rank,)).fetchone()
        return int(row[0]) if row else 0

    def checkpoint(self, rank: int, covered: int) -> None:
        """Commit: every input of source `rank` before `covered` has its decisions here."""
        self.db.execute("INSERT OR REPLACE INTO covered VALUES (?, MAX(?, COALESCE((SELECT idx "
                        "FROM covered WHERE rank = ?), 0)))", (rank, covered, rank))
        self.db.commit()

    def first_displaced(self, rank: int) -> int | None:
        row = self.db.execute("SELECT MIN(idx) FROM displaced WHERE rank = ?", (rank,)).fetchone()
        return None if row[0] is None else int(row[0])

    def _displace(self, rank: int, idx: int) -> None:
        """Sample (rank, idx)'s decision may change: its source rebuilds from it, and so do the
        samples judged against it."""
        self.db.execute("INSERT OR IGNORE INTO displaced VALUES (?, ?)", (rank, idx))
        for r, i in self.db.execute("SELECT rank, idx FROM dups WHERE kept_rank = ? AND "
                                    "kept_idx = ?", (rank, idx)).fetchall():
            self.db.execute("INSERT OR IGNORE INTO displaced VALUES (?, ?)", (r, i))

    def reset_from(self, rank: int, idx: int) -> None:
        """Forget source `rank`'s decisions from input `idx` on; samples of later sources
        judged against them are displaced."""
        later = self.db.execute("SELECT DISTINCT rank, idx FROM dups WHERE kept_rank = ? AND "
                                "kept_idx >= ? AND rank != ?", (rank, idx, rank)).fetchall()
        self.db.executemany("INSERT OR IGNORE INTO displaced VALUES (?, ?)", later)
        self.db.execute("DELETE FROM image_chunks WHERE sha IN (SELECT sha FROM images WHERE "
                        "rank = ? AND idx >= ?)", (rank, idx))
        for table in ("exact", "kept", "bands", "dups", "displaced", "images"):
            self.db.execute(f"DELETE FROM {table} WHERE rank = ? AND idx >= ?", (rank, idx))
        self.db.execute("DELETE FROM displaced WHERE rank = ?", (rank,))
        self.db.execute("INSERT OR REPLACE INTO covered VALUES (?, MIN(?, COALESCE((SELECT idx "
                        "FROM covered WHERE rank = ?), 0)))", (rank, idx, rank))
        self.db.commit()

    # -- exact --------------------------------------------------------------------------------
    def claim(self, key: str, rank: int, idx: int, rid: str) -> tuple[int, int, str] | None:
        """Claim content `key` for sample (rank, idx); None if it is the first, else the
        (rank, idx, id) of the sample that has it."""
        # Most keys are new: one insert; the existing row is read only when there is one.
        if self.db.execute("INSERT OR IGNORE INTO exact VALUES (?, ?, ?, ?)",
                           (key, rank, idx, rid)).rowcount:
            return None
        row = self.db.execute("SELECT rank, idx, id FROM exact WHERE key = ?", (key,)).fetchone()
        if (row[0], row[1]) < (rank, idx):
            return int(row[0]), int(row[1]), row[2]
        if (row[0], row[1]) > (rank, idx):
            self._displace(int(row[0]), int(row[1]))  # a later source kept it in an earlier run
        self.db.execute("INSERT OR REPLACE INTO exact VALUES (?, ?, ?, ?)", (key, rank, idx, rid))
        return None

    # -- near-duplicate text --------------------------------------------------------------------
    def candidates(self, keys: list[int], limit: int
                   ) -> Iterator[tuple[int, int, str, np.ndarray]]:
        """Kept samples sharing a band with `keys` (band b has key keys[b]): (rank, idx, id,
        shingle hashes), at most `limit` per band, earliest first."""
        # One query for every band (most samples hit none), then the shingle hashes of the hits.
        # (UNION ALL of one indexed lookup per band: a row-value IN would scan the table.)
        hits = self.db.execute(
            " UNION ALL ".join("SELECT * FROM (SELECT band, rank, idx FROM bands WHERE band = ? "
                               "AND h = ? ORDER BY rank, idx LIMIT ?)" for _ in keys),
            [v for b, h in enumerate(keys) for v in (b, h, limit)]).fetchall()
        per_band: dict[int, int] = {}
        seen: set[tuple[int, int]] = set()
        for band, r, i in hits:
            per_band[band] = per_band.get(band, 0) + 1
            if per_band[band] > limit or (r, i) in seen:
                continue
            seen.add((r, i))
            row = self.db.execute("SELECT id, shingles FROM kept WHERE rank = ? AND idx = ?",
                                  (r, i)).fetchone()
            if row is not None:
                yield int(r), int(i), row[0], np.frombuffer(row[1], dtype="<u8")

    def add_kept(self, rank: int, idx: int, rid: str, shingles: np.ndarray, keys: list[int]
                 ) -> None:
        """A sample kept as the first of its text: its shingle hashes, in its LSH buckets."""
        self.db.execute("INSERT OR REPLACE INTO kept VALUES (?, ?, ?, ?)",
                        (rank, idx, rid, shingles.astype("<u8").tobytes()))
        self.db.executemany("INSERT OR IGNORE INTO bands VALUES (?, ?, ?, ?)",
                            [(b, h, rank, idx) for b, h in enumerate(keys)])

    def displace(self, rank: int, idx: int) -> None:
        self._displace(rank, idx)

    # -- near-duplicate images ------------------------------------------------------------------
    def phash_of(self, sha: str) -> int | None:
        row = self.db.execute("SELECT phash FROM phashes WHERE sha = ?", (sha,)).fetchone()
        return None if row is None else int(row[0]) & MASK64

    def set_phash(self, sha: str, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO phashes VALUES (?, ?)", (sha, _signed(value)))

    def near_image(self, images: list[tuple[str, int]], rank: int, idx: int, max_distance: int
                   ) -> tuple[tuple[int, int, str], int, int] | None:
        """The earliest kept sample with an image of other bytes at most `max_distance` bits
        from one of `images` ((sha256, pHash) of sample (rank, idx)): ((rank, idx, id),
        distance, which image), or None. Images a later sample holds from an earlier run are
        displaced (this sample now comes first)."""
        best: tuple[tuple[int, int, str], int, int] | None = None
        for k, (sha, ph) in enumerate(images):
            row = self.db.execute("SELECT rank, idx FROM images WHERE sha = ?", (sha,)).fetchone()
            if row is not None:  # the same bytes: no near-duplicate of itself
                if (row[0], row[1]) > (rank, idx):
                    self._displace(int(row[0]), int(row[1]))
                continue
            for c, v in phash_chunks(ph, max_distance):
                for oph, r, i, rid in self.db.execute(
                        "SELECT i.phash, i.rank, i.idx, i.id FROM image_chunks k JOIN images i "
                        "ON i.sha = k.sha WHERE k.c = ? AND k.v = ? LIMIT 64", (c, v)):
                    dist = bin(ph ^ (int(oph) & MASK64)).count("1")
                    if dist > max_distance or (r, i) == (rank, idx):
                        continue
                    if (r, i) > (rank, idx):
                        self._displace(int(r), int(i))
                    elif best is None or (r, i, dist) < (*best[0][:2], best[1]):
                        best = ((int(r), int(i), rid), dist, k)
        return best

    def add_images(self, images: list[tuple[str, int]], rank: int, idx: int, rid: str,
                   max_distance: int) -> None:
        """The images of kept sample (rank, idx), where no earlier sample has them."""
        for sha, ph in images:
            row = self.db.execute("SELECT rank, idx FROM images WHERE sha = ?", (sha,)).fetchone()
            if row is not None and (row[0], row[1]) <= (rank, idx):
                continue
            self.db.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)",
                            (sha, _signed(ph), rank, idx, rid))
            self.db.executemany("INSERT OR IGNORE INTO image_chunks VALUES (?, ?, ?)",
                                [(c, v, sha) for c, v in phash_chunks(ph, max_distance)])

    # -- decisions ----------------------------------------------------------------------------
    def record(self, kind: str, rank: int, idx: int, rid: str, kept: tuple[int, int, str],
               score: float, action: str) -> None:
        """A duplicate or leak decided (kept: (rank, idx, id); rank -1 for a benchmark, whose
        name is then in idx's place as the item's benchmark position in the config)."""
        self.db.execute("INSERT OR REPLACE INTO dups VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rank, idx, kind, rid, kept[0], kept[1], kept[2], score, action))

    # -- media file hashes ---------------------------------------------------------------------
    def file_sha(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = self.db.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path = ?",
                              (path,)).fetchone()
        return row[2] if row is not None and row[0] == size and row[1] == mtime_ns else None

    def set_file_sha(self, path: str, size: int, mtime_ns: int, sha: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                        (path, size, mtime_ns, sha))

    # -- the report -----------------------------------------------------------------------------
    def summary(self, benchmarks: list[str], clusters: int = 4, members: int = 6
                ) -> dict[str, Any]:
        """Counts by kind and action, the matrix of (kept source, duplicate source), leaks per
        benchmark, and the largest clusters of each kind with a few members each."""
        name = dict(enumerate(self.sources))
        out: dict[str, Any] = {"by_kind": {}, "matrix": {}, "benchmarks": {}, "clusters": []}
        for kind, action, n in self.db.execute(
                "SELECT kind, action, COUNT(*) FROM dups GROUP BY kind, action"):
            out["by_kind"].setdefault(kind, {})[action] = n
        for kind, kr, r, n in self.db.execute(
                "SELECT kind, kept_rank, rank, COUNT(*) FROM dups WHERE kept_rank >= 0 "
                "GROUP BY kind, kept_rank, rank ORDER BY kind, kept_rank, rank"):
            out["matrix"].setdefault(kind, {}).setdefault(name[kr], {})[name[r]] = n
        for bi, r, n in self.db.execute(
                "SELECT kept_idx, rank, COUNT(*) FROM dups WHERE kept_rank = -1 "
                "GROUP BY kept_idx, rank ORDER BY kept_idx, rank"):
            out["benchmarks"].setdefault(benchmarks[bi], {})[name[r]] = n
        kinds = [k for (k,) in self.db.execute("SELECT DISTINCT kind FROM dups WHERE "
                                                 "kept_rank >= 0 ORDER BY kind")]
        for kind in kinds:  # the largest of each kind: a few near-duplicates beside the exact
            for kr, ki, kid, n in self.db.execute(
                    "SELECT kept_rank, kept_idx, kept_id, COUNT(*) AS n FROM dups WHERE kind = ? "
                    "AND kept_rank >= 0 GROUP BY kept_rank, kept_idx ORDER BY n DESC, kept_rank, "
                    "kept_idx LIMIT ?", (kind, clusters)).fetchall():
                rows = self.db.execute(
                    "SELECT rank, idx, id, score, action FROM dups WHERE kind = ? AND "
                    "kept_rank = ? AND kept_idx = ? ORDER BY rank, idx LIMIT ?",
                    (kind, kr, ki, members)).fetchall()
                out["clusters"].append({
                    "kind": kind, "size": n + 1,
                    "kept": {"source": name[kr], "index": ki, "id": kid},
                    "members": [{"source": name[r], "index": i, "id": rid, "score": round(s, 3),
                                 "action": a} for r, i, rid, s, a in rows]})
        return out

    def iter_dups(self) -> Iterator[tuple[str, str, int, str, int]]:
        """(kind, source, idx, kept source or benchmark position, kept idx) of every decision."""
        name = dict(enumerate(self.sources))
        for kind, r, i, kr, ki in self.db.execute(
                "SELECT kind, rank, idx, kept_rank, kept_idx FROM dups ORDER BY rank, idx"):
            yield kind, name[r], i, (name[kr] if kr >= 0 else "benchmark"), ki
