"""Partitions: planned in one process, written by whoever runs them, in any order, as the plain
build's bytes; duplicate ids decided on disk; reruns keep whole ranges.

These call the functions the flow's tasks and the Ray executor call (flows.build.partitions), in this
process; the flow on Ray runs them in tests/test_flow.py and tests/test_faults.py.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.build.partitions import write_partition
from flows.build.pipeline import build, prepare
from flows.build.plan import SourcePlanner, leading_ranges, range_size, source_fingerprint
from schemas.config import load_config
from storage.dedupe import KeyStore
from storage.parts import list_manifests

from conftest import make_caption_corpus, tars, temp_leftovers


def rejects(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "rejects").glob("*.jsonl"))}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """14 inputs in ranges of 3: 12 captions (2 with a missing image), a duplicate id in another
    range than its first, a record that does not parse."""
    cfg = make_caption_corpus(tmp_path / "in", 12, max_samples=3, bad_every=6)
    recs = json.loads((tmp_path / "in" / "cap.json").read_text())
    recs.insert(5, dict(recs[1]))  # input 5 (range 1): the id of input 1 (range 0) again
    recs.insert(9, {"id": "no_conversations", "image": "img/0.jpg"})  # input 9: a parse error
    (tmp_path / "in" / "cap.json").write_text(json.dumps(recs))
    return cfg


def plan_and_write(cfg, out: str, ranges: int = 1, order=lambda parts: parts) -> dict:
    """Plan the one source, write its partitions in `order` (as workers finishing in any order
    would), account for them; the source's stats as JSON."""
    planner = SourcePlanner(cfg, cfg.sources[0], out)
    parts = list(planner.partitions(ranges))
    for p in order(parts):
        planner.add(p.start, p.end, write_partition(cfg, out, p))
    return planner.finish().to_json()


