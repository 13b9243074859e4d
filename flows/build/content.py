"""Content decisions in the planner: exact duplicates across sources, near-duplicate text
(MinHash LSH for candidates, the shingle sets' Jaccard to decide), benchmark leaks,
near-duplicate images when rejecting them (pHash); and, after the ingest, the near-duplicate
image report.

The planner reads sources in config order and inputs in input order, and asks `decide` about
each parsed record before handing it out, so the first sample of a duplicate set is kept and
the decision is the same whatever the number of workers, and on a rebuild. Everything that
grows with the corpus is on disk (storage.content); the benchmark n-grams are held in memory
(they grow with the benchmarks).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import tempfile
from collections import Counter
from typing import Any

from schemas.config import CorpusConfig, SourceConfig
from schemas.record import Record
from schemas.rejects import Rejected
from storage import uri
from storage.benchmarks import read_benchmark
from storage.content import ContentIndex, phash_chunks
from storage.media import safe_relpath
from storage.parts import iter_manifests
from storage.readers import default_media_root
from transforms.dedupe import (
    BenchmarkIndex,
    band_keys,
    content_key,
    jaccard,
    lsh_params,
    media_salt,
    minhash,
    shingle_hashes,
    shingles,
    tokens,
)

RECENT_FILES = 65536


# What the decisions also depend on: the code's rules (2: CJK characters are words after a
# digit too; near text is decided on the shingle sets' Jaccard, not the MinHash estimate;
# 3: shingle hashes from word hashes, band keys from the rows by arithmetic).
RULES = 3


def decisions_fingerprint(cfg: CorpusConfig) -> str:
    # The interpreter's version too: the shingle and band hashes are Python's hashes of ints.
    blob = json.dumps([cfg.dedupe.decisions(), cfg.seed, RULES, list(sys.version_info[:2])],
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ContentDecider:
    """One build's content decisions (shared by the planners of every source)."""

    def __init__(self, cfg: CorpusConfig, out: str, stage: str) -> None:
        d = cfg.dedupe
        self.cfg, self.d = cfg, d
        self.ranks = {s.name: i for i, s in enumerate(cfg.sources)}
        self.index = ContentIndex.for_build(out, stage, decisions_fingerprint(cfg),
                                            [s.name for s in cfg.sources])
        self.bench: BenchmarkIndex | None = None
        self.bench_names = [b.name for b in d.benchmarks]
        if d.benchmarks:
            self.bench = BenchmarkIndex(d.ngram)
            for b in d.benchmarks:
                for item, text in read_benchmark(b):
                    self.bench.add(b.name, item, text)
        nt = d.near_text
        self.seed = nt.seed if nt.seed is not None else cfg.seed
        self.bands, self.rows = lsh_params(nt.threshold, nt.num_perm) if nt.enabled else (0, 0)
        self.counts: Counter[str] = Counter()
        self.files_hashed = self.images_phashed = 0
        # The hashes of recently seen files (a corpus reuses its popular images), at most
        # RECENT_FILES; the rest are looked up in the index's file table.
        self._recent: dict[str, tuple[tuple[int, int], str]] = {}
        self._access: dict[str, tuple[str, bool, Any]] = {}  # source -> its media's access

    # -- media hashes -------------------------------------------------------------------------
    def _media_access(self, src: SourceConfig) -> tuple[str, bool, Any]:
        """(media root, whether it is local, its guarded fetch) of a source, made once."""
        got = self._access.get(src.name)
        if got is None:
            from storage.media import fetcher

            root = default_media_root(src)
            got = (root, uri.is_local(root), fetcher(root, self.cfg.limits.max_file_mb))
            self._access[src.name] = got
        return got

    def media_sha256(self, src: SourceConfig, rec: Record) -> dict[str, list[str]] | None:
        """Each medium's sha256 by kind, or None when one cannot be read here (the worker then
        rejects the record with the reason)."""
        root, local, fetch = self._media_access(src)
        out: dict[str, list[str]] = {}
        try:
            for kind, paths in rec.media().items():
                for path in paths:
                    # The guarded read keeps the file inside the root; a stat of a path outside
                    # it reads nothing, and its record is rejected by the worker.
                    full = uri.join(root, safe_relpath(path))
                    st = os.stat(full) if local else None
                    stamp = (st.st_size, st.st_mtime_ns) if st else None
                    sha = None
                    if stamp is not None:
                        known = self._recent.get(full)
                        sha = known[1] if known and known[0] == stamp else \
                            self.index.file_sha(full, *stamp)
                    if sha is None:
                        sha = hashlib.sha256(fetch(path, kind)).hexdigest()
                        self.files_hashed += 1
                        if stamp is not None:
                            self.index.set_file_sha(full, *stamp, sha)
                    if stamp is not None:
                        if len(self._recent) >= RECENT_FILES:  # bounded: memory stays flat
                            self._recent.pop(next(iter(self._recent)))
                        self._recent[full] = (stamp, sha)
                    out.setdefault(kind, []).append(sha)
        except (Rejected, OSError):
            return None
        return out

    def image_phashes(self, src: SourceConfig, rec: Record, shas: list[str]
                      ) -> list[tuple[str, int]] | None:
        """(sha256, pHash) of each image, the pHash computed once per distinct image (decoded
        at reduced scale, behind the workers' header checks); None when one cannot be decoded
        here (the worker then rejects the record with the reason)."""
        from storage.media import fetcher
        from transforms.dedupe import phash
        from transforms.media import open_header

        fetch = fetcher(default_media_root(src), self.cfg.limits.max_file_mb)
        out = []
        for path, sha in zip(rec.media().get("image", []), shas, strict=True):
            value = self.index.phash_of(sha)
            if value is None:
                try:
                    data = fetch(path, "image")
                    open_header(data, self.cfg.media.max_image_pixels,
                                int(self.cfg.limits.image_max_decoded_mb * 2**20))
                    value = int(phash(data), 16)
                except Exception:  # noqa: BLE001 - the worker names the reject (decode, size)
                    return None
                self.index.set_phash(sha, value)
                self.images_phashed += 1
            out.append((sha, value))
        return out

    # -- one record ---------------------------------------------------------------------------
    def decide(self, src: SourceConfig, idx: int, rec: Record
               ) -> tuple[dict[str, list[str]] | None, tuple[str, str] | None]:
        """(the media's hashes, for the worker; a reject (reason, detail) or None)."""
        rank = self.ranks[src.name]
        # exact, near text and near images compare the media's bytes
        need = self.d.exact or self.d.near_text.enabled or self.d.near_image.rejects
        hashes = self.media_sha256(src, rec) if need else None
        if need and hashes is None and any(rec.media().values()):
            return None, None  # the worker rejects it (missing, unreadable media)
        words = tokens(rec.text())
        if self.bench is not None:
            hit = self.bench.match(words)
            if hit is not None:
                bench, item = hit
                self.index.record("eval_contamination", rank, idx, rec.id,
                                  (-1, self.bench_names.index(bench), item), 1.0, "reject")
                self.counts["eval_contamination"] += 1
                return hashes, ("eval_contamination",
                                f"shares a {self.d.ngram}-token n-gram with item {item!r} of "
                                f"benchmark {bench!r}")
        if self.d.exact:
            assert hashes is not None
            kept = self.index.claim(content_key(rec, hashes), rank, idx, rec.id)
            if kept is not None:
                self.index.record("duplicate_content", rank, idx, rec.id, kept, 1.0, "reject")
                self.counts["duplicate_content"] += 1
                return hashes, ("duplicate_content",
                                f"same conversation and media as {kept[2]!r} of source "
                                f"{self.cfg.sources[kept[0]].name!r} (input {kept[1]}), kept")
        nt = self.d.near_text
        text_kept = None  # (shingles, band keys) to index once the sample is kept
        if nt.enabled and len(words) >= nt.min_words:
            # MinHash LSH finds the candidates; each is decided on the Jaccard of the shingle
            # sets themselves, so the threshold means what it says (the estimate's noise,
            # 0.04 at 128 permutations, would let pairs of 0.62 in and keep pairs of 0.75 out).
            sig = minhash(words, nt.shingle, nt.num_perm, self.seed,
                          grams=shingles(words, nt.shingle))
            keys = band_keys(sig, self.bands, self.rows, media_salt(hashes))
            own = shingle_hashes(words, nt.shingle)
            best = None
            for r, i, rid, other in self.index.candidates(keys, nt.max_candidates):
                if (r, i) == (rank, idx):  # its own row, from a run cut short before it
                    continue
                sim = jaccard(own, other)
                if sim < nt.threshold:
                    continue
                if (r, i) > (rank, idx):  # kept by a later source in an earlier run
                    self.index.displace(r, i)
                elif best is None or (r, i) < best[0][:2]:
                    best = ((r, i, rid), sim)
            if best is not None:
                kept, sim = best
                self.index.record("near_duplicate", rank, idx, rec.id, kept, sim, nt.action)
                self.counts[f"near_duplicate:{nt.action}"] += 1
                if nt.action == "reject":
                    return hashes, ("near_duplicate",
                                    f"near-duplicate text (Jaccard {sim:.2f} >= {nt.threshold} "
                                    f"of {nt.shingle}-word shingles) of {kept[2]!r} of source "
                                    f"{self.cfg.sources[kept[0]].name!r} (input {kept[1]}), kept")
            else:
                text_kept = (own, keys)
        ni = self.d.near_image
        if ni.rejects and hashes and hashes.get("image"):
            images = self.image_phashes(src, rec, hashes["image"])
            if images is None:
                return hashes, None  # the worker rejects it (an image it cannot decode)
            near = self.index.near_image(images, rank, idx, ni.max_distance)
            if near is not None:
                kept, dist, k = near
                self.index.record("near_duplicate_image", rank, idx, rec.id, kept, dist,
                                  "reject")
                self.counts["near_duplicate_image"] += 1
                return hashes, ("near_duplicate_image",
                                f"image {k} ({rec.media()['image'][k]}) is {dist} bits of pHash "
                                f"(<= {ni.max_distance}) from an image of {kept[2]!r} of source "
                                f"{self.cfg.sources[kept[0]].name!r} (input {kept[1]}), kept")
            self.index.add_images(images, rank, idx, rec.id, ni.max_distance)
        if text_kept is not None:
            self.index.add_kept(rank, idx, rec.id, *text_kept)
        return hashes, None

    def report(self) -> dict[str, Any]:
        """The build report's `dedupe` entry (decisions part)."""
        d = self.d
        out = self.index.summary(self.bench_names)
        out["settings"] = {
            "exact": d.exact, "ngram": d.ngram, "benchmarks": self.bench_names,
            "near_text": {**d.near_text.model_dump(), "seed": self.seed, "bands": self.bands,
                          "rows": self.rows}}
        if self.bench is not None:
            out["benchmark_items"] = {b: {"indexed": self.bench.items.get(b, 0),
                                          "too_short": self.bench.too_short.get(b, 0)}
                                      for b in self.bench_names}
        out["media_files_hashed"] = self.files_hashed
        if d.near_image.rejects:
            out["settings"]["near_image"] = d.near_image.model_dump()
            out["images_phashed"] = self.images_phashed
        return out

    def close(self) -> None:
        self.index.close()


