"""Partitions of a source for the flow: transformed in parallel, then sharded in input order.

The flow cuts a source's new inputs into partitions of `size` inputs, aligned to multiples of
`size` (partition k holds inputs [k*size, (k+1)*size)), and runs one task per partition on
Ray: it transforms the partition's records and writes the results to staging files of up to
CHUNK inputs each, OUT/staging/<stage>/<source>/<k>-<c>.pkl, each renamed into place as soon
as it is complete. The source's shard task runs the ordinary ingest (flows.build.ingest) with a
`StagedExecutor`, which hands back the staged results instead of transforming again, so the
parts are exactly the plain build's: same samples, same bytes.

The shard task starts when the source's first partition is done and follows the others as
they are transformed, a staging file at a time: it waits for the file, or for the marker
`<k>.ready` that the flow writes when partition k's task has ended (done or failed for good),
or for `plan.json` (the partitions the flow planned, once it has planned them all) to show
that no task will stage it. A staging file is deleted as soon as the parts holding all of its
inputs are committed, so staging holds a few files at a time rather than a whole source.

A staging file is a pickle stream: a header (its key: the source's config fingerprint, the
seed, the partition and chunk sizes), then one (input index, sha256 of the record, result)
entry per record in input order. A new flow run renames the staging files an earlier run left
to `<k>-<c>.prev` (flows.partitions.clear_markers); a partition task takes over such a file
when its entries all match the task's records, and otherwise transforms only the records that
do not match, so a flow killed during the transforms loses at most the files under way.

The shard task reads only this run's files, so never one that a partition task has yet to
check or rewrite. It transforms whatever it does not find staged (a partition task that
failed, a record that changed since), and removes the source's staging folder once its parts
are committed. Parse errors and duplicate ids are decided by the shard task, as in the plain
build; a partition task only sees the records that parsed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import posixpath
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from flows.build import DEFAULT_STAGE, leading_parts, source_fingerprint
from flows.executors import FnFactory, failed_result
from schemas.config import CorpusConfig, SourceConfig
from schemas.manifest import ShardManifest
from storage import uri
from storage.parts import list_manifests
from storage.readers import read_source

T = TypeVar("T")
STAGING_DIR = "staging"
DEFAULT_SIZE = 500  # inputs per partition: a few tens of seconds of transforms on one core
CHUNK = 100  # inputs per staging file: what the shard task trails a partition task by
PLAN_MARKER = "plan.json"
READY_SUFFIX = ".ready"
STAGED_SUFFIX = ".pkl"
PREVIOUS_SUFFIX = ".prev"  # a staging file of an earlier flow run, for this run's tasks to reuse


def staging_key(cfg: CorpusConfig, src: SourceConfig, size: int) -> str:
    """What staged results depend on: the source's config fingerprint, the seed, the sizes."""
    blob = f"{source_fingerprint(cfg, src)}:{cfg.seed}:{size}:{CHUNK}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def staging_dir(out: str, stage: str, source: str) -> str:
    return uri.join(out, STAGING_DIR, stage, source)


def chunk_of(index: int, size: int) -> tuple[int, int]:
    """(partition, chunk in it) of an input."""
    k = index // size
    return k, (index - k * size) // CHUNK


def chunk_end(k: int, c: int, size: int) -> int:
    """One past the last input of chunk c of partition k."""
    return min((k + 1) * size, k * size + (c + 1) * CHUNK)


def staging_file(out: str, stage: str, source: str, k: int, c: int = 0,
                 previous: bool = False) -> str:
    """Chunk c of partition k, as this flow run's tasks stage it (or, `previous`, as an
    earlier run left it)."""
    suffix = PREVIOUS_SUFFIX if previous else STAGED_SUFFIX
    return uri.join(staging_dir(out, stage, source), f"{k:06d}-{c:03d}{suffix}")


def ready_marker(out: str, stage: str, source: str, k: int) -> str:
    return uri.join(staging_dir(out, stage, source), f"{k:06d}{READY_SUFFIX}")


def plan_marker(out: str, stage: str, source: str) -> str:
    return uri.join(staging_dir(out, stage, source), PLAN_MARKER)


def clear_markers(out: str, stage: str, source: str, key: str) -> None:
    """Set aside what an earlier flow run left: remove its markers and its staging files of
    another key (another config, seed or size), and rename the rest to `<k>-<c>.prev`. The shard
    task reads only the files that this run's partition tasks write (they take over a previous
    file whose entries all match their records, or reuse the entries that do), so it never
    reads a file that a partition task is about to rewrite or has yet to check."""
    folder = staging_dir(out, stage, source)
    names = uri.listdir(folder)
    for name in names:
        path = uri.join(folder, name)
        if name == PLAN_MARKER or name.endswith(READY_SUFFIX):
            uri.remove(path)
        elif name.endswith((STAGED_SUFFIX, PREVIOUS_SUFFIX)) and _header_key(path) != key:
            uri.remove(path)
    for name in names:
        if name.endswith(STAGED_SUFFIX) and uri.exists(path := uri.join(folder, name)):
            # The newer of the two where both are there (a run killed between writing a file
            # and removing the previous one).
            uri.rename(path, path[: -len(STAGED_SUFFIX)] + PREVIOUS_SUFFIX)