def test_partitions_written_in_any_order_give_the_plain_builds_bytes(tmp_path, corpus):
    cfg = load_config(corpus)
    build(cfg, str(tmp_path / "plain"))
    out = str(tmp_path / "parts")
    cfg = prepare(cfg, out)
    planner = SourcePlanner(cfg, cfg.sources[0], out)
    parts = list(planner.partitions(ranges=2))
    # Whole ranges of max_samples inputs, two per partition; every input handed out once.
    assert range_size(cfg) == 3
    assert [(p.start, p.end) for p in parts] == [(0, 6), (6, 12), (12, 14)]
    assert [i["index"] for p in parts for i in p.inputs] == list(range(14))
    # The planner decided the parse error and the duplicate; the workers get the rest.
    decided = {i["index"]: i["error"][0] for p in parts for i in p.inputs if "error" in i}
    assert decided == {5: "duplicate_id", 9: "missing_conversations"}
    for p in reversed(parts):
        planner.add(p.start, p.end, write_partition(cfg, out, p))
    stats = planner.finish().to_json()
    assert stats["reject_reasons"] == {"duplicate_id": 1, "missing_conversations": 1,
                                       "missing_media": 2}
    assert stats["accounted"] and stats["inputs"] == 14
    assert tars(Path(out)) == tars(tmp_path / "plain")
    assert rejects(Path(out)) == rejects(tmp_path / "plain")
    # Parts never span two ranges, and their boundaries do not depend on the partitions.
    ms = list_manifests(out, "ingest", "cap")
    assert all(m.input_start // 3 == (m.input_end - 1) // 3 == m.part for m in ms)
    assert temp_leftovers(Path(out)) == []


def test_a_result_that_does_not_account_for_its_inputs_is_refused(tmp_path, corpus):
    from schemas.manifest import AccountingError

    cfg = prepare(load_config(corpus), str(tmp_path / "out"))
    planner = SourcePlanner(cfg, cfg.sources[0], str(tmp_path / "out"))
    p = next(planner.partitions())
    result = write_partition(cfg, str(tmp_path / "out"), p)
    result["stats"]["inputs"] -= 1
    result["stats"]["rejected"] -= 1
    with pytest.raises(AccountingError, match="came back as"):
        planner.add(p.start, p.end, result)
    with pytest.raises(AccountingError, match="never came back"):
        planner.finish()


def test_a_rerun_keeps_the_leading_whole_ranges_and_rewrites_the_rest(tmp_path, corpus):
    cfg = load_config(corpus)
    build(cfg, str(tmp_path / "plain"))
    out = str(tmp_path / "out")
    cfg = prepare(cfg, out)
    planner = SourcePlanner(cfg, cfg.sources[0], out)
    parts = list(planner.partitions())
    # A killed run: ranges 0, 1 and 3 written (workers finish out of order), range 2 not, and a
    # dead writer's temporary file in range 4.
    for p in (parts[0], parts[1], parts[3]):
        write_partition(cfg, out, p)
    planner.abort()
    (Path(out) / "ingest" / "cap-00004-00.tar.tmp-1-0badf00d").write_bytes(b"half a part")
    again = SourcePlanner(cfg, cfg.sources[0], out)
    assert again.resume == 6 and again.stats.parts_reused == 2
    assert sorted(p.name for p in (Path(out) / "ingest").iterdir()) == [
        "cap-00000-00.manifest.json", "cap-00000-00.tar",
        "cap-00001-00.manifest.json", "cap-00001-00.tar"]
    rest = list(again.partitions())
    assert [p.start for p in rest] == [6, 9, 12]
    # The duplicate at input 5 is behind the resume point: the store still knows input 1's id.
    for p in rest:
        again.add(p.start, p.end, write_partition(cfg, out, p))
    again.finish()
    assert tars(Path(out)) == tars(tmp_path / "plain")
    assert rejects(Path(out)) == rejects(tmp_path / "plain")


def test_a_range_cut_short_is_written_again_whole(tmp_path):
    """Parts close by bytes inside a range; a writer killed after its range's first part left a
    part that a rerun must not continue from."""
    cfg_path = make_caption_corpus(tmp_path / "in", 12, max_samples=6)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["shard"]["max_bytes"] = 9000  # about two tiny samples per part
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    build(cfg, str(tmp_path / "plain"))
    subs = [(m.part, m.sub) for m in list_manifests(str(tmp_path / "plain"), "ingest")]
    assert len(subs) > 2 and (0, 1) in subs
    out = tmp_path / "out"
    build(cfg, str(out))
    for f in (out / "ingest").glob("cap-00001-0[1-9].*"):  # range 1 cut after its first part
        f.unlink()
    report = build(cfg, str(out))
    assert report["sources"]["cap"]["parts_reused"] == sum(k == 0 for k, _ in subs)
    assert tars(out) == tars(tmp_path / "plain")


def test_an_appended_source_rewrites_its_last_range_as_a_fresh_build_would(tmp_path):
    cfg_path = make_caption_corpus(tmp_path / "in", 8, max_samples=3)
    out = tmp_path / "out"
    build(load_config(cfg_path), str(out))  # ranges 0-2, 3-5, 6-7
    recs = json.loads((cfg_path.parent / "cap.json").read_text())
    recs += [{**recs[0], "id": f"new_{i}"} for i in range(4)]
    (cfg_path.parent / "cap.json").write_text(json.dumps(recs, indent=1))  # as it was written
    report = build(load_config(cfg_path), str(out))
    assert report["sources"]["cap"]["parts_reused"] == 2
    build(load_config(cfg_path), str(tmp_path / "fresh"))
    assert tars(out) == tars(tmp_path / "fresh")
    # Nothing new: everything kept, nothing read but the hashes.
    again = build(load_config(cfg_path), str(out))
    assert again["sources"]["cap"]["parts_reused"] == 4
    assert again["partitions"]["sources"]["cap"]["tasks"] == 0


def test_a_retried_partition_clears_only_its_own_ranges(tmp_path, corpus):
    cfg = prepare(load_config(corpus), str(tmp_path / "out"))
    out = tmp_path / "out"
    planner = SourcePlanner(cfg, cfg.sources[0], str(out))
    first, second = list(planner.partitions())[:2]
    other_writer = out / "ingest" / "cap-00001-00.tar.tmp-456-5eed5eed"  # range 1, under way
    dead = out / "ingest" / "cap-00000-00.tar.tmp-123-0badf00d"  # range 0's killed attempt
    for p in (other_writer, dead):
        p.write_bytes(b"half a part")
    write_partition(cfg, str(out), first)
    assert not dead.exists() and other_writer.exists()
    write_partition(cfg, str(out), first)  # retried after it had committed: the same part
    assert [(m.part, m.sub) for m in list_manifests(str(out), "ingest")] == [(0, 0)]
    write_partition(cfg, str(out), second)
    assert not other_writer.exists()
    planner.abort()


def test_duplicate_ids_are_decided_on_disk_across_partitions_and_reruns(tmp_path):
    """The first input that parses claims an id, even one rejected later for its media; the
    claims live in a SQLite file under OUT/state, which a rerun trusts up to its resume point."""
    cfg_path = make_caption_corpus(tmp_path / "in", 10, max_samples=2, bad_every=4)
    recs = json.loads((cfg_path.parent / "cap.json").read_text())
    # Inputs 3 and 7 are missing their images; input 3 still claims its id, so input 7, with
    # that id, is a duplicate (decided before its media are looked at).
    recs[7]["id"] = recs[3]["id"]
    recs[9]["id"] = recs[0]["id"]
    (cfg_path.parent / "cap.json").write_text(json.dumps(recs))
    cfg = load_config(cfg_path)
    out = tmp_path / "out"
    first = build(cfg, str(out))
    assert first["sources"]["cap"]["reject_reasons"] == {"duplicate_id": 2, "missing_media": 1}
    dupes = sorted(json.loads(line)["index"] for f in (out / "rejects").glob("*.jsonl")
                   for line in f.read_text().splitlines()
                   if json.loads(line)["reason"] == "duplicate_id")
    assert dupes == [7, 9]
    store = out / "state" / "ingest" / "cap.keys.sqlite"
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM keys").fetchone() == (8,)  # one per id
    before = (tars(out), rejects(out))
    # A crash after range 1: the rerun resumes at input 4 and decides inputs 7 and 9 as before,
    # from the claims on disk (it parses only the inputs after the resume point).
    for f in [*(out / "ingest").glob("cap-0000[2-9]-*"), *(out / "rejects").glob("cap-0000[2-9]-*")]:
        f.unlink()
    again = build(cfg, str(out))
    assert again["sources"]["cap"]["parts_reused"] == 2
    assert (tars(out), rejects(out)) == before
    # Without the store (or with one cut short), the rerun claims the kept inputs' ids again.
    for f in [*(out / "ingest").glob("cap-0000[2-9]-*"), *(out / "rejects").glob("cap-0000[2-9]-*")]:
        f.unlink()
    store.write_bytes(b"not a database")
    build(cfg, str(out))
    assert (tars(out), rejects(out)) == before


def test_the_key_store_claims_resets_and_starts_over(tmp_path):
    path = str(tmp_path / "k.sqlite")
    ks = KeyStore(path, "fp1")
    assert [ks.claim(k, i) for i, k in enumerate("abcab")] == [None, None, None, 0, 1]
    ks.checkpoint(5)
    ks.close()
    ks = KeyStore(path, "fp1")
    assert ks.covered == 5
    ks.reset_from(2)  # a rerun resuming at input 2: input 2's claim is forgotten
    assert ks.covered == 2 and ks.claim("c", 2) is None and ks.claim("a", 3) == 0
    ks.close()
    ks = KeyStore(path, "fp2")  # another config: nothing claimed
    assert ks.covered == 0 and ks.claim("a", 0) is None
    ks.close()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), min_size=1, max_size=14),
       per_range=st.integers(1, 4), ranges=st.integers(1, 3), cut=st.integers(0, 5))
