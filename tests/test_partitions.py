"""The flow's partitions: transformed apart, staged, then sharded exactly as the plain build.

These call the functions the flow's tasks call (flows.partitions), in this process; the flow
on Ray runs them in tests/test_flow.py and tests/test_faults.py.
"""

from __future__ import annotations

import copy
import json
import pickle
import threading
import time
from pathlib import Path

import pytest

from flows.build import build, ingest, prepare
from flows.partitions import (
    StagedExecutor,
    clear_markers,
    mark_planned,
    mark_ready,
    plan,
    plan_marker,
    ready_marker,
    remove_staging,
    staging_dir,
    staging_file,
    staging_key,
    transform_partition,
)
from schemas.config import CorpusConfig, load_config
from storage.parts import list_manifests

from conftest import make_caption_corpus, tars, temp_leftovers

SIZE = 4


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """14 inputs: 12 captions (2 with a missing image), a duplicate id, a record that does not
    parse."""
    cfg = make_caption_corpus(tmp_path / "in", 12, max_samples=3, bad_every=6)
    recs = json.loads((tmp_path / "in" / "cap.json").read_text())
    recs.insert(5, dict(recs[1]))  # input 5: the id of input 1 again
    recs.insert(9, {"id": "no_conversations", "image": "img/0.jpg"})  # input 9: a parse error
    (tmp_path / "in" / "cap.json").write_text(json.dumps(recs))
    return cfg


def plain_and_flow_out(tmp_path: Path, corpus: Path) -> tuple[CorpusConfig, str]:
    """The plain build in tmp_path/plain; the config prepared for a flow's OUT, and that OUT."""
    cfg = load_config(corpus)
    build(cfg, str(tmp_path / "plain"))
    out = str(tmp_path / "flow")
    return prepare(cfg, out), out


def stage_all(cfg, out: str) -> list[dict[str, int]]:
    return [transform_partition(cfg, out, p, SIZE) for p in plan(cfg, out, cfg.sources[0], SIZE)]


def test_partitions_cover_the_parsed_records_and_shard_like_the_plain_build(tmp_path, corpus):
    cfg, out = plain_and_flow_out(tmp_path, corpus)
    parts = list(plan(cfg, out, cfg.sources[0], SIZE))
    assert [(p.k, p.start, p.end) for p in parts] == [(0, 0, 4), (1, 4, 8), (2, 8, 12),
                                                      (3, 12, 14)]
    # Every record that parsed, the duplicate too (the shard task decides it), not the error.
    assert [len(p.payloads) for p in parts] == [4, 4, 3, 2]
    counts = [transform_partition(cfg, out, p, SIZE) for p in parts]
    assert sum(c["transformed"] for c in counts) == 13 and not any(c["reused"] for c in counts)

    staged = StagedExecutor(cfg, out, SIZE)
    stats, _ = ingest(cfg, out, executor=staged)
    # Every record came from the staging files; the duplicate and the parse error were decided
    # here, as in the plain build, and are not counted as transforms.
    assert (staged.staged, staged.transformed) == (12, 0)
    assert tars(Path(out)) == tars(tmp_path / "plain")
    plain_rejects = tmp_path / "plain" / "rejects"
    assert ({p.name: p.read_bytes() for p in (Path(out) / "rejects").iterdir()}
            == {p.name: p.read_bytes() for p in plain_rejects.iterdir()})
    assert stats[0].to_json()["reject_reasons"] == {"duplicate_id": 1, "missing_media": 2,
                                                   "missing_conversations": 1}
    remove_staging(out, "ingest", "cap")
    assert not (Path(out) / "staging").exists()


def test_a_partition_task_rerun_keeps_what_is_staged_and_redoes_the_rest(tmp_path, corpus):
    cfg = load_config(corpus)
    out = str(tmp_path / "flow")
    cfg = prepare(cfg, out)
    first = list(plan(cfg, out, cfg.sources[0], SIZE))[0]
    assert transform_partition(cfg, out, first, SIZE)["transformed"] == 4
    assert transform_partition(cfg, out, first, SIZE) == {"records": 4, "transformed": 0,
                                                          "reused": 4}
    # A file cut short (a disk that filled, say) keeps its whole entries.
    path = Path(staging_file(out, "ingest", "cap", 0))
    with open(path, "rb") as f:
        pickle.load(f)
        pickle.load(f)
        pickle.load(f)
        cut = f.tell()
    path.write_bytes(path.read_bytes()[:cut + 10])
    assert transform_partition(cfg, out, first, SIZE) == {"records": 4, "transformed": 2,
                                                          "reused": 2}
    # A record edited since: only that one again.
    first.payloads[3]["record"] = first.payloads[3]["record"].replace("Describe", "Portray")
    assert transform_partition(cfg, out, first, SIZE)["transformed"] == 1
    # Another config (here: the seed): nothing staged before counts.
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    assert transform_partition(other, out, first, SIZE)["transformed"] == 4
    assert temp_leftovers(Path(out)) == []


