"""Parts: a shard, its rejects and its manifest, committed together as one unit of a source.

A part accounts for a contiguous range of a source's inputs: each input in the range is either
a sample in the part's tar or a line in its rejects file. Commit order is tar, rejects, then the
manifest; the manifest is the commit marker, so a part without one is unfinished and is
removed on the next run.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any

from schemas.manifest import AccountingError, SampleEntry, ShardManifest
from schemas.rejects import RejectRecord
from schemas.version import code_version
from storage import uri
from storage.shards import TarShardWriter, sha256_of

REJECTS_DIR = "rejects"
_PART_RE = re.compile(r"^(?P<source>[A-Za-z0-9_-]+)-(?P<part>\d{5})\.manifest\.json$")


def part_name(source: str, part: int) -> str:
    return f"{source}-{part:05d}"


class PartWriter:
    def __init__(self, out: str, stage: str, source: str, part: int, input_start: int,
                 fingerprint: str) -> None:
        self.out, self.stage, self.source, self.part = out, stage, source, part
        self.name = part_name(source, part)
        self.stage_dir = uri.join(out, stage)
        self.fingerprint = fingerprint
        self.input_start = self.input_end = input_start
        self._digest = hashlib.sha256()
        self._tar: TarShardWriter | None = None
        self.samples: list[SampleEntry] = []
        self.rejects: list[RejectRecord] = []
        self.member_counts: Counter[str] = Counter()

    @property
    def bytes(self) -> int:
        return self._tar.bytes_written if self._tar else 0

    @property
    def inputs(self) -> int:
        return self.input_end - self.input_start

    def add_input(self, index: int, raw: str) -> None:
        if index != self.input_end:
            raise RuntimeError(f"{self.name}: input {index} out of order (expected {self.input_end})")
        data = raw.encode("utf-8", "surrogateescape")
        self._digest.update(len(data).to_bytes(8, "little"))
        self._digest.update(data)
        self.input_end += 1

    def add_sample(self, key: str, record_id: str, index: int,
                   members: list[tuple[str, bytes]], **info: Any) -> None:
        """Append a sample; `info` fills the manifest entry (language, task, tokens, ...)."""
        if self._tar is None:
            self._tar = TarShardWriter(uri.join(self.stage_dir, f"{self.name}.tar"))
        n = self._tar.write_sample(key, members)
        suffixes = [s for s, _ in members]
        for s in suffixes:
            self.member_counts[s.split("_", 1)[0].split(".", 1)[0]] += 1
        self.samples.append(SampleEntry(id=record_id, key=key, index=index, members=suffixes,
                                        bytes=n, **info))

    def add_reject(self, rec: RejectRecord) -> None:
        self.rejects.append(rec)

    def commit(self) -> ShardManifest:
        size, sha = (self._tar.close() if self._tar else (0, None))
        rejects_file = None
        if self.rejects:
            rejects_file = f"{self.name}.rejects.jsonl"
            body = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in self.rejects)
            uri.write_bytes_atomic(uri.join(self.out, REJECTS_DIR, rejects_file),
                                   body.encode("utf-8"))
        manifest = ShardManifest(
            stage=self.stage, source=self.source, part=self.part,
            shard=f"{self.name}.tar" if self._tar else None,
            count=len(self.samples), bytes=size, sha256=sha,
            input_start=self.input_start, input_end=self.input_end,
            input_sha256=self._digest.hexdigest(),
            rejected=len(self.rejects),
            reject_reasons=dict(sorted(Counter(r.reason for r in self.rejects).items())),
            rejects_file=rejects_file,
            member_counts=dict(sorted(self.member_counts.items())),
            config_fingerprint=self.fingerprint, code_version=code_version(),
            samples=self.samples,
        )
        if manifest.count + manifest.rejected != manifest.inputs:
            raise AccountingError(
                f"{self.name}: {manifest.inputs} inputs but {manifest.count} written + "
                f"{manifest.rejected} rejected; this is a bug, please report it"
            )
        uri.write_bytes_atomic(uri.join(self.stage_dir, f"{self.name}.manifest.json"),
                               manifest.to_json_bytes())
        return manifest

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()


def list_manifests(out: str, stage: str, source: str | None = None) -> list[ShardManifest]:
    """Committed manifests of a stage (of one source), in source and part order."""
    stage_dir = uri.join(out, stage)
    found = []
    for name in uri.listdir(stage_dir):
        m = _PART_RE.match(name)
        if m and (source is None or m.group("source") == source):
            found.append(ShardManifest.from_json_bytes(uri.read_bytes(uri.join(stage_dir, name))))
    return sorted(found, key=lambda m: (m.source, m.part))


def verify_part(out: str, m: ShardManifest) -> str | None:
    """None when the part's files match its manifest, else what is wrong."""
    if m.shard is not None:
        tar = uri.join(out, m.stage, m.shard)
        if not uri.exists(tar):
            return f"{m.shard} is missing"
        size, sha = sha256_of(tar)
        if size != m.bytes or sha != m.sha256:
            return f"{m.shard} does not match its manifest (size {size} vs {m.bytes}, sha256)"
    if m.rejects_file is not None and not uri.exists(uri.join(out, REJECTS_DIR, m.rejects_file)):
        return f"{m.rejects_file} is missing"
    return None


def delete_part(out: str, stage: str, source: str, part: int) -> None:
    """Remove a part's files, manifest first so that it stops counting as committed."""
    name = part_name(source, part)
    uri.remove(uri.join(out, stage, f"{name}.manifest.json"))
    uri.remove(uri.join(out, stage, f"{name}.tar"))
    uri.remove(uri.join(out, REJECTS_DIR, f"{name}.rejects.jsonl"))


def orphan_parts(out: str, stage: str, source: str, committed: set[int]) -> list[int]:
    """Part numbers of `source` with files on disk but no committed manifest."""
    pat = re.compile(rf"^{re.escape(source)}-(\d{{5}})\.(tar|rejects\.jsonl)$")
    parts = set()
    for folder in (uri.join(out, stage), uri.join(out, REJECTS_DIR)):
        for name in uri.listdir(folder):
            m = pat.match(name)
            if m and int(m.group(1)) not in committed:
                parts.add(int(m.group(1)))
    return sorted(parts)


def remove_part_temps(out: str, stage: str, source: str) -> list[str]:
    """Delete the temporary files of `source`'s parts that a killed writer left behind; return
    their names. A source has one writer at a time, so when it resumes they are stale, even
    while other sources of the stage are being written (their temporary files are kept)."""
    pat = re.compile(rf"^{re.escape(source)}-\d{{5}}\.(tar|rejects\.jsonl|manifest\.json)"
                     rf"{re.escape(uri.TMP_MARK)}")
    removed = []
    for folder in (uri.join(out, stage), uri.join(out, REJECTS_DIR)):
        for name in uri.listdir(folder):
            if pat.match(name):
                uri.remove(uri.join(folder, name))
                removed.append(name)
    return removed