def _header_key(path: str) -> str | None:
    try:
        with uri.open_read(path) as f:
            return pickle.load(f).get("key")
    except Exception:  # cut short, or not a staging file: nothing in it can be used
        return None


def mark_ready(out: str, stage: str, source: str, k: int, ok: bool) -> None:
    """Partition k's task has ended (`ok`: it staged its records; otherwise it failed)."""
    uri.write_bytes_atomic(ready_marker(out, stage, source, k), json.dumps({"ok": ok}).encode())


def mark_planned(out: str, stage: str, source: str, ks: list[int]) -> None:
    """Every partition of the source that the flow submitted, once it has planned them all."""
    uri.write_bytes_atomic(plan_marker(out, stage, source),
                           json.dumps({"partitions": ks}).encode())


def record_sha(payload: dict[str, Any]) -> str:
    return hashlib.sha256(payload["record"].encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class Partition:
    source: str
    k: int  # partition number: inputs [k*size, (k+1)*size)
    start: int  # first input of this run in it (a resumed source starts mid-partition)
    end: int  # one past its last input
    payloads: list[dict[str, Any]] = field(default_factory=list)  # its records that parsed


def estimated_resume(out: str, stage: str, src: SourceConfig, fingerprint: str) -> int:
    """Where the shard task will likely resume: after the committed parts it can keep, short of
    their checksums (it checks those; a part it rejects only means that it transforms those
    inputs itself)."""
    kept = leading_parts(list_manifests(out, stage, src.name), fingerprint)
    return kept[-1].input_end if kept else 0


def plan(cfg: CorpusConfig, out: str, src: SourceConfig, size: int,
         stage: str = DEFAULT_STAGE) -> Iterator[Partition]:
    """The partitions of `src`'s inputs that the next ingest will read, one at a time, each
    with the payloads of its records (read here, in the flow's process, once)."""
    if size < 1:
        raise ValueError(f"partition size must be at least 1, got {size}")
    resume = estimated_resume(out, stage, src, source_fingerprint(cfg, src))
    cur: Partition | None = None
    for item in read_source(src, start=resume):
        if item.index < resume:
            continue
        k = item.index // size
        if cur is None or cur.k != k:
            if cur is not None and cur.payloads:
                yield cur
            cur = Partition(src.name, k, item.index, item.index + 1)
        cur.end = item.index + 1
        if item.error is None and item.record is not None:
            cur.payloads.append({"source": src.name, "index": item.index,
                                 "record": item.record.model_dump_json(by_alias=True)})
    if cur is not None and cur.payloads:
        yield cur


def _entries(path: str, key: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """The entries of a staging file whose key is `key`; none if it is missing, of another key,
    or cut short (what it holds up to the cut is still good)."""
    if not uri.exists(path):
        return
    with uri.open_read(path) as f:
        try:
            header = pickle.load(f)
            if header.get("key") != key:
                return
            while True:
                yield pickle.load(f)
        except (EOFError, pickle.UnpicklingError, AttributeError, ValueError):
            return


class _Cursor:
    """Walks one staging file forward, matching entries to increasing input indices."""

    def __init__(self, path: str, key: str) -> None:
        self.it = _entries(path, key)
        self.head: tuple[int, str, dict[str, Any]] | None = next(self.it, None)

    def find(self, index: int, sha: str) -> dict[str, Any] | None:
        while self.head is not None and self.head[0] < index:
            self.head = next(self.it, None)
        if self.head is not None and self.head[0] == index and self.head[1] == sha:
            return self.head[2]
        return None

    def close(self) -> None:
        self.it.close()


def _dump(f: IO[bytes], obj: Any) -> None:
    pickle.dump(obj, f, protocol=5)


def transform_partition(cfg: CorpusConfig, out: str, part: Partition, size: int,
                        stage: str = DEFAULT_STAGE) -> dict[str, int]:
    """Transform `part`'s records into its staging files, a chunk at a time, keeping the
    entries already staged for the same records; {"records", "transformed", "reused"}."""
    src = next(s for s in cfg.sources if s.name == part.source)
    key = staging_key(cfg, src, size)
    chunks: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for p in part.payloads:
        chunks.setdefault(chunk_of(p["index"], size)[1], []).append((p, record_sha(p)))
    fn = None
    transformed = 0
    for c, staged in chunks.items():
        path = staging_file(out, stage, part.source, part.k, c)
        previous = staging_file(out, stage, part.source, part.k, c, previous=True)
        # This run's file (an earlier attempt of this task wrote it), else an earlier run's.
        reuse = path if uri.exists(path) else previous
        old = _Cursor(reuse, key)
        reused = sum(old.find(p["index"], sha) is not None for p, sha in staged)
        old.close()
        if reused == len(staged):
            if reuse == previous:
                uri.rename(previous, path)
            continue
        if fn is None:
            from flows.work import Worker, work_context

            fn = Worker(work_context(cfg, out))
        # Reread rather than hold every old result: the cursor streams the file as it is
        # rewritten.
        old = _Cursor(reuse, key)
        try:
            with uri.atomic_write(path) as f:
                _dump(f, {"key": key, "source": part.source, "partition": part.k, "chunk": c,
                          "size": size})
                for p, sha in staged:
                    result = old.find(p["index"], sha)
                    if result is None:
                        result = fn(p)
                        transformed += 1
                    _dump(f, (p["index"], sha, result))
        finally:
            old.close()
        uri.remove(previous)
    n = len(part.payloads)
    return {"records": n, "transformed": transformed, "reused": n - transformed}


class StagedExecutor:
    """Hands back the staged results of the flow's partition tasks, in input order; transforms
    what it does not find staged (and parse errors, duplicates: their results are cheap).

    With `follow`, a staging file is read only once it is there or its partition's task has
    ended (see the module docstring), so the shard task can run beside the partition tasks;
    `committed` deletes the staging files whose inputs are all in committed parts."""

    name = "staged"

    def __init__(self, cfg: CorpusConfig, out: str, size: int, stage: str = DEFAULT_STAGE,
                 follow: bool = False, poll_s: float = 0.2) -> None:
        self.out, self.size, self.stage = out, size, stage
        self.follow, self.poll_s = follow, poll_s
        self.keys = {s.name: staging_key(cfg, s, size) for s in cfg.sources}
        self.staged = self.transformed = 0
        self.waited_s = 0.0  # time spent waiting for partition tasks
        self._read: dict[str, set[tuple[int, int]]] = {}  # files read to the end, per source
        self._committed: dict[str, int] = {}  # inputs in committed parts, per source

    def _wait_for(self, source: str, k: int, c: int) -> None:
        if not self.follow:
            return
        t0 = time.monotonic()
        path = staging_file(self.out, self.stage, source, k, c)
        ready, planned = ready_marker(self.out, self.stage, source, k), None
        while not uri.exists(path, fresh=True) and not uri.exists(ready, fresh=True):
            if planned is None and uri.exists(plan_marker(self.out, self.stage, source),
                                              fresh=True):
                planned = json.loads(uri.read_bytes(plan_marker(self.out, self.stage, source)))
            if planned is not None and k not in planned["partitions"]:
                break  # no task stages it (inputs before the flow's resume point)
            time.sleep(self.poll_s)
        self.waited_s += time.monotonic() - t0

    def map_ordered(self, make_fn: FnFactory, items: Iterable[tuple[T, dict[str, Any] | None]]
                    ) -> Iterator[tuple[T, dict[str, Any] | None]]:
        fn = None
        at: tuple[str, int, int] | None = None
        cursor: _Cursor | None = None
        try:
            for tag, payload in items:
                if payload is None:
                    yield tag, None
                    continue
                result = None
                if "record" in payload:
                    source, index = payload["source"], payload["index"]
                    where = (source, *chunk_of(index, self.size))
                    if where != at:
                        if cursor is not None:
                            cursor.close()
                        if at is not None:
                            self._read.setdefault(at[0], set()).add(at[1:])
                            self._drop(at[0])
                        self._wait_for(*where)
                        cursor = _Cursor(staging_file(self.out, self.stage, *where),
                                         self.keys[source])
                        at = where
                    assert cursor is not None
                    result = cursor.find(index, record_sha(payload))
                    if result is not None:
                        self.staged += 1
                    else:
                        self.transformed += 1
                if result is None and payload.get("error"):  # decided by the shard task
                    result = failed_result(*payload["error"])
                if result is None:
                    fn = fn or make_fn()
                    result = fn(payload)
                yield tag, result
        finally:
            if cursor is not None:
                cursor.close()

    def committed(self, source: str, part: ShardManifest) -> None:
        """A part of `source` is committed: delete the staging files it completes."""
        self._committed[source] = part.input_end
        self._drop(source)

    def _drop(self, source: str) -> None:
        """Delete the staging files read to the end whose inputs are all in committed parts."""
        end = self._committed.get(source, 0)
        done = {kc for kc in self._read.get(source, ()) if chunk_end(*kc, self.size) <= end}
        for k, c in sorted(done):
            uri.remove(staging_file(self.out, self.stage, source, k, c))
        self._read[source] = self._read.get(source, set()) - done

    def close(self) -> None:
        pass


def remove_staging(out: str, stage: str, source: str) -> None:
    """Delete a source's staging folder (after its parts are committed)."""
    folder = staging_dir(out, stage, source)
    for name in uri.listdir(folder):
        uri.remove(uri.join(folder, name))
    fs, path = uri.fs_and_path(folder)
    stage_dir = posixpath.dirname(path)
    for level in (path, stage_dir, posixpath.dirname(stage_dir)):  # source, stage, staging
        try:
            if fs.exists(level) and not fs.ls(level, detail=False):
                fs.rmdir(level)
        except OSError:  # another source's task removing its own: theirs to finish
            return