def test_the_shard_task_transforms_what_is_not_staged(tmp_path, corpus):
    cfg, out = plain_and_flow_out(tmp_path, corpus)
    stage_all(cfg, out)
    Path(staging_file(out, "ingest", "cap", 1)).unlink()  # its task failed
    bad = Path(staging_file(out, "ingest", "cap", 2))
    bad.write_bytes(b"not a pickle")  # a file of something else
    staged = StagedExecutor(cfg, out, SIZE)
    ingest(cfg, out, executor=staged)
    assert (staged.staged, staged.transformed) == (6, 6)
    assert tars(Path(out)) == tars(tmp_path / "plain")


def test_a_resumed_source_plans_only_its_new_inputs(tmp_path, corpus):
    cfg = load_config(corpus)
    out = str(tmp_path / "flow")
    build(cfg, out)
    # Nothing new: no partition to transform.
    assert list(plan(cfg, out, cfg.sources[0], SIZE)) == []
    # Two records appended: one partition from input 14 on (partition 3 holds inputs 12-15).
    recs = json.loads((corpus.parent / "cap.json").read_text())
    recs += [{**recs[0], "id": "new_a"}, {**recs[2], "id": "new_b"}]
    (corpus.parent / "cap.json").write_text(json.dumps(recs))
    [part] = list(plan(cfg, out, cfg.sources[0], SIZE))
    assert (part.k, part.start, part.end) == (3, 14, 16)
    assert [p["index"] for p in part.payloads] == [14, 15]
    with pytest.raises(ValueError, match="at least 1"):
        next(plan(cfg, out, cfg.sources[0], 0))


def test_staging_of_one_source_is_removed_with_its_leftovers(tmp_path, corpus):
    cfg = load_config(corpus)
    out = str(tmp_path / "flow")
    cfg = prepare(cfg, out)
    stage_all(cfg, out)
    folder = Path(staging_dir(out, "ingest", "cap"))
    (folder / "000001.pkl.tmp-123-0badf00d").write_bytes(b"a killed task's file")
    other = Path(staging_dir(out, "ingest", "other"))
    other.mkdir()
    (other / "000000.pkl").write_bytes(b"")
    remove_staging(out, "ingest", "cap")
    assert not folder.exists() and other.exists()
    remove_staging(out, "ingest", "other")
    assert not (Path(out) / "staging").exists()


class _Follower:
    """A shard task's ingest in a thread, following the partitions as the test marks them."""

    def __init__(self, cfg, out: str) -> None:
        self.cfg, self.out = cfg, out
        self.staged = StagedExecutor(cfg, out, SIZE, follow=True, poll_s=0.01)
        self.inputs = 0  # inputs the ingest has handed to its parts so far
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        def progress(source, inputs, written, rejected, final):
            self.inputs = inputs

        try:
            ingest(self.cfg, self.out, executor=self.staged, on_commit=self.staged.committed,
                   progress=progress)
        except BaseException as err:  # handed to the test
            self.error = err

    def settles_at(self, inputs: int) -> bool:
        """Whether the ingest reaches `inputs` and stays there (it waits for a partition)."""
        end = time.monotonic() + 60
        while self.inputs < inputs and time.monotonic() < end and self.thread.is_alive():
            time.sleep(0.01)
        time.sleep(0.3)
        return self.inputs == inputs

    def join(self) -> None:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the ingest still waits"
        if self.error is not None:
            raise self.error


def test_the_shard_task_follows_partitions_as_their_tasks_end(tmp_path, corpus):
    cfg, out = plain_and_flow_out(tmp_path, corpus)
    parts = list(plan(cfg, out, cfg.sources[0], SIZE))
    follower = _Follower(cfg, out)
    # Input 0 is a record of partition 0: nothing is read before it is staged.
    assert follower.settles_at(0)
    transform_partition(cfg, out, parts[0], SIZE)
    assert follower.settles_at(4)  # partition 0 (inputs 0-3) written; input 4 waits
    transform_partition(cfg, out, parts[1], SIZE)
    assert follower.settles_at(8)
    # Partition 2's task failed for good: once the flow marks it ended, the shard task
    # transforms its records itself.
    mark_ready(out, "ingest", "cap", 2, ok=False)
    assert follower.settles_at(12)
    # A staging file goes as soon as committed parts hold all of its inputs.
    end = max(m.input_end for m in list_manifests(out, "ingest", "cap"))
    assert end >= 4
    for k in range(2):
        assert Path(staging_file(out, "ingest", "cap", k)).exists() == ((k + 1) * SIZE > end)
    mark_planned(out, "ingest", "cap", [0, 1, 2, 3])
    transform_partition(cfg, out, parts[3], SIZE)
    follower.join()
    # Partition 2 holds inputs 8-11, of which 9 does not parse: three records transformed here.
    assert (follower.staged.staged, follower.staged.transformed) == (9, 3)
    assert follower.staged.waited_s > 1
    assert tars(Path(out)) == tars(tmp_path / "plain")


