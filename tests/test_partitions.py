"""The flow's partitions: transformed apart, staged, then sharded exactly as the plain build.

These call the functions the flow's tasks call (flows.partitions), in this process; the flow
on Ray runs them in tests/test_flow.py and tests/test_faults.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from flows.build import build, ingest, prepare
from flows.partitions import (
    StagedExecutor,
    plan,
    remove_staging,
    staging_dir,
    staging_file,
    transform_partition,
)
from schemas.config import load_config

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


def stage_all(cfg, out: str) -> list[dict[str, int]]:
    return [transform_partition(cfg, out, p, SIZE) for p in plan(cfg, out, cfg.sources[0], SIZE)]


def test_partitions_cover_the_parsed_records_and_shard_like_the_plain_build(tmp_path, corpus):
    cfg = load_config(corpus)
    build(cfg, str(tmp_path / "plain"))
    out = str(tmp_path / "flow")
    cfg = prepare(cfg, out)
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
    cfg = load_config(corpus)
    build(cfg, str(tmp_path / "plain"))
    out = str(tmp_path / "flow")
    cfg = prepare(cfg, out)
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