def test_first_occurrence_wins_however_the_source_is_cut(tmp_path_factory, ids, per_range,
                                                         ranges, cut):
    """Text-only records with repeated ids: whatever the range and partition sizes, exactly the
    later occurrences are rejected as duplicate_id, and a rerun after losing the ranges from
    `cut` on decides the same."""
    root = tmp_path_factory.mktemp("dup")
    recs = [{"id": rid, "conversations": [{"from": "human", "value": f"Question {i}?"},
                                          {"from": "gpt", "value": "Answer."}]}
            for i, rid in enumerate(ids)]
    (root / "t.json").write_text(json.dumps(recs))
    (root / "c.yaml").write_text(yaml.safe_dump({"shard": {"max_samples": per_range}, "sources": [
        {"name": "t", "kind": "text", "format": "llava", "path": "t.json"}]}))
    cfg = prepare(load_config(root / "c.yaml"), str(root / "out"))
    out = str(root / "out")
    plan_and_write(cfg, out, ranges)
    expected = [i for i, rid in enumerate(ids) if rid in ids[:i]]

    def decided() -> list[int]:
        return sorted(json.loads(line)["index"] for f in (root / "out" / "rejects").glob("*")
                      for line in f.read_text().splitlines())

    assert decided() == expected
    kept = leading_ranges(list_manifests(out, "ingest", "t"),
                          source_fingerprint(cfg, cfg.sources[0]), per_range)
    assert len(kept) == -(-len(ids) // per_range)
    for m in kept[cut:]:
        for f in [*(root / "out").rglob(f"t-{m.part:05d}-*")]:
            f.unlink()
    plan_and_write(cfg, out, ranges, order=lambda parts: list(reversed(parts)))
    assert decided() == expected


def test_a_parts_chosen_samples_are_read_at_their_offsets(tmp_path):
    """What a stage copies: only the chosen samples' bytes, found by the sizes in the manifest;
    long keys (a PAX header holds the name) included, and a tar that no longer matches its
    manifest is refused by name."""
    from storage.parts import PartMismatch, read_samples
    from storage.shards import iter_samples

    cfg_path = make_caption_corpus(tmp_path / "in", 9, max_samples=9)
    recs = json.loads((cfg_path.parent / "cap.json").read_text())
    recs[4]["id"] = "x" * 140  # a key past tar's 100-character name field
    (cfg_path.parent / "cap.json").write_text(json.dumps(recs))
    out = tmp_path / "out"
    build(load_config(cfg_path), str(out))
    [m] = list_manifests(str(out), "ingest")
    tar = out / "ingest" / m.shard
    every = list(iter_samples(str(tar)))
    assert [(e.key, mem) for e, mem in read_samples(str(out), m, {s.key for s in m.samples})] \
        == every
    some = {m.samples[i].key for i in (1, 4, 8)}
    assert [(e.key, mem) for e, mem in read_samples(str(out), m, some)] == \
        [(k, mem) for k, mem in every if k in some]
    data = bytearray(tar.read_bytes())
    first = m.samples[0].key.encode()
    data[: len(first)] = first[::-1]  # the first member's name, reversed
    tar.write_bytes(bytes(data))
    with pytest.raises(PartMismatch, match="where its manifest puts"):
        list(read_samples(str(out), m, {m.samples[0].key}))
