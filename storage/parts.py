"""Parts: a shard, its rejects and its manifest, committed together as one unit of a source.

A part accounts for a contiguous range of a source's inputs: each input in the range is either
a sample in the part's tar or a line in its rejects file. Commit order is tar, rejects, then the
manifest; the manifest is the commit marker, so a part without one is unfinished and is
removed on the next run.

An ingest part is `<source>-<range>-<sub>`: a source's inputs are cut into ranges of a fixed
number of inputs (flows.build.plan.range_size), and each range into parts by the shard limits,
so where a part starts depends only on the inputs and the config, and any worker can write a
range's parts. A stage's parts, written by one process, are `<source>-<part>`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from schemas.manifest import AccountingError, SampleEntry, ShardManifest
from schemas.rejects import RejectRecord
from schemas.version import code_version
from storage import uri
from storage.shards import TarShardWriter, sha256_of

REJECTS_DIR = "rejects"
_PART_RE = re.compile(r"^(?P<source>[A-Za-z0-9_-]+?)-(?P<part>\d{5,})(?:-(?P<sub>\d{2,}))?"
                      r"\.manifest\.json$")
_OF_SOURCE = re.compile(r"\d{5,}(?:-\d{2,})?\.manifest\.json$")  # the name after `<source>-`


def part_name(source: str, part: int, sub: int | None = None) -> str:
    return f"{source}-{part:05d}" if sub is None else f"{source}-{part:05d}-{sub:02d}"


class PartWriter:
    def __init__(self, out: str, stage: str, source: str, part: int, input_start: int,
                 fingerprint: str, sub: int | None = None) -> None:
        self.out, self.stage, self.source, self.part, self.sub = out, stage, source, part, sub
        self.name = part_name(source, part, sub)
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
            stage=self.stage, source=self.source, part=self.part, sub=self.sub,
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


def _manifest_names(out: str, stage: str, source: str | None) -> list[str]:
    names = []
    for name in uri.listdir(uri.join(out, stage)):
        if source is None:
            if _PART_RE.match(name):
                names.append(name)
        elif name.startswith(f"{source}-") and _OF_SOURCE.match(name, len(source) + 1):
            names.append(name)
    return names


def read_manifest(out: str, stage: str, name: str, samples: bool = True) -> ShardManifest:
    """One manifest; without `samples`, its per-sample entries are dropped before they are
    validated (a summary: what reruns and accounting need, in constant memory)."""
    data = json.loads(uri.read_bytes(uri.join(out, stage, name)))
    if not samples:
        data["samples"] = []
    return ShardManifest.model_validate(data)


def iter_manifests(out: str, stage: str, source: str | None = None, samples: bool = True
                   ) -> Iterator[ShardManifest]:
    """Committed manifests of a stage (of one source), one at a time, in source, part and
    sub-part order (file names sort that way)."""
    for name in sorted(_manifest_names(out, stage, source), key=_order):
        yield read_manifest(out, stage, name, samples)


def _order(name: str) -> tuple[str, int, int]:
    m = _PART_RE.match(name)
    assert m is not None
    return m.group("source"), int(m.group("part")), int(m.group("sub") or -1)


def list_manifests(out: str, stage: str, source: str | None = None, samples: bool = True
                   ) -> list[ShardManifest]:
    """Committed manifests of a stage (of one source), in source, part and sub-part order.
    Holds them all: for a stage of millions of samples, use `iter_manifests` or
    `samples=False`."""
    return list(iter_manifests(out, stage, source, samples))


class PartMismatch(RuntimeError):
    """A tar's bytes are not what its manifest says; the message says what to do."""