NEAR_IMAGES = "near_images.jsonl"  # under OUT/report: every pair found, one a line


def near_images(cfg: CorpusConfig, out: str, stage: str, examples: int = 8) -> dict[str, Any]:
    """Pairs of distinct images (by content hash) whose pHashes differ in at most
    `near_image.max_distance` bits, from the manifests of `stage`: counted per pair of sources,
    with a few examples, and every pair in OUT/report/near_images.jsonl (written as found, so
    memory stays flat). The Hamming search splits the 64 bits into max_distance + 1 chunks
    (two hashes that close agree on at least one, whole) indexed on disk. With
    near_image.action reject the planner has dropped the later sample of each pair already
    (ContentDecider.decide), so what this finds is what is left among the kept samples."""
    t = cfg.dedupe.near_image.max_distance
    tmp = tempfile.mkdtemp(prefix="vc-phash-")
    db = sqlite3.connect(os.path.join(tmp, "phash.sqlite"))
    db.execute("CREATE TABLE images (sha TEXT PRIMARY KEY, phash TEXT, source TEXT, "
               "id TEXT) WITHOUT ROWID")
    db.execute("CREATE TABLE chunks (c INTEGER, v INTEGER, sha TEXT, PRIMARY KEY (c, v, sha)) "
               "WITHOUT ROWID")
    pairs: Counter[tuple[str, str]] = Counter()  # sources x sources: small
    shown: list[dict[str, Any]] = []
    distinct = 0
    listing = uri.AtomicFile(uri.join(out, "report", NEAR_IMAGES))
    try:
        for src in cfg.sources:
            for m in iter_manifests(out, stage, src.name):
                for s in m.samples:
                    shas = s.media_sha256[:len(s.phash)]
                    for sha, ph in zip(shas, s.phash, strict=True):
                        if db.execute("SELECT 1 FROM images WHERE sha = ?", (sha,)).fetchone():
                            continue
                        distinct += 1
                        v = int(ph, 16)
                        parts = phash_chunks(v, t)
                        near = None
                        for c, part in parts:
                            for osha, oph, osrc, oid in db.execute(
                                    "SELECT i.sha, i.phash, i.source, i.id FROM chunks k JOIN "
                                    "images i ON i.sha = k.sha WHERE k.c = ? AND k.v = ? LIMIT 16",
                                    (c, part)):
                                dist = bin(v ^ int(oph, 16)).count("1")
                                if dist <= t and (near is None or dist < near[4]):
                                    near = (osha, osrc, oid, oph, dist)
                        db.execute("INSERT INTO images VALUES (?, ?, ?, ?)", (sha, ph, src.name, s.id))
                        db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?)",
                                       [(c, part, sha) for c, part in parts])
                        if near is not None:
                            pairs[(near[1], src.name)] += 1
                            listing.file.write((json.dumps(
                                {"kept": {"source": near[1], "id": near[2], "sha256": near[0]},
                                 "other": {"source": src.name, "id": s.id, "sha256": sha},
                                 "distance": near[4]}) + "\n").encode())
                            if len(shown) < examples:
                                shown.append({"kept": {"source": near[1], "id": near[2]},
                                              "other": {"source": src.name, "id": s.id,
                                                        "key": s.key},
                                              "distance": near[4]})
        db.commit()
        listing.commit()
    finally:
        listing.discard()
        db.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    matrix: dict[str, dict[str, int]] = {}
    for (a, b), n in sorted(pairs.items()):
        matrix.setdefault(a, {})[b] = n
    return {"max_distance": t, "distinct_images": distinct, "pairs": sum(pairs.values()),
            "matrix": matrix, "examples": shown, "action": cfg.dedupe.near_image.action,
            "pairs_file": NEAR_IMAGES}


def open_decider(cfg: CorpusConfig, out: str, stage: str) -> ContentDecider | None:
    """The build's decider, or None when the config asks for no content decisions."""
    return ContentDecider(cfg, out, stage) if cfg.dedupe.decides else None


def dedupe_entry(cfg: CorpusConfig, out: str, stage: str, decisions: dict[str, Any] | None,
                 work: list[dict[str, Any]]) -> dict[str, Any]:
    """The build report's `dedupe` entry: the decisions (exact, near text, benchmarks), the
    media cache's hit rate from the partitions' `work`, and near-duplicate images."""
    hits = sum(w.get("media_cache_hits", 0) for w in work)
    misses = sum(w.get("media_cache_misses", 0) for w in work)
    entry: dict[str, Any] = {
        "media_cache": {"enabled": cfg.dedupe.media_cache, "hits": hits, "misses": misses,
                        "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None}}
    if decisions is not None:
        entry.update(decisions)
    if cfg.dedupe.near_image.enabled:
        entry["near_image"] = near_images(cfg, out, stage)
    return entry