def test_the_shard_task_trails_a_partition_by_a_staging_file(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr("flows.partitions.CHUNK", 2)  # two staging files per partition of 4
    cfg, out = plain_and_flow_out(tmp_path, corpus)
    stage_all(cfg, out)
    names = sorted(p.name for p in Path(staging_dir(out, "ingest", "cap")).iterdir())
    assert names == ["000000-000.pkl", "000000-001.pkl", "000001-000.pkl", "000001-001.pkl",
                     "000002-000.pkl", "000002-001.pkl", "000003-000.pkl"]
    # The second half of partition 0 still being transformed: the first half is written.
    second = Path(staging_file(out, "ingest", "cap", 0, 1))
    second.rename(second.with_name("held-back"))
    follower = _Follower(cfg, out)
    assert follower.settles_at(2)
    second.with_name("held-back").rename(second)
    follower.join()  # every file there: no marker needed
    assert (follower.staged.staged, follower.staged.transformed) == (12, 0)
    assert tars(Path(out)) == tars(tmp_path / "plain")


def test_the_shard_task_does_not_wait_for_a_partition_the_flow_did_not_plan(tmp_path, corpus):
    cfg, out = plain_and_flow_out(tmp_path, corpus)
    for p in list(plan(cfg, out, cfg.sources[0], SIZE))[1:]:  # partition 0: before the resume
        transform_partition(cfg, out, p, SIZE)                 # point the flow estimated
        mark_ready(out, "ingest", "cap", p.k, ok=True)
    follower = _Follower(cfg, out)
    assert follower.settles_at(0)  # the flow is still planning: partition 0 may yet come
    mark_planned(out, "ingest", "cap", [1, 2, 3])
    follower.join()
    # Partition 0's four records were transformed by the shard task itself.
    assert (follower.staged.staged, follower.staged.transformed) == (8, 4)
    assert tars(Path(out)) == tars(tmp_path / "plain")


def test_a_new_flow_run_clears_what_it_must_not_read_of_the_one_before(tmp_path, corpus):
    cfg, out = plain_and_flow_out(tmp_path, corpus)
    stage_all(cfg, out)
    for k in range(4):
        mark_ready(out, "ingest", "cap", k, ok=k != 2)
    mark_planned(out, "ingest", "cap", [0, 1, 2, 3])
    assert json.loads(Path(ready_marker(out, "ingest", "cap", 2)).read_text()) == {"ok": False}
    # Partition 1 staged under another seed, partition 2's file is not a pickle at all.
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    Path(staging_file(out, "ingest", "cap", 1)).unlink()
    transform_partition(other, out, list(plan(other, out, other.sources[0], SIZE))[1], SIZE)
    Path(staging_file(out, "ingest", "cap", 2)).write_bytes(b"not a pickle")
    key = staging_key(cfg, cfg.sources[0], SIZE)
    clear_markers(out, "ingest", "cap", key)
    assert not Path(plan_marker(out, "ingest", "cap")).exists()
    # The staged results of this config stay, set aside for the new run's partition tasks to
    # reuse; the rest would only have kept the shard task from waiting for the tasks that
    # rewrite them.
    folder = Path(staging_dir(out, "ingest", "cap"))
    assert sorted(p.name for p in folder.iterdir()) == ["000000-000.prev", "000003-000.prev"]
    # The new run's shard task reads none of them before a partition task has taken it over.
    follower = _Follower(cfg, out)
    assert follower.settles_at(0)
    parts = list(plan(cfg, out, cfg.sources[0], SIZE))
    assert transform_partition(cfg, out, parts[0], SIZE) == {"records": 4, "transformed": 0,
                                                             "reused": 4}
    assert follower.settles_at(4)
    assert [transform_partition(cfg, out, p, SIZE)["transformed"] for p in parts[1:]] == [4, 3, 0]
    mark_planned(out, "ingest", "cap", [0, 1, 2, 3])
    follower.join()
    assert (follower.staged.staged, follower.staged.transformed) == (12, 0)
    assert tars(Path(out)) == tars(tmp_path / "plain")
    # A run killed after a task wrote its file but before it removed the previous one: the
    # next run keeps the newer.
    newer = Path(staging_file(out, "ingest", "cap", 0))
    older = Path(staging_file(out, "ingest", "cap", 0, previous=True))
    edited = copy.deepcopy(parts[0])
    edited.payloads[3]["record"] = edited.payloads[3]["record"].replace("Describe", "Portray")
    transform_partition(cfg, out, edited, SIZE)
    newer.rename(older)
    transform_partition(cfg, out, parts[0], SIZE)
    assert not older.exists()  # taken over
    staged = newer.read_bytes()
    transform_partition(cfg, out, edited, SIZE)
    newer.rename(older)
    newer.write_bytes(staged)
    clear_markers(out, "ingest", "cap", key)
    assert not newer.exists() and older.read_bytes() == staged