def _member(buf: bytes, pos: int, where: str) -> tuple[str, int, int]:
    """(name, data start, data size) of the member whose header is at `pos`, past any PAX
    extended header (which holds the name when it is long)."""
    name = None
    while True:
        h = buf[pos:pos + 512]
        if len(h) < 512:
            raise PartMismatch(f"{where}: cut short")
        size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        flag, pos = h[156:157], pos + 512
        if flag in (b"x", b"g"):
            for rec in buf[pos:pos + size].decode("utf-8", "surrogateescape").split("\n"):
                _, _, kv = rec.partition(" ")
                if kv.startswith("path="):
                    name = kv[5:]
            pos += size + (-size % 512)
            continue
        if name is None:
            prefix, base = h[345:500].split(b"\0", 1)[0], h[:100].split(b"\0", 1)[0]
            name = (prefix + b"/" + base if prefix else base).decode("utf-8", "surrogateescape")
        return name, pos, size


def read_samples(out: str, m: ShardManifest, keys: set[str]
                 ) -> Iterator[tuple[SampleEntry, dict[str, bytes]]]:
    """The samples of part `m` whose keys are in `keys`, in shard order, with their members;
    only their bytes are read: a sample's offset in the tar is the sum of the sizes the manifest
    gives the samples before it (the writer puts each sample's members together)."""
    if m.shard is None:
        return
    where = f"{m.stage}/{m.shard}"
    with uri.open_read(uri.join(out, m.stage, m.shard)) as f:
        offset = 0
        for entry in m.samples:
            if entry.key in keys:
                f.seek(offset)
                buf = f.read(entry.bytes)
                members, pos = {}, 0
                for suffix in entry.members:
                    name, start, size = _member(buf, pos, where)
                    if name != f"{entry.key}.{suffix}" or start + size > len(buf):
                        raise PartMismatch(
                            f"{where} holds {name!r} where its manifest puts "
                            f"{entry.key}.{suffix}: the shard changed after it was written. "
                            "Rebuild it (delete the part, or build with --overwrite).")
                    members[suffix] = buf[start:start + size]
                    pos = start + size + (-size % 512)
                yield entry, members
            offset += entry.bytes


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


def delete_part(out: str, stage: str, source: str, part: int, sub: int | None = None) -> None:
    """Remove a part's files, manifest first so that it stops counting as committed."""
    name = part_name(source, part, sub)
    uri.remove(uri.join(out, stage, f"{name}.manifest.json"))
    uri.remove(uri.join(out, stage, f"{name}.tar"))
    uri.remove(uri.join(out, REJECTS_DIR, f"{name}.rejects.jsonl"))


def _part_files(out: str, stage: str, source: str) -> Iterator[tuple[str, str, int, bool]]:
    """(folder, name, range, temporary) of every file of `source`'s ingest parts."""
    pat = re.compile(rf"^{re.escape(source)}-(\d{{5,}})-\d{{2,}}\."
                     rf"(?:tar|rejects\.jsonl|manifest\.json)({re.escape(uri.TMP_MARK)}.*)?$")
    for folder in (uri.join(out, stage), uri.join(out, REJECTS_DIR)):
        for name in uri.listdir(folder):
            m = pat.match(name)
            if m:
                yield folder, name, int(m.group(1)), m.group(2) is not None


def delete_ranges(out: str, stage: str, source: str, first: int, last: int | None = None
                  ) -> list[str]:
    """Remove every file of `source`'s parts in ranges `first` to `last` (all after `first`
    when None), committed or not, manifests first; return their names. A range has one writer
    at a time, so whoever (re)writes it may clear what a killed writer left there, even while
    other ranges of the source are being written."""
    found = [(f, n, k) for f, n, k, _ in _part_files(out, stage, source)
             if k >= first and (last is None or k <= last)]
    found.sort(key=lambda x: not x[1].endswith(".manifest.json"))
    for folder, name, _ in found:
        uri.remove(uri.join(folder, name))
    return [n for _, n, _ in found]


def remove_part_temps(out: str, stage: str, source: str) -> list[str]:
    """Delete the temporary files of `source`'s parts that a killed writer left behind; return
    their names. Call it only while no range of the source is being written (a planner
    starting the source); a range's own writer clears its range with `delete_ranges`."""
    removed = []
    for folder, name, _, temp in _part_files(out, stage, source):
        if temp:
            uri.remove(uri.join(folder, name))
            removed.append(name)
    return removed
